"""Segment everything: :class:`SamAutomaticMaskGenerator` (``generator``), its mask utilities
(``masks``) and the ``leansam everything`` file writer (``files``)."""

from __future__ import annotations

from .files import GENERATOR_ARGS, METADATA_HEADER, everything
from .generator import OUTPUT_MODES, SamAutomaticMaskGenerator
from .masks import (
    area_from_rle,
    box_area,
    build_all_layer_point_grids,
    build_point_grid,
    coco_encode_rle,
    generate_crop_boxes,
    mask_to_rle,
    masks_to_boxes,
    nms,
    remove_small_regions,
    rle_to_mask,
    stability_score,
)

__all__ = [
    "GENERATOR_ARGS",
    "METADATA_HEADER",
    "OUTPUT_MODES",
    "SamAutomaticMaskGenerator",
    "area_from_rle",
    "box_area",
    "build_all_layer_point_grids",
    "build_point_grid",
    "coco_encode_rle",
    "everything",
    "generate_crop_boxes",
    "mask_to_rle",
    "masks_to_boxes",
    "nms",
    "remove_small_regions",
    "rle_to_mask",
    "stability_score",
]
