"""AHCPTQ's hybrid log-uniform quantizer (HLUQ) for post-GELU / post-ReLU activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...errors import InputError
from .base import MinMaxObserver, round_ste


class HLUQ(MinMaxObserver):
    """Hybrid log-uniform quantizer (AHCPTQ) for post-GELU / post-ReLU tensors, per tensor.

    With ``L = 2^b`` levels, ``L_log = g L`` logarithmic levels below ``s_log`` and
    ``L_uni = L - L_log`` uniform levels from ``s_log`` up in steps ``s_uni``, on ``x' = x - m``:

    - ``x' <= s_log``: ``k = round(-log2(x' / s_log))``; ``k >= L_log`` gives 0, else
      ``s_log 2^-k``;
    - otherwise ``s_log + clamp(round((x' - s_log) / s_uni), 0, L_uni - 1) s_uni``;

    and ``x^ = x^' + m``. Exactly ``2^b`` distinct output values. ``kernel_bug=True`` reproduces
    the published CUDA kernel, where uniform-region values with ``x' >= L_log`` collapse to
    ``m + s_log``; only for reproducing published numbers.
    """

    kind = "hluq"
    r_grid = (0.1, 0.3, 0.5)
    g_grid = (1 / 8, 1 / 4, 1 / 2)

    def __init__(self, bits: int, *, kernel_bug: bool = False) -> None:
        super().__init__(bits, None)
        self.kernel_bug = kernel_bug
        self.s_log = nn.Parameter(torch.ones(()))
        self.s_uni = nn.Parameter(torch.ones(()))
        self.register_buffer("minimum", torch.zeros(()))
        self.register_buffer("g", torch.tensor(0.25))

    @property
    def levels_log(self) -> int:
        return round(float(self.g) * 2**self.bits)

    @property
    def levels_uni(self) -> int:
        return 2**self.bits - self.levels_log

    @staticmethod
    def candidate(r: float, g: float, value_range: float, bits: int) -> tuple[float, float]:
        """(s_log, s_uni) for range ratio ``r`` and log share ``g`` (SPEC section 7)."""
        s_log = r * value_range
        s_uni = (1 - r) * value_range / ((2**bits - 1) * (1 - g))
        return s_log, s_uni

    def _hluq(self, x: torch.Tensor, s_log, s_uni, n_log: int, n_uni: int) -> torch.Tensor:
        xs = x - self.minimum.to(x.dtype)
        ratio = torch.clamp(xs, min=1e-20) / s_log
        k = round_ste(-torch.log2(ratio))
        k_clamped = torch.clamp(k, 0, n_log - 1)
        log_val = torch.where(k >= n_log, torch.zeros_like(xs), s_log * torch.pow(2.0, -k_clamped))
        j = torch.clamp(round_ste((xs - s_log) / s_uni), 0, n_uni - 1)
        uni_val = s_log + j * s_uni
        if self.kernel_bug:
            uni_val = torch.where(xs >= n_log, s_log.expand_as(xs), uni_val)
        return torch.where(xs <= s_log, log_val, uni_val) + self.minimum.to(x.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s_log, s_uni = self.s_log.to(x.dtype), self.s_uni.to(x.dtype)
        return self._hluq(x, s_log, s_uni, self.levels_log, self.levels_uni)

    def init_params(
        self, next_layer: Callable[[torch.Tensor], torch.Tensor] | None = None, sample=None
    ) -> tuple[float, float]:
        """Grid search of (r, g): keep the pair minimising the MSE of ``next_layer``'s output
        (the following linear layer in full precision) on ``sample`` (default: the observed
        values), or of the quantized values themselves without ``next_layer``. Returns (r, g)."""
        lo, hi, observed = self.observed()
        if next_layer is not None and sample is None:
            raise InputError("HLUQ.init_params: a next_layer criterion needs its input sample")
        x = observed.reshape(-1) if sample is None else sample
        value_range = float(hi - lo)
        self.minimum.fill_(float(lo))
        ref = next_layer(x) if next_layer is not None else x
        best, choice = float("inf"), (self.r_grid[0], self.g_grid[0])
        with torch.no_grad():
            for r in self.r_grid:
                for g in self.g_grid:
                    s_log, s_uni = self.candidate(r, g, max(value_range, 1e-8), self.bits)
                    n_log = round(g * 2**self.bits)
                    xq = self._hluq(
                        x, torch.tensor(s_log), torch.tensor(s_uni), n_log, 2**self.bits - n_log
                    )
                    out = next_layer(xq) if next_layer is not None else xq
                    err = float((out - ref).pow(2).mean())
                    if err < best:
                        best, choice = err, (r, g)
            r, g = choice
            s_log, s_uni = self.candidate(r, g, max(value_range, 1e-8), self.bits)
            self.s_log.fill_(s_log)
            self.s_uni.fill_(s_uni)
            self.g.fill_(g)
            self.initialized.fill_(True)
        self.observing = False
        return choice

    def levels(self) -> torch.Tensor:
        """The sorted distinct output values (2^b of them)."""
        n_log, n_uni = self.levels_log, self.levels_uni
        m, s_log, s_uni = self.minimum, self.s_log.detach(), self.s_uni.detach()
        log_vals = s_log * torch.pow(2.0, -torch.arange(n_log, dtype=torch.float32))
        uni_vals = s_log + torch.arange(n_uni, dtype=torch.float32) * s_uni
        vals = torch.cat([torch.zeros(1), log_vals, uni_vals]) + m
        return torch.unique(vals)

    def num_params(self) -> int:
        return 1  # (s_log, s_uni, m) per tensor

    def learnable(self) -> list[nn.Parameter]:
        return [self.s_log, self.s_uni]

    def extra_repr(self) -> str:
        return super().extra_repr() + (", kernel_bug=True" if self.kernel_bug else "")
