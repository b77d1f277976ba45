"""One set of prompt rules (leansam.prompts.check_prompts) for the CLI and the service."""

from __future__ import annotations

import pytest

from leansam.errors import InputError
from leansam.prompts import check_prompts


@pytest.mark.parametrize(
    ("points", "labels", "boxes", "limits", "message"),
    [
        (None, None, None, {}, "give at least one point or box"),
        ([(5, 5)], None, None, {}, "one label"),
        ([(5, 5)], [1, 0], None, {}, "one label"),
        ([(5, 5)], [2], None, {}, "labels must be 1 .foreground. or 0"),
        (None, [1], [(0, 0, 5, 5)], {}, "labels given without points"),
        ([(1, 1)] * 3, [1] * 3, None, {"max_points": 2}, "at most 2 points"),
        (None, None, [(0, 0, 5, 5)] * 3, {"max_boxes": 2}, "at most 2 boxes"),
        ([(5, 5)], [1], [(0, 0, 5, 5)] * 2, {}, "points can be combined with one box only"),
        (None, None, [(10, 0, 5, 5)], {}, r"box \(10.0, 0.0, 5.0, 5.0\) is empty or inverted"),
        (None, None, [(5, 0, 5, 5)], {}, "empty or inverted"),
        (None, None, [(-4, 10, 50, 60)], {}, r"\(-4.0, 10.0, 50.0, 60.0\) lies outside the 64x48"),
        (None, None, [(0, 0, 64, 49)], {}, "lies outside the 64x48 image"),
        ([(-0.5, 5)], [0], None, {}, r"point \(-0.5, 5.0\) lies outside the 64x48 image"),
        ([(64.5, 5)], [1], None, {}, "lies outside"),
    ],
)
def test_check_prompts_refuses_with_one_line(points, labels, boxes, limits, message):
    with pytest.raises(InputError, match=message) as e:
        check_prompts(points, labels, boxes, 64, 48, **limits)
    assert "\n" not in str(e.value)


def test_check_prompts_accepts_the_image_border():
    check_prompts([(0, 0), (64, 48)], [1, 0], [(0, 0, 64, 48)], 64, 48)
    check_prompts(None, None, [(0, 0, 1, 1), (10, 10, 64, 48)], 64, 48, max_boxes=2)
    check_prompts([(3.5, 7.25)], [1], None, 64, 48, max_points=1)
