"""Zero-shot evaluation protocols of the papers (SPEC section 6): box, click, detector."""

from .dataset import EvalDataset, load_detections
from .predictors import BASELINES, make_mask_source
from .runner import PROTOCOLS, evaluate, markdown

__all__ = [
    "BASELINES",
    "PROTOCOLS",
    "EvalDataset",
    "evaluate",
    "load_detections",
    "make_mask_source",
    "markdown",
]
