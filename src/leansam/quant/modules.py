"""Quantized layers: drop-in replacements that keep the wrapped layer's parameter names.

``QuantLinear`` / ``QuantConv2d`` hold the original ``weight`` and ``bias`` (so state-dict keys
only gain the quantizers' entries), a weight quantizer ``w_quant`` and an input quantizer
``a_quant``. The matmul quantization points of SPEC section 7 (q, k, v, softmax output) are
not here: the model's own attention modules have them
(:class:`leansam.modeling.common.QuantPoints`), and :mod:`leansam.quant.wrap` fills them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import Quantizer

#: input rows / maps a layer keeps while observing, for HLUQ's next-layer criterion
SAMPLE_ROWS = 2048


class QuantLayer(nn.Module):
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


class QuantLinear(QuantLayer):
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


class QuantConv2d(QuantLayer):
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
