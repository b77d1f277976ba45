"""Boxes to masks over a dataset (`leansam segment --images DIR --detections FILE`): the detector
protocol's masks, three input formats, resume, 2 gloo ranks = 1, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import COCO_MINI, cli_one_and_two_ranks, mask_agreement

import leansam.label as label
from leansam import SamPredictor, create_model
from leansam.errors import InputError
from leansam.eval import evaluate
from leansam.eval.dataset import EvalDataset
from leansam.io import coco_rle_to_mask

MODEL = "efficientvit-sam-tiny-l"
IMAGES = COCO_MINI / "val2017"
ANNS = COCO_MINI / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An instances file and a results file of the first 3 val images (ground-truth boxes)."""
    d = tmp_path_factory.mktemp("dets")
    data = json.loads(ANNS.read_text())
    ids = sorted(im["id"] for im in data["images"])[:3]
    inst = {
        **data,
        "images": [im for im in data["images"] if im["id"] in ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
    }
    (d / "instances.json").write_text(json.dumps(inst))
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 0.5}
        for a in inst["annotations"] if not a.get("iscrowd", 0)
    ]  # fmt: skip
    (d / "results.json").write_text(json.dumps(results))
    return d, ids, inst


@pytest.fixture(scope="module")
def predictor():
    return SamPredictor(create_model(MODEL, seed=0).eval())


def _agreement(a: list[dict], b: list[dict]) -> float:
    """The lowest pixel agreement between the masks of two record lists, pair by pair."""
    assert len(a) == len(b)
    return min(
        mask_agreement(coco_rle_to_mask(x["segmentation"]), coco_rle_to_mask(y["segmentation"]))
        for x, y in zip(a, b, strict=True)
    )


def test_gt_boxes_reproduce_the_detector_protocol(small, predictor, tmp_path):
    d, _, _ = small
    dataset = EvalDataset.load(IMAGES, d / "instances.json")
    evaluate(predictor, dataset, "detector", detections="gt", out_dir=tmp_path / "ev",
             progress=False)  # fmt: skip
    protocol = json.loads((tmp_path / "ev" / "segm_results.json").read_text())
    images, dets = label.read_detections(d / "instances.json", IMAGES)
    summary = label.boxes_to_masks(predictor, images, dets, tmp_path / "m.json", progress=False)
    ours = json.loads((tmp_path / "m.json").read_text())
    assert summary["images"] == summary["labelled"] == 3 and summary["detections"] == len(ours)
    assert [r["bbox"] for r in ours] == [r["bbox"] for r in protocol]
    assert [r["image_id"] for r in ours] == [r["image_id"] for r in protocol]
    assert [r["segmentation"] for r in ours] == [r["segmentation"] for r in protocol]
    assert all(r["predicted_iou"] >= 0 and r["score"] == 1.0 for r in ours)


def test_results_file_and_yolo_labels_give_the_same_masks(small, predictor, tmp_path):
    d, ids, inst = small
    images, dets = label.read_detections(d / "results.json", IMAGES)
    label.boxes_to_masks(predictor, images, dets, tmp_path / "r.json", score="detector*iou",
                         progress=False)  # fmt: skip
    from_results = json.loads((tmp_path / "r.json").read_text())
    assert all(r["score"] == pytest.approx(0.5 * r["predicted_iou"]) for r in from_results)
    # YOLO: the same boxes, normalised centre form, one file per image
    yolo = tmp_path / "yolo"
    yolo.mkdir()
    sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
    names = {im["id"]: im["file_name"] for im in inst["images"]}
    for i in ids:
        w, h = sizes[i]
        lines = [
            f"{a['category_id']} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.9f} "
            f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.9f} {a['bbox'][2] / w:.9f} "
            f"{a['bbox'][3] / h:.9f} 0.5"
            for a in inst["annotations"]
            if a["image_id"] == i and not a.get("iscrowd", 0)
        ]
        (yolo / (names[i].rsplit(".", 1)[0] + ".txt")).write_text("\n".join(lines) + "\n")
    (yolo / "classes.txt").write_text("person\nbicycle\n")  # LabelImg's class list: not labels
    images, dets = label.read_detections(yolo, IMAGES)
    label.boxes_to_masks(predictor, images, dets, tmp_path / "y.json", progress=False)
    from_yolo = json.loads((tmp_path / "y.json").read_text())
    assert {r["file_name"] for r in from_yolo} == {names[i] for i in ids}
    assert len(from_yolo) == len(from_results)
    for a, b in zip(from_yolo, from_results, strict=True):
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-4)
        assert a["category_id"] == b["category_id"] and a["score"] == 0.5
    assert _agreement(from_yolo, from_results) >= 0.999  # boxes equal to 1e-4 px
    assert sum(a["segmentation"] == b["segmentation"] for a, b in zip(from_yolo, from_results,
               strict=True)) >= 0.9 * len(from_yolo)  # fmt: skip


def test_boxes_are_clipped_to_the_image_and_boxes_outside_get_empty_masks(predictor, tmp_path):
    dets = [
        {"image_id": 139, "category_id": 1, "bbox": [1000.0, 1000.0, 50.0, 50.0], "score": 1.0},
        {"image_id": 139, "category_id": 1, "bbox": [-20.0, -20.0, 120.0, 120.0], "score": 1.0},
        {"image_id": 139, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 100.0], "score": 1.0},
    ]
    (tmp_path / "d.json").write_text(json.dumps(dets))
    images, by_image = label.read_detections(tmp_path / "d.json", IMAGES)
    label.boxes_to_masks(predictor, images, by_image, tmp_path / "m.json", progress=False)
    out = json.loads((tmp_path / "m.json").read_text())  # strict JSON
    assert out[0]["predicted_iou"] == 0.0 and out[0]["segmentation"]["counts"]
    assert coco_rle_to_mask(out[0]["segmentation"]).sum() == 0
    assert out[1]["bbox"] == [-20.0, -20.0, 120.0, 120.0]  # the detector's box, as given
    assert out[1]["segmentation"] == out[2]["segmentation"]  # prompted with the clipped box


