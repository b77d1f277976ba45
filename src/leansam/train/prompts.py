"""Prompt simulation for stage-2 training (SPEC section 5).

Per image, with probability 0.5 every mask is prompted with its box, otherwise with the same number
(1-10, uniform) of positive points sampled uniformly from each mask; multimask output is drawn with
probability 0.5. One prompt kind per image keeps the decoder call batched over its masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompts:
    """Prompts for N masks, in the masks' pixel frame: boxes N x 4 XYXY, or points N x K x 2
    (x, y) with labels N x K (all 1)."""

    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    multimask: bool


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """N x H x W bool -> N x 4 XYXY boxes (x1 = last column + 1, COCO's convention)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    out = np.zeros((len(masks), 4), dtype=np.float64)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        ys, xs = np.nonzero(r)[0], np.nonzero(c)[0]
        if len(ys):
            out[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def sample_points(masks: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """N x K x 2 (x, y) pixel positions drawn uniformly, with replacement, from each mask."""
    out = np.zeros((len(masks), k, 2), dtype=np.float64)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(ys):
            j = rng.integers(0, len(ys), size=k)
            out[i, :, 0], out[i, :, 1] = xs[j], ys[j]
    return out


def error_clicks(
    pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One corrective click per mask (SAM's interactive training): N x 2 (x, y) pixel positions
    drawn uniformly from each prediction's error region and N labels, 1 on a missed object pixel
    and 0 on a spurious one. Where a prediction has no error the click is a positive one drawn
    from the mask; where the mask is empty too, a padding point (label -1, SAM's "not a point").

    Arguments: pred, gt: N x H x W bool, the same pixel frame."""
    n = len(gt)
    xy, labels = np.zeros((n, 2), np.float64), np.full(n, -1, np.int64)
    w = gt.shape[2]
    for i in range(n):
        err = pred[i] != gt[i]
        region = err if err.any() else gt[i]
        flat = np.flatnonzero(region)
        if not len(flat):
            continue
        j = int(flat[rng.integers(len(flat))])
        y, x = divmod(j, w)
        xy[i], labels[i] = (x, y), int(gt[i, y, x])
    return xy, labels


def sample_prompts(
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    box_prob: float = 0.5,
    max_points: int = 10,
    multimask_prob: float = 0.5,
) -> Prompts:
    """Draw the prompts of one image's N masks (N x H x W bool): boxes with ``box_prob``, else
    1 to ``max_points`` positive points (the same number for every mask)."""
    multimask = bool(rng.random() < multimask_prob)
    if rng.random() < box_prob:
        return Prompts(mask_boxes(masks), None, None, multimask)
    k = int(rng.integers(1, max_points + 1))
    return Prompts(
        None, sample_points(masks, k, rng), np.ones((len(masks), k), np.int64), multimask
    )
