"""Segment everything: same records as the reference automatic mask generators, SAM's format."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, REPO, load_json
from reference import build_reference  # puts the torchvision stand-in on sys.path if needed

from leansam import create_model
from leansam.amg import (
    METADATA_HEADER,
    SamAutomaticMaskGenerator,
    build_all_layer_point_grids,
    coco_encode_rle,
    generate_crop_boxes,
    mask_to_rle,
    masks_to_boxes,
    nms,
    rle_to_mask,
    stability_score,
)
from leansam.errors import InputError
from leansam.io import load_image

KEYS = [
    "segmentation",
    "area",
    "bbox",
    "predicted_iou",
    "point_coords",
    "stability_score",
    "crop_box",
]


@pytest.fixture(scope="module")
def student_pair():
    """leansam's shipped student and the reference EfficientViT-SAM classes with its weights."""
    ours = create_model("leansam-efficientvit-s", pretrained=True).float().eval()
    ref = build_reference("leansam-efficientvit-s")
    ref.load_state_dict(ours.state_dict())
    return ref, ours


def _image(name="000000000139.jpg"):
    return load_image(COCO_MINI / "val2017" / name)


def _matched(a: list[dict], b: list[dict]) -> float:
    """Share of records of ``a`` with a record of ``b`` from the same point and crop whose mask has
    IoU >= 0.99 and whose scores and box agree (the decoder's fast path differs from the
    reference by float rounding, which can flip a pixel whose logit is ~0)."""
    ok = 0
    for ra in a:
        for rb in b:
            if ra["point_coords"] != rb["point_coords"] or ra["crop_box"] != rb["crop_box"]:
                continue
            ma, mb = ra["segmentation"], rb["segmentation"]
            iou = (ma & mb).sum() / max((ma | mb).sum(), 1)
            if (
                iou >= 0.99
                and abs(ra["predicted_iou"] - rb["predicted_iou"]) <= 1e-4
                and abs(ra["stability_score"] - rb["stability_score"]) <= 1e-3
                and np.abs(np.subtract(ra["bbox"], rb["bbox"])).max() <= 2
            ):
                ok += 1
                break
    return ok / max(len(a), 1)


