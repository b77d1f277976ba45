"""The command line as a user meets it: real subprocesses, real files, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI
from PIL import Image

from leansam.io import coco_rle_to_mask

MODEL = "efficientvit-sam-tiny-l"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leansam.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def image_path(coco_val):
    images, _ = coco_val
    return COCO_MINI / "val2017" / images[0]["file_name"]


def test_models_lists_variants():
    res = run("models")
    assert res.returncode == 0, res.stderr
    assert "efficientvit-sam-l0" in res.stdout and "sam-vit-h" in res.stdout
    assert "641.1M" in res.stdout and MODEL not in res.stdout
    rows = json.loads(run("models", "--all", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["efficientvit-sam-l0"]["image_size"] == 512
    assert by_name["efficientvit-sam-xl1"]["state_dict_keys"] == 701
    assert MODEL in by_name


def test_segment_boxes_multimask(tmp_path, image_path):
    out = tmp_path / "out"
    res = run(
        "segment",
        str(image_path),
        "--model",
        MODEL,
        "--box",
        "10,20,200,300",
        "--box",
        "50,60,120,100",
        "--multimask",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert "random weights" in res.stderr
    w, h = Image.open(image_path).size
    record = json.loads((out / "result.json").read_text())
    assert len(record["results"]) == 2
    assert record["config"]["model"] == MODEL and record["config"]["multimask"] is True
    assert record["environment"]["torch"] == torch.__version__
    for i, r in enumerate(record["results"]):
        assert len(r["masks"]) == 3
        best = np.array(Image.open(out / f"mask_{i:03d}.png")) > 0
        assert best.shape == (h, w)
        for k, m in enumerate(r["masks"]):
            png = np.array(Image.open(out / f"mask_{i:03d}_{k}.png")) > 0
            np.testing.assert_array_equal(coco_rle_to_mask(m["segmentation"]), png)
            assert m["area"] == int(png.sum())
        np.testing.assert_array_equal(coco_rle_to_mask(r["masks"][r["best"]]["segmentation"]), best)
    overlay = Image.open(out / "overlay.png")
    assert overlay.size == (w, h) and overlay.mode == "RGB"
    assert not list(out.glob(".*tmp"))


def test_segment_points(tmp_path, image_path):
    out = tmp_path / "pts"
    res = run(
        "segment",
        str(image_path),
        "--model",
        MODEL,
        "--point",
        "100,120",
        "--point",
        "30,40,0",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["results"][0]["prompt"]["points"] == [[100.0, 120.0, 1], [30.0, 40.0, 0]]
    assert len(record["results"][0]["masks"]) == 1
    res = run(
        "segment",
        str(image_path),
        "--model",
        MODEL,
        "--point",
        "100,120",
        "--point",
        "30,40",
        "--separate-points",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert len(json.loads((out / "result.json").read_text())["results"]) == 2


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, image_path):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    data = image_path.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "notes.pt").write_text("not weights")
    torch.save(
        __import__("leansam").create_model("efficientvit-sam-tiny-xl").state_dict(), d / "xl.pt"
    )
    return d


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing image", "image not found"),
        ("name too long", "is not usable: File name too long"),
        ("corrupt image", "cannot read image"),
        ("truncated image", "truncated"),
        ("box outside", "lies outside the"),
        ("inverted box", "empty or inverted"),
        ("malformed box", "expected four numbers"),
        ("bad label", "label must be 1"),
        ("no prompt", "give at least one prompt"),
        ("unknown model", "unknown model 'efficientvit-sam-l9'"),
        ("not a checkpoint", "not a PyTorch or safetensors checkpoint"),
        ("other variant", "is for efficientvit-sam-tiny-xl, not efficientvit-sam-tiny-l"),
        ("missing checkpoint", "checkpoint not found"),
    ],
)
def test_segment_bad_input(tmp_path, image_path, bad_files, case, message):
    img, model, extra = str(image_path), MODEL, ["--box", "10,20,200,300"]
    if case == "missing image":
        img = str(tmp_path / "nope.jpg")
    elif case == "name too long":
        img = "x" * 300 + ".jpg"
    elif case == "corrupt image":
        img = str(bad_files / "corrupt.jpg")
    elif case == "truncated image":
        img = str(bad_files / "truncated.jpg")
    elif case == "box outside":
        extra = ["--box", "10,20,5000,300"]
    elif case == "inverted box":
        extra = ["--box", "200,20,10,300"]
    elif case == "malformed box":
        extra = ["--box", "10,20,30"]
    elif case == "bad label":
        extra = ["--point", "10,20,7"]
    elif case == "no prompt":
        extra = []
    elif case == "unknown model":
        model = "efficientvit-sam-l9"
    elif case == "not a checkpoint":
        extra += ["--checkpoint", str(bad_files / "notes.pt")]
    elif case == "other variant":
        extra += ["--checkpoint", str(bad_files / "xl.pt")]
    elif case == "missing checkpoint":
        extra += ["--checkpoint", str(tmp_path / "none.pt")]
    res = run("segment", img, "--model", model, *extra, "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("leansam: error: ") and message in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "result.json").exists()


def test_demo_reports_untrained_weights(tmp_path):
    out = tmp_path / "demo"
    res = run(
        "demo", "--data", str(COCO_MINI), "--out", str(out), "--model", MODEL, "--images", "2"
    )
    assert res.returncode == 0, res.stderr
    assert "has random weights (no --checkpoint): its masks are meaningless" in res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["trained"] is False and len(report["images"]) == 2
    assert 0.0 <= report["mIoU"] <= 100.0
    assert all(len(r["iou"]) == r["objects"] >= 1 for r in report["images"])
    md = (out / "report.md").read_text()
    assert "untrained (random)" in md and "| image | objects | mIoU |" in md
    assert "label each mask with its IoU against the ground-truth mask (measured" in md
    assert all(len(r["predicted_iou"]) == r["objects"] for r in report["images"])
    assert len(list((out / "overlays").glob("*.png"))) == 2


def test_flag_defaults_are_the_library_defaults():
    """Flags that set a library dataclass field or function argument take its default from there
    (issue 20), so the command line and the library cannot drift apart."""
    import inspect

    from leansam.amg import SamAutomaticMaskGenerator
    from leansam.cli import build_parser
    from leansam.cli.parsing import default_of
    from leansam.configs import SamConfig
    from leansam.eval import evaluate, make_mask_source
    from leansam.quant import QuantConfig, quantize_to_file
    from leansam.service import Limits

    def parse(*argv: str) -> dict:
        return vars(build_parser().parse_args(argv))

    ev = parse("everything", "x.jpg", "--model", MODEL, "--out", "o")
    generator = inspect.signature(SamAutomaticMaskGenerator).parameters
    for name in ("points_per_side", "points_per_batch", "pred_iou_thresh", "box_nms_thresh",
                 "stability_score_thresh", "crop_n_layers", "min_mask_region_area"):  # fmt: skip
        assert ev[name] == generator[name].default, name
    qz = parse("quantize", "--model", MODEL, "--calib-images", "d", "--calib-annotations", "a.json",
               "--out", "q.pt")  # fmt: skip
    config = QuantConfig.from_bits(
        qz["method"], qz["bits"], iters=qz["iters"], kernel_bug=qz["kernel_bug"],
        sign_fold=not qz["no_sign_fold"], cag_merge=qz["cag_merge"], softmax=qz["softmax"],
        seed=qz["seed"], keep_8bit=tuple(qz["keep_8bit"]),
    )  # fmt: skip
    assert config == QuantConfig()
    assert qz["calib_count"] == default_of(quantize_to_file, "calib_count") == 32
    e = parse("eval", "--images", "i", "--annotations", "a.json", "--model", MODEL,
              "--protocol", "box", "--out", "o")  # fmt: skip
    assert tuple(int(k) for k in e["clicks"].split(",")) == default_of(evaluate, "clicks")
    assert e["score"] == default_of(evaluate, "score")
    assert e["batch_size"] == default_of(make_mask_source, "batch_size")
    sv = parse("serve", "--model", MODEL)
    assert Limits() == Limits(
        max_upload_bytes=int(sv["max_upload_mb"] * 2**20),
        max_pixels=int(sv["max_megapixels"] * 1e6), cache_images=sv["cache_images"],
        max_concurrency=sv["concurrency"], max_queue=sv["queue"], timeout_s=sv["timeout"],
    )  # fmt: skip
    with pytest.raises(TypeError, match="'calib_images' has no default"):
        default_of(quantize_to_file, "calib_images")
    with pytest.raises(TypeError, match="'name' has no default"):
        default_of(SamConfig, "name")
