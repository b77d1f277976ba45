"""The log2 quantizer of softmax outputs, with PTQ4SAM's adaptive granularity (AGQ)."""

from __future__ import annotations

import torch

from .base import Quantizer, round_ste


class Log2Quantizer(Quantizer):
    """Softmax outputs in [0, 1] on a log2 grid with adaptive granularity (PTQ4SAM's AGQ):
    ``x^ = s * 2^(-k / tau)`` with ``k = round(-tau * log2(x / s))`` clamped to
    ``[0, 2^b - 2]``, and zero where ``k >= 2^b - 1``.

    ``tau = 1, s = 1`` is the plain log2 quantizer of SPEC section 7 (``search=False`` keeps
    it). With ``search`` (the default), calibration picks ``tau`` from :attr:`taus` (powers of
    two: in hardware ``2^(-k/tau)`` is a shift by ``k // tau`` times one of ``tau`` table
    entries) and ``s`` from half-octave steps below 1, minimising the squared error of the
    attention output ``x^ @ V`` against ``x @ V`` (the attention passes its ``value``): a
    finer grid than powers of two where the bit width leaves enough octaves for the small
    probabilities, plain log2 where it does not."""

    kind = "log2"
    taus = (1, 2, 4, 8, 16)
    scales = tuple(2.0 ** (-j / 2) for j in range(9))
    rows = 32  # query rows per observed batch used by the search

    def __init__(self, bits: int, *, search: bool = True) -> None:
        super().__init__(bits)
        self.search = search
        self.register_buffer("tau", torch.tensor(1.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self._errors: torch.Tensor | None = None  # taus x scales, summed over batches

    def forward(self, x: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        if self.observing and self.search and value is not None:
            with torch.no_grad():
                self._search(x.detach().float(), value.detach().float())
        return super().forward(x)

    def _observe(self, x: torch.Tensor) -> None:
        pass  # the range is [0, 1] by construction; the grid search runs in forward

    def _search(self, x: torch.Tensor, value: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.batches)
        idx = torch.randperm(x.shape[-2], generator=g)[: self.rows].to(x.device)
        p = x.index_select(-2, idx)  # the error of each query row is independent of the others
        ref = p @ value
        errors = torch.empty(len(self.taus), len(self.scales))
        for i, tau in enumerate(self.taus):
            for j, s in enumerate(self.scales):
                out = self._fake(p, torch.tensor(tau), torch.tensor(s), self.bits) @ value
                errors[i, j] = (out - ref).pow(2).mean()
        self._errors = errors if self._errors is None else self._errors + errors

    @staticmethod
    def _fake(x, tau, scale, bits: int) -> torch.Tensor:
        n = 2**bits - 1  # codes 0..n-1 are levels, code n is zero
        k = round_ste(-torch.log2(x.clamp(min=1e-20) / scale) * tau)
        val = scale * torch.pow(2.0, -torch.clamp(k, 0, n - 1) / tau)
        return torch.where(k >= n, torch.zeros_like(x), val)

    def init_params(self) -> None:
        if self._errors is not None:
            best = int(torch.argmin(self._errors))
            i, j = divmod(best, len(self.scales))
            self.tau.fill_(self.taus[i])
            self.scale.fill_(self.scales[j])
            self._errors = None
        self.initialized.fill_(True)
        self.observing = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("tau", "scale"):  # files written before the granularity search: plain log2
            state_dict.setdefault(prefix + name, torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake(x, self.tau, self.scale, self.bits).to(x.dtype)

    def num_params(self) -> int:
        return 2  # tau and s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={float(self.tau):g}, scale={float(self.scale):.4g}"
