"""Quantizer base classes and the uniform quantizers (SPEC section 7).

Every quantizer is a small module with three states:

- *observing* (``observe()``): passes its input through unchanged and records statistics;
- *quantizing* (after ``init_params()``): returns the fake-quantized input (straight-through
  rounding, so scales can be learned by gradient descent);
- *disabled* (``enabled = False``): passes its input through; every quantizer's state is reported,
  so that a disabled one cannot inflate a result unnoticed.

During block reconstruction an activation quantizer may *drop* (QDrop): with ``drop_prob`` p > 0
and autograd on, each element keeps its full-precision value with probability p.

Here: :class:`Quantizer` (the state handling), :class:`UniformQuantizer` (per tensor or per
channel; MinMax, percentile or MSE initialisation; LSQ-style learnable scale) and
:class:`AdaRoundQuantizer` (weights with learned rounding), with the straight-through rounding
:func:`round_ste`.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import InputError


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, like ``torch.round``) with an identity gradient.

    ``x + (round(x) - x)`` is exactly ``round(x)`` in floating point (the difference is exact
    by Sterbenz's lemma, and so is the sum), so without autograd plain rounding is used."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.round()
    return x + (x.round() - x).detach()


def channel_view(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as C x N with C the channel axis (or 1 x N for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def broadcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A length-C parameter shaped to broadcast along ``axis`` of ``x``."""
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


class Quantizer(nn.Module):
    """Base class: state handling shared by all quantizers."""

    #: short name used in reports
    kind = "quantizer"

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise InputError(f"quantizer bits must be 2..16, got {bits}")
        self.bits = bits
        self.enabled = True
        self.observing = False
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        self.batches = 0
        self.drop_prob = 0.0

    def observe(self, on: bool = True) -> Quantizer:
        self.observing = on
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                self._observe(x.detach().float())
            self.batches += 1
            return x
        if not self.enabled:
            return x
        if not bool(self.initialized):
            raise RuntimeError(f"{self.kind} quantizer used before calibration (init_params)")
        xq = self.quantize(x)
        if self.drop_prob > 0 and torch.is_grad_enabled():
            return torch.where(torch.rand_like(x) < self.drop_prob, x, xq)
        return xq

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Calibration sets the parameters' shapes (per channel, per group, per weight element):
        # take the saved shapes, so that a freshly built quantizer loads a calibrated one.
        for name, t in [*self._parameters.items(), *self._buffers.items()]:
            saved = state_dict.get(prefix + name)
            if t is None or saved is None or saved.shape == t.shape:
                continue
            new = torch.empty(saved.shape, dtype=t.dtype, device=t.device)
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def learnable(self) -> list[nn.Parameter]:
        """The parameters block reconstruction trains (activation scales, rounding)."""
        return []

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


