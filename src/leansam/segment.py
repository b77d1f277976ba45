"""Segment one image from box / point prompts and write masks, an overlay and a JSON record."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import atomic_write_json, atomic_write_png, draw_overlay, load_image, mask_to_coco_rle
from .prompts import check_prompts
from .provenance import describe_environment


@dataclass(frozen=True)
class Prompt:
    """One object to segment: an optional XYXY box and (x, y, label) points, image pixels."""

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float, int], ...] = field(default_factory=tuple)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> box; raises :class:`InputError` with the expected form."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InputError(f"--box {text!r}: expected four numbers x0,y0,x1,y1")
    return values  # type: ignore[return-value]


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` (label 1 foreground, 0 background) -> point."""
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise InputError(f"--point {text!r}: expected x,y or x,y,label") from None
    if label not in (0, 1):
        raise InputError(f"--point {text!r}: label must be 1 (foreground) or 0 (background)")
    return x, y, label


def build_prompts(
    boxes: list[tuple[float, float, float, float]],
    points: list[tuple[float, float, int]],
    *,
    separate_points: bool = False,
) -> list[Prompt]:
    """Boxes are one prompt each; points are one prompt together (clicks on one object), or one
    prompt each with ``separate_points``; points plus a single box form one prompt."""
    if not boxes and not points:
        raise InputError("give at least one prompt: --box x0,y0,x1,y1 or --point x,y[,label]")
    if boxes and points:
        if len(boxes) > 1 or separate_points:
            raise InputError("points can be combined with one --box only")
        return [Prompt(boxes[0], tuple(points))]
    if boxes:
        return [Prompt(box=b) for b in boxes]
    if separate_points:
        return [Prompt(points=(p,)) for p in points]
    return [Prompt(points=tuple(points))]


def validate_prompts(prompts: list[Prompt], height: int, width: int) -> None:
    """Each prompt checked by :func:`leansam.prompts.check_prompts` (the service's rules):
    boxes non-empty and inside the image, points inside the image."""
    for p in prompts:
        check_prompts(
            [q[:2] for q in p.points],
            [q[2] for q in p.points],
            [p.box] if p.box is not None else None,
            width,
            height,
        )


def _predict_prompts(
    predictor, prompts: list[Prompt], multimask: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(masks C x H x W, scores C) per prompt; prompts of the same shape go in one batched call."""
    if len(prompts) > 1 and all(p.box is not None and not p.points for p in prompts):
        masks, scores, _ = predictor.predict(
            box=np.array([p.box for p in prompts]), multimask_output=multimask
        )
        return list(zip(masks, scores, strict=True))
    if len(prompts) > 1 and all(p.box is None and len(p.points) == 1 for p in prompts):
        coords = np.array([[p.points[0][:2]] for p in prompts])
        labels = np.array([[p.points[0][2]] for p in prompts])
        masks, scores, _ = predictor.predict(coords, labels, multimask_output=multimask)
        return list(zip(masks, scores, strict=True))
    out = []
    for p in prompts:
        coords = np.array([q[:2] for q in p.points]) if p.points else None
        labels = np.array([q[2] for q in p.points]) if p.points else None
        box = np.array(p.box) if p.box is not None else None
        masks, scores, _ = predictor.predict(coords, labels, box, multimask_output=multimask)
        out.append((masks, scores))
    return out


def segment(
    image_path: str | os.PathLike,
    *,
    model: str,
    checkpoint: str | os.PathLike | None = None,
    boxes: list[tuple[float, float, float, float]] = (),  # type: ignore[assignment]
    points: list[tuple[float, float, int]] = (),  # type: ignore[assignment]
    separate_points: bool = False,
    multimask: bool = False,
    out_dir: str | os.PathLike,
    device: str | None = None,
    runtime: str = "torch",
    calib_images: str | os.PathLike | None = None,
) -> dict:
    """Segment ``image_path`` and write into ``out_dir``:

    - ``mask_NNN.png``: the (best-scoring) mask of prompt NNN, 0/255; with ``multimask`` also
      ``mask_NNN_K.png`` for each of the 3 candidates;
    - ``overlay.png``: the image with every prompt's mask, box and points drawn;
    - ``result.json``: COCO RLE, scores, prompts and the full configuration.

    ``runtime`` picks the image encoder's runtime (:mod:`leansam.runtime`); the INT8 runtimes
    take their calibration images from the folder ``calib_images``.

    Returns the JSON record.
    """
    from .loading import load_model
    from .predictor import SamPredictor
    from .registry import get_config
    from .runtime import check_runtime, runtime_calibration

    image = load_image(image_path)
    h, w = image.shape[:2]
    prompts = build_prompts(list(boxes), list(points), separate_points=separate_points)
    validate_prompts(prompts, h, w)
    get_config(model)  # unknown names fail before any work
    check_runtime(runtime)
    calib = runtime_calibration(runtime, calib_images)

    sam = load_model(model, checkpoint, device=device)
    checkpoint = sam.checkpoint_path
    predictor = SamPredictor(sam, runtime, calibration_images=calib)
    t0 = time.perf_counter()
    predictor.set_image(image)
    t1 = time.perf_counter()
    results = _predict_prompts(predictor, prompts, multimask)
    t2 = time.perf_counter()

    out = Path(out_dir)
    records, best_masks = [], []
    for i, (prompt, (masks, scores)) in enumerate(zip(prompts, results, strict=True)):
        best = int(np.argmax(scores))
        best_masks.append(masks[best])
        atomic_write_png(out / f"mask_{i:03d}.png", masks[best].astype(np.uint8) * 255)
        if multimask:
            for k, m in enumerate(masks):
                atomic_write_png(out / f"mask_{i:03d}_{k}.png", m.astype(np.uint8) * 255)
        records.append(
            {
                "prompt": {"box": prompt.box, "points": [list(p) for p in prompt.points]},
                "best": best,
                "masks": [
                    {
                        "segmentation": mask_to_coco_rle(m),
                        "area": int(m.sum()),
                        "predicted_iou": float(s),
                    }
                    for m, s in zip(masks, scores, strict=True)
                ],
            }
        )
    overlay = draw_overlay(
        image,
        best_masks,
        boxes=[p.box for p in prompts],
        points=[q for p in prompts for q in p.points],
        labels=[f"{i}: {r[1][int(np.argmax(r[1]))]:.2f}" for i, r in enumerate(results)],
        label_points=[p.points[0][:2] if p.points else None for p in prompts],
    )
    atomic_write_png(out / "overlay.png", overlay)
    record = {
        "image": {"path": os.fspath(image_path), "height": h, "width": w},
        "config": {
            "model": model,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None,
            "weights": "checkpoint" if checkpoint else "random (untrained): masks are meaningless",
            "image_size": sam.image_size,
            "multimask": multimask,
            "separate_points": separate_points,
            "device": str(sam.device),
            "runtime": runtime,
            "calib_images": os.path.realpath(calib_images) if calib else None,
            "prompts": [asdict(p) for p in prompts],
        },
        "timing_ms": {"embed": 1000 * (t1 - t0), "decode": 1000 * (t2 - t1)},
        "environment": describe_environment(),
        "results": records,
    }
    atomic_write_json(out / "result.json", record)
    return record
