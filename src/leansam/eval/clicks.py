"""Deterministic click simulator of the zero-shot point protocol (SPEC section 6).

Follows the clicker the published point mIoU figures were computed with: a click goes to the pixel
farthest from the boundary of the larger error region (L2 distance transform with 1-px zero
padding, so the image border counts as boundary), positive when the false-negative maximum is
strictly larger than the false-positive one, and never twice on the same pixel. The first click
(empty prediction) therefore lands inside the object at the maximum of its distance transform.
Ties go to the first pixel in row-major order.
"""

from __future__ import annotations

import numpy as np

from ..errors import require


def distance_to_boundary(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` (H x W bool) to the nearest pixel outside it,
    the area outside the image counting as outside."""
    cv2 = require("cv2", "data")
    padded = np.pad(region, 1).astype(np.uint8)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


class Clicker:
    """Simulates a user clicking on the errors of successive predictions of one object."""

    def __init__(self, gt_mask: np.ndarray) -> None:
        self.gt = np.asarray(gt_mask, dtype=bool)
        self.not_clicked = np.ones_like(self.gt, dtype=bool)
        self.coords: list[tuple[int, int]] = []  # (x, y)
        self.labels: list[int] = []

    def next_click(self, pred_mask: np.ndarray) -> tuple[int, int, int]:
        """Add and return the click (x, y, label) that corrects ``pred_mask`` (H x W bool) most."""
        pred = np.asarray(pred_mask, dtype=bool)
        fn = distance_to_boundary(self.gt & ~pred) * self.not_clicked
        fp = distance_to_boundary(~self.gt & pred) * self.not_clicked
        fn_max, fp_max = fn.max(), fp.max()
        positive = bool(fn_max > fp_max)
        dist, best = (fn, fn_max) if positive else (fp, fp_max)
        ys, xs = np.nonzero(dist == best)
        y, x = int(ys[0]), int(xs[0])
        self.not_clicked[y, x] = False
        self.coords.append((x, y))
        self.labels.append(int(positive))
        return x, y, int(positive)
