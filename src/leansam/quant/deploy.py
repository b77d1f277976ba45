"""Integer deployment of a W8A8 leansam-quantized image encoder (issue 22).

The fake-quantized model computes in float; integer runtimes need the quantization as ONNX
``QuantizeLinear`` / ``DequantizeLinear`` (QDQ) pairs around each convolution and matrix product,
which ONNX Runtime fuses into ``QLinearConv`` / ``QLinearMatMul`` and OpenVINO into u8 x i8
convolutions. :func:`integer_encoder` builds that form of a quantized model's image encoder in
PyTorch (``torch.fake_quantize_*`` ops, which export as QDQ pairs):

============================ ===================================================================
leansam quantizer            deployed as
============================ ===================================================================
weights (8 bits, round to    int8 per output channel, symmetric, zero point 0: the same codes
nearest or AdaRound)         and scales, hence **exact** (``weights="u8"``: the same codes + 128
                             with zero point 128, exact too; ``"s7"``: halved, not exact)
plain activation (per        uint8 per tensor with the same scale and zero point: **exact**
tensor, 8 bits)
CAG (channel groups)         uint8 per tensor covering every group's range (integer kernels take
                             one activation scale; a group's zero point cannot be folded into
                             the weights): exact only with one group
HLUQ (log + uniform levels)  uint8 per tensor over the same range ``[m, m + s_log + (L_uni - 1)
                             s_uni]``: the nearest uniform equivalent, never exact
log2 (softmax output, ViT)   kept float (no uint8 grid holds the small probabilities a log grid
                             does): the product with V runs in float
============================ ===================================================================

ONNX Runtime fuses a convolution only when its output is quantized too; ``calibration`` adds
an 8-bit per-tensor quantization of every quantized layer's output, its range observed on the
calibration images. OpenVINO needs none: its convolutions take u8/i8 inputs and give float
outputs. The deployed encoder's difference from the fake-quantized one is
measured in the tests and in ``benchmarks/int8.py`` (QUANTIZATION.md, "Deployed INT8").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..modeling.common import QuantPoints
from ..modeling.sam import Sam
from .config import QuantConfig
from .modules import QuantLayer
from .quantizers import HLUQ, CAGQuantizer, Log2Quantizer, UniformQuantizer
from .wrap import (
    init_activations,
    init_weights,
    is_quantized,
    observe_activations,
    prepare,
    quantizers,
)


class ActivationQDQ(nn.Module):
    """uint8 per-tensor quantize-dequantize: ``(clamp(round(x / s) + z, 0, 255) - z) s``, exported
    as one QuantizeLinear / DequantizeLinear pair. ``exact``: whether it reproduces the leansam
    quantizer it replaces."""

    observing = False  # read by QuantLayer.quantized_input

    def __init__(self, scale: float, zero_point: int, exact: bool) -> None:
        super().__init__()
        if not (scale > 0 and 0 <= zero_point <= 255):
            raise ValueError(f"bad uint8 quantization parameters: scale {scale}, zero {zero_point}")
        self.scale, self.zero_point, self.exact = float(scale), int(zero_point), exact

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, exact={self.exact}"


#: how the weight codes are stored in the graph (see :func:`integer_encoder`)
WEIGHT_FORMATS = ("s8", "u8", "s7")


class WeightQDQ(nn.Module):
    """Per-output-channel quantize-dequantize of a weight whose values are already ``codes *
    scale``, so that the exported codes are the quantized model's own: ``s8`` int8 with zero
    point 0, ``u8`` uint8 with zero point 128 (the same values)."""

    def __init__(self, scale: torch.Tensor, unsigned: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        zero = 128 if unsigned else 0
        self.register_buffer("zero_point", torch.full((len(self.scale),), zero, dtype=torch.int32))
        self.low, self.high = (0, 255) if unsigned else (-128, 127)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(
            w, self.scale, self.zero_point, 0, self.low, self.high
        )


def _covering(lo: float, hi: float, exact: bool) -> ActivationQDQ:
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero stays exactly representable
    scale = max((hi - lo) / 255, 1e-8)
    return ActivationQDQ(scale, int(min(max(round(-lo / scale), 0), 255)), exact)


def activation_qdq(q: nn.Module) -> ActivationQDQ:
    """The uint8 per-tensor equivalent of an 8-bit activation quantizer (module table)."""
    if isinstance(q, CAGQuantizer):
        s, z = (t.detach().float() for t in q.channel_params())
        lo, hi = float((-z * s).min()), float(((q.qmax - z) * s).max())
        if q.num_groups == 1:
            return ActivationQDQ(float(s[0]), int(z[0]), exact=True)
        return _covering(lo, hi, exact=False)
    if isinstance(q, HLUQ):
        m = float(q.minimum)
        return _covering(m, m + float(q.s_log) + (q.levels_uni - 1) * float(q.s_uni), exact=False)
    if type(q) is UniformQuantizer and q.scale.numel() == 1:
        return ActivationQDQ(float(q.scale), int(q.zero_point.reshape(())), exact=True)
    raise InputError(f"no integer form for the {q.kind} quantizer in the image encoder")


def check_int8(model: nn.Module) -> QuantConfig:
    """The model's quantization settings, or a one-line InputError when it cannot be deployed on
    8-bit integer kernels: a float model, or one quantized at other widths than W8A8."""
    if not is_quantized(model):
        raise InputError(
            "not a quantized model: make one with `leansam quantize --bits w8a8` and pass it as "
            "--checkpoint"
        )
    cfg: QuantConfig = model.quant_config
    if cfg.a_bits != 8 or cfg.w_bits != 8:
        raise InputError(
            f"INT8 kernels need a W8A8 model, this one is {cfg.bits.upper()}: quantize with "
            "--bits w8a8"
        )
    return cfg


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 without 16-bit saturation (AVX512-VNNI, AVX-VNNI or
    AMX-INT8, from ``/proc/cpuinfo``; False where that cannot be read). Without it, ONNX
    Runtime's and oneDNN's u8 x s8 kernels add pairs of products in 16 bits, which saturates."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


@torch.no_grad()
def integer_encoder(
    model: Sam,
    calibration: Sequence[torch.Tensor] | None = None,
    *,
    weights: str = "s8",
    output_method: str = "percentile",
) -> tuple[nn.Module, dict]:
    """A copy of ``model.image_encoder`` (a W8A8 leansam-quantized model) with every quantizer
    replaced by its QDQ form (module table), plus a report: how many quantized tensors are exact
    and which are approximated.

    ``weights``: ``s8`` (int8 codes, zero point 0: what VNNI / AMX kernels take), ``u8`` (the
    same codes + 128 with zero point 128: exact too, and ONNX Runtime's u8 x u8 kernels do not
    saturate on CPUs without VNNI) or ``s7`` (codes halved to 7 bits, twice the scale: NNCF's
    "overflow fix" for OpenVINO on CPUs without VNNI, whose u8 x s8 convolutions saturate; not
    exact). ``calibration`` (preprocessed B x 3 x R x R images): also quantize every quantized
    layer's output, 8 bits per tensor, range by ``output_method`` (a
    :class:`~leansam.quant.UniformQuantizer` initialisation) on those images: what ONNX
    Runtime needs to fuse a convolution. Raises InputError for a model :func:`check_int8`
    refuses."""
    if weights not in WEIGHT_FORMATS:
        raise InputError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    check_int8(model)
    enc = copy.deepcopy(model.image_encoder).float().eval()
    exact, approx = 0, []
    layers = [(n, m) for n, m in enc.named_modules() if isinstance(m, QuantLayer)]
    for name, mod in layers:
        codes = mod.w_quant.codes(mod.weight)
        if codes.min() < -128 or codes.max() > 127:
            raise InputError(f"{name}: weight codes exceed int8")
        scale = mod.w_quant.scale.detach().float()
        if weights == "s7":
            codes, scale = torch.round(codes / 2).clamp(-64, 63), scale * 2
            approx.append(f"{name}.weight")
        else:
            exact += 1
        mod.weight = nn.Parameter(codes * scale.reshape([-1] + [1] * (codes.dim() - 1)), False)
        mod.w_quant = WeightQDQ(scale, unsigned=weights == "u8")
        if mod.a_quant is not None:
            mod.a_quant = activation_qdq(mod.a_quant)
            exact += mod.a_quant.exact
            if not mod.a_quant.exact:
                approx.append(f"{name}.input")
    for name, mod in enc.named_modules():
        if isinstance(mod, QuantPoints) and mod.quantized:
            for attr in mod.QUANT_POINTS:
                if isinstance(getattr(mod, attr), Log2Quantizer):
                    setattr(mod, attr, None)  # the softmax output stays float
                    approx.append(f"{name}.{attr.removesuffix('_quant')} (float)")
                    continue
                qdq = activation_qdq(getattr(mod, attr))
                setattr(mod, attr, qdq)
                exact += qdq.exact
                if not qdq.exact:
                    approx.append(f"{name}.{attr.removesuffix('_quant')}")
    left = [n for n, _ in quantizers(enc)]
    if left:
        raise RuntimeError(f"quantizers left in the deployed encoder: {left[:3]}")
    report = {"weights": weights, "exact": exact, "approximated": approx}
    report["output_requantized"] = (
        _requantize_outputs(enc, layers, calibration, output_method) if calibration else 0
    )
    return enc, report


def _requantize_outputs(
    enc: nn.Module,
    layers: list[tuple[str, QuantLayer]],
    calibration: Sequence[torch.Tensor],
    method: str,
) -> int:
    observers = {
        n: UniformQuantizer(8, method=method, learn_scale=False).observe() for n, _ in layers
    }
    handles = [m.register_forward_hook(lambda m, a, out, n=n: observers[n](out)) for n, m in layers]
    try:
        for x in calibration:
            enc(x.float())
    finally:
        for h in handles:
            h.remove()
    for name, mod in layers:
        obs = observers[name]
        obs.init_params()
        parent_name, _, attr = name.rpartition(".")
        parent = enc.get_submodule(parent_name) if parent_name else enc
        out_q = ActivationQDQ(float(obs.scale), int(obs.zero_point.reshape(())), exact=False)
        wrapped = nn.Sequential(mod, out_q)
        if isinstance(parent, nn.Sequential | nn.ModuleList) and attr.isdigit():
            parent[int(attr)] = wrapped
        else:
            setattr(parent, attr, wrapped)
    return len(layers)


@torch.no_grad()
def calibrate_encoder(
    model: Sam, images: Sequence[torch.Tensor], method: str = "percentile"
) -> Sam:
    """leansam's own W8A8 calibration of the image encoder alone (no reconstruction, no prompts),
    for the integer runtimes given a float model: ``prepare`` with ``method`` (``percentile`` by
    default: measured better than ONNX Runtime's min-max, QUANTIZATION.md) keeps leansam's fp32
    islands (stem, LayerNorms, LiteMLA's division, the neck's resize); the mask decoder stays
    float. ``images``: preprocessed 1 x 3 x R x R tensors. The percentile ranges come from the
    values the observers keep, which the first image fills (QUANTIZATION.md, "Deployed INT8");
    ``model`` is left as it is."""
    if not images:
        raise InputError("INT8 calibration needs images: pass calibration=[...] / --calib-images")
    cfg = QuantConfig(method=method, w_bits=8, a_bits=8, iters=0)
    q = prepare(model if model.dtype == torch.float32 else copy.deepcopy(model).float(), cfg)
    q.mask_decoder = copy.deepcopy(model.mask_decoder)
    init_weights(q)
    observe_activations(q, True)
    for x in images:
        q.image_encoder(x.float())
    observe_activations(q, False)
    init_activations(q)
    return q.eval()
