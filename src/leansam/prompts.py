"""Prompt validation in image pixels: the one set of rules the CLI (``leansam segment``) and the
service apply before prompts reach :class:`~leansam.predictor.SamPredictor`.

Coordinates are original-image pixels (x right, y down), boxes XYXY; SAM's predictor itself
accepts any float coordinates, so these checks exist to turn a user's mistake into one line.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError


def check_prompts(
    points: Sequence[Sequence[float]] | None,
    labels: Sequence[int] | None,
    boxes: Sequence[Sequence[float]] | None,
    width: int,
    height: int,
    *,
    max_points: int | None = None,
    max_boxes: int | None = None,
) -> None:
    """Check the prompts of one request against a ``width`` x ``height`` image.

    Arguments:
      points: N (x, y) clicks, or None; labels: N labels (1 foreground, 0 background).
      boxes: M XYXY boxes, or None. Several boxes are decoded as a batch, so points may join at
        most one box.
      max_points / max_boxes: optional limits (the service's).

    Raises :class:`~leansam.errors.InputError` (one line) when there is no prompt, labels do not
    match the points, a label is not 0 / 1, a limit is exceeded, points join several boxes, a box
    is empty or inverted (x0 < x1 and y0 < y1 are required), or a point or box lies outside the
    image (the image border itself is inside).
    """
    points = list(points or [])
    boxes = list(boxes or [])
    if not points and not boxes:
        raise InputError("give at least one point or box")
    if points:
        if labels is None or len(labels) != len(points):
            raise InputError("give one label (1 foreground, 0 background) per point")
        if max_points is not None and len(points) > max_points:
            raise InputError(f"at most {max_points} points per request")
        if any(v not in (0, 1) for v in labels):
            raise InputError("labels must be 1 (foreground) or 0 (background)")
    elif labels:
        raise InputError("labels given without points")
    if max_boxes is not None and len(boxes) > max_boxes:
        raise InputError(f"at most {max_boxes} boxes per request")
    if points and len(boxes) > 1:
        raise InputError("points can be combined with one box only")
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        shown = (x0, y0, x1, y1)
        if not (x0 < x1 and y0 < y1):
            raise InputError(f"box {shown} is empty or inverted: need x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise InputError(f"box {shown} lies outside the {width}x{height} image")
    for point in points:
        x, y = (float(v) for v in point[:2])
        if not (0 <= x <= width and 0 <= y <= height):
            raise InputError(f"point ({x}, {y}) lies outside the {width}x{height} image")