class MinMaxObserver(Quantizer):
    """Running means of the per-batch (per-channel) minimum and maximum, plus a bounded sample of
    values for MSE / percentile initialisation."""

    max_sample = 1 << 16  # values kept per channel

    def __init__(
        self, bits: int, channel_axis: int | None = None, keep_sample: bool = True
    ) -> None:
        super().__init__(bits)
        self.channel_axis = channel_axis
        self.keep_sample = keep_sample
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._sample: list[torch.Tensor] = []

    def _observe(self, x: torch.Tensor) -> None:
        v = channel_view(x, self.channel_axis)
        lo, hi = v.min(1).values, v.max(1).values
        n = self.batches
        self._min = lo if self._min is None else (self._min * n + lo) / (n + 1)
        self._max = hi if self._max is None else (self._max * n + hi) / (n + 1)
        kept = sum(s.shape[1] for s in self._sample)
        if self.keep_sample and kept < self.max_sample:
            g = torch.Generator().manual_seed(n)
            take = min(v.shape[1], self.max_sample - kept)
            idx = torch.randperm(v.shape[1], generator=g)[:take]
            self._sample.append(v[:, idx].cpu())

    def observed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(min, max, C x N sample) of the calibration data."""
        if self._min is None:
            raise RuntimeError(f"{self.kind} quantizer saw no calibration data")
        sample = torch.cat(self._sample, 1) if self._sample else torch.empty(len(self._min), 0)
        return self._min, self._max, sample

    def release(self) -> None:
        """Drop the calibration statistics (after ``init_params``)."""
        self._min = self._max = None
        self._sample = []


class UniformQuantizer(MinMaxObserver):
    """Uniform affine quantizer: ``x^ = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``.

    Arguments:
      bits: bit width.
      channel_axis: per-channel parameters along this axis (weights: 0, NCHW activations: 1,
        token activations: -1); ``None`` for per tensor.
      symmetric: signed symmetric range (z = 2^(b-1)) instead of asymmetric.
      method: ``minmax`` (observed range), ``percentile`` (0.01 / 99.99 %% of the observed values)
        or ``mse`` (range shrink factor minimising the quantization MSE on the observed values).
      learn_scale: make the scale an ``nn.Parameter`` (LSQ-style, trained by reconstruction).
    """

    kind = "uniform"
    methods = ("minmax", "percentile", "mse")

    def __init__(
        self,
        bits: int,
        *,
        channel_axis: int | None = None,
        symmetric: bool = False,
        method: str = "minmax",
        learn_scale: bool = True,
    ) -> None:
        super().__init__(bits, channel_axis)
        if method not in self.methods:
            raise InputError(f"unknown quantizer init {method!r}: use {', '.join(self.methods)}")
        self.symmetric = symmetric
        self.method = method
        self.learn_scale = learn_scale
        self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)
        self.register_buffer("zero_point", torch.zeros(1))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def _params_for(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-8)
            scale = amax / (2 ** (self.bits - 1) - 1)
            return scale, torch.full_like(scale, 2 ** (self.bits - 1))
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # zero stays exactly representable
        scale = ((hi - lo) / self.qmax).clamp(min=1e-8)
        return scale, (-lo / scale).round()

    @staticmethod
    def _fake(x, scale, zp, qmax):
        if not torch.is_grad_enabled():  # inference: the same operations, in place
            return torch.round(x / scale).add_(zp).clamp_(0, qmax).sub_(zp).mul_(scale)
        q = torch.clamp(round_ste(x / scale) + zp, 0, qmax)
        return (q - zp) * scale

    def init_params(self, weight: torch.Tensor | None = None) -> None:
        """Set scale and zero point from the observed data (activations) or from ``weight``."""
        if weight is not None:
            v = channel_view(weight.detach().float(), self.channel_axis)
            lo, hi, sample = v.min(1).values, v.max(1).values, v
        else:
            lo, hi, sample = self.observed()
        if self.method == "percentile":
            q = torch.quantile(sample.float(), torch.tensor([1e-4, 1 - 1e-4]), dim=1)
            lo, hi = q[0], q[1]
        scale, zp = self._params_for(lo, hi)
        if self.method == "mse":
            best = torch.full_like(scale, float("inf"))
            best_scale, best_zp = scale.clone(), zp.clone()
            for alpha in torch.linspace(0.3, 1.0, 36):
                s, z = self._params_for(lo * alpha, hi * alpha)
                err = (self._fake(sample, s[:, None], z[:, None], self.qmax) - sample).pow(2)
                err = err.mean(1)
                better = err < best
                best = torch.where(better, err, best)
                best_scale = torch.where(better, s, best_scale)
                best_zp = torch.where(better, z, best_zp)
            scale, zp = best_scale, best_zp
        with torch.no_grad():
            self.scale = nn.Parameter(scale.clone(), requires_grad=self.learn_scale)
            self.zero_point = zp.clone()
            self.initialized.fill_(True)
        self.observing = False

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = broadcast(self.scale, x, self.channel_axis)
        z = broadcast(self.zero_point, x, self.channel_axis)
        return self._fake(x, s.to(x.dtype), z.to(x.dtype), self.qmax)

    def learnable(self) -> list[nn.Parameter]:
        return [self.scale] if self.learn_scale else []

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Signed integer codes ``q - z`` of ``w`` (float32 arithmetic, as in :meth:`quantize`)."""
        s = broadcast(self.scale.detach().float(), w, self.channel_axis)
        z = broadcast(self.zero_point.float(), w, self.channel_axis)
        return torch.clamp(torch.round(w.float() / s) + z, 0, self.qmax) - z

    def num_params(self) -> int:
        """(scale, zero point) pairs a datapath must hold."""
        return int(self.scale.numel())


class AdaRoundQuantizer(UniformQuantizer):
    """Weights, symmetric per output channel, with learned rounding (AdaRound): the code is
    ``floor(w / s) + h(alpha)`` with the rectified sigmoid ``h`` during reconstruction and
    ``floor(w / s) + [alpha >= 0]`` after :meth:`finalize` (kept as the boolean ``up``). The
    scale starts at the MSE-optimal clipping."""

    kind = "adaround"
    zeta, gamma = 1.1, -0.1

    def __init__(self, bits: int) -> None:
        super().__init__(bits, channel_axis=0, symmetric=True, method="mse", learn_scale=False)
        self.alpha: nn.Parameter | None = None
        self.register_buffer("up", torch.zeros(1, dtype=torch.bool))

    def init_params(self, weight: torch.Tensor | None = None) -> None:
        super().init_params(weight)
        with torch.no_grad():
            s = broadcast(self.scale, weight, 0)
            rest = (weight.detach().float() / s) - torch.floor(weight.detach().float() / s)
            rest = rest.clamp(1e-4, 1 - 1e-4)  # h(alpha) = rest at the start: round to nearest
            alpha = -torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1)
            self.alpha = nn.Parameter(alpha)
            self.up = alpha >= 0

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)

    def _rounding(self) -> torch.Tensor:
        return self.h() if self.alpha is not None else self.up.float()

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        s = broadcast(self.scale, w, 0).to(w.dtype)
        z = broadcast(self.zero_point, w, 0).to(w.dtype)
        q = torch.clamp(torch.floor(w / s) + self._rounding().to(w.dtype) + z, 0, self.qmax)
        return (q - z) * s

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        s = broadcast(self.scale.float(), w, 0)
        z = broadcast(self.zero_point.float(), w, 0)
        q = torch.clamp(torch.floor(w.float() / s) + self._rounding() + z, 0, self.qmax)
        return q - z

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser pushing every h(alpha) to 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """The round-to-nearest decisions (the start of the optimisation) as an ``up`` mask."""
        s = broadcast(self.scale.detach(), weight, 0)
        w = weight.detach().float() / s
        return (w - torch.floor(w)) >= 0.5

    def finalize(self) -> None:
        """Hard rounding from now on; the soft variables are dropped."""
        if self.alpha is not None:
            self.up = (self.alpha.detach() >= 0).clone()
            self.alpha = None

    def learnable(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha is not None else []
