"""Minimal COCO instance-annotation reading (json + pycocotools' mask codec)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import InputError, require
from ..io import read_json


def load_coco(annotations: str | os.PathLike) -> tuple[list[dict], dict[int, list[dict]]]:
    """(images sorted by id, annotations grouped by image id) of a COCO instances JSON."""
    path = Path(annotations)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise InputError(f"{path} is not COCO instances JSON (needs 'images' and 'annotations')")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return sorted(data["images"], key=lambda im: im["id"]), dict(by_image)


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """A COCO annotation's segmentation (polygons, RLE or uncompressed RLE) -> H x W bool."""
    mask_utils = require("pycocotools.mask", "data")
    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool)


def xywh_to_xyxy(box: list[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return x, y, x + w, y + h
