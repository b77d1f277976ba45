"""leansam's own weights: publishing, lookup, integrity checks, and the shipped models' quality."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, REPO

from leansam import SamPredictor, create_model
from leansam.checkpoint import save_state_dict
from leansam.data.coco import ann_to_mask, load_coco, xywh_to_xyxy
from leansam.errors import CheckpointError, InputError
from leansam.io import load_image
from leansam.pretrained import PRETRAINED, pretrained_path, publish

STUDENT = "leansam-efficientvit-s"
SHIPPED = (REPO / "weights" / "manifest.json").is_file()


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A random student published into a temporary weights folder."""
    model = create_model(STUDENT, seed=1)
    save_state_dict(model.state_dict(), tmp_path / "model.pt")
    folder = tmp_path / "weights"
    publish(STUDENT, tmp_path / "model.pt", folder)
    monkeypatch.setenv("LEANSAM_WEIGHTS", str(folder))
    return model, folder


def test_publish_and_load_round_trip(published):
    model, folder = published
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest[STUDENT]
    assert entry["bytes"] == (folder / PRETRAINED[STUDENT]).stat().st_size
    assert entry["params"] == sum(v.numel() for v in model.state_dict().values())
    loaded = create_model(STUDENT, pretrained=True)
    assert loaded.dtype == torch.float32  # stored in float16, built in float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k


def test_pretrained_errors(published, tmp_path, monkeypatch):
    _, folder = published
    with pytest.raises(InputError, match="not both"):
        create_model(STUDENT, checkpoint="x.pt", pretrained=True)
    with pytest.raises(CheckpointError, match="only for leansam-vit-s, leansam-efficientvit-s"):
        create_model("efficientvit-sam-l0", pretrained=True)
    with pytest.raises(CheckpointError, match=r"leansam-vit-s\.safetensors not found"):
        pretrained_path("leansam-vit-s")
    path = folder / PRETRAINED[STUDENT]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        create_model(STUDENT, pretrained=True)
    with pytest.raises(CheckpointError, match="not one of leansam's own models"):
        publish("sam-vit-b", tmp_path / "model.pt", folder)
    with pytest.raises(CheckpointError, match="is for leansam-efficientvit-s, not leansam-vit-s"):
        publish("leansam-vit-s", tmp_path / "model.pt", folder)


def test_cli_uses_shipped_weights_by_default(published, tmp_path):
    out = tmp_path / "seg"
    path = COCO_MINI / "val2017" / sorted(p.name for p in (COCO_MINI / "val2017").iterdir())[0]
    r = subprocess.run(
        [sys.executable, "-m", "leansam.cli", "segment", str(path), "--model", STUDENT,
         "--box", "10,10,200,200", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "random weights" not in r.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["config"]["checkpoint"].endswith(PRETRAINED[STUDENT])


# ------------------------------------------------------------- the weights in this repository
def _box_miou(model: str, n_images: int) -> tuple[float, float]:
    """(model, box-fill) mIoU in % on the first val images' objects from their GT boxes."""
    from leansam.eval.predictors import box_masks

    images, anns = load_coco(COCO_MINI / "annotations" / "instances_val2017.json")
    predictor = SamPredictor(create_model(model, pretrained=True))
    ious, fill = [], []
    for info in images[:n_images]:
        objs = [a for a in anns.get(info["id"], []) if not a["iscrowd"]]
        if not objs:
            continue
        image = load_image(COCO_MINI / "val2017" / info["file_name"])
        h, w = image.shape[:2]
        boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in objs])
        predictor.set_image(image)
        masks, _, _ = predictor.predict(box=boxes, multimask_output=False)
        for m, b, a in zip(
            masks.reshape(len(objs), h, w), box_masks(boxes, h, w), objs, strict=True
        ):
            gt = ann_to_mask(a, h, w)
            ious.append((m & gt).sum() / (m | gt).sum())
            fill.append((b & gt).sum() / (b | gt).sum())
    return 100 * float(np.mean(ious)), 100 * float(np.mean(fill))


@pytest.mark.skipif(not SHIPPED, reason="weights/ not in this checkout")
@pytest.mark.parametrize("model", sorted(PRETRAINED))
def test_shipped_weights_segment_better_than_box_fill(model):
    """The trained models are real: on val images they were never trained on, their box-prompt
    masks beat filling the box (MODEL_CARD.md has the full evaluation)."""
    miou, box_fill = _box_miou(model, n_images=8)
    assert miou > box_fill + 2.0, (miou, box_fill)


def test_demo_defaults_to_the_shipped_student(published, tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "leansam.cli", "demo", "--data", str(COCO_MINI), "--out", str(out),
         "--images", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "random" not in r.stderr and "WARNING" not in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == STUDENT and report["trained"]
    assert report["checkpoint"].endswith(PRETRAINED[STUDENT])
    assert 0 < report["box_fill_mIoU"] <= 100
    assert "box-fill" in (out / "report.md").read_text()