@pytest.mark.parametrize(
    "kw",
    [
        # NMS off: every candidate that passes the filters is compared one to one, crops included
        dict(
            points_per_side=4,
            crop_n_layers=1,
            box_nms_thresh=1.0,
            crop_nms_thresh=1.0,
            min_mask_region_area=100,
        ),
        # SAM's NMS and a denser grid
        pytest.param(dict(points_per_side=8), marks=pytest.mark.slow),
    ],
)
def test_records_match_reference_generator(student_pair, kw):
    from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator

    ref, ours = student_pair
    # The shipped weights predict low IoUs: SAM's 0.88 / 0.95 would leave nothing to compare.
    kw = dict(kw, pred_iou_thresh=0.0, stability_score_thresh=0.3)
    image = _image()
    want = EfficientViTSamAutomaticMaskGenerator(ref, **kw).generate(image)
    got = SamAutomaticMaskGenerator(ours, **kw).generate(image)
    assert len(got) >= (10 if kw.get("box_nms_thresh") == 1.0 else 1)
    assert all(list(r) == KEYS for r in got)
    assert _matched(want, got) >= 0.95 and _matched(got, want) >= 0.95
    assert abs(len(want) - len(got)) <= max(1, len(want) // 50)
    assert got[0]["segmentation"].shape == image.shape[:2]


def test_nms_matches_torchvision_on_real_boxes():
    """leansam's vectorised NMS against torchvision's ``batched_nms`` as segment_anything's
    generator calls it, recorded by scripts/nms_golden.py in an environment where torchvision
    imports (it does not beside the CPU torch wheel): the ground-truth boxes of 20 coco-mini val
    images with jittered copies, scores with ties, three thresholds."""
    record = load_json(REPO / "tests" / "data" / "nms_torchvision.json")
    assert record["torchvision"].startswith("0.") and len(record["cases"]) == 60
    suppressed = 0
    for case in record["cases"]:
        boxes = torch.tensor(case["boxes"], dtype=torch.float32)
        scores = torch.tensor(case["scores"], dtype=torch.float32)
        got = nms(boxes, scores, case["iou_threshold"])
        assert got.tolist() == case["keep"], (case["image_id"], case["iou_threshold"])
        suppressed += len(boxes) - len(got)
    assert suppressed > 500  # the cases really exercise suppression


def test_mask_helpers_match_reference():
    from segment_anything.utils import amg as ref

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 37, 53, generator=g).cumsum(1)
    masks = logits > 0
    masks[2] = False  # an empty mask
    masks[3] = True
    assert torch.equal(
        stability_score(logits, 0.0, 1.0), ref.calculate_stability_score(logits, 0.0, 1.0)
    )
    assert torch.equal(masks_to_boxes(masks), ref.batched_mask_to_box(masks))
    rles = mask_to_rle(masks)
    assert rles == ref.mask_to_rle_pytorch(masks)
    for m, r in zip(masks, rles, strict=True):
        assert np.array_equal(rle_to_mask(r), m.numpy())
        assert np.array_equal(rle_to_mask(r), ref.rle_to_mask(r))
        from pycocotools import mask as mask_utils

        assert np.array_equal(mask_utils.decode(coco_encode_rle(r)).astype(bool), m.numpy())
    assert generate_crop_boxes((480, 640), 2, 512 / 1500) == ref.generate_crop_boxes(
        (480, 640), 2, 512 / 1500
    )
    for a, b in zip(
        build_all_layer_point_grids(16, 2, 2),
        ref.build_all_layer_point_grids(16, 2, 2),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_output_modes_and_errors(student_pair):
    _, ours = student_pair
    image = _image()
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.3)
    binary = SamAutomaticMaskGenerator(ours, **kw).generate(image)
    rle = SamAutomaticMaskGenerator(ours, output_mode="uncompressed_rle", **kw).generate(image)
    coco = SamAutomaticMaskGenerator(ours, output_mode="coco_rle", **kw).generate(image)
    assert len(binary) == len(rle) == len(coco) >= 1
    from pycocotools import mask as mask_utils

    for b, r, c in zip(binary, rle, coco, strict=True):
        assert np.array_equal(rle_to_mask(r["segmentation"]), b["segmentation"])
        assert np.array_equal(mask_utils.decode(c["segmentation"]).astype(bool), b["segmentation"])
        assert isinstance(c["segmentation"]["counts"], str)
        assert b["area"] == int(b["segmentation"].sum())
    with pytest.raises(InputError, match="exactly one of points_per_side and point_grids"):
        SamAutomaticMaskGenerator(ours, points_per_side=None)
    with pytest.raises(InputError, match="unknown output_mode 'png'"):
        SamAutomaticMaskGenerator(ours, output_mode="png")
    with pytest.raises(InputError, match="points_per_batch"):
        SamAutomaticMaskGenerator(ours, points_per_batch=0)


def test_cli_everything(tmp_path):
    out = tmp_path / "ev"
    image = COCO_MINI / "val2017" / "000000000139.jpg"
    cmd = [sys.executable, "-m", "leansam.cli", "everything"]
    args = [
        "--model",
        "leansam-efficientvit-s",
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0",
        "--stability-score-thresh",
        "0.3",
    ]
    r = subprocess.run([*cmd, str(image), *args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "masks.json").read_text())
    n = len(record["masks"])
    assert n >= 1 and f"wrote {n} mask(s)" in r.stdout
    assert record["config"]["pred_iou_thresh"] == 0.0
    rows = list(csv.reader((out / "metadata.csv").open()))
    assert ",".join(rows[0]) == METADATA_HEADER and len(rows) == n + 1
    areas = [int(row[1]) for row in rows[1:]]
    assert areas == sorted(areas, reverse=True)
    png = load_image(out / "0.png")
    assert png.shape[:2] == (426, 640) and set(np.unique(png)) <= {0, 255}
    assert (out / "overlay.png").exists()

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = subprocess.run([*cmd, str(bad), *args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("leansam: error:")
    assert "Traceback" not in r.stderr
