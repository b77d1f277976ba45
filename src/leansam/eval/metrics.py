"""Metrics of the zero-shot protocols: mIoU by object size, COCO / LVIS mask AP."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from ..errors import InputError, require

SMALL_MAX = 32**2  # area <= 32^2: small
LARGE_MIN = 96**2  # area >= 96^2: large; medium in between
SIZES = ("all", "small", "medium", "large")


def size_of(area: float) -> str:
    return "small" if area <= SMALL_MAX else "large" if area >= LARGE_MIN else "medium"


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two H x W bool masks (1.0 when both are empty)."""
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def miou_by_size(areas: list[float], ious: list[float]) -> dict:
    """mIoU x 100 over all objects and by COCO size; counts alongside (None where no object)."""
    groups = {s: [] for s in SIZES}
    for area, iou in zip(areas, ious, strict=True):
        groups["all"].append(iou)
        groups[size_of(area)].append(iou)
    return {
        "mIoU": {s: (100 * float(np.mean(v)) if v else None) for s, v in groups.items()},
        "count": {s: len(v) for s, v in groups.items()},
    }


COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_mask_ap(annotations, results: list[dict], image_ids: list[int]) -> dict:
    """COCOeval(iouType="segm") over ``image_ids``; AP in COCO units (0..1, -1 where undefined)."""
    require("pycocotools", "data")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        raise InputError("no detections to evaluate")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO(str(annotations))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, ev.stats[:6], strict=True)}


LVIS_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def lvis_mask_ap(annotations, results: list[dict], image_ids: list[int]) -> dict:
    """LVISEval(iou_type="segm") over ``image_ids`` (needs the ``lvis`` package)."""
    lvis = require("lvis", "data")
    if not results:
        raise InputError("no detections to evaluate")
    with contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
        gt = lvis.LVIS(str(annotations))
        dt = lvis.LVISResults(gt, results)
        ev = lvis.LVISEval(gt, dt, iou_type="segm")
        ev.params.img_ids = sorted(image_ids)
        ev.run()
    return {k: float(ev.results[k]) for k in LVIS_STATS}


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis 0.5.3 (the latest release) still calls ``np.float``, removed in NumPy 2.0; provide the
    alias only while it runs."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float
