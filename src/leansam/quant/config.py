"""What a quantization run does: method, bit widths, calibration and reconstruction settings."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from ..errors import InputError

#: method -> (block reconstruction, CAG at the CAG points, HLUQ at the post-activation points)
METHODS: dict[str, tuple[bool, bool, bool]] = {
    "minmax": (False, False, False),
    "percentile": (False, False, False),
    "qdrop": (True, False, False),
    "ahcptq": (True, True, True),
    "ahcptq-no-hluq": (True, True, False),
    "ahcptq-no-cag": (True, False, True),
}

#: the bit settings the project reports (any WnAm with 2 <= n, m <= 8 is accepted)
BIT_SETTINGS = ("w8a8", "w6a6", "w5a5", "w4a4")

#: CAG's progressive grouping (SPEC section 7), applied at 20/40/60/80 % of the iterations
CAG_GROUPS = (32, 16, 8, 4)


def parse_bits(text: str) -> tuple[int, int]:
    """``"w4a4"`` -> (4, 4)."""
    m = re.fullmatch(r"w(\d+)a(\d+)", text.strip().lower())
    if not m or not all(2 <= int(b) <= 8 for b in m.groups()):
        raise InputError(f"bits must look like w4a4 (weights 2..8, activations 2..8), got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class QuantConfig:
    """Arguments of :func:`leansam.quant.quantize`.

    Attributes:
      method: one of :data:`METHODS`.
      w_bits, a_bits: weight and activation bit widths (one width for all activations).
      iters: reconstruction iterations per block (the paper uses 20,000; a few hundred fit a CPU).
      drop_prob: QDrop probability of keeping an activation in full precision while
        reconstructing.
      round_reg: AdaRound regulariser weight; its beta anneals ``beta_start`` -> ``beta_end``
        after ``warmup`` (a fraction of ``iters``) without it.
      lr_round, lr_scale: Adam learning rates of the rounding variables and of the activation
        scales (the latter with a cosine decay).
      kernel_bug: HLUQ with the published kernel's uniform-region collapse (only to reproduce
        published numbers).
      sign_fold: fold the sign of bimodal decoder attention keys into q/k projections (PTQ4SAM;
        methods with reconstruction only).
      cag_merge: how CAG merges a group's channels: ``range`` (the default: MinMax over the
        members' ranges, so no channel is clipped) or ``mean`` of their (scale, zero point), the
        KMeans centroid (clips the group's wide channels; measured worse at a CPU budget, see
        QUANTIZATION.md).
      softmax: the softmax-output quantizer: ``agq`` (log2 codes with a calibrated
        granularity ``2^(-k/tau)`` and top level, PTQ4SAM's adaptive granularity, as the
        published AHCPTQ code uses) or ``log2`` (plain powers of two, SPEC section 7's formula).
        The same for every method.
      keep_8bit: quantized tensors kept at 8 bits whatever ``w_bits`` / ``a_bits`` say, named
        as :func:`leansam.quant.report` lists them (e.g.
        ``mask_decoder.transformer.layers.0.cross_attn_image_to_token.q``) or by a module name
        (every quantized tensor under it): mixed precision for the few tensors a model is most
        sensitive to (``benchmarks/quant_diagnosis.py --breakdown`` finds them;
        QUANTIZATION.md). Empty by default: one width for all.
      seed: calibration sampling, dropping, KMeans.
    """

    method: str = "ahcptq"
    w_bits: int = 4
    a_bits: int = 4
    iters: int = 200
    drop_prob: float = 0.5
    round_reg: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr_round: float = 1e-3
    lr_scale: float = 4e-5
    kernel_bug: bool = False
    sign_fold: bool = True
    cag_merge: str = "range"
    softmax: str = "agq"
    seed: int = 0
    keep_8bit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.keep_8bit, str) or not all(
            isinstance(p, str) and p for p in self.keep_8bit
        ):
            raise InputError(
                f"keep_8bit must be a tuple of tensor or module names, got {self.keep_8bit!r}"
            )
        object.__setattr__(self, "keep_8bit", tuple(self.keep_8bit))
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise InputError(f"{name} must be 2..8, got {getattr(self, name)}")
        if self.iters < 0:
            raise InputError(f"iters must be >= 0, got {self.iters}")
        if self.cag_merge not in ("mean", "range"):
            raise InputError(f"cag_merge must be 'mean' or 'range', got {self.cag_merge!r}")
        if self.softmax not in ("agq", "log2"):
            raise InputError(f"softmax must be 'agq' or 'log2', got {self.softmax!r}")
        if not 0 <= self.drop_prob < 1:
            raise InputError(f"drop_prob must be in [0, 1), got {self.drop_prob}")

    @classmethod
    def from_bits(cls, method: str, bits: str, **kw) -> QuantConfig:
        w, a = parse_bits(bits)
        return cls(method=method, w_bits=w, a_bits=a, **kw)

    @property
    def reconstruct(self) -> bool:
        return METHODS[self.method][0]

    @property
    def cag(self) -> bool:
        return METHODS[self.method][1]

    @property
    def hluq(self) -> bool:
        return METHODS[self.method][2]

    @property
    def bits(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        # files from before these options: plain log2 softmax, CAG groups merged by mean
        d = {"softmax": "log2", "cag_merge": "mean", **d}
        return cls(**{k: v for k, v in d.items() if k in known})
