"""``leansam everything``: segment everything in one image and write SAM's files (one PNG per
mask, ``metadata.csv``, ``masks.json``, ``overlay.png``)."""

from __future__ import annotations

import math

import numpy as np

from .generator import SamAutomaticMaskGenerator

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def everything(
    image_path,
    *,
    model: str,
    out_dir,
    checkpoint=None,
    device: str | None = None,
    runtime: str = "torch",
    calib_images=None,
    progress: bool = False,
    **generator_args,
) -> dict:
    """Segment everything in one image and write into ``out_dir``: ``NNN.png`` per mask (0/255, by
    decreasing area, as SAM's ``amg.py``), ``metadata.csv`` (SAM's columns), ``masks.json`` (the
    records with COCO RLE, the configuration and timings) and ``overlay.png``. The INT8 runtimes
    take their calibration images from the folder ``calib_images`` (:func:`leansam.segment.
    segment`). Returns the JSON record."""
    import os
    import time

    from ..io import (
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_png,
        coco_rle_to_mask,
        draw_overlay,
        ensure_dir,
        load_image,
    )
    from ..loading import load_model
    from ..provenance import describe_environment
    from ..registry import get_config
    from ..runtime import runtime_calibration

    image = load_image(image_path)
    get_config(model)
    out = ensure_dir(out_dir)
    sam = load_model(model, checkpoint, device=device)
    checkpoint = sam.checkpoint_path
    calib = runtime_calibration(runtime, calib_images)
    gen = SamAutomaticMaskGenerator(
        sam,
        output_mode="coco_rle",
        runtime=runtime,
        calibration_images=calib,
        progress=progress,
        **generator_args,
    )
    t0 = time.perf_counter()
    records = gen.generate(image)
    seconds = time.perf_counter() - t0
    records.sort(key=lambda r: r["area"], reverse=True)

    masks = [coco_rle_to_mask(r["segmentation"]) for r in records]
    lines = [METADATA_HEADER]
    for i, (r, m) in enumerate(zip(records, masks, strict=True)):
        atomic_write_png(out / f"{i}.png", m.astype(np.uint8) * 255)
        lines.append(
            ",".join(
                str(v)
                for v in (
                    i,
                    r["area"],
                    *r["bbox"],
                    *r["point_coords"][0],
                    r["predicted_iou"],
                    r["stability_score"],
                    *r["crop_box"],
                )
            )
        )
    atomic_write_bytes(out / "metadata.csv", ("\n".join(lines) + "\n").encode())
    atomic_write_png(out / "overlay.png", draw_overlay(image, masks))
    h, w = image.shape[:2]
    record = {
        "image": {"path": os.fspath(image_path), "height": h, "width": w},
        "config": {
            "model": model,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None,
            "runtime": runtime,
            "calib_images": os.path.realpath(calib_images) if calib else None,
            "device": str(sam.device),
            **{k: getattr(gen, k) for k in GENERATOR_ARGS},
        },
        "seconds": seconds,
        "environment": describe_environment(),
        "masks": records,
    }
    # strict JSON: an empty mask's stability score is 0 / 0 (NaN, as in SAM), written as null
    safe = [{k: finite_or_none(v) for k, v in r.items()} for r in records]
    atomic_write_json(out / "masks.json", {**record, "masks": safe})
    return record


#: the generator arguments `leansam everything` exposes (and records)
GENERATOR_ARGS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)


def finite_or_none(value):
    """NaN / infinity -> None (JSON has no such numbers); anything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
