"""AHCPTQ post-training quantization (SPEC section 7).

``quantize(model, QuantConfig(...), samples)`` returns a fake-quantized copy of any leansam model
(SAM-ViT or EfficientViT-SAM); :func:`save` / :func:`load` write and read it (``leansam
quantize`` on the command line; ``create_model(name, checkpoint=q.pt)`` also loads it). The
quantizers, the model mapping and the integer reference are in the submodules.

Import cost stays out of ``import leansam``: this package is imported on use.
"""

from .config import BIT_SETTINGS, METHODS, QuantConfig, parse_bits
from .model import (
    CalibSample,
    calibration_samples,
    check_active,
    is_quantized,
    layer_sqnr,
    load,
    prepare,
    quantize,
    quantized_tensors,
    report,
    save,
)
from .quantizers import (
    HLUQ,
    AdaRoundQuantizer,
    CAGQuantizer,
    Log2Quantizer,
    Quantizer,
    UniformQuantizer,
    round_ste,
    sign_fold,
    sqnr_db,
)

__all__ = [
    "BIT_SETTINGS",
    "HLUQ",
    "METHODS",
    "AdaRoundQuantizer",
    "CAGQuantizer",
    "CalibSample",
    "Log2Quantizer",
    "QuantConfig",
    "Quantizer",
    "UniformQuantizer",
    "calibration_samples",
    "check_active",
    "is_quantized",
    "layer_sqnr",
    "load",
    "parse_bits",
    "prepare",
    "quantize",
    "quantized_tensors",
    "report",
    "round_ste",
    "save",
    "sign_fold",
    "sqnr_db",
]
