"""EfficientViT-L/XL backbone, SAM neck and image encoder (SPEC section 2).

Module and attribute names mirror the upstream module tree (``stages.{s}.op_list.{j}``,
``context_module.main``, ``input_ops`` / ``middle`` / ``output_ops``) so that official
``efficientvit_sam_*.pt`` state dicts load with ``strict=True`` and no key surgery.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..configs import EMBED_DIM, EMBED_SIZE, BlockType, EfficientViTConfig
from .common import LayerNorm2d, QuantPoints, quant_point

#: EfficientViT uses the tanh approximation of GELU everywhere.
TanhGELU = partial(nn.GELU, approximate="tanh")


class ConvLayer(nn.Module):
    """conv (padding k // 2) -> optional norm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.norm = norm_layer(out_channels, device=device, dtype=dtype) if norm_layer else None
        self.act = act_layer() if act_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """A plain sequence stored as ``op_list`` (the upstream key layout)."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    """``main(x) + x``, or just ``main(x)`` for blocks that change shape (stride 2)."""

    def __init__(self, main: nn.Module, *, residual: bool) -> None:
        super().__init__()
        self.main = main
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x if self.residual else self.main(x)


def _layers(fewer_norm: bool, n: int, norm: type[nn.Module]) -> tuple[list[bool], list]:
    """Per-conv (bias, norm) of a block: "fewer norm" blocks keep BN only on the last conv."""
    if fewer_norm:
        return [True] * (n - 1) + [False], [None] * (n - 1) + [norm]
    return [False] * n, [norm] * n


class ResBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expand_ratio: float,
        fewer_norm: bool,
        norm_layer: type[nn.Module],
        act_layer: type[nn.Module],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        bias, norm = _layers(fewer_norm, 2, norm_layer)
        kw = dict(device=device, dtype=dtype)
        self.conv1 = ConvLayer(
            in_channels,
            mid,
            3,
            stride=stride,
            bias=bias[0],
            norm_layer=norm[0],
            act_layer=act_layer,
            **kw,
        )
        self.conv2 = ConvLayer(mid, out_channels, 3, bias=bias[1], norm_layer=norm[1], **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expand_ratio: float,
        fewer_norm: bool,
        norm_layer: type[nn.Module],
        act_layer: type[nn.Module],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        bias, norm = _layers(fewer_norm, 2, norm_layer)
        kw = dict(device=device, dtype=dtype)
        self.spatial_conv = ConvLayer(
            in_channels,
            mid,
            3,
            stride=stride,
            bias=bias[0],
            norm_layer=norm[0],
            act_layer=act_layer,
            **kw,
        )
        self.point_conv = ConvLayer(mid, out_channels, 1, bias=bias[1], norm_layer=norm[1], **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expand_ratio: float,
        fewer_norm: bool,
        norm_layer: type[nn.Module],
        act_layer: type[nn.Module],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        mid = round(in_channels * expand_ratio)
        bias, norm = _layers(fewer_norm, 3, norm_layer)
        kw = dict(device=device, dtype=dtype)
        self.inverted_conv = ConvLayer(
            in_channels, mid, 1, bias=bias[0], norm_layer=norm[0], act_layer=act_layer, **kw
        )
        self.depth_conv = ConvLayer(
            mid,
            mid,
            3,
            stride=stride,
            groups=mid,
            bias=bias[1],
            norm_layer=norm[1],
            act_layer=act_layer,
            **kw,
        )
        self.point_conv = ConvLayer(mid, out_channels, 1, bias=bias[2], norm_layer=norm[2], **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


_LOCAL_BLOCKS: dict[BlockType, type[nn.Module]] = {
    BlockType.RES: ResBlock,
    BlockType.FMB: FusedMBConv,
    BlockType.MB: MBConv,
}


class LiteMLA(QuantPoints, nn.Module):
    """ReLU linear attention with one multi-scale aggregation branch.

    ``out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps)``, per head of ``dim`` channels; the
    aggregated q/k/v (depthwise s x s then grouped 1x1) form extra heads. Quantization points
    (:class:`~leansam.modeling.common.QuantPoints`): q and k after the ReLU, v, and the head
    context ``v k^T`` (the second matrix product's input; its normaliser row, the sum of the
    keys, and the division stay in fp32 like the rest of this island).
    """

    QUANT_POINTS = ("q_quant", "k_quant", "v_quant", "ctx_quant")

    def __init__(
        self,
        channels: int,
        *,
        dim: int,
        scale: int,
        norm_layer: type[nn.Module],
        eps: float = 1e-15,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        heads = channels // dim
        total = 3 * heads * dim
        self.dim = dim
        self.eps = eps
        self.qkv = ConvLayer(channels, total, 1, **kw)
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(
                        total, total, scale, padding=scale // 2, groups=total, bias=False, **kw
                    ),
                    nn.Conv2d(total, total, 1, groups=3 * heads, bias=False, **kw),
                )
            ]
        )
        self.proj = ConvLayer(2 * heads * dim, channels, 1, norm_layer=norm_layer, **kw)
        self._init_quant_points()

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: B x (heads * 3 * dim) x H x W, each head laid out as [q | k | v]."""
        b, _, h, w = qkv.shape
        # Half precision overflows the k.q sums: this island always runs in fp32.
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            qkv = qkv.float().reshape(b, -1, 3 * self.dim, h * w)
            q, k, v = qkv.split(self.dim, dim=2)
            q = quant_point(self.q_quant, torch.relu(q))
            k = quant_point(self.k_quant, torch.relu(k))
            v = F.pad(quant_point(self.v_quant, v), (0, 0, 0, 1), value=1.0)  # ones: normaliser
            ctx = v @ k.transpose(-1, -2)  # (dim + 1) x dim per head; last row: sum of keys
            if self.ctx_quant is not None:
                ctx = torch.cat([self.ctx_quant(ctx[:, :, :-1]), ctx[:, :, -1:]], dim=2)
            out = ctx @ q
            out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        return self.proj(self.attention(qkv).to(x.dtype))


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x), then x + MBConv(x) (no pre-norm)."""

    def __init__(
        self,
        channels: int,
        *,
        dim: int,
        scale: int,
        expand_ratio: float,
        norm_layer: type[nn.Module],
        act_layer: type[nn.Module],
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.context_module = ResidualBlock(
            LiteMLA(channels, dim=dim, scale=scale, norm_layer=norm_layer, **kw), residual=True
        )
        self.local_module = ResidualBlock(
            MBConv(
                channels,
                channels,
                stride=1,
                expand_ratio=expand_ratio,
                fewer_norm=True,
                norm_layer=norm_layer,
                act_layer=act_layer,
                **kw,
            ),
            residual=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class EfficientViTBackbone(nn.Module):
    """EfficientViT-L/XL backbone; returns the feature map of every stage."""

    def __init__(self, cfg: EfficientViTConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        norm = partial(nn.BatchNorm2d, eps=cfg.norm_eps)
        act = TanhGELU
        stages = []
        for s, (width, depth) in enumerate(zip(cfg.widths, cfg.depths, strict=True)):
            kind, expand, fewer = cfg.blocks[s], cfg.expand_ratios[s], cfg.fewer_norm[s]
            if s == 0:
                ops: list[nn.Module] = [
                    ConvLayer(3, width, 3, stride=2, norm_layer=norm, act_layer=act, **kw)
                ]
            else:
                # Stride-2 block: FusedMBConv in fused stages, MBConv everywhere else.
                down = FusedMBConv if kind is BlockType.FMB else MBConv
                block = down(
                    cfg.widths[s - 1],
                    width,
                    stride=2,
                    expand_ratio=expand * 4,
                    fewer_norm=fewer,
                    norm_layer=norm,
                    act_layer=act,
                    **kw,
                )
                ops = [ResidualBlock(block, residual=False)]
            for _ in range(depth):
                if kind is BlockType.ATT:
                    ops.append(
                        EfficientViTBlock(
                            width,
                            dim=cfg.qkv_dim,
                            scale=cfg.attention_scale,
                            expand_ratio=expand,
                            norm_layer=norm,
                            act_layer=act,
                            **kw,
                        )
                    )
                else:
                    block = _LOCAL_BLOCKS[kind](
                        width,
                        width,
                        stride=1,
                        expand_ratio=expand,
                        fewer_norm=fewer,
                        norm_layer=norm,
                        act_layer=act,
                        **kw,
                    )
                    ops.append(ResidualBlock(block, residual=True))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ResizeTo(nn.Module):
    """Bicubic resize to a fixed size, computed in fp32 (bicubic overshoots in half precision),
    returned in the input's dtype."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.interpolate(
                x.float(), size=(self.size, self.size), mode="bicubic", align_corners=False
            )
        return y.to(x.dtype)


