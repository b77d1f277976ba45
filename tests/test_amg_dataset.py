"""Segment everything over a dataset: the single-image API's records per image, 2 gloo ranks = 1,
kill and resume, bad files skipped and counted, the output trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, cli_one_and_two_ranks

from leansam import SamAutomaticMaskGenerator, create_model
from leansam.amg.dataset import (
    embed_chunks,
    label_images,
    list_images,
    output_name,
    shard_chunks,
    write_behind,
)
from leansam.amg.files import finite_or_none
from leansam.errors import InputError
from leansam.io import coco_rle_to_mask, load_image

MODEL = "efficientvit-sam-tiny-l"
GEN = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
CLI_GEN = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three coco-mini val images, one in a subfolder."""
    d = tmp_path_factory.mktemp("imgs")
    files = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:3]
    (d / "sub").mkdir()
    dests = [d / files[0].name, d / files[1].name, d / "sub" / files[2].name]
    for f, dest in zip(files, dests, strict=True):
        shutil.copy(f, dest)
    return d


@pytest.fixture(scope="module")
def sam():
    return create_model(MODEL, seed=0).eval()


def _outputs(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("sa_*.json"))}


def test_folder_gives_the_single_image_records(folder, sam, tmp_path):
    summary = label_images(folder, sam, tmp_path / "o", progress=False, workers=0, **GEN)
    assert summary["images"] == summary["labelled"] == 3 and not summary["skipped"]
    files, root = list_images(folder)
    gen = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **GEN)
    total = 0
    for i, f in enumerate(files):
        data = json.loads((tmp_path / "o" / f"{output_name(f, root)}.json").read_text())
        expected = sorted(gen.generate(load_image(f)), key=lambda r: r["area"], reverse=True)
        expected = [{"id": k, **{a: finite_or_none(v) for a, v in r.items()}} for k, r in
                    enumerate(expected)]  # fmt: skip
        assert data["annotations"] == json.loads(json.dumps(expected))
        assert data["image"]["image_id"] == i
        assert (tmp_path / "o" / data["image"]["file_name"]).resolve() == f.resolve()
        assert data["config"]["points_per_side"] == 4
        total += len(expected)
    assert total == summary["masks"] > 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["masks"] == total
    assert "sa_sub__" in "".join(_outputs(tmp_path / "o"))


