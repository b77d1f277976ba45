"""Training building blocks: COCO -> SA-1B conversion and reading, prompt sampling, the loss."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI

from leansam.data.coco import ann_to_mask, load_coco
from leansam.data.sa1b import SA1BDataset, coco_to_sa1b
from leansam.errors import InputError
from leansam.train.losses import iou_loss, mask_loss, point_sample, uncertain_point_coords
from leansam.train.prompts import error_clicks, mask_boxes, sample_prompts

IMAGES = COCO_MINI / "train2017"
ANNS = COCO_MINI / "annotations" / "instances_train2017.json"


@pytest.fixture(scope="module")
def sa1b(tmp_path_factory):
    out = tmp_path_factory.mktemp("sa1b")
    counts = coco_to_sa1b(IMAGES, ANNS, out, progress=False)
    return out, counts


def test_coco_to_sa1b_round_trips_masks_exactly(sa1b):
    out, counts = sa1b
    images, anns = load_coco(ANNS)
    kept = {
        im["id"]: [a for a in anns.get(im["id"], []) if a["area"] >= 1 and not a["iscrowd"]]
        for im in images
    }
    assert counts["images"] == sum(1 for v in kept.values() if v)
    assert counts["masks"] == sum(len(v) for v in kept.values())
    ds = SA1BDataset(out)
    assert len(ds) == counts["images"]
    by_id = {im["id"]: im for im in images}
    for i in range(0, len(ds), 7):
        sample = ds[i]
        iid = int(ds.files[i].stem.split("_")[1])
        info = by_id[iid]
        expected = sorted(kept[iid], key=lambda a: a["id"])
        assert sample.ids == [a["id"] for a in expected]
        assert sample.image.shape == (info["height"], info["width"], 3)
        for m, a in zip(sample.masks, expected, strict=True):
            np.testing.assert_array_equal(m, ann_to_mask(a, info["height"], info["width"]))
        # JPEG bytes copied unchanged
        assert (out / f"sa_{iid}.jpg").read_bytes() == (IMAGES / info["file_name"]).read_bytes()


def test_coco_to_sa1b_resumes_and_cli(sa1b, tmp_path):
    out, counts = sa1b
    again = coco_to_sa1b(IMAGES, ANNS, out, progress=False)
    assert again["existing"] == counts["images"] and again["images"] == 0
    res = subprocess.run(
        [
            sys.executable, "-m", "leansam.cli", "data", "coco-to-sa1b", "--images", str(IMAGES),
            "--annotations", str(ANNS), "--out", str(tmp_path / "x"), "--no-progress",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"wrote {counts['images']} images with {counts['masks']} masks" in res.stdout


def test_corrupt_samples_are_skipped_and_counted(sa1b, tmp_path):
    out, _ = sa1b
    good = sorted(out.glob("sa_*.json"))[:2]
    for f in good:
        (tmp_path / f.name).write_text(f.read_text())
        jpg = f.with_suffix(".jpg")
        (tmp_path / jpg.name).write_bytes(jpg.read_bytes())
    # a truncated image and an annotation file that is not JSON
    (tmp_path / good[0].with_suffix(".jpg").name).write_bytes(
        good[0].with_suffix(".jpg").read_bytes()[:500]
    )
    (tmp_path / "sa_999.json").write_text("{not json")
    ds = SA1BDataset(tmp_path)
    samples = [ds[i] for i in range(len(ds))]
    assert sum(s is None for s in samples) == 2 and ds.skipped == 2
    assert sum(s is not None for s in samples) == 1


def test_dataset_errors(tmp_path):
    from leansam.errors import InputError

    with pytest.raises(InputError, match="SA-1B folder not found"):
        SA1BDataset(tmp_path / "none")
    with pytest.raises(InputError, match="no sa_"):
        SA1BDataset(tmp_path)


def test_prompt_sampling():
    masks = np.zeros((3, 40, 50), dtype=bool)
    masks[0, 5:10, 7:20] = True
    masks[1, 20:39, 0:3] = True
    masks[2, 0:1, 49:50] = True
    np.testing.assert_array_equal(
        mask_boxes(masks), [[7, 5, 20, 10], [0, 20, 3, 39], [49, 0, 50, 1]]
    )
    rng = np.random.default_rng(0)
    kinds, multi, counts = [], [], set()
    for _ in range(400):
        p = sample_prompts(masks, rng)
        kinds.append(p.boxes is not None)
        multi.append(p.multimask)
        if p.points is not None:
            assert p.boxes is None and p.labels.shape == p.points.shape[:2]
            assert (p.labels == 1).all()
            counts.add(p.points.shape[1])
            xs, ys = p.points[..., 0].astype(int), p.points[..., 1].astype(int)
            for i in range(3):
                assert masks[i, ys[i], xs[i]].all()  # every point inside its own mask
    assert 0.4 < np.mean(kinds) < 0.6 and 0.4 < np.mean(multi) < 0.6
    assert counts == set(range(1, 11))
    a = sample_prompts(masks, np.random.default_rng(5))
    b = sample_prompts(masks, np.random.default_rng(5))
    assert a.multimask == b.multimask and np.array_equal(
        a.points if a.points is not None else a.boxes, b.points if b.points is not None else b.boxes
    )


def test_error_clicks_land_on_the_error_with_its_label():
    gt = np.zeros((4, 30, 40), dtype=bool)
    gt[:3, 10:20, 5:25] = True
    pred = np.zeros_like(gt)
    pred[1] = True  # everything: the error is the background
    pred[2] = gt[2]  # no error: a positive click in the mask
    rng = np.random.default_rng(0)
    seen = {0: set(), 1: set()}
    for _ in range(200):
        xy, labels = error_clicks(pred, gt, rng)
        x, y = xy.astype(int).T
        assert xy.shape == (4, 2) and labels.tolist() == [1, 0, 1, -1]
        assert gt[0, y[0], x[0]] and not gt[1, y[1], x[1]] and gt[2, y[2], x[2]]
        assert (xy[3] == 0).all()  # empty mask, empty prediction: a padding point
        seen[0].add((x[0], y[0]))
        seen[1].add((x[1], y[1]))
    assert len(seen[0]) > 90 and len(seen[1]) > 150  # spread over the region, not one pixel
    # a mixed error: missed pixels give positive clicks, spurious ones negative, by area
    pred[0] = False
    pred[0, 10:20, 5:15] = True  # half the object found
    pred[0, 0:10, 0:10] = True  # and as much background (100 px each)
    labels = [int(error_clicks(pred, gt, rng)[1][0]) for _ in range(400)]
    assert 0.35 < np.mean(labels) < 0.65
    a, b = (error_clicks(pred, gt, np.random.default_rng(3)) for _ in range(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_point_sample_and_uncertainty():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    centres = torch.tensor([[[0.125, 0.125], [0.875, 0.375]]])  # pixel centres (0,0) and (3,1)
    torch.testing.assert_close(point_sample(x, centres), torch.tensor([[[0.0, 7.0]]]))
    ramp = 20 * (0.5 - (torch.arange(32) + 0.5) / 32)  # logit 0 at x = 0.5, growing away from it
    logits = ramp.expand(2, 1, 32, 32).clone()
    g = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, 400, generator=g)
    assert coords.shape == (2, 400, 2)
    # 75% of the points are the most uncertain quarter of 3x candidates: |x - 0.5| < 0.125, where
    # uniform sampling would put 25%
    near_edge = ((coords[..., 0] - 0.5).abs() < 0.13).float().mean()
    assert near_edge > 0.7


def test_mask_loss():
    gt = torch.zeros(2, 64, 64)
    gt[:, 10:40, 20:50] = 1
    perfect = (gt * 40 - 20)[:, None]  # +20 inside, -20 outside
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # points concentrate on the boundary, where bilinear targets are soft: even a perfect
    # prediction keeps some loss, but far below an uninformed or an inverted one
    lp = mask_loss(perfect, gt, num_points=2000, generator=g())
    l0 = mask_loss(torch.zeros_like(perfect), gt, num_points=2000, generator=g())
    lw = mask_loss(-perfect, gt, num_points=2000, generator=g())
    assert lp.shape == (2,)
    assert (lp < 0.5 * l0).all() and (l0 < 0.2 * lw).all()
    # multimask: the best of the three candidates counts
    three = torch.cat([-perfect, perfect, torch.zeros_like(perfect)], dim=1)
    lm = mask_loss(three, gt, num_points=2000, generator=g())
    assert (lm < 0.5 * l0).all() and ((lm - lp).abs() < 0.2 * lp).all()  # sampling noise only
    # 20 x BCE + Dice exactly, on points away from the boundary
    inside = torch.full((1, 1, 8, 8), 3.0)
    full = torch.ones(1, 8, 8)
    expected = 20 * torch.nn.functional.softplus(torch.tensor(-3.0)) + (
        1
        - (2 * torch.sigmoid(torch.tensor(3.0)) * 500 + 1)
        / (torch.sigmoid(torch.tensor(3.0)) * 500 + 500 + 1)
    )
    torch.testing.assert_close(mask_loss(inside, full, num_points=500)[0], expected)
    bce = torch.nn.functional.softplus(torch.tensor(-3.0))
    torch.testing.assert_close(
        mask_loss(inside, full, num_points=500, bce_weight=1.0)[0], expected - 19 * bce
    )
    focal = mask_loss(perfect, gt, num_points=2000, focal=True, generator=g())
    assert (focal < lp).all()
    # gradients reach the logits
    x = torch.zeros(1, 1, 16, 16, requires_grad=True)
    mask_loss(x, gt[:1], num_points=500).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_iou_loss_is_mse_to_the_actual_iou():
    gt = torch.zeros(1, 512, 512)
    gt[0, :256, :] = 1  # top half
    logits = torch.full((1, 3, 256, 256), -10.0)
    logits[0, 0, :128, :] = 10  # exact: IoU 1
    logits[0, 1, :64, :] = 10  # half of it: IoU 0.5
    # mask 2 predicts nothing: IoU 0
    iou_pred = torch.tensor([[1.0, 0.5, 0.0]])
    assert iou_loss(logits, gt, iou_pred).item() == pytest.approx(0.0, abs=1e-7)
    wrong = torch.tensor([[0.0, 0.0, 1.0]])
    assert iou_loss(logits, gt, wrong).item() == pytest.approx((1 + 0.25 + 1) / 3)
    # the loss trains the IoU head only, not the masks
    logits.requires_grad_(True)
    iou_pred = wrong.clone().requires_grad_(True)
    iou_loss(logits, gt, iou_pred).sum().backward()
    assert logits.grad is None and iou_pred.grad.abs().sum() > 0


def test_synthetic_scenes(tmp_path):
    from leansam.data.synth import make_scene, write_scenes

    image, masks = make_scene(np.random.default_rng([0, 1]), size=128)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and max(image.shape[:2]) == 128
    assert masks.shape[1:] == image.shape[:2] and len(masks) >= 1
    assert (masks.sum(0) <= 1).all()  # visible parts: disjoint
    assert (masks.reshape(len(masks), -1).sum(1) >= 30).all()
    assert write_scenes(tmp_path, 3, seed=0, size=128) == 3
    assert write_scenes(tmp_path, 4, seed=0, size=128) == 1  # resumes
    ds = SA1BDataset(tmp_path)
    assert len(ds) == 4
    again, again_masks = make_scene(np.random.default_rng([0, 1]), size=128)
    assert np.array_equal(again_masks, masks) and np.array_equal(again, image)
    assert np.array_equal(ds[1].masks, masks)  # masks round-trip exactly through RLE
    # the settings are recorded: another seed or size into the same folder is refused, --fresh
    # replaces the scenes, and a folder of other SA-1B files is never mixed into
    with pytest.raises(InputError, match=r"another configuration \(differs in seed\)"):
        write_scenes(tmp_path, 4, seed=1, size=128)
    assert write_scenes(tmp_path, 2, seed=1, size=128, fresh=True, progress=False) == 2
    assert len(SA1BDataset(tmp_path)) == 2
    _, other_masks = make_scene(np.random.default_rng([1, 1]), size=128)
    assert np.array_equal(SA1BDataset(tmp_path)[1].masks, other_masks)  # seed 1's scene now
    assert other_masks.shape != masks.shape or not np.array_equal(other_masks, masks)
    # a folder written before the settings were recorded: taken over when its first scene is
    # the one the settings generate, else refused (never deleted: it may be someone's data)
    (tmp_path / "synth.json").unlink()
    for fresh in (False, True):
        with pytest.raises(InputError, match="holds SA-1B files not written by synth: use a new"):
            write_scenes(tmp_path, 2, seed=0, size=128, fresh=fresh)
        assert len(SA1BDataset(tmp_path)) == 2 and not (tmp_path / "synth.json").exists()
    assert write_scenes(tmp_path, 3, seed=1, size=128, progress=False) == 1
    assert json.loads((tmp_path / "synth.json").read_text()) == {"seed": 1, "size": 128}
    with pytest.raises(InputError, match="is a file"):
        write_scenes(tmp_path / "sa_0.jpg", 1)
    with pytest.raises(InputError, match="--seed must be 0 or more"):
        write_scenes(tmp_path / "neg", 1, seed=-1)
    # the command line: scenes written without a bar, one line and exit 2 for another seed
    cli = [sys.executable, "-m", "leansam.cli", "data", "synth", "--out", str(tmp_path / "c")]
    ok = subprocess.run(
        [*cli, "--count", "2", "--size", "64", "--no-progress"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.startswith("wrote 2 scenes") and not ok.stderr
    bad = subprocess.run(
        [*cli, "--count", "2", "--size", "64", "--seed", "2"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        "holds results of another configuration (differs in seed): use a new --out, or --fresh "
        "to discard them"
    ), bad.stderr


def _color_sources(root) -> list:
    """Two SA-1B folders of blue images, each with one red square object (its mask exact)."""
    from PIL import Image

    from leansam.data.sa1b import mask_record, write_sa1b_pair

    folders = []
    for d, (h, w) in enumerate(((100, 80), (60, 90))):
        folder = root / f"src{d}"
        folder.mkdir()
        for i in range(2):
            image = np.zeros((h, w, 3), np.uint8)
            image[..., 2] = 255
            mask = np.zeros((h, w), bool)
            mask[10 + 5 * i : 40 + 5 * i, 20:50] = True
            image[mask] = (255, 0, 0)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")  # lossless: exact colours
            write_sa1b_pair(folder, i, buf.getvalue(), h, w, [mask_record(mask, 0)])
        folders.append(folder)
    return folders


def test_copy_paste_scenes(tmp_path):
    from scipy.ndimage import binary_dilation, binary_erosion

    from leansam.data.paste import MIN_PIXELS, ObjectPool, make_paste_scene, write_paste_scenes

    sources = _color_sources(tmp_path)
    (sources[1] / "sa_9.json").write_text("{not json")  # unreadable: left out of the pool
    pool = ObjectPool(sources)
    assert len(pool.objects) == 4 and len(pool.images) == 4
    for i in range(10):
        rng = np.random.default_rng([0, i])
        image, masks, n_pasted = make_paste_scene(pool, rng, size=128, objects=(3, 3))
        assert image.dtype == np.uint8 and max(image.shape[:2]) == 128
        assert masks.shape[1:] == image.shape[:2] and masks.dtype == bool
        assert 1 <= n_pasted <= 3 and len(masks) <= 1 + n_pasted  # one background object
        assert (masks.reshape(len(masks), -1).sum(1) >= MIN_PIXELS).all()
        # pasted objects lie on top: each pasted mask is disjoint from every other mask
        for k in range(len(masks) - n_pasted, len(masks)):
            others = np.delete(masks, k, axis=0).any(0)
            assert not (masks[k] & others).any()
        # red inside every object (away from the softened edge), blue away from all objects
        for m in masks:
            inner = binary_erosion(m, iterations=2)
            assert np.abs(image[inner].astype(int) - (255, 0, 0)).max() <= 2
        outside = ~binary_dilation(masks.any(0), iterations=2)
        assert np.abs(image[outside].astype(int) - (0, 0, 255)).max() <= 2
        again = make_paste_scene(pool, np.random.default_rng([0, i]), size=128, objects=(3, 3))
        assert np.array_equal(again[0], image) and np.array_equal(again[1], masks)
    out = tmp_path / "paste"
    assert write_paste_scenes(sources, out, 3, size=128, progress=False) == 3
    assert write_paste_scenes(sources, out, 4, size=128, progress=False) == 1  # resumes
    ds = SA1BDataset(out)
    assert len(ds) == 4
    _, masks, _ = make_paste_scene(pool, np.random.default_rng([0, 2]), size=128)
    assert np.array_equal(ds[2].masks, masks)  # masks round-trip exactly through RLE
    with pytest.raises(InputError, match="is one of the sources"):
        write_paste_scenes([out], out, 1)
    with pytest.raises(InputError, match=r"another configuration \(differs in size\).*--fresh"):
        write_paste_scenes(sources, out, 5, size=96, progress=False)  # would mix two sizes
    with pytest.raises(InputError, match=r"another configuration \(differs in seed, sources\)"):
        write_paste_scenes(sources[:1], out, 5, seed=1, size=128, progress=False)
    # --fresh: the old scenes go, the new settings' are written from scene 0
    assert write_paste_scenes(sources, out, 2, size=96, fresh=True, progress=False) == 2
    assert sorted(f.name for f in out.glob("sa_*")) == [
        "sa_0.jpg", "sa_0.json", "sa_1.jpg", "sa_1.json"
    ]  # fmt: skip
    assert max(SA1BDataset(out)[0].image.shape[:2]) == 96
    with pytest.raises(InputError, match="is a file"):
        write_paste_scenes(sources, out / "sa_0.json", 1)
    with pytest.raises(InputError, match="cannot create --out"):
        write_paste_scenes(sources, out / "sa_0.json" / "under", 1)
    with pytest.raises(InputError, match="holds SA-1B files not written by copy-paste"):
        write_paste_scenes(sources[:1], sources[1], 1)  # another dataset: never mixed in
    with pytest.raises(InputError, match="--seed must be 0 or more"):
        write_paste_scenes(sources, tmp_path / "neg", 1, seed=-1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no sa_"):
        write_paste_scenes([tmp_path / "empty"], tmp_path / "x", 1)
    # the command line: scenes written, then one line and exit 2 for a missing source
    cli = [sys.executable, "-m", "leansam.cli", "data", "paste", "--out", str(tmp_path / "c")]
    ok = subprocess.run(
        [*cli, "--sources", *map(str, sources), "--count", "2", "--size", "96", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0 and "wrote 2 copy-paste scenes" in ok.stdout, ok.stderr
    assert len(SA1BDataset(tmp_path / "c")) == 2
    assert ok.stderr.splitlines() == [  # the unreadable source file, named once
        f"skipping sa_9.json: SA-1B annotation file {sources[1] / 'sa_9.json'} is not valid "
        "JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    ]
    bad = subprocess.run(
        [*cli, "--sources", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"leansam: error: SA-1B folder not found: {tmp_path / 'missing'}"
    args = [*cli, "--sources", *map(str, sources), "--count", "1", "--size", "64", "--no-progress"]
    other = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and other.stderr.strip().endswith(
        "holds results of another configuration (differs in size): use a new --out, or --fresh "
        "to discard them"
    ), other.stderr
    fresh = subprocess.run([*args, "--fresh"], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and "wrote 1 copy-paste scenes" in fresh.stdout, fresh.stderr
    assert len(SA1BDataset(tmp_path / "c")) == 1


def test_dense_mask_loss():
    gt = torch.zeros(1, 64, 64)
    gt[0, :32] = 1  # top half
    logits = torch.full((1, 3, 32, 32), -5.0)
    logits[0, 0, :16] = 5.0  # right
    dense = mask_loss(logits, gt, num_points=0)
    # best of three = the exact one: BCE softplus(-5) everywhere + Dice of sigmoid(5) masks
    p = torch.sigmoid(torch.tensor(5.0))
    dice = 1 - (2 * p * 512 + 1) / (p * 512 + (1 - p) * 512 + 512 + 1)
    bce = torch.nn.functional.softplus(torch.tensor(-5.0))
    torch.testing.assert_close(dense[0], 20 * bce + dice)
    # every logit gets a gradient, also far from any boundary
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    mask_loss(x, gt, num_points=0).sum().backward()
    assert bool((x.grad != 0).all())


def test_balanced_bce_weighs_object_and_background_alike():
    """A 4 x 4 object in a 64 x 64 frame: an empty mask costs the plain BCE almost nothing (the
    object is 0.4 % of the pixels) but half the balanced BCE, whatever the object's size."""
    empty = torch.full((1, 1, 64, 64), -8.0)
    costs = {}
    for side in (4, 32):
        gt = torch.zeros(1, 64, 64)
        gt[0, :side, :side] = 1
        plain = mask_loss(empty, gt, num_points=0, bce_weight=1.0) - mask_loss(
            empty, gt, num_points=0, bce_weight=0.0
        )
        balanced = mask_loss(empty, gt, num_points=0, bce_weight=1.0, bce_balanced=True) - (
            mask_loss(empty, gt, num_points=0, bce_weight=0.0)
        )
        costs[side] = plain.item(), balanced.item()
        # object pixels cost softplus(8) each, background softplus(-8): their means, averaged
        sp = torch.nn.functional.softplus
        expected = 0.5 * (sp(torch.tensor(8.0)) + sp(torch.tensor(-8.0)))
        torch.testing.assert_close(balanced[0], expected)
    assert costs[4][0] < 0.04 and costs[4][1] > 3.9  # plain BCE: the small object hardly counts
    assert costs[32][0] == pytest.approx(2.0, abs=0.01)


def test_decoder_lr_scale_splits_the_groups():
    from leansam import create_model
    from leansam.train.loop import param_groups

    model = create_model("efficientvit-sam-tiny-l", seed=0)
    plain = param_groups(model, 0.1, 1e-3)
    assert [(g["weight_decay"], g["lr"]) for g in plain] == [(0.1, 1e-3), (0.0, 1e-3)]
    scaled = param_groups(model, 0.1, 1e-3, decoder_lr_scale=0.1)
    assert [(g["weight_decay"], g["lr"]) for g in scaled] == [
        (0.1, 1e-3), (0.1, 1e-4), (0.0, 1e-3), (0.0, 1e-4)
    ]  # fmt: skip
    decoder = {id(p) for n, p in model.named_parameters() if n.startswith("mask_decoder.")}
    low = {id(p) for g in scaled if g["lr"] == 1e-4 for p in g["params"]}
    assert decoder <= low and len(low) < len(list(model.parameters()))
    assert sum(len(g["params"]) for g in scaled) == len(list(model.parameters()))
