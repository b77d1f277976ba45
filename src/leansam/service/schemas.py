"""The request bodies of the service's JSON endpoints, as pydantic models (FastAPI validates each
request against them and answers 422 / 400 before a handler runs). Checks that need the image
(coordinates inside it, label counts) are :func:`leansam.service.engine.validate_prompts`."""

from __future__ import annotations

from typing import Literal

from ..errors import require

require("pydantic", "serve")
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

Output = list[Literal["rle", "png"]]


class MaskRequest(BaseModel):
    """Prompts in original image pixels: points (x, y) with labels (1 foreground, 0 background)
    and / or boxes XYXY. Several boxes are decoded in one batch (then without points);
    ``mask_input_id`` (from an earlier answer) refines that mask."""

    model_config = ConfigDict(extra="forbid")
    points: list[tuple[float, float]] | None = None
    labels: list[int] | None = None
    boxes: list[tuple[float, float, float, float]] | None = None
    mask_input_id: str | None = Field(default=None, max_length=64)
    multimask: bool = True
    output: Output = Field(default_factory=lambda: ["rle"])


class EverythingRequest(BaseModel):
    """SAM's automatic mask generator on the uploaded image (no crop layers)."""

    model_config = ConfigDict(extra="forbid")
    points_per_side: int = Field(default=16, ge=1)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, ge=0, le=1)
    min_mask_region_area: int = Field(default=0, ge=0)
    output: Output = Field(default_factory=lambda: ["rle"])