def test_inputs_glob_list_and_errors(folder, tmp_path):
    every, _ = list_images(folder)
    assert len(every) == 3
    other = tmp_path / "formats"
    other.mkdir()
    from PIL import Image

    for k, suffix in enumerate((".webp", ".bmp", ".tif", ".gif", ".JPG")):
        Image.new("RGB", (8, 8)).save(other / f"img{k}{suffix}")
    (other / "notes.txt").write_text("not an image")
    found = sorted(p.suffix for p in list_images(other)[0])
    assert found == [".JPG", ".bmp", ".gif", ".tif", ".webp"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# images\n{every[0]}\n\nsub/{every[2].name}\n")
    shutil.copytree(folder / "sub", tmp_path / "sub")
    assert [p.name for p in list_images(lst)[0]] == [every[0].name, every[2].name]
    with pytest.raises(InputError, match="no images found"):
        list_images(tmp_path / "sub" / "*.png")
    with pytest.raises(InputError, match="not an image, a folder, a glob pattern"):
        list_images(tmp_path / "missing")
    with pytest.raises(InputError, match=r"image not found: .*typo\.jpg"):
        list_images(tmp_path / "typo.jpg")


def test_bad_throughput_arguments_fail_before_touching_the_output(folder, sam, tmp_path):
    out = tmp_path / "o"
    label_images(folder, sam, out, progress=False, workers=0, **GEN)
    before = _outputs(out)
    for kw, message in (({"image_batch": 0}, "at least 1, got 0"),
                        ({"workers": -1}, "workers must be 0 or more, got -1")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            label_images(folder, sam, out, progress=False, fresh=True, **{"workers": 0, **kw},
                         **GEN)  # fmt: skip
    assert _outputs(out) == before  # --fresh did not discard anything
    # a run folder of batch 1 records no image_batch (folders from before the option resume)
    assert "image_batch" not in json.loads((out / "run.json").read_text())


def test_write_behind_runs_in_order_and_raises_the_writers_errors():
    done = []

    def fails():
        raise OSError("disk full")

    with write_behind() as submit:
        submit(done.append, 1)
        submit(done.append, 2)
    assert done == [1, 2]
    with pytest.raises(OSError, match="disk full"), write_behind() as submit:
        submit(fails)
        submit(done.append, 3)  # waits for the failed write first, and raises its error
    assert done == [1, 2]
    with pytest.raises(OSError, match="disk full"), write_behind() as submit:
        submit(fails)  # the last write's error is raised on leaving


def test_shard_chunks_deal_consecutive_batches_round_robin():
    assert shard_chunks(5, 2, 0, 1) == [[0, 1], [2, 3], [4]]
    assert shard_chunks(5, 2, 0, 2) == [[0, 1], [4]]
    assert shard_chunks(5, 2, 1, 2) == [[2, 3]]
    assert shard_chunks(2, 1, 2, 3) == []
    with pytest.raises(InputError, match="encoder batch size must be at least 1, got 0"):
        shard_chunks(5, 0, 0, 1)


def test_batched_encoder_gives_the_per_image_results(folder, sam, tmp_path):
    files, _ = list_images(folder)
    predictor = SamAutomaticMaskGenerator(sam).predictor
    batches, real = [], predictor.set_torch_images

    def recorded(images, sizes):
        batches.append(len(images))
        return real(images, sizes)

    predictor.set_torch_images = recorded
    got = list(embed_chunks(predictor, files, [[0, 1], [2]], workers=1))
    del predictor.set_torch_images
    assert batches == [2, 1]  # one encoder call per chunk
    assert [i for i, _, _, _ in got] == [0, 1, 2]
    for i, image, embedding, error in got:
        assert error is None and image.shape == load_image(files[i]).shape
        predictor.set_image(image)
        single = predictor.get_image_embedding()
        assert embedding.shape == single.shape
        torch.testing.assert_close(embedding, single, rtol=0, atol=1e-5)
    one, two = tmp_path / "one", tmp_path / "two"
    label_images(folder, sam, one, progress=False, workers=0, image_batch=1, **GEN)
    summary = label_images(folder, sam, two, progress=False, workers=2, image_batch=2, **GEN)
    assert summary["config"]["image_batch"] == 2 and summary["labelled"] == 3
    for a, b in zip(_outputs(one).values(), _outputs(two).values(), strict=True):
        a, b = json.loads(a)["annotations"], json.loads(b)["annotations"]
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b, strict=True):
            ma, mb = coco_rle_to_mask(ra["segmentation"]), coco_rle_to_mask(rb["segmentation"])
            assert (ma & mb).sum() / (ma | mb).sum() > 0.99
            assert abs(ra["predicted_iou"] - rb["predicted_iou"]) < 1e-4


def test_kill_and_resume_and_bad_files(folder, sam, tmp_path):
    # encoder batches of 2: the run dies inside a batch, and the resumed run embeds it whole
    gen = {**GEN, "image_batch": 2}
    full = tmp_path / "full"
    label_images(folder, sam, full, progress=False, workers=0, **gen)
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    lst = tmp_path / "list.txt"
    names = [p.relative_to(data).as_posix() for p in list_images(data)[0]]
    lst.write_text("\n".join([*names, "gone.png"]) + "\n")
    lst = lst.rename(data / "list.txt")

    calls = {"n": 0}
    real = SamAutomaticMaskGenerator.generate

    def dies_on_second(self, image, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, image, **kw)

    part = tmp_path / "part"
    SamAutomaticMaskGenerator.generate = dies_on_second
    try:
        with pytest.raises(KeyboardInterrupt):
            label_images(lst, sam, part, progress=False, workers=0, **gen)
    finally:
        SamAutomaticMaskGenerator.generate = real
    assert len(_outputs(part)) == 1 and not (part / "summary.json").exists()
    summary = label_images(lst, sam, part, progress=False, workers=1, **gen)
    assert summary["already_done"] == 1 and summary["labelled"] == 2
    n_full = json.loads((full / "summary.json").read_text())["masks"]
    assert summary["masks_in_dataset"] == n_full > summary["masks"]  # earlier run's masks too
    assert [os.path.basename(s["image"]) for s in summary["skipped"]] == ["broken.jpg", "gone.png"]
    assert all(s["reason"] for s in summary["skipped"])
    # the same records as the uninterrupted run (file names differ: other root)
    ann = lambda out: [json.loads(b)["annotations"] for b in _outputs(out).values()]  # noqa: E731
    assert ann(part) == ann(full)


def test_two_gloo_ranks_write_what_one_writes(folder, tmp_path):
    # batches of 2 (3 images: rank 0 embeds two, rank 1 one) give what one process gives
    args = ["everything", str(folder), "--model", MODEL, "--no-progress", "--image-batch", "2",
            *CLI_GEN]  # fmt: skip
    one = cli_one_and_two_ranks(args, tmp_path / "one", tmp_path / "two", port_offset=7)
    assert "labelled 3 image(s) with" in one.stdout
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert len(a) == 3 and a == b  # byte-identical
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["labelled"] == 3


def test_output_folder_trains(folder, sam, tmp_path):
    from leansam.data.sa1b import SA1BDataset
    from leansam.train.config import TrainConfig
    from leansam.train.finetune import finetune

    out = tmp_path / "labels"
    label_images(folder, sam, out, progress=False, workers=0, write_overlay=True, **GEN)
    assert len(list(out.glob("*.overlay.png"))) == 3
    ds = SA1BDataset(out)
    assert len(ds) == 3 and all(ds[i] is not None for i in range(3))
    ious = [a["predicted_iou"] for p in out.glob("sa_*.json")
            for a in json.loads(p.read_text())["annotations"]]  # fmt: skip
    cut = float(np.median(ious))
    kept = SA1BDataset(out, min_predicted_iou=cut)
    n_all = sum(len(ds[i].masks) for i in range(3))
    n_kept = sum(len(s.masks) for s in (kept[i] for i in range(3)) if s is not None)
    assert 0 < n_kept < n_all
    # the masks-only reader (ShapeBank's) keeps the same masks without decoding any image
    for i in range(3):
        sample = kept[i]
        if sample is not None:
            np.testing.assert_array_equal(kept.masks(i), sample.masks)
    masks_only = tmp_path / "masks-only"
    shutil.copytree(out, masks_only, ignore=shutil.ignore_patterns("*.jpg", "*.png"))
    assert sum(len(SA1BDataset(masks_only).masks(i)) for i in range(3)) == n_all
    cfg = TrainConfig(
        stage="finetune", model=MODEL, data=[str(out)], out=str(tmp_path / "ft"), epochs=1,
        batch_size=1, masks_per_image=2, lr=1e-3, num_points=256, min_predicted_iou=cut,
    )  # fmt: skip
    result = finetune(cfg)
    assert result["steps"] == 3 and (tmp_path / "ft" / "model.pt").exists()


def test_other_settings_are_refused_outputs_are_never_inputs(folder, sam, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    out = data / "labels"  # inside the input folder: its overlays must not become inputs
    label_images(data, sam, out, progress=False, workers=0, write_overlay=True, **GEN)
    again = label_images(data, sam, out, progress=False, workers=0, write_overlay=True, **GEN)
    assert again["images"] == 3 and again["already_done"] == 3 and again["labelled"] == 0
    with pytest.raises(InputError, match=r"another configuration \(differs in points_per_side\)"):
        label_images(data, sam, out, progress=False, workers=0, **{**GEN, "points_per_side": 2})
    fresh = label_images(data, sam, out, progress=False, workers=0, fresh=True,
                         **{**GEN, "points_per_side": 2})  # fmt: skip
    assert fresh["labelled"] == 3 and not list(out.glob("*.overlay.png"))
    assert json.loads((out / "run.json").read_text())["points_per_side"] == 2
    lst = data / "twice.txt"
    first = list_images(data)[0][0]
    lst.write_text(f"{first}\n{first}\n")
    assert list_images(lst)[0] == [first]


def test_cli_refuses_dataset_options_for_one_image(tmp_path):
    image = sorted((COCO_MINI / "val2017").glob("*.jpg"))[0]
    r = subprocess.run(
        [sys.executable, "-m", "leansam.cli", "everything", str(image), "--model", MODEL,
         "--png", "--image-batch", "0", "--out", str(tmp_path / "o")], capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--png, --image-batch: only for a dataset" in r.stderr and "not one image" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "leansam.cli", "segment", str(image), "--model", MODEL,
         "--box", "1,1,30,30", "--workers", "3", "--out", str(tmp_path / "s")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "--workers: for --images DIR --detections FILE" in r.stderr
