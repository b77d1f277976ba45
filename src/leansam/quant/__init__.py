"""AHCPTQ post-training quantization (SPEC section 7).

``quantize(model, QuantConfig(...), samples)`` returns a fake-quantized copy of any leansam model
(SAM-ViT or EfficientViT-SAM); :func:`save` / :func:`load` write and read it (``leansam
quantize`` on the command line; ``create_model(name, checkpoint=q.pt)`` also loads it). The
submodules hold one job each: ``config`` (methods and bit widths), ``quantizers`` (uniform, CAG,
HLUQ, log2, AdaRound), ``modules`` (quantized layers), ``wrap`` (the model mapping), ``calibrate``,
``reconstruct``, ``api`` (:func:`quantize`), ``report``, ``io`` (files) and ``integer`` (the
integer-datapath reference).

Import cost stays out of ``import leansam``: this package is imported on use.
"""

from .api import quantize, quantize_to_file
from .calibrate import CalibSample, calibration_samples, run_samples
from .config import BIT_SETTINGS, METHODS, QuantConfig, parse_bits
from .io import load, save
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
from .report import check_active, layer_sqnr, report
from .wrap import is_quantized, prepare, quantized_tensors, quantizers

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
    "quantize_to_file",
    "quantized_tensors",
    "quantizers",
    "report",
    "round_ste",
    "run_samples",
    "save",
    "sign_fold",
    "sqnr_db",
]
