"""SAM's ViT image encoder: windowed attention, decomposed relative positions, conv neck.

Attribute names follow ``segment_anything`` (``patch_embed.proj``, ``blocks.{i}.attn.qkv``,
``rel_pos_h``, ``neck.{0..3}``) so official ``sam_vit_*.pth`` files load strictly.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import EMBED_DIM, ViTConfig
from .common import LayerNorm2d, MLPBlock, QuantPoints, quant_point, softmax_ftz


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """B x H x W x C -> (B * nW) x window x window x C, zero-padding H and W up to the window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    (hp, wp), (h, w) = padded, size
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if (hp > h or wp > w) else x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table (2 max(q, k) - 1, C) -> q_size x k_size x C, resizing if needed."""
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_dist, mode="linear"
        )
        rel_pos = rel_pos.reshape(-1, max_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.long()]


class Attention(QuantPoints, nn.Module):
    """Multi-head self-attention with decomposed relative position terms (MViTv2); quantization
    points (:class:`~leansam.modeling.common.QuantPoints`) at q, k, v and the softmax output."""

    QUANT_POINTS = ("q_quant", "k_quant", "v_quant", "attn_quant")

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        input_size: tuple[int, int],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True, **kw)
        self.proj = nn.Linear(dim, dim, **kw)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim, **kw))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim, **kw))
        self._init_quant_points()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, n, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * n, h * w, -1).unbind(0)
        # the relative-position terms use the full-precision q (positional terms stay FP)
        qq, kq = quant_point(self.q_quant, q), quant_point(self.k_quant, k)
        attn = (qq * self.scale) @ kq.transpose(-2, -1)
        rh = get_rel_pos(h, h, self.rel_pos_h)
        rw = get_rel_pos(w, w, self.rel_pos_w)
        r_q = q.reshape(b * n, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        attn = (attn.view(b * n, h, w, h, w) + rel_h[..., None] + rel_w[..., None, :]).view(
            b * n, h * w, h * w
        )
        v = quant_point(self.v_quant, v)
        attn = softmax_ftz(attn, dim=-1)  # at inference: subnormal weights flushed
        attn = quant_point(self.attn_quant, attn, value=v)
        out = (attn @ v).view(b, n, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; window attention unless ``window_size == 0`` (global)."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        norm = partial(nn.LayerNorm, eps=1e-6, **kw)
        self.norm1 = norm(dim)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads=num_heads, input_size=attn_size, **kw)
        self.norm2 = norm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU, **kw)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, embed_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch, stride=patch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B x H x W x C


class ViTImageEncoder(nn.Module):
    """B x 3 x 1024 x 1024 normalised image -> B x ``out_chans`` (256) x 64 x 64 embedding."""

    def __init__(
        self, cfg: ViTConfig, *, out_chans: int = EMBED_DIM, device=None, dtype=None
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.img_size = cfg.img_size
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, **kw)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim, **kw))
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                input_size=(grid, grid),
                **kw,
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, out_chans, 1, bias=False, **kw),
            LayerNorm2d(out_chans, **kw),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False, **kw),
            LayerNorm2d(out_chans, **kw),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
