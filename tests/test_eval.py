"""Evaluation on coco-mini val: oracle, baselines against numpy, clicks, sharding, resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, cli_one_and_two_ranks

from leansam.data.coco import ann_to_mask
from leansam.errors import InputError
from leansam.eval import EvalDataset, evaluate
from leansam.eval.clicks import Clicker
from leansam.eval.predictors import BoxFill

IMAGES = COCO_MINI / "val2017"
ANNS = COCO_MINI / "annotations" / "instances_val2017.json"
LIMIT = 6


@pytest.fixture(scope="module")
def dataset():
    return EvalDataset.load(IMAGES, ANNS, limit=LIMIT)


class Oracle:
    """Returns the ground truth: masks of the annotations the prompts came from, in order."""

    name = "oracle"

    def __init__(self, dataset: EvalDataset) -> None:
        self.dataset = dataset
        self.calls = 0

    def set_image(self, image):
        self.calls += 1
        h, w = image.shape[:2]
        # a single-process run visits the images in dataset order
        info = self.dataset.images[self.calls - 1]
        self.gt = {a["id"]: ann_to_mask(a, h, w) for a in self.dataset.anns.get(info["id"], [])}
        self.boxes = {
            tuple(np.round(a["bbox"], 3)): a["id"] for a in self.dataset.anns.get(info["id"], [])
        }
        self.objects = [a["id"] for a in self.dataset.objects(info["id"])]

    def predict_boxes(self, boxes):
        ids = [
            self.boxes[tuple(np.round([b[0], b[1], b[2] - b[0], b[3] - b[1]], 3))] for b in boxes
        ]
        return np.stack([self.gt[i] for i in ids]), np.ones(len(ids))

    def predict_clicks(self, coords, labels):
        return np.stack([self.gt[i] for i in self.objects]), np.ones(len(self.objects))


def test_oracle_gives_perfect_scores(dataset):
    box = evaluate(Oracle(dataset), dataset, "box", progress=False)
    assert box["metrics"]["mIoU"]["all"] == pytest.approx(100.0)
    assert box["metrics"]["count"]["all"] == dataset.num_objects() > 20
    click = evaluate(Oracle(dataset), dataset, "click", clicks=(1, 3), progress=False)
    assert click["metrics"]["1 clicks"]["mIoU"]["all"] == pytest.approx(100.0)
    det = evaluate(Oracle(dataset), dataset, "detector", detections="gt", progress=False)
    assert det["metrics"]["segm"]["AP"] == pytest.approx(1.0)
    assert det["metrics"]["segm"]["AP50"] == pytest.approx(1.0)


def test_lvis_annotations_use_lvis_eval(tmp_path):
    """An LVIS-format JSON (built here from coco-mini) is detected and scored with LVISEval."""
    src = json.loads(ANNS.read_text())
    images = src["images"][:4]
    ids = {im["id"] for im in images}
    lvis_json = {
        "images": [
            {**im, "not_exhaustive_category_ids": [], "neg_category_ids": []} for im in images
        ],
        "annotations": [
            {k: v for k, v in a.items() if k != "iscrowd"}
            for a in src["annotations"]
            if a["image_id"] in ids and not a["iscrowd"]
        ],
        "categories": [{**c, "frequency": "f", "synset": c["name"]} for c in src["categories"]],
    }
    path = tmp_path / "lvis_mini.json"
    path.write_text(json.dumps(lvis_json))
    ds = EvalDataset.load(IMAGES, path)
    assert ds.is_lvis
    oracle = evaluate(Oracle(ds), ds, "detector", detections="gt", progress=False)["metrics"]
    assert oracle["segm"]["AP"] == pytest.approx(1.0) and "APf" in oracle["segm"]
    fill = evaluate(BoxFill(), ds, "detector", detections="gt", progress=False)["metrics"]
    assert 0.0 < fill["segm"]["AP"] < 1.0
    assert not hasattr(np, "float")  # the NumPy 2 shim for lvis is scoped


def test_box_fill_matches_independent_numpy(dataset):
    from pycocotools.coco import COCO

    result = evaluate(BoxFill(), dataset, "box", progress=False)
    coco = COCO(str(ANNS))
    ious, areas = [], []
    for info in dataset.images:
        h, w = info["height"], info["width"]
        yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            if ann["area"] < 1:
                continue
            x, y, bw, bh = ann["bbox"]
            pred = (xx >= x) & (xx <= x + bw) & (yy >= y) & (yy <= y + bh)
            gt = coco.annToMask(ann).astype(bool)
            ious.append((pred & gt).sum() / (pred | gt).sum())
            areas.append(ann["area"])
    ious, areas = np.array(ious), np.array(areas)
    m = result["metrics"]["mIoU"]
    assert m["all"] == pytest.approx(100 * ious.mean(), abs=1e-9)
    assert m["small"] == pytest.approx(100 * ious[areas <= 1024].mean(), abs=1e-9)
    assert m["large"] == pytest.approx(100 * ious[areas >= 9216].mean(), abs=1e-9)
    medium = (areas > 1024) & (areas < 9216)
    assert m["medium"] == pytest.approx(100 * ious[medium].mean(), abs=1e-9)
    assert result["metrics"]["count"]["all"] == len(ious)


def _brute_force_distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each mask pixel to the nearest pixel outside (or the border)."""
    padded = np.pad(mask, 1)
    out_y, out_x = np.nonzero(~padded)
    in_y, in_x = np.nonzero(padded)
    d = np.zeros(padded.shape)
    for i in range(0, len(in_y), 512):
        dy = in_y[i : i + 512, None] - out_y[None]
        dx = in_x[i : i + 512, None] - out_x[None]
        d[in_y[i : i + 512], in_x[i : i + 512]] = np.sqrt((dy**2 + dx**2).min(1))
    return d[1:-1, 1:-1]


