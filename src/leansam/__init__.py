"""leansam: fast, exact Segment Anything (SAM and EfficientViT-SAM).

Public API::

    model = leansam.create_model("efficientvit-sam-l0", checkpoint="efficientvit_sam_l0.pt")
    predictor = leansam.SamPredictor(model)
    generator = leansam.SamAutomaticMaskGenerator(model)  # segment everything
"""

from .amg import SamAutomaticMaskGenerator
from .predictor import SamPredictor
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "__version__",
    "create_model",
    "list_models",
]