class SamNeck(nn.Module):
    """Last three stages -> 1x1 conv + BN -> resize to 64 x 64 -> sum -> FusedMBConvs -> 1x1."""

    def __init__(
        self, cfg: EfficientViTConfig, *, out_chans: int = EMBED_DIM, device=None, dtype=None
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        norm = partial(nn.BatchNorm2d, eps=cfg.norm_eps)
        w = cfg.neck_width
        self.stage_ids = tuple(cfg.neck_stages)
        self.input_ops = nn.ModuleList(
            OpSequential(
                [ConvLayer(cfg.widths[s], w, 1, norm_layer=norm, **kw), ResizeTo(EMBED_SIZE)]
            )
            for s in self.stage_ids
        )
        self.middle = OpSequential(
            [
                ResidualBlock(
                    FusedMBConv(
                        w,
                        w,
                        stride=1,
                        expand_ratio=cfg.neck_expand,
                        fewer_norm=False,
                        norm_layer=norm,
                        act_layer=TanhGELU,
                        **kw,
                    ),
                    residual=True,
                )
                for _ in range(cfg.neck_depth)
            ]
        )
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(w, out_chans, 1, bias=True, **kw)])]
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        xs = [op(feats[s]) for s, op in zip(self.stage_ids, self.input_ops, strict=True)]
        # Upstream sums right-nested, x0 + (x1 + x2); keep that order for bit parity.
        total = xs[-1]
        for x in reversed(xs[:-1]):
            total = x + total
        return self.output_ops[0](self.middle(total))


class EfficientViTImageEncoder(nn.Module):
    """B x 3 x R x R normalised image -> B x ``out_chans`` (256) x 64 x 64 embedding."""

    def __init__(
        self,
        cfg: EfficientViTConfig,
        img_size: int,
        *,
        out_chans: int = EMBED_DIM,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.backbone = EfficientViTBackbone(cfg, device=device, dtype=dtype)
        self.neck = SamNeck(cfg, out_chans=out_chans, device=device, dtype=dtype)
        self.norm = LayerNorm2d(out_chans, eps=cfg.norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.neck(self.backbone(x)))


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every eval-mode BatchNorm2d that directly follows a Conv2d (as
    ``conv`` / ``norm`` attributes of one layer, EfficientViT's ``ConvLayer``) folded into the
    convolution's weight and bias with PyTorch's ``fuse_conv_bn_eval``. Same function up to
    float rounding."""
    module = copy.deepcopy(module).eval()
    for layer in module.modules():
        conv, bn = getattr(layer, "conv", None), getattr(layer, "norm", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            layer.conv, layer.norm = fuse_conv_bn_eval(conv, bn), None
    return module
