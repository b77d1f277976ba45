"""AHCPTQ post-training quantization (SPEC section 7): quantizers and the integer reference.

Import cost stays out of ``import leansam``: this package is imported on use.
"""

from .quantizers import (
    HLUQ,
    CAGQuantizer,
    Log2Quantizer,
    Quantizer,
    UniformQuantizer,
    round_ste,
    sign_fold,
    sqnr_db,
)

__all__ = [
    "HLUQ",
    "CAGQuantizer",
    "Log2Quantizer",
    "Quantizer",
    "UniformQuantizer",
    "round_ste",
    "sign_fold",
    "sqnr_db",
]
