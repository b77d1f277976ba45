"""Quantized layers: drop-in replacements that keep the wrapped layer's parameter names.

``QuantLinear`` / ``QuantConv2d`` hold the original ``weight`` and ``bias`` (so state-dict keys
only gain the quantizers' entries), a weight quantizer ``w_quant`` and an input quantizer
``a_quant``. The attention classes subclass the model's own attention modules and add the
matmul quantization points of SPEC section 7 (q, k, v, softmax output); with every quantizer
disabled each computes exactly what the module it replaces computes.

The decoder's inference fast paths (``transformer.Attention.attend_*``) fold projections into
each other, which would skip quantization points; :class:`QuantDecoderAttention` routes them
through the plain, quantized forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import efficientvit, transformer, vit
from .quantizers import Quantizer

#: input rows / maps a layer keeps while observing, for HLUQ's next-layer criterion
SAMPLE_ROWS = 2048


def _maybe(q: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if q is None else q(x)


class _QuantLayer(nn.Module):
    """Shared parts of the quantized linear and convolution."""

    def __init__(
        self, weight: nn.Parameter, bias, w_quant: Quantizer, a_quant: Quantizer | None, role: str
    ):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.w_quant = w_quant
        self.a_quant = a_quant
        #: which rule picked the input quantizer: "cag", "hluq" or "plain"
        self.role = role
        self._sample: torch.Tensor | None = None

    def _keep(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def input_sample(self) -> torch.Tensor | None:
        return self._sample

    def release(self) -> None:
        self._sample = None

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quant is None:
            return x
        if self.a_quant.observing:
            self._keep(x.detach())
        return self.a_quant(x)

    def quantized_weight(self) -> torch.Tensor:
        return self.w_quant(self.weight)


class QuantLinear(_QuantLayer):
    def __init__(self, linear: nn.Linear, w_quant, a_quant, role: str = "plain") -> None:
        super().__init__(linear.weight, linear.bias, w_quant, a_quant, role)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _keep(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if self._sample is None or len(self._sample) < SAMPLE_ROWS:
            g = torch.Generator().manual_seed(len(rows))
            idx = torch.randperm(len(rows), generator=g)[: SAMPLE_ROWS // 4]
            new = rows[idx.to(rows.device)].float().cpu()
            self._sample = new if self._sample is None else torch.cat([self._sample, new])

    def fp(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in full precision (for HLUQ's next-layer criterion)."""
        return F.linear(x, self.weight.detach().float(), _detach(self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, role={self.role}"


class QuantConv2d(_QuantLayer):
    def __init__(self, conv: nn.Conv2d, w_quant, a_quant, role: str = "plain") -> None:
        super().__init__(conv.weight, conv.bias, w_quant, a_quant, role)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def _keep(self, x: torch.Tensor) -> None:
        if self._sample is None:  # the first map, at most 32 x 32
            self._sample = x[:1, :, :32, :32].float().cpu()

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def fp(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight.detach().float(), _detach(self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"groups={self.groups}, role={self.role}"
        )


def _detach(b):
    return None if b is None else b.detach().float()


class QuantViTAttention(vit.Attention):
    """SAM-ViT attention with q, k, v (per tensor) and the softmax output (log2) quantized;
    the relative-position terms use the full-precision q (positional terms stay FP)."""

    def add_quantizers(self, q, k, v, softmax) -> None:
        self.q_quant, self.k_quant, self.v_quant, self.attn_quant = q, k, v, softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, n, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * n, h * w, -1).unbind(0)
        attn = (self.q_quant(q) * self.scale) @ self.k_quant(k).transpose(-2, -1)
        rh = vit.get_rel_pos(h, h, self.rel_pos_h)
        rw = vit.get_rel_pos(w, w, self.rel_pos_w)
        r_q = q.reshape(b * n, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        attn = (attn.view(b * n, h, w, h, w) + rel_h[..., None] + rel_w[..., None, :]).view(
            b * n, h * w, h * w
        )
        v = self.v_quant(v)
        attn = self.attn_quant(attn.softmax(dim=-1), value=v)
        out = (attn @ v).view(b, n, h, w, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(b, h, w, -1))


class QuantDecoderAttention(transformer.Attention):
    """Two-way-transformer attention with the projected q, k, v and the softmax output
    quantized. The folded inference paths of the base class would bypass the quantization
    points: they all run the plain forward here (broadcasting a shared 1-image side)."""

    def add_quantizers(self, q, k, v, softmax) -> None:
        self.q_quant, self.k_quant, self.v_quant, self.attn_quant = q, k, v, softmax

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.q_quant(self._heads(self.q_proj(q)))
        k = self.k_quant(self._heads(self.k_proj(k)))
        v = self.v_quant(self._heads(self.v_proj(v)))
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        out = self.attn_quant(attn, value=v) @ v
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    def attend_to_shared_image(self, q, k, v):
        return self(q, k, v)

    def attend_to_image(self, q, k, v):
        return self(q, k, v)

    def attend_from_image(self, q, k, v, *, residual, project_q):
        return residual + self(q, k, v)


class QuantLiteMLA(efficientvit.LiteMLA):
    """EfficientViT's ReLU linear attention with its matmul inputs quantized per tensor: q and k
    after the ReLU, v, and the head context ``v k^T`` (the second matmul's input). The
    normaliser row (the sum of the keys) and the division stay in fp32, like the rest of this
    island."""

    def add_quantizers(self, q, k, v, context) -> None:
        self.q_quant, self.k_quant, self.v_quant, self.ctx_quant = q, k, v, context

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, h, w = qkv.shape
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            qkv = qkv.float().reshape(b, -1, 3 * self.dim, h * w)
            q, k, v = qkv.split(self.dim, dim=2)
            q, k = self.q_quant(torch.relu(q)), self.k_quant(torch.relu(k))
            v = F.pad(self.v_quant(v), (0, 0, 0, 1), value=1.0)
            ctx = v @ k.transpose(-1, -2)  # (dim + 1) x dim per head; last row: sum of keys
            ctx = torch.cat([self.ctx_quant(ctx[:, :, :-1]), ctx[:, :, -1:]], dim=2)
            out = ctx @ q
            out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(b, -1, h, w)