def test_first_click_inside_mask_at_distance_maximum(dataset):
    info = dataset.images[0]
    small = next(a for a in dataset.objects(info["id"]) if 200 < a["area"] < 3000)
    gt = ann_to_mask(small, info["height"], info["width"])
    clicker = Clicker(gt)
    x, y, label = clicker.next_click(np.zeros_like(gt))
    assert label == 1 and gt[y, x]
    dist = _brute_force_distance(gt)
    assert dist[y, x] == pytest.approx(dist.max(), abs=1e-3)
    again = Clicker(gt)  # deterministic
    assert again.next_click(np.zeros_like(gt)) == (x, y, label)


def test_next_click_corrects_the_larger_error():
    gt = np.zeros((60, 80), dtype=bool)
    gt[10:50, 10:40] = True
    pred = np.zeros_like(gt)
    pred[10:50, 10:70] = True  # a 40 x 30 false positive on the right
    clicker = Clicker(gt)
    x, y, label = clicker.next_click(pred)
    assert label == 0 and 40 <= x < 70 and not gt[y, x] and pred[y, x]
    pred2 = np.zeros_like(gt)
    pred2[10:50, 10:15] = True  # mostly missed: a positive click in the missed part
    x, y, label = clicker.next_click(pred2)
    assert label == 1 and gt[y, x] and not pred2[y, x]
    assert clicker.coords[0] != clicker.coords[1] and clicker.labels == [0, 1]


def test_click_protocol_with_a_model(dataset):
    from leansam import create_model

    model = create_model("efficientvit-sam-tiny-l", seed=0)
    one = EvalDataset.load(IMAGES, ANNS, limit=2)
    r = evaluate(model, one, "click", clicks=(1, 2), progress=False)
    for k in ("1 clicks", "2 clicks"):
        assert 0 <= r["metrics"][k]["mIoU"]["all"] <= 100
        assert r["metrics"][k]["count"]["all"] == one.num_objects()


def _strip(result: dict) -> dict:
    return {"metrics": result["metrics"], "num_images": result["config"]["num_images"]}


@pytest.mark.parametrize(
    ("model", "protocol", "extra"),
    [
        ("efficientvit-sam-tiny-l", "box", []),
        ("box-fill", "detector", ["--detections", "gt", "--score", "detector*iou"]),
    ],
)
def test_two_gloo_processes_equal_one(tmp_path, model, protocol, extra):
    args = [
        "eval", "--images", str(IMAGES), "--annotations", str(ANNS), "--model", model,
        "--protocol", protocol, "--limit", "5", "--no-progress", *extra,
    ]  # fmt: skip
    cli_one_and_two_ranks(args, tmp_path / "one", tmp_path / "two")
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert _strip(one) == _strip(two)  # exactly, not approximately
    assert sorted(os.listdir(tmp_path / "one" / "per_image")) == sorted(
        os.listdir(tmp_path / "two" / "per_image")
    )


