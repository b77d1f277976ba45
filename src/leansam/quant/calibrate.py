"""Calibration data: COCO images with box prompts, and passes of a model over them."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..modeling.sam import Sam


@dataclass
class CalibSample:
    """One calibration image: encoder input (1 x 3 x R x R) and box prompts (B x 4, 1024 frame)."""

    image: torch.Tensor
    boxes: torch.Tensor


def calibration_samples(
    model: Sam,
    images_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    *,
    count: int = 32,
    max_boxes: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> list[CalibSample]:
    """The first ``count`` images (by id) of a COCO instances file that have objects, each with
    up to ``max_boxes`` of its ground-truth boxes (a seeded random choice) as prompts;
    ``progress`` shows a bar while they load."""
    from ..eval.dataset import EvalDataset
    from ..io import load_image
    from ..predictor import SamPredictor
    from ..progress import progress_bar

    if count < 1:
        raise InputError(f"--calib-count must be at least 1, got {count}")
    data = EvalDataset.load(images_dir, annotations)
    pred = SamPredictor(model)
    rng = random.Random(seed)
    out: list[CalibSample] = []
    bar = progress_bar(total=count, desc="load calibration images", enabled=progress, unit="img")
    for info in data.images:
        objs = data.objects(info["id"])
        if not objs:
            continue
        image = load_image(data.path(info))
        boxes = np.array([o["bbox"] for o in objs], dtype=np.float64)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        pick = sorted(rng.sample(range(len(boxes)), min(max_boxes, len(boxes))))
        boxes = pred.transform.apply_boxes(boxes[pick], image.shape[:2])
        out.append(
            CalibSample(
                pred.encoder_input(image).to(model.dtype),
                torch.as_tensor(boxes, dtype=model.dtype, device=model.device),
            )
        )
        bar.update(1)
        if len(out) == count:
            break
    bar.close()
    if not out:
        raise InputError(f"{annotations} has no annotated image to calibrate on")
    return out


@torch.no_grad()
def run_samples(
    model: Sam, samples: list[CalibSample], embeddings=None, *, progress: str | None = None
) -> None:
    """Encoder and decoder over every sample (calibration and capture passes); ``progress``: the
    label of a progress bar (none without it)."""
    from ..progress import progress as bar

    for i, s in bar(
        list(enumerate(samples)), desc=progress or "", enabled=bool(progress), unit="img"
    ):
        emb = model.image_encoder(s.image) if embeddings is None else embeddings[i]
        model.decode(emb, boxes=s.boxes)


def run_hooked(model: Sam, samples, hooks: list) -> None:
    """:func:`run_samples` with forward hooks (module, fn) attached for the pass only."""
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        run_samples(model, samples)
    finally:
        for h in handles:
            h.remove()
