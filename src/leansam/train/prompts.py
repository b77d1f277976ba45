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


def sample_prompts(
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    box_prob: float = 0.5,
    max_points: int = 10,
    multimask_prob: float = 0.5,
) -> Prompts:
    """Draw the prompts of one image's N masks (N x H x W bool)."""
    multimask = bool(rng.random() < multimask_prob)
    if rng.random() < box_prob:
        return Prompts(mask_boxes(masks), None, None, multimask)
    k = int(rng.integers(1, max_points + 1))
    return Prompts(
        None, sample_points(masks, k, rng), np.ones((len(masks), k), np.int64), multimask
    )