def test_another_configuration_is_refused_and_fresh_discards(small, predictor, tmp_path):
    d, _, _ = small
    images, dets = label.read_detections(d / "results.json", IMAGES)
    out = tmp_path / "m.json"
    label.boxes_to_masks(predictor, images, dets, out, config={"model": "a"}, progress=False)
    with pytest.raises(InputError, match=r"another configuration \(differs in score\)"):
        label.boxes_to_masks(predictor, images, dets, out, config={"model": "a"},
                             score="detector*iou", progress=False)  # fmt: skip
    s = label.boxes_to_masks(predictor, images, dets, out, config={"model": "a"},
                             score="detector*iou", fresh=True, progress=False)  # fmt: skip
    assert s["labelled"] == 3 and s["already_done"] == 0
    assert all(r["score"] < 0.5 for r in json.loads(out.read_text()))


def test_killed_run_resumes_to_the_same_file(small, predictor, tmp_path, monkeypatch):
    d, _, _ = small
    images, dets = label.read_detections(d / "instances.json", IMAGES)
    kw = dict(progress=False, image_batch=2)  # the run dies inside a batch of 2
    label.boxes_to_masks(predictor, images, dets, tmp_path / "full.json", **kw)
    real, calls = label._records, {"n": 0}

    def dies_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(label, "_records", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        label.boxes_to_masks(predictor, images, dets, tmp_path / "part.json", **kw)
    assert not (tmp_path / "part.json").exists()
    monkeypatch.setattr(label, "_records", real)
    summary = label.boxes_to_masks(predictor, images, dets, tmp_path / "part.json", **kw)
    assert summary["already_done"] == 1 and summary["labelled"] == 2
    assert (tmp_path / "part.json").read_bytes() == (tmp_path / "full.json").read_bytes()


def test_errors_are_one_line(small, tmp_path):
    d, _, _ = small
    with pytest.raises(InputError, match="have no image in"):
        label.read_detections(d / "results.json", tmp_path)
    bad = tmp_path / "yolo"
    bad.mkdir()
    (bad / "000000000139.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(InputError, match=r"000000000139.txt:1: expected 'class cx cy w h"):
        label.read_detections(bad, IMAGES)
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match="neither a COCO results file"):
        label.read_detections(tmp_path / "x.json", IMAGES)
    for bad_id in ('"../../escaped"', '"cat"', "1.5"):
        (tmp_path / "ids.json").write_text(
            f'[{{"image_id": {bad_id}, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}}]'
        )
        with pytest.raises(InputError, match="image ids must be integers"):
            label.read_detections(tmp_path / "ids.json", IMAGES)
    (tmp_path / "box.json").write_text(
        '[{"image_id": 139, "category_id": 1, "bbox": [0, 0, 5], "score": 1}]'
    )
    with pytest.raises(InputError, match=r"a bbox must be \[x, y, width, height\]"):
        label.read_detections(tmp_path / "box.json", IMAGES)
    for bad_box in ("[10, 10, -50, 50]", "[10, 10, 0, 5]", "[NaN, 0, 5, 5]"):
        (tmp_path / "box.json").write_text(
            f'[{{"image_id": 139, "category_id": 1, "bbox": {bad_box}, "score": 1}}]'
        )
        with pytest.raises(InputError, match="width and height > 0"):
            label.read_detections(tmp_path / "box.json", IMAGES)
    (bad / "000000000139.txt").write_text("0 0.5 0.5 0.0 0.2\n")
    with pytest.raises(InputError, match=r"000000000139\.txt:1: box width and height must be > 0"):
        label.read_detections(bad, IMAGES)
    cli = [sys.executable, "-m", "leansam.cli", "segment", "--model", MODEL]
    r = subprocess.run([*cli, "--detections", str(d / "results.json"), "--out", "o.json"],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "needs both --images DIR and --detections FILE" in r.stderr
    r = subprocess.run([*cli, "--images", str(IMAGES), "--detections", str(d / "results.json"),
                        "--multimask", "--out", "o.json"], capture_output=True, text=True,
                       cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "no --multimask" in r.stderr and r.stderr.count("\n") == 1
    for flag, value, message in (
        ("--image-batch", "0", "--image-batch must be at least 1, got 0"),
        ("--workers", "-1", "--workers must be 0 or more, got -1"),
    ):
        r = subprocess.run([*cli, "--images", str(IMAGES), "--detections", str(d / "results.json"),
                            flag, value, "--out", "o.json"], capture_output=True, text=True,
                           cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2 and r.stderr == f"leansam: error: {message}\n"


def test_cli_two_gloo_ranks_write_what_one_writes(small, tmp_path):
    d, _, _ = small
    # encoder batches of 2: rank 0 embeds two images, rank 1 one, as in one process
    args = ["segment", "--images", str(IMAGES), "--detections", str(d / "results.json"),
            "--model", MODEL, "--no-progress", "--image-batch", "2"]  # fmt: skip
    one = cli_one_and_two_ranks(args, tmp_path / "one.json", tmp_path / "two.json", port_offset=13)
    assert "masks of 3 image(s)" in one.stdout
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    s = json.loads((tmp_path / "two.json.summary.json").read_text())
    assert s["world_size"] == 2 and s["labelled"] == 3 and s["already_done"] == 0