class Interrupting(BoxFill):
    """box-fill that counts images and can stop like Ctrl-C at the n-th one."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.seen = stop_at, 0

    def set_image(self, image):
        self.seen += 1
        if self.stop_at is not None and self.seen == self.stop_at:
            raise KeyboardInterrupt
        super().set_image(image)


def test_interrupted_run_resumes(tmp_path, dataset):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        evaluate(Interrupting(stop_at=4), dataset, "box", out_dir=out, progress=False)
    assert len(list((out / "per_image").glob("*.json"))) == 3
    assert not (out / "results.json").exists()
    resumed = Interrupting()
    result = evaluate(resumed, dataset, "box", out_dir=out, progress=False)
    assert resumed.seen == LIMIT - 3  # finished images are not redone
    full = evaluate(BoxFill(), dataset, "box", progress=False)
    assert result["metrics"] == full["metrics"]
    with pytest.raises(InputError, match=r"another configuration .*protocol"):
        evaluate(BoxFill(), dataset, "detector", detections="gt", out_dir=out, progress=False)
    fresh = Interrupting()
    evaluate(fresh, dataset, "box", out_dir=out, progress=False, fresh=True)
    assert fresh.seen == LIMIT


def test_outputs_and_per_object(tmp_path):
    out = tmp_path / "o"
    res = subprocess.run(
        [
            sys.executable, "-m", "leansam.cli", "eval", "--images", str(IMAGES),
            "--annotations", str(ANNS), "--model", "box-fill", "--protocol", "box",
            "--limit", "3", "--save-per-object", "--plot", "--no-progress", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "| box-fill |" in res.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["model"] == "box-fill" and result["environment"]["torch"]
    rows = [json.loads(x) for x in (out / "per_object.jsonl").read_text().splitlines()]
    assert len(rows) == result["metrics"]["count"]["all"]
    assert np.mean([r["iou"] for r in rows]) * 100 == pytest.approx(
        result["metrics"]["mIoU"]["all"]
    )
    assert (out / "results.md").read_text().startswith("| model | all | small")
    from PIL import Image

    assert Image.open(out / "iou_by_size.png").size[0] > 300


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    data = json.loads(ANNS.read_text())
    missing = {
        **data,
        "images": [{**data["images"][0], "file_name": "gone.jpg"}, *data["images"][1:3]],
    }
    (d / "missing.json").write_text(json.dumps(missing))
    (d / "list.json").write_text(json.dumps([1, 2, 3]))
    (d / "empty.json").write_text(json.dumps({**data, "images": [], "annotations": []}))
    no_objects = {**data, "annotations": [{**a, "area": 0} for a in data["annotations"]]}
    (d / "noobj.json").write_text(json.dumps(no_objects))
    (d / "dets.json").write_text(
        json.dumps([{"image_id": 999999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}])
    )
    (d / "notdets.json").write_text(json.dumps({"annotations": []}))
    return d


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing image", "1 of 3 images listed in missing.json are missing from"),
        ("not coco", "is not COCO instances JSON"),
        ("not json", "is not valid JSON"),
        ("empty dataset", "lists no images"),
        ("no objects", "has no annotation with area >= 1"),
        ("unknown ids", "1 image ids are not in instances_val2017.json, e.g. 999999999"),
        ("not results", "is not a COCO results file"),
        ("no detections arg", "needs --detections"),
        ("baseline clicks", "box-fill needs a box"),
        ("missing folder", "image folder not found"),
    ],
)
def test_bad_input_one_line(tmp_path, bad_inputs, case, message):
    images, anns, extra = str(IMAGES), str(ANNS), ["--protocol", "box"]
    if case == "missing image":
        anns = str(bad_inputs / "missing.json")
    elif case == "not coco":
        anns = str(bad_inputs / "list.json")
    elif case == "not json":
        anns = str(IMAGES / os.listdir(IMAGES)[0])
    elif case == "empty dataset":
        anns = str(bad_inputs / "empty.json")
    elif case == "no objects":
        anns = str(bad_inputs / "noobj.json")
    elif case == "unknown ids":
        extra = ["--protocol", "detector", "--detections", str(bad_inputs / "dets.json")]
    elif case == "not results":
        extra = ["--protocol", "detector", "--detections", str(bad_inputs / "notdets.json")]
    elif case == "no detections arg":
        extra = ["--protocol", "detector"]
    elif case == "baseline clicks":
        extra = ["--protocol", "click"]
    elif case == "missing folder":
        images = str(tmp_path / "nowhere")
    res = subprocess.run(
        [
            sys.executable, "-m", "leansam.cli", "eval", "--images", images, "--annotations", anns,
            "--model", "box-fill", "--limit", "3", "--no-progress", *extra,
            "--out", str(tmp_path / "o"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leansam: error: "), res.stderr
    assert message in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_grabcut_baseline_is_deterministic(dataset):
    from leansam.eval.predictors import GrabCut
    from leansam.io import load_image

    info = dataset.images[0]
    image = load_image(dataset.path(info))
    objs = dataset.objects(info["id"])[:2]
    boxes = np.array(
        [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in objs
        ]
    )
    gc = GrabCut()
    gc.set_image(image)
    m1, _ = gc.predict_boxes(boxes)
    m2, _ = gc.predict_boxes(boxes[::-1])
    np.testing.assert_array_equal(m1, m2[::-1])
    # the mask stays inside its box (GrabCut marks outside the rectangle as background)
    for m, b in zip(m1, boxes, strict=True):
        _, xs = np.nonzero(m)
        assert xs.min() >= np.floor(b[0]) and xs.max() < np.ceil(b[2])


def test_ellipse_fill_is_the_inscribed_ellipse_and_beats_box_fill():
    """The shape-prior baseline: inside its box, pi / 4 of a large box's area; on the first 10
    coco-mini val images (recorded) above box-fill, as on the whole split (EVALUATION.md)."""
    from leansam.eval.predictors import EllipseFill, box_masks, ellipse_masks

    boxes = np.array([[10.0, 20.0, 410.0, 220.0], [0.0, 0.0, 3.0, 2.0]])
    ell, box = ellipse_masks(boxes, 240, 420), box_masks(boxes, 240, 420)
    assert not (ell & ~box).any()
    assert ell[0].sum() / box[0].sum() == pytest.approx(np.pi / 4, abs=0.01)
    ds = EvalDataset.load(IMAGES, ANNS, limit=10)
    ell_m = evaluate(EllipseFill(), ds, "box", progress=False)["metrics"]["mIoU"]
    box_m = evaluate(BoxFill(), ds, "box", progress=False)["metrics"]["mIoU"]
    assert ell_m["all"] == pytest.approx(65.49245302616691, abs=1e-9)
    assert box_m["all"] == pytest.approx(62.28277346859714, abs=1e-9)
    with pytest.raises(InputError, match="ellipse-fill needs a box"):
        EllipseFill().predict_clicks(None, None)


@pytest.mark.parametrize(
    "name, recorded",
    [
        (
            "leansam-efficientvit-s",
            {"all": 49.333, "small": 44.158, "medium": 48.729, "large": 60.045},
        ),
        ("leansam-vit-s", {"all": 42.936, "small": 34.160, "medium": 44.665, "large": 57.392}),
    ],
)
def test_shipped_weights_score_their_recorded_box_miou(name, recorded):
    """The shipped weights (weights/, MODEL_CARD.md "Results") on the first 10 coco-mini val
    images, box protocol: the recorded mIoU x 100 by size, within 0.005 (masks thresholded at a
    logit of 0 can flip a pixel between CPUs and thread counts; 1e-5 here between 1 and 2
    threads). A changed weight file, preprocessing or decoder moves it. Box-fill scores 62.28 on
    the same images (above): issue 21's target, shipped weights above box-fill, is not met yet
    (the student is 13 points below, the teacher 19), so that is not asserted; the weights before
    issue 21 scored 33.34 and 33.11 here."""
    from leansam import create_model

    model = create_model(name, pretrained=True).eval()
    got = evaluate(model, EvalDataset.load(IMAGES, ANNS, limit=10), "box", progress=False)
    for size, value in recorded.items():
        assert got["metrics"]["mIoU"][size] == pytest.approx(value, abs=0.005), size


def test_a_run_refuses_to_resume_after_its_weights_changed_under_the_same_path(tmp_path, capsys):
    """`make weights` republishes weights/ under the same names: the run folder records the
    checkpoint's sha256, so an earlier model's per-image results are never mixed in."""
    from leansam import create_model
    from leansam.cli import main

    ckpt = tmp_path / "model.pt"
    torch.save(create_model("efficientvit-sam-tiny-l", seed=0).state_dict(), ckpt)
    args = ["eval", "--images", str(IMAGES), "--annotations", str(ANNS), "--limit", "1",
            "--model", "efficientvit-sam-tiny-l", "--checkpoint", str(ckpt), "--protocol", "box",
            "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()  # sha256sum's
    assert main(args) == 0  # the same file: resumes (nothing left to do)
    capsys.readouterr()
    # a folder written before the sha256 was recorded may hold another model's results: refused
    del run["checkpoint_sha256"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    assert main(args) == 2 and "differs in checkpoint_sha256" in capsys.readouterr().err
    torch.save(create_model("efficientvit-sam-tiny-l", seed=1).state_dict(), ckpt)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "holds results of another configuration (differs in checkpoint_sha256): use a new --out, "
        "or --fresh to discard them"
    ), err
    assert main([*args, "--fresh"]) == 0
