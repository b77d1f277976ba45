"""Fake quantizers with observers (SPEC section 7), one module per kind.

``base``: :class:`Quantizer` (observing / quantizing / disabled states, QDrop),
:class:`UniformQuantizer`, :class:`AdaRoundQuantizer`; ``hluq``: :class:`HLUQ`; ``cag``:
:class:`CAGQuantizer`; ``log2``: :class:`Log2Quantizer`; ``ops``: :func:`sign_fold`,
:func:`sqnr_db`.
"""

from .base import AdaRoundQuantizer, MinMaxObserver, Quantizer, UniformQuantizer, round_ste
from .cag import CAGQuantizer
from .hluq import HLUQ
from .log2 import Log2Quantizer
from .ops import sign_fold, sqnr_db

__all__ = [
    "HLUQ",
    "AdaRoundQuantizer",
    "CAGQuantizer",
    "Log2Quantizer",
    "MinMaxObserver",
    "Quantizer",
    "UniformQuantizer",
    "round_ste",
    "sign_fold",
    "sqnr_db",
]
