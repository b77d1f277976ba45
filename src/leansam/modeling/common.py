"""Layers shared by the image encoders, the prompt encoder and the mask decoder."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a B x C x H x W tensor (SAM's and EfficientViT's).

    Both references compute ``(x - mean) / sqrt(var + eps)`` in the same operation order, so one
    class serves both and matches each bit for bit.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (transformer feed-forward)."""

    def __init__(
        self,
        embedding_dim: int,
        mlp_dim: int,
        act: type[nn.Module] = nn.GELU,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim, device=device, dtype=dtype)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim, device=device, dtype=dtype)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (SAM's hypernetwork and IoU heads)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(i, o, device=device, dtype=dtype)
            for i, o in zip(dims_in, dims_out, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x


#: while True (:func:`flush_subnormals_in_traces`), traced graphs flush subnormal softmax outputs
#: too (an elementwise select in the graph)
_FLUSH_IN_TRACE = False


@contextlib.contextmanager
def flush_subnormals_in_traces():
    """Within this context, graphs traced from :func:`softmax_ftz` (ONNX export) flush its
    subnormal outputs to zero as eager inference does: used by
    :func:`leansam.runtime.openvino_decoder`."""
    global _FLUSH_IN_TRACE
    _FLUSH_IN_TRACE = True
    try:
        yield
    finally:
        _FLUSH_IN_TRACE = False


def softmax_ftz(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax with subnormal outputs flushed to zero (float32 / bfloat16) at inference. A
    trained decoder's attention over 4,096 image tokens leaves up to ~12 % of the weights
    subnormal (below 1.2e-38); as operands of the next matrix product they take the CPU's slow
    path for subnormals (segment everything ran 2x slower, ``benchmarks/subnormal_softmax.py``),
    while their contribution is below 1.2e-38 of a sum of weights equal to 1. A plain softmax
    under autograd (the in-place flush would break its backward), in float16 (its smallest
    normal, 6e-5, is not negligible) and in traced graphs (ONNX export: the runtime decides)."""
    y = torch.softmax(x, dim=dim)
    if torch.jit.is_tracing() and _FLUSH_IN_TRACE and y.dtype != torch.float16:
        return torch.where(y > torch.finfo(y.dtype).tiny, y, torch.zeros_like(y))
    if torch.is_grad_enabled() or y.dtype == torch.float16 or torch.jit.is_tracing():
        return y
    return F.threshold_(y, torch.finfo(y.dtype).tiny, 0.0)


class QuantPoints:
    """Mixin for the attention modules: the named places between their matrix products where
    ``leansam.quant`` attaches activation quantizers (SPEC section 7: q, k, v and the softmax
    output or LiteMLA's context). Each point is ``None`` in a full-precision model, so the
    forward computes exactly what it computes without the mixin and the state dict is
    unchanged; :meth:`add_quantizers` fills them (the quantizers become submodules, so their
    state is saved under ``<module>.<point>.*``)."""

    #: the attribute names of the points, in the order :meth:`add_quantizers` takes them
    QUANT_POINTS: tuple[str, ...] = ()

    def _init_quant_points(self) -> None:
        for name in self.QUANT_POINTS:
            setattr(self, name, None)

    @property
    def quantized(self) -> bool:
        """Whether quantizers sit at the points (then fused fast paths that would skip them are
        not taken)."""
        return getattr(self, self.QUANT_POINTS[0]) is not None

    def add_quantizers(self, *quantizers: nn.Module) -> None:
        """One quantizer per point, in :attr:`QUANT_POINTS` order."""
        if len(quantizers) != len(self.QUANT_POINTS):
            raise ValueError(f"{type(self).__name__} takes {len(self.QUANT_POINTS)} quantizers")
        for name, q in zip(self.QUANT_POINTS, quantizers, strict=True):
            setattr(self, name, q)


def quant_point(q: nn.Module | None, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``x`` through the quantizer at a point, or ``x`` itself when the point is empty."""
    return x if q is None else q(x, **kwargs)
