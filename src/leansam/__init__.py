"""leansam: fast, exact Segment Anything (SAM and EfficientViT-SAM).

Public API::

    model = leansam.create_model("efficientvit-sam-l0", checkpoint="efficientvit_sam_l0.pt")
    predictor = leansam.SamPredictor(model)
    generator = leansam.SamAutomaticMaskGenerator(model)  # segment everything
"""

from .amg import SamAutomaticMaskGenerator
from .loading import create_model, load_model
from .predictor import SamPredictor
from .registry import list_models
from .version import __version__

__all__ = [
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "__version__",
    "create_model",
    "list_models",
    "load_model",
]
