"""Fake quantizers with observers (SPEC section 7).

Every quantizer is a small module with three states:

- *observing* (``observe()``): passes its input through unchanged and records statistics;
- *quantizing* (after ``init_params()``): returns the fake-quantized input (straight-through
  rounding, so scales can be learned by gradient descent);
- *disabled* (``enabled = False``): passes its input through; every quantizer's state is reported,
  so that a disabled one cannot inflate a result unnoticed.

During block reconstruction an activation quantizer may *drop* (QDrop): with ``drop_prob`` p > 0
and autograd on, each element keeps its full-precision value with probability p.

Quantizers here: :class:`UniformQuantizer` (per tensor or per channel; MinMax, percentile or MSE
initialisation; LSQ-style learnable scale), :class:`HLUQ` (hybrid log-uniform, for post-GELU/ReLU
inputs), :class:`CAGQuantizer` (per-channel parameters merged into groups by KMeans) and
:class:`Log2Quantizer` (softmax outputs), and :class:`AdaRoundQuantizer` (weights with learned
rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, like ``torch.round``) with an identity gradient.

    ``x + (round(x) - x)`` is exactly ``round(x)`` in floating point (the difference is exact
    by Sterbenz's lemma, and so is the sum), so without autograd plain rounding is used."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.round()
    return x + (x.round() - x).detach()


def _channel_view(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as C x N with C the channel axis (or 1 x N for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
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


class _MinMaxObserver(Quantizer):
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
        v = _channel_view(x, self.channel_axis)
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


class UniformQuantizer(_MinMaxObserver):
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
            v = _channel_view(weight.detach().float(), self.channel_axis)
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
        s = _broadcast(self.scale, x, self.channel_axis)
        z = _broadcast(self.zero_point, x, self.channel_axis)
        return self._fake(x, s.to(x.dtype), z.to(x.dtype), self.qmax)

    def learnable(self) -> list[nn.Parameter]:
        return [self.scale] if self.learn_scale else []

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Signed integer codes ``q - z`` of ``w`` (float32 arithmetic, as in :meth:`quantize`)."""
        s = _broadcast(self.scale.detach().float(), w, self.channel_axis)
        z = _broadcast(self.zero_point.float(), w, self.channel_axis)
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
            s = _broadcast(self.scale, weight, 0)
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
        s = _broadcast(self.scale, w, 0).to(w.dtype)
        z = _broadcast(self.zero_point, w, 0).to(w.dtype)
        q = torch.clamp(torch.floor(w / s) + self._rounding().to(w.dtype) + z, 0, self.qmax)
        return (q - z) * s

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        s = _broadcast(self.scale.float(), w, 0)
        z = _broadcast(self.zero_point.float(), w, 0)
        q = torch.clamp(torch.floor(w.float() / s) + self._rounding() + z, 0, self.qmax)
        return q - z

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser pushing every h(alpha) to 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """The round-to-nearest decisions (the start of the optimisation) as an ``up`` mask."""
        s = _broadcast(self.scale.detach(), weight, 0)
        w = weight.detach().float() / s
        return (w - torch.floor(w)) >= 0.5

    def finalize(self) -> None:
        """Hard rounding from now on; the soft variables are dropped."""
        if self.alpha is not None:
            self.up = (self.alpha.detach() >= 0).clone()
            self.alpha = None

    def learnable(self) -> list[nn.Parameter]:
        return [self.alpha] if self.alpha is not None else []


class HLUQ(_MinMaxObserver):
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


class CAGQuantizer(_MinMaxObserver):
    """Channel-aware grouping (AHCPTQ): per-channel asymmetric (scale, zero point) from
    calibration, then :meth:`regroup` merges channels with KMeans into fewer groups; group zero
    points are rounded and frozen, group scales stay learnable. ``channel_axis`` is the channel
    dimension of the input (``-1`` for token activations)."""

    kind = "cag"

    def __init__(self, bits: int, *, channel_axis: int = -1) -> None:
        super().__init__(bits, channel_axis, keep_sample=False)  # min / max are enough
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("group", torch.zeros(1, dtype=torch.long))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def num_groups(self) -> int:
        return int(self.scale.numel())

    def init_params(self) -> None:
        lo, hi, _ = self.observed()
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / self.qmax).clamp(min=1e-8)
        with torch.no_grad():
            self.scale = nn.Parameter(scale.clone())
            self.zero_point = (-lo / scale).round()
            self.group = torch.arange(len(scale))
            self.initialized.fill_(True)
        self.observing = False

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, zero point) as used in the forward (through the groups)."""
        return self.scale[self.group], self.zero_point[self.group]

    def regroup(self, n_groups: int, seed: int = 0, merge: str = "range") -> None:
        """Merge the channels' current (scale, zero point) into ``n_groups`` KMeans clusters
        (n_init 10, fixed seed). ``merge="mean"``: each group starts at its members' mean
        (zero point rounded); ``"range"``: at the MinMax parameters of the union of its members'
        ranges (no member is clipped)."""
        from ..errors import require

        if n_groups >= self.num_groups:
            return
        kmeans = require("sklearn.cluster", "quant").KMeans
        scale, zp = (t.detach().float() for t in self.channel_params())
        # scales are tiny next to zero points: standardise both features for the clustering
        feats = torch.stack([scale, zp], 1)
        feats = (feats - feats.mean(0)) / feats.std(0).clamp(min=1e-12)
        labels = kmeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(
            feats.double().numpy()
        )
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.group.device)
        if merge == "range":
            lo, hi = -zp * scale, (self.qmax - zp) * scale
            los = torch.stack([lo[labels == k].min() for k in range(n_groups)])
            his = torch.stack([hi[labels == k].max() for k in range(n_groups)])
            new_scale = ((his - los) / self.qmax).clamp(min=1e-8)
            new_zp = (-los / new_scale).round()
        else:
            new_scale = torch.stack([scale[labels == k].mean() for k in range(n_groups)])
            new_zp = torch.stack([zp[labels == k].mean() for k in range(n_groups)]).round()
        with torch.no_grad():
            self.scale = nn.Parameter(new_scale.to(self.scale.device))
            self.zero_point = new_zp.to(self.zero_point.device)
            self.group = labels

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.channel_params()
        s = _broadcast(scale, x, self.channel_axis).to(x.dtype)
        z = _broadcast(zp, x, self.channel_axis).to(x.dtype)
        return UniformQuantizer._fake(x, s, z, self.qmax)

    def num_params(self) -> int:
        return self.num_groups

    def learnable(self) -> list[nn.Parameter]:
        return [self.scale]


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


def sign_fold(q_proj: nn.Linear, k_proj: nn.Linear, keys: torch.Tensor) -> torch.Tensor:
    """Bimodal key fold (PTQ4SAM): flip the sign of every key channel whose mean over ``keys``
    (the layer's input sample, ... x C_in) is negative, in both ``k_proj`` and ``q_proj`` rows,
    so that q . k is unchanged while each key channel becomes one-sided. Returns the signs."""
    with torch.no_grad():
        k = k_proj(keys.float()).reshape(-1, k_proj.out_features)
        signs = torch.where(k.mean(0) < 0, -1.0, 1.0)
        for lin in (q_proj, k_proj):
            lin.weight.mul_(signs[:, None].to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.mul_(signs.to(lin.bias.dtype))
    return signs


def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.float() - quantized.float()).pow(2).mean()
    signal = reference.float().pow(2).mean()
    return float(10 * math.log10(float(signal) / max(float(noise), 1e-30)))
