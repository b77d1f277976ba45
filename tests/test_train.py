"""Stage 1 / stage 2 trainers on tiny models: learning, exact resume, 2 gloo processes = 1."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import COCO_MINI

from leansam.data.sa1b import SA1BDataset, coco_to_sa1b
from leansam.errors import InputError
from leansam.train.config import TrainConfig
from leansam.train.distill import distill
from leansam.train.finetune import FinetuneStep, finetune, load_prompt_decoder, prepare_sample, zoom
from leansam.train.loop import lr_factor

STUDENT = "efficientvit-sam-tiny-l"


@pytest.fixture(scope="module")
def sa1b_small(tmp_path_factory):
    """Four coco-mini train images in SA-1B layout."""
    full = tmp_path_factory.mktemp("sa1b_full")
    coco_to_sa1b(
        COCO_MINI / "train2017",
        COCO_MINI / "annotations" / "instances_train2017.json",
        full,
        progress=False,
    )
    small = tmp_path_factory.mktemp("sa1b_small")
    for f in sorted(full.glob("sa_*.json"))[:4]:
        shutil.copy(f, small / f.name)
        shutil.copy(f.with_suffix(".jpg"), small / f.with_suffix(".jpg").name)
    return small


@pytest.fixture(scope="module")
def images_small(sa1b_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for f in sorted(sa1b_small.glob("*.jpg")):
        shutil.copy(f, d / f.name)
    return d


def _ft_cfg(data, out, **kw) -> TrainConfig:
    base = dict(
        stage="finetune", model=STUDENT, data=[str(data)], out=str(out), epochs=4,
        batch_size=2, masks_per_image=4, lr=2e-3, num_points=1024, save_every=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _fixed_batch_loss(model, data, cfg) -> float:
    """Stage-2 loss of a fixed set of samples and prompts (seeded), for before / after checks."""
    ds = SA1BDataset(data)
    step = FinetuneStep(model, cfg).eval()
    samples = [
        prepare_sample(ds[i], model.image_size, cfg, np.random.default_rng([99, i]), "cpu")
        for i in range(len(ds))
    ]
    with torch.no_grad():
        return float(step(samples, list(range(len(samples)))))


def _channels_last_check(monkeypatch, module) -> Callable[[int], None]:
    """An ``on_step`` hook asserting that the encoder ``module``'s trainer converted (through
    its ``channels_last``) trains with channels-last convolutions, 3 x 3 ones included."""
    encoders = []
    convert = module.channels_last
    monkeypatch.setattr(module, "channels_last", lambda e: encoders.append(convert(e)) or e)

    def check(step: int) -> None:
        (encoder,) = encoders
        convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
        assert any(m.weight.shape[1] > 1 and m.weight.shape[2] > 1 for m in convs)
        for m in convs:
            assert m.weight.is_contiguous(memory_format=torch.channels_last), (step, m)

    return check


def test_finetune_learns(sa1b_small, tmp_path, monkeypatch):
    import leansam.train.finetune as trainer
    from leansam import create_model

    cfg = _ft_cfg(sa1b_small, tmp_path / "ft", epochs=6, iou_loss_weight=0.5)
    before = _fixed_batch_loss(create_model(STUDENT, seed=0), sa1b_small, cfg)
    result = finetune(cfg, on_step=_channels_last_check(monkeypatch, trainer))
    after_model = create_model(STUDENT, checkpoint=tmp_path / "ft" / "model.pt")
    after = _fixed_batch_loss(after_model, sa1b_small, cfg)
    assert result["steps"] == result["total_steps"] == 12
    assert after < 0.9 * before, (before, after)
    log = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["lr"] < log[0]["lr"]  # cosine decay
    assert all(np.isfinite(r["loss"]) for r in log)
    # each term is logged, and the loss is their weighted sum
    for r in log:
        terms = r["loss_terms"]
        assert terms.keys() == {"mask", "iou"} and terms["mask"] > 0 and terms["iou"] > 0
        assert r["loss"] == pytest.approx(terms["mask"] + 0.5 * terms["iou"], rel=1e-5)


def test_distill_learns_and_takes_teacher_decoder(images_small, tmp_path, monkeypatch):
    import leansam.train.distill as trainer
    from leansam import create_model
    from leansam.checkpoint import load_state_dict
    from leansam.train.distill import encoder_input

    cfg = TrainConfig(
        stage="distill", model=STUDENT, teacher="sam-vit-tiny", data=[str(images_small)],
        out=str(tmp_path / "ds"), epochs=8, batch_size=2, lr=3e-3, save_every=4,
    )  # fmt: skip
    teacher = create_model("sam-vit-tiny", seed=0)
    files = sorted(images_small.glob("*.jpg"))

    def mse(student):
        with torch.no_grad():
            return float(
                sum(
                    torch.nn.functional.mse_loss(
                        student.image_encoder(encoder_input(student, f, "cpu")),
                        teacher.image_encoder(encoder_input(teacher, f, "cpu")),
                    )
                    for f in files
                )
            )

    student = create_model(STUDENT, seed=0)
    before = mse(student.eval())
    result = distill(cfg, on_step=_channels_last_check(monkeypatch, trainer))
    trained = create_model(STUDENT, checkpoint=tmp_path / "ds" / "model.pt")
    assert mse(trained) < 0.7 * before
    assert result["steps"] == 16
    state = load_state_dict(tmp_path / "ds" / "model.pt")
    for k, v in teacher.state_dict().items():
        if k.startswith(("prompt_encoder.", "mask_decoder.")):
            assert torch.equal(state[k], v), k
    assert len(list((tmp_path / "ds" / "teacher_cache").glob("shard_*.pt"))) == 1
    cached = torch.load(tmp_path / "ds" / "teacher_cache" / "shard_00000.pt", weights_only=True)
    dim = teacher.config.decoder.embed_dim
    assert cached["emb"].dtype == torch.float16 and cached["emb"].shape == (4, dim, 64, 64)


def test_distill_flips_cache_the_mirrored_images(images_small, tmp_path):
    from leansam import create_model
    from leansam.train.distill import encoder_input

    cfg = TrainConfig(
        stage="distill", model=STUDENT, teacher="sam-vit-tiny", data=[str(images_small)],
        out=str(tmp_path / "ds"), epochs=1, batch_size=2, distill_flips=True,
    )  # fmt: skip
    result = distill(cfg)
    files = sorted(images_small.glob("*.jpg"))
    assert result["steps"] == 2 * len(files) // 2
    (shard,) = (tmp_path / "ds" / "teacher_cache").glob("shard_*.pt")
    cache = torch.load(shard, weights_only=True)
    assert cache["files"] == [f.name for f in files] + [f"{f.name} (mirrored)" for f in files]
    teacher = create_model("sam-vit-tiny", seed=0)
    with torch.no_grad():
        mirrored = teacher.image_encoder(encoder_input(teacher, files[0], "cpu", flip=True))
        plain = teacher.image_encoder(encoder_input(teacher, files[0], "cpu"))
    torch.testing.assert_close(cache["emb"][len(files)].float(), mirrored[0], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(mirrored, plain, atol=1e-2)


def test_train_shows_progress_bars_unless_no_progress(images_small, tmp_path, capsys, monkeypatch):
    """Rank 0 shows a bar for the teacher cache and one for the steps, on stderr; a resumed run's
    bar starts at its step and a finished cache shows none; --no-progress shows neither and
    changes nothing else; other ranks compute their shards without a bar."""
    from leansam.cli import main
    from leansam.train import distill as distill_module

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"stage: distill\nmodel: {STUDENT}\nteacher: sam-vit-tiny\ndata: [{images_small}]\n"
        "out: unused\nepochs: 1\nbatch_size: 2\nsave_every: 1\n"
    )
    base = ["train", "distill", "--recipe", str(recipe)]
    assert main([*base, "--out", str(tmp_path / "a"), "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "teacher embeddings: 100%" in err and "train distill: 100%" in err, err
    assert main([*base, "--out", str(tmp_path / "a"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "teacher embeddings" not in err and " 1/2 " in err and " 2/2 " in err, err
    assert "train distill:   0%" not in err  # starts at the resumed step
    assert main([*base, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "distill: step 2/2, last loss " in captured.out
    # a finished run resumed (make weights reruns every step) takes no step and says so
    assert main([*base, "--out", str(tmp_path / "b"), "--no-progress", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "distill: step 2/2, already finished; weights: " in out and "nan" not in out, out
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setattr(distill_module, "init_from_env", lambda: (1, 2))  # rank 1 of 2
    cfg = TrainConfig(stage="distill", model=STUDENT, teacher="sam-vit-tiny",
                      data=[str(images_small)], out=str(tmp_path / "c"))  # fmt: skip
    files = sorted(images_small.glob("*.jpg"))
    cache = distill_module.build_teacher_cache(cfg, [(f, False) for f in files], shard_size=2)
    assert capsys.readouterr().err == ""
    assert [p.name for p in cache.glob("shard_*.pt")] == ["shard_00001.pt"]


class Kill(Exception):
    pass


@pytest.mark.parametrize("stage", ["finetune", "distill", "finetune-prior"])
def test_killed_run_resumes_to_identical_weights(sa1b_small, images_small, tmp_path, stage):
    """... also with prior_distill_weight, whose frozen prior must come from decoder_checkpoint
    on resume, not from the resumed weights (the losses after the resume would differ)."""
    from leansam import create_model
    from leansam.checkpoint import load_state_dict

    torch.save(create_model(STUDENT, seed=4).state_dict(), tmp_path / "decoder.pt")

    def cfg(out):
        if stage == "finetune":
            return _ft_cfg(sa1b_small, out, epochs=2)
        if stage == "finetune-prior":
            return _ft_cfg(sa1b_small, out, epochs=2, box_prob=1.0, prior_distill_weight=50.0,
                           decoder_checkpoint=str(tmp_path / "decoder.pt"))  # fmt: skip
        return TrainConfig(
            stage="distill", model=STUDENT, teacher="sam-vit-tiny", data=[str(images_small)],
            out=str(out), epochs=2, batch_size=2, lr=1e-3, save_every=1,
        )  # fmt: skip

    run = distill if stage == "distill" else finetune
    run(cfg(tmp_path / "a"))

    def kill_at_2(step):
        if step == 2:
            raise Kill

    with pytest.raises(Kill):
        run(cfg(tmp_path / "b"), on_step=kill_at_2)
    assert not (tmp_path / "b" / "model.pt").exists()
    with pytest.raises(InputError, match="pass --resume"):
        run(cfg(tmp_path / "b"))
    result = run(cfg(tmp_path / "b"), resume=True)
    assert result["resumed"] and len(result["records"]) == 2  # steps 3 and 4 only
    a = load_state_dict(tmp_path / "a" / "model.pt")
    b = load_state_dict(tmp_path / "b" / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_a] == [json.loads(x)["loss"] for x in log_b]


def _recipe(tmp_path, **kw) -> str:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(kw))
    return str(path)


@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_two_gloo_processes_match_one(sa1b_small, images_small, tmp_path, stage):
    common = dict(model=STUDENT, epochs=1, lr=1e-3, save_every=10, seed=3)
    if stage == "finetune":
        common.update(data=[str(sa1b_small)], masks_per_image=4, num_points=1024)
    else:  # batch statistics are per process on CPU (no SyncBatchNorm): compare with BN frozen
        common.update(data=[str(images_small)], teacher="sam-vit-tiny", freeze_bn=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lr = common["lr"]
    one = subprocess.run(
        [
            sys.executable, "-m", "leansam.cli", "train", stage,
            "--recipe", _recipe(tmp_path, batch_size=2, **common), "--out", str(tmp_path / "one"),
        ],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    (tmp_path / "r2").mkdir()
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29600 + os.getpid() % 1000), "-m", "leansam.cli", "train", stage,
            # lr is per process and scaled by the world size (SPEC): halve it for equal updates
            "--recipe", _recipe(tmp_path / "r2", batch_size=1, **{**common, "lr": lr / 2}),
            "--out", str(tmp_path / "two"),
        ],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    l2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 2  # 4 items, global batch 2
    for a, b in zip(l1, l2, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["loss"], b["loss"])
        if stage == "finetune":  # the terms too, averaged over the processes
            assert a["loss_terms"].keys() == b["loss_terms"].keys() == {"mask"}
            assert abs(a["loss_terms"]["mask"] - b["loss_terms"]["mask"]) <= 1e-5
    run2 = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run2["world_size"] == 2


def test_corrupt_samples_are_skipped(sa1b_small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sa1b_small, data)
    first = sorted(data.glob("*.jpg"))[0]
    first.write_bytes(first.read_bytes()[:300])  # truncated image
    result = finetune(_ft_cfg(data, tmp_path / "out", epochs=1, save_every=5))
    assert result["steps"] == 2 and result["skipped_samples"] >= 1
    assert (tmp_path / "out" / "model.pt").exists()


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nlerning_rate: 1\n")
    with pytest.raises(InputError, match="unknown keys lerning_rate"):
        TrainConfig.from_yaml(bad, stage="finetune", data=["d"], out="o")
    with pytest.raises(InputError, match="recipe not found"):
        TrainConfig.from_yaml(tmp_path / "none.yaml")
    with pytest.raises(InputError, match="needs a teacher"):
        TrainConfig(stage="distill", model="m", data=["d"], out="o")
    cases = [  # (recipe text, from_yaml overrides, the one-line message)
        ("model: x\nbach_size: 1\n", {"stage": "finetune", "data": ["d"], "out": "o"},
         r"unknown keys bach_size \(did you mean batch_size\?\)"),
        ("- stage: prompt\n", {}, r"must be a mapping of keys"),
        ("model: x\nout: o\n", {"stage": "finetune"},
         r"no training data given: set data or pass --data"),
        ("stage: prompt\n", {"stage": "prompt"}, r"missing required keys model, out"),
        ("stage: finetune\nmodel: x\nout: o\ndata: [d]\n", {"stage": "prompt"},
         r"is for stage finetune: run leansam train finetune"),
        ("model: x\nout: o\nlr: -1\n", {"stage": "prompt"}, r"lr must be positive, got -1"),
        ("stage: fine-tune\nmodel: x\nout: o\ndata: [d]\n", {"stage": "finetune"},
         r"stage must be distill, finetune or prompt, got 'fine-tune'"),
        ("model: x\nout: o\ndecoder_lr_scale: -1\n", {"stage": "prompt"},
         r"decoder_lr_scale must be 0 \(frozen\) or positive, got -1"),
        ("model: x\nout: o\nsave_every: 0\n", {"stage": "prompt"},
         r"save_every must be positive, got 0"),
        ("model: x\nout: o\nbox_size_log: maybe\n", {"stage": "prompt"},
         r"box_size_log must be true or false, got 'maybe'"),
        ("model: x\nout: o\nbox_sizes_start: [0.3, 0.9]\nbox_size_ramp: -5\n",
         {"stage": "prompt"}, r"box_size_ramp must be 0 \(off\) or a number of steps, got -5"),
        ("model: x\nout: [o\nlr: 1\n", {}, r"is not valid YAML: .* line \d+, column \d+"),
    ]  # fmt: skip
    for text, overrides, message in cases:
        bad.write_text(text)
        with pytest.raises(InputError, match=message) as e:
            TrainConfig.from_yaml(bad, **overrides)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(InputError, match="cannot be read"):
        TrainConfig.from_yaml(tmp_path)  # a folder


def test_shipped_recipes_parse():
    from conftest import REPO

    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 9
    for path in recipes:
        cfg = TrainConfig.from_yaml(path)
        assert cfg.stage in ("distill", "finetune", "prompt") and cfg.model
    stage2 = TrainConfig.from_yaml(REPO / "recipes" / "paper-l0-stage2.yaml")
    assert (stage2.lr, stage2.masks_per_image, stage2.batch_size, stage2.grad_clip) == (
        8e-7,
        64,
        4,
        2.0,
    )
    assert TrainConfig.from_yaml(REPO / "recipes" / "paper-xl1-stage2.yaml").lr == 4e-7


def test_own_recipes_chain():
    """make weights: warm start -> shape prior -> teacher -> stage 1 (from the teacher) -> stage 2
    (from stage 1) -> its prompt mix with clicks (from stage 2); the ablation starts from the same
    prior."""
    from conftest import REPO

    own = REPO / "recipes" / "own"
    load = lambda name: TrainConfig.from_yaml(own / f"{name}.yaml")  # noqa: E731
    warm, shapes, teacher = load("decoder-warmup"), load("decoder-shapes"), load("teacher")
    s1, s2, clicks = load("student-stage1"), load("student-stage2"), load("student-clicks")
    only = load("student-stage2-only")
    assert warm.stage == shapes.stage == "prompt" and warm.data == shapes.data == []
    assert warm.min_box_iou > 0 and warm.model == shapes.model == teacher.model == s1.teacher
    assert shapes.decoder_checkpoint == f"{warm.out}/model.pt"
    assert teacher.decoder_checkpoint == only.decoder_checkpoint == f"{shapes.out}/model.pt"
    assert teacher.init_checkpoint is None and only.init_checkpoint is None
    assert s1.teacher == "leansam-vit-s" and s1.teacher_checkpoint == f"{teacher.out}/model.pt"
    assert s2.init_checkpoint == f"{s1.out}/model.pt"
    assert clicks.init_checkpoint == f"{s2.out}/model.pt"
    assert s1.model == s2.model == clicks.model == only.model == "leansam-efficientvit-s"
    assert s2.data == only.data == teacher.data == clicks.data
    # box prompts until the last step, which trains corrective clicks beside boxes
    assert teacher.box_prob == s2.box_prob == only.box_prob == 1.0
    assert clicks.box_prob < 1 and clicks.click_rounds >= 4  # the protocol's 5 clicks
    # make weights publishes what these recipes write
    make = (REPO / "Makefile").read_text()
    assert f"--model leansam-vit-s --checkpoint {teacher.out}/model.pt" in make
    assert f"--model leansam-efficientvit-s --checkpoint {clicks.out}/model.pt" in make


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, total=100, warmup=10) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.1)))
    assert f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))  # decays after warm-up
    assert lr_factor(0, total=100) == 1.0  # no warm-up: the paper's plain cosine
    with pytest.raises(InputError, match="warmup_steps"):
        TrainConfig(stage="finetune", model="m", data=["d"], out="o", warmup_steps=-1)
    with pytest.raises(InputError, match="box_prob and multimask_prob"):
        TrainConfig(stage="finetune", model="m", data=["d"], out="o", box_prob=1.5)


def test_zoom_keeps_size_and_moves_masks_with_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    masks = np.zeros((1, 60, 80), bool)
    masks[0, 20:40, 30:50] = True
    image[masks[0]] = 255  # the object is white
    for scale in (0.5, 1.5):
        zi, zm = zoom(image, masks, scale, np.random.default_rng(1))
        assert zi.shape == image.shape and zm.shape == masks.shape
        area = zm.sum() / masks.sum()
        assert area == pytest.approx(scale**2, rel=0.1)
        assert (zi[zm[0]] > 200).mean() > 0.9  # the mask still covers the white object
    # zoom out: outside the pasted image is the pixel mean (normalises to ~0 like padding)
    zi, zm = zoom(image, masks, 0.5, np.random.default_rng(1))
    assert (zi == np.array([124, 116, 104], np.uint8)).all(-1).sum() >= 60 * 80 * 0.7
    same = zoom(image, masks, 1.0, rng)
    assert same[0] is image and same[1] is masks


def test_prepare_sample_with_zoom_always_has_objects(sa1b_small):
    ds = SA1BDataset(sa1b_small)
    cfg = _ft_cfg(
        sa1b_small, "o", scale_jitter=[0.3, 3.0], masks_per_image=3, box_prob=1.0,
        multimask_prob=0.0,
    )  # fmt: skip
    for i in range(len(ds)):
        for k in range(5):
            s = prepare_sample(ds[i], 256, cfg, np.random.default_rng([i, k]), "cpu")
            assert s["gt"].shape == (3, 256, 256)
            assert (s["gt"].flatten(1).sum(1) > 0).all()
            assert s["boxes"].shape == (3, 4) and s["points"] is None and not s["multimask"]


def test_decoder_checkpoint_takes_prompt_encoder_and_decoder(tmp_path):
    from leansam import create_model
    from leansam.checkpoint import save_state_dict

    donor = create_model("efficientvit-sam-tiny-xl", seed=3)
    save_state_dict(donor.state_dict(), tmp_path / "donor.pt")
    model = create_model(STUDENT, seed=0)
    encoder_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    load_prompt_decoder(model, tmp_path / "donor.pt")
    for part in ("prompt_encoder", "mask_decoder"):
        for k, v in getattr(model, part).state_dict().items():
            assert torch.equal(v, getattr(donor, part).state_dict()[k]), k
    for k, v in model.image_encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k])
    save_state_dict(donor.image_encoder.state_dict(), tmp_path / "enc.pt")
    with pytest.raises(InputError, match="holds no prompt_encoder"):
        load_prompt_decoder(model, tmp_path / "enc.pt")


def test_data_repeat_lists_folders_several_times(sa1b_small, tmp_path):
    cfg = _ft_cfg(sa1b_small, tmp_path / "rep", epochs=1, data_repeat=[3], max_steps=1)
    assert finetune(cfg)["total_steps"] == 3 * 4 // 2
    with pytest.raises(InputError, match="data_repeat needs one count"):
        _ft_cfg(sa1b_small, tmp_path / "x", data_repeat=[1, 2])


def test_synthetic_boxes_and_their_masks():
    from leansam.train.warmup import box_target, synthetic_box

    boxes = np.stack([synthetic_box(np.random.default_rng([0, i])) for i in range(200)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 1024 + 1e-3).all()
    assert (np.sqrt(w * h) >= 16 * 0.99).all() and np.sqrt(w * h).max() > 400
    # pixel centres 8, 24, ... of a 64-grid over the 1024 frame: [20, 100] holds 24..88, 5 cells
    m = box_target(torch.tensor([[20.0, 0.0, 100.0, 1024.0]]), 64)
    assert m.shape == (1, 64, 64) and m[0, 0].sum() == 5 and m[0, :, 1:6].all()


def test_prompt_warmup_learns_boxes_and_keeps_the_encoder(tmp_path):
    """`leansam train prompt`: the decoder learns box -> box mask; the encoder is untouched."""
    from leansam import create_model
    from leansam.train.warmup import PromptStep, box_target, prompt_warmup, synthetic_box

    cfg = TrainConfig(
        stage="prompt", model="sam-vit-tiny", data=[], out=str(tmp_path / "pw"), grid=4,
        items_per_epoch=64, epochs=5, batch_size=16, lr=1e-2, warmup_steps=2, bce_weight=1.0,
        save_every=100,
    )  # fmt: skip
    boxes = torch.as_tensor(
        np.stack([synthetic_box(np.random.default_rng([7, i])) for i in range(32)])
    )

    def fixed_loss(model) -> float:
        with torch.no_grad():
            return float(PromptStep(model, cfg)(boxes, False))

    before_model = create_model("sam-vit-tiny", seed=0)
    result = prompt_warmup(cfg)
    after_model = create_model("sam-vit-tiny", checkpoint=tmp_path / "pw" / "model.pt")
    assert result["steps"] == result["total_steps"] == 20
    before, after = fixed_loss(before_model), fixed_loss(after_model)
    assert after < 0.8 * before, (before, after)
    for a, b in zip(
        before_model.image_encoder.state_dict().values(),
        after_model.image_encoder.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert box_target(boxes, 16).shape == (32, 16, 16)
    with pytest.raises(InputError, match="exceeds the model's 64 x 64"):
        PromptStep(after_model, TrainConfig(**{**cfg.as_dict(), "grid": 65}))


def test_grid_window_trains_on_a_window_of_the_full_grid(tmp_path):
    """grid_window: the decoder sees a window of the full grid's positional encoding and the
    window's part of the frame; a window that is the whole grid gives the full-grid loss, a
    smaller one the same cells and target pixels as the full grid; the stage trains with it."""
    from leansam import create_model
    from leansam.train.warmup import PromptStep, box_target, prompt_warmup, window_pe

    model = create_model("sam-vit-tiny", seed=0).eval()
    pe = model.prompt_encoder
    full = max(pe.image_embedding_size)  # 64: cells of 16 px
    kw = dict(stage="prompt", model="sam-vit-tiny", data=[], out=str(tmp_path / "w"))
    boxes = torch.tensor([[40.0, 60.0, 90.0, 100.0], [300.0, 20.0, 700.0, 500.0]])
    with torch.no_grad():
        whole = PromptStep(model, TrainConfig(**kw, grid_window=full))(boxes, False, None, (0, 0))
        plain = PromptStep(model, TrainConfig(**kw, grid=full))(boxes, False)
    torch.testing.assert_close(whole, plain)
    col, row, side = 5, 2, 8  # cells 5..12 x 2..9: pixels 80..208 x 32..160
    torch.testing.assert_close(
        window_pe(pe.pe_layer, full, col, row, side), pe.pe_layer((full, full))[:, 2:10, 5:13]
    )
    inside = torch.tensor([[100.0, 40.0, 130.0, 70.0]])
    crop = box_target(inside, 1024)[:, 32:160, 80:208]  # 1-px pixels of the full frame
    origin = torch.tensor([80.0, 32.0, 80.0, 32.0])
    assert torch.equal(box_target(inside - origin, 16 * side, frame=side * 16), crop)

    cfg = TrainConfig(
        **{**kw, "out": str(tmp_path / "pw")}, grid_window=8, items_per_epoch=64, epochs=5,
        batch_size=16, lr=1e-2, warmup_steps=2, bce_weight=1.0, save_every=100,
        box_sizes=[0.01, 0.1],
    )  # fmt: skip
    step = PromptStep(model, cfg)
    with torch.no_grad():
        before = float(step(inside, False, None, (5, 2)))
    result = prompt_warmup(cfg)
    after_model = create_model("sam-vit-tiny", checkpoint=tmp_path / "pw" / "model.pt")
    with torch.no_grad():
        after = float(PromptStep(after_model, cfg)(inside, False, None, (5, 2)))
    assert result["steps"] == 20 and after < 0.8 * before, (before, after)
    # the steps' boxes: inside their window; with a share, the other steps' boxes exceed it
    from leansam.train.warmup import synthetic_batch

    mixed = TrainConfig(**kw, grid_window=8, grid_window_share=0.5, box_sizes=[0.01, 0.6])
    kinds = set()
    for step in range(40):
        b, window, _ = synthetic_batch(mixed, step, list(range(16)), full)
        kinds.add(window is None)
        if window is None:  # boxes of 128 px (8 cells) and more, except where the frame clips
            whole = (b[:, 2] < 1024) & (b[:, 3] < 1024)
            assert (b[whole, 2:] - b[whole, :2] >= 128 - 1e-3).all()
        else:
            lo = np.array(window * 2) * 16
            assert (b >= lo).all() and (b <= lo + 128).all(), (window, b)
    assert kinds == {True, False}
    assert all(synthetic_batch(cfg, s, [0, 1], full)[1] is not None for s in range(20))
    # windows cover the grid's border cells about as often as its middle ones
    cover = np.zeros(full)
    for step in range(2000):
        col = synthetic_batch(cfg, step, [0], full)[1][0]
        cover[col : col + 8] += 1
    # uniform starts would give cell 0 0.16x the middle's; cells a few in get up to ~2x
    assert 0.8 * np.median(cover) <= cover.min() and cover.max() <= 2.2 * np.median(cover), cover
    with pytest.raises(InputError, match="grid_window_share"):
        TrainConfig(**kw, grid_window=8, grid_window_share=0)
    with pytest.raises(InputError, match="only with grid_window"):
        TrainConfig(**kw, grid_window_share=0.5)
    with pytest.raises(InputError, match="no smaller than the window"):
        PromptStep(model, TrainConfig(**kw, grid_window=8, box_sizes=[0.2, 0.6]))
    with pytest.raises(InputError, match="grid_window 65 exceeds"):
        PromptStep(model, TrainConfig(**kw, grid_window=65))
    with pytest.raises(InputError, match="grid_window"):
        TrainConfig(**{**kw, "data": ["d"]}, grid_window=8, box_prob=1.0)
    with pytest.raises(InputError, match="grid_window"):
        TrainConfig(**kw, grid_window=-1)


def test_shape_data_stretches_real_shapes_over_synthetic_boxes(tmp_path, sa1b_small):
    """shape_data: each synthetic box gets an object's mask, cropped to its box and stretched
    over a box of the object's aspect ratio; the prompt is that box clipped to the frame (or the
    window); the stage trains with it; misuse is refused."""
    from leansam.data.sa1b import mask_record, write_sa1b_pair
    from leansam.train.warmup import ShapeBank, prompt_warmup, synthetic_batch

    # an L-shaped object of 40 x 20 px (aspect 2) in a 64 x 48 image
    mask = np.zeros((48, 64), bool)
    mask[10:30, 8:48] = True
    mask[10:20, 28:48] = False  # the top right quarter is cut away
    folder = tmp_path / "shapes"
    folder.mkdir()
    write_sa1b_pair(folder, 1, b"", 48, 64, [mask_record(mask, 1)])
    bank = ShapeBank([str(folder)], side=16)
    assert len(bank) == 1 and bank.aspects.tolist() == [2.0]
    # generated masks: the quality minimums apply as in training on them (no image is read)
    scored = tmp_path / "scored"
    scored.mkdir()
    square = np.zeros((64, 64), bool)
    square[:48] = mask
    low, high = mask_record(square, 1), mask_record(square.T.copy(), 2)  # aspects 2 and 0.5
    low["predicted_iou"], high["predicted_iou"] = 0.5, 0.9
    write_sa1b_pair(scored, 1, b"", 64, 64, [low, high])
    assert len(ShapeBank([str(scored)], side=16)) == 2
    kept = ShapeBank([str(scored)], side=16, min_predicted_iou=0.8)
    assert len(kept) == 1 and kept.aspects.tolist() == [0.5]
    with pytest.raises(InputError, match="no usable mask"):
        ShapeBank([str(scored)], side=16, min_stability_score=0.5)  # no scores: none kept
    # an unreadable annotation file is skipped with a warning, as in training on the folder
    (scored / "sa_2.json").write_text("{not json")
    assert len(ShapeBank([str(scored)], side=16)) == 2
    (scored / "sa_1.json").unlink()
    with pytest.raises(InputError, match=r"no usable mask .*\(1 annotation files skipped"):
        ShapeBank([str(scored)], side=16)
    with pytest.raises(InputError, match="shape_data: SA-1B folder not found"):
        ShapeBank([str(tmp_path / "missing")])
    box = torch.tensor([[100.0, 200.0, 180.0, 240.0]])  # 80 x 40 px in a 256 px frame
    gt = bank.target(torch.tensor([0]), box, 256, 256.0)[0]
    assert not gt[:200].any() and not gt[240:].any() and not gt[:, :100].any()
    assert gt[200:240, 100:140].all() and gt[230:240, 140:180].all()
    assert not gt[200:219, 141:180].any()  # the missing quarter (bilinear at its inner corner)
    assert abs(int(gt.sum()) - 80 * 40 * 3 // 4) <= 2

    full, kw = 64, dict(stage="prompt", model="sam-vit-tiny", data=[], out=str(tmp_path / "s"))
    cfg = TrainConfig(**kw, shape_data=[str(sa1b_small)], box_sizes=[0.05, 0.9])
    coco = ShapeBank(cfg.shape_data)
    on = coco.shapes >= 0.5  # every stored shape still reaches the four sides of its box
    assert len(coco) > 20 and on[:, 0].any(1).all() and on[:, -1].any(1).all()
    assert on[:, :, 0].any(1).all() and on[:, :, -1].any(1).all()

    def tight(m: torch.Tensor, px: float) -> np.ndarray:  # the target's box, in the frame's px
        ys, xs = np.nonzero(m.numpy())
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * px

    for step in range(4):
        boxes, window, gt = synthetic_batch(cfg, step, list(range(8)), full, 1024, coco)
        assert window is None and gt.shape == (8, 256, 256) and gt.dtype == torch.bool
        assert (boxes >= 0).all() and (boxes <= 1024).all()
        again = synthetic_batch(cfg, step, list(range(8)), full, 1024, coco)
        assert np.array_equal(boxes, again[0]) and torch.equal(gt, again[2])  # reproducible
        for b, m in zip(boxes, gt, strict=True):  # the prompt is the target's box (4 px pixels)
            assert np.abs(tight(m, 4) - b).max() <= 8, (tight(m, 4), b)
            side = b[2:] - b[:2]
            assert side.min() >= 0.05 * 1024 - 1e-3 or (b[2:] >= 1024 - 1e-3).any()
    win = TrainConfig(**kw, shape_data=[str(sa1b_small)], grid_window=8, box_sizes=[0.01, 0.1])
    for step in range(4):
        boxes, window, gt = synthetic_batch(win, step, list(range(8)), full, 1024, coco)
        lo = np.array(window * 2) * 16
        assert gt.shape == (8, 128, 128) and (boxes >= lo).all() and (boxes <= lo + 128).all()
        for b, m in zip(boxes, gt, strict=True):  # in the window's frame, 1 px pixels
            assert np.abs(tight(m, 1) + lo - b).max() <= 3, (tight(m, 1) + lo, b)
    # the stage trains on the shapes: other weights than on the boxes themselves
    short = dict(items_per_epoch=8, epochs=2, batch_size=4, save_every=100, grid=8)
    result = prompt_warmup(TrainConfig(**kw, shape_data=[str(sa1b_small)], **short))
    assert result["steps"] == 4
    prompt_warmup(TrainConfig(**{**kw, "out": str(tmp_path / "b")}, **short))
    shaped = torch.load(tmp_path / "s" / "model.pt", weights_only=True)
    boxed = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    key = "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"
    assert not torch.equal(shaped[key], boxed[key])
    with pytest.raises(InputError, match="shape_data"):
        TrainConfig(**{**kw, "data": ["d"]}, shape_data=["x"], box_prob=1.0)
    with pytest.raises(InputError, match="no sa_"):
        ShapeBank([str(tmp_path)])


def test_prompt_stage_uses_the_recipes_loss_options(tmp_path):
    """bce_balanced and focal reach the warm start's loss (they were once silently ignored in
    stage prompt): the same seeded run gives the same weights twice, and other weights with
    either option."""
    from leansam.train.warmup import prompt_warmup

    short = dict(stage="prompt", model="sam-vit-tiny", data=[], items_per_epoch=8, epochs=1,
                 batch_size=4, save_every=100, grid=8, lr=1e-3)  # fmt: skip
    key = "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"
    weights = {}
    for name, extra in (("a", {}), ("b", {}), ("balanced", {"bce_balanced": True}),
                        ("focal", {"focal": True})):  # fmt: skip
        prompt_warmup(TrainConfig(**short, out=str(tmp_path / name), **extra))
        weights[name] = torch.load(tmp_path / name / "model.pt", weights_only=True)[key]
    assert torch.equal(weights["a"], weights["b"])
    assert not torch.equal(weights["a"], weights["balanced"])
    assert not torch.equal(weights["a"], weights["focal"])


def test_box_size_curriculum_moves_from_the_start_sizes_to_box_sizes():
    """box_sizes_start / box_size_ramp: the synthetic boxes' sizes move linearly from the start
    sizes to box_sizes over the ramp's steps, then stay; a bad curriculum is one clear error."""
    from leansam.train.warmup import synthetic_batch

    kw = dict(stage="prompt", model="sam-vit-tiny", data=[], out="unused", batch_size=64)
    cfg = TrainConfig(**kw, box_sizes=[0.02, 0.1], box_sizes_start=[0.5, 0.9], box_size_ramp=10)
    assert cfg.box_sizes_at(0) == (0.5, 0.9)
    assert cfg.box_sizes_at(5) == pytest.approx((0.26, 0.5))
    assert cfg.box_sizes_at(10) == cfg.box_sizes_at(500) == (0.02, 0.1)
    assert TrainConfig(**kw).box_sizes_at(0) == (0.03, 0.6)  # no curriculum: box_sizes

    def sides(step):
        boxes, _, _ = synthetic_batch(cfg, step, list(range(64)), full=64)
        unclipped = (boxes[:, 2] < 1024) & (boxes[:, 3] < 1024)  # not cut at the frame's edge
        return np.concatenate([boxes[unclipped, 2] - boxes[unclipped, 0],
                               boxes[unclipped, 3] - boxes[unclipped, 1]]) / 1024  # fmt: skip

    first, late = sides(0), sides(10)
    assert first.min() >= 0.5 - 1e-6 and first.max() <= 0.9 + 1e-6 and len(first) >= 4
    assert late.min() >= 0.02 - 1e-6 and late.max() <= 0.1 + 1e-6
    for bad, message in (
        ({"box_sizes_start": [0.5, 0.9]}, "box_sizes_start and box_size_ramp"),
        ({"box_size_ramp": 10}, "box_sizes_start and box_size_ramp"),
        ({"box_sizes_start": [0.9, 0.5], "box_size_ramp": 10}, "box_sizes_start must be"),
    ):
        with pytest.raises(InputError, match=message):
            TrainConfig(**kw, **bad)
    with pytest.raises(InputError, match="for stage prompt without data"):
        TrainConfig(stage="finetune", model="sam-vit-tiny", data=["x"], out="unused",
                    box_sizes_start=[0.5, 0.9], box_size_ramp=10)  # fmt: skip
    from leansam import create_model
    from leansam.train.warmup import PromptStep

    windowed = TrainConfig(**kw, grid_window=16, box_sizes=[0.02, 0.1], box_sizes_start=[0.3, 0.9],
                           box_size_ramp=10)  # fmt: skip
    with pytest.raises(InputError, match=r"box_sizes_start starts at 0\.3 of the frame"):
        PromptStep(create_model("sam-vit-tiny", seed=0), windowed)  # every window step clipped


def test_recipe_numbers_are_numbers(tmp_path):
    """YAML reads 1e-6 (no dot) as a string: a recipe's number fields take it as the number, an
    int field a whole float; other values are one clear error, not a TypeError in training. Keys
    that stage prompt would silently not use are refused."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: prompt\nmodel: sam-vit-tiny\nout: o\nlr: 1e-6\nbatch_size: 8.0\n")
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    for extra in ("num_points: 0", "masks_per_image: 4"):  # stage prompt would not use them
        recipe.write_text(f"stage: prompt\nmodel: sam-vit-tiny\nout: o\n{extra}\n")
        key = extra.split(":")[0]
        with pytest.raises(InputError, match=f"stage prompt does not use {key}"):
            TrainConfig.from_yaml(recipe)
    kw = dict(stage="prompt", model="sam-vit-tiny", data=[], out="o")
    cfg = TrainConfig(**kw, max_steps="1e2", box_sizes=["1e-2", 0.6], seed=np.int64(3))
    assert cfg.max_steps == 100 and cfg.box_sizes == [0.01, 0.6] and cfg.seed == 3
    assert TrainConfig(**kw, max_steps=None).max_steps is None
    ft = TrainConfig(stage="finetune", model="sam-vit-tiny", data=["x"], out="o",
                     scale_jitter=["5e-1", 1], data_repeat=[2.0])  # fmt: skip
    assert ft.scale_jitter == [0.5, 1.0] and ft.data_repeat == [2]
    for bad, message in (({"lr": "nan"}, "lr must be a finite number .*, got 'nan'"),
                         ({"epochs": float("inf")}, "epochs must be a finite number"),
                         ({"box_sizes": ["small", 0.6]}, "box_sizes must hold numbers"),
                         ({"lr": "fast"}, "lr must be a finite number .*, got 'fast'"),
                         ({"batch_size": 2.5}, "batch_size must be an integer .*, got 2.5"),
                         ({"seed": True}, "seed must be an integer .*, got True")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            TrainConfig(**kw, **bad)


def test_min_box_iou_fails_a_warm_start_that_draws_no_boxes(tmp_path, capsys, monkeypatch):
    """min_box_iou: a warm start whose content-free decoder does not draw boxes fails with one
    line naming the measured IoU, writes no model.pt (removes one of an earlier pass) and keeps
    its checkpoint, from which a resume with the check passed writes model.pt without replaying
    a step; the CLI reports the measurement; the check off measures nothing."""
    from leansam.cli import main
    from leansam.errors import TrainingError
    from leansam.eval import diagnose
    from leansam.train.warmup import prompt_warmup

    short = dict(stage="prompt", model="sam-vit-tiny", data=[], items_per_epoch=8, epochs=1,
                 batch_size=4, save_every=1, grid=8, lr=1e-6)  # fmt: skip
    a = tmp_path / "a"
    # the real measurement: 2 steps at a tiny learning rate draw nothing near 0.95
    with pytest.raises(
        TrainingError, match=r"at a mean IoU of 0\.\d\d / 0\.\d\d, below min_box_iou 0\.95"
    ):
        prompt_warmup(TrainConfig(**short, out=str(a), min_box_iou=0.95))
    assert not (a / "model.pt").exists() and (a / "checkpoint.pt").exists()
    steps = len((a / "metrics.jsonl").read_text().splitlines())

    drawn = {128: 0.0, 256: 0.0}  # the plateau, then a decoder that draws
    monkeypatch.setattr(diagnose, "box_drawing", lambda model, sides: {k: drawn[k] for k in sides})
    with pytest.raises(TrainingError) as failed:
        prompt_warmup(TrainConfig(**short, out=str(a), min_box_iou=0.3), resume=True)
    assert str(failed.value) == (
        "the warm start draws boxes of 128 / 256 px at a mean IoU of 0.00 / 0.00, below "
        "min_box_iou 0.3 (a plateau: nothing or everything drawn), so no model.pt was written; "
        "rerun in a new --out with another --seed or a size curriculum (box_sizes_start, "
        "box_size_ramp)"
    )
    drawn.update({128: 0.5, 256: 0.7})
    result = prompt_warmup(TrainConfig(**short, out=str(a), min_box_iou=0.3), resume=True)
    assert result["box_iou"] == {128: 0.5, 256: 0.7} and (a / "model.pt").exists()
    assert result["steps"] == result["total_steps"] == steps  # nothing replayed
    assert len((a / "metrics.jsonl").read_text().splitlines()) == steps
    drawn.update({128: 0.1, 256: 0.2})  # a later failing pass removes the earlier model.pt
    with pytest.raises(TrainingError):
        prompt_warmup(TrainConfig(**short, out=str(a), min_box_iou=0.3), resume=True)
    assert not (a / "model.pt").exists()
    assert prompt_warmup(TrainConfig(**short, out=str(tmp_path / "c")))["box_iou"] is None

    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join(f"{k}: {v}" for k, v in {**short, "min_box_iou": 0.3}.items()
                                if k != "data"))  # fmt: skip
    d = ["train", "prompt", "--recipe", str(recipe), "--out", str(tmp_path / "d"), "--seed", "3"]
    assert main(d) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("leansam: error: the warm start draws boxes of 128 / 256 px"), err
    saved = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["config"]
    assert saved["seed"] == 3  # --seed overrides the recipe
    drawn.update({128: 0.5, 256: 0.7})
    assert main([*d, "--resume"]) == 0
    assert "box IoU 0.50 / 0.70 at 128 / 256 px" in capsys.readouterr().out
    with pytest.raises(InputError, match="min_box_iou is for stage prompt only, not finetune"):
        TrainConfig(**{**short, "stage": "finetune", "data": ["x"]}, out="x", min_box_iou=0.5)
    with pytest.raises(InputError, match=r"min_box_iou must lie in \[0, 1\), got 2"):
        TrainConfig(**short, out="x", min_box_iou=2)


def test_min_box_iou_fails_every_gloo_process_together(tmp_path):
    """Under torchrun (2 gloo processes) a warm start that fails min_box_iou stops both
    processes with the one-line message (rank 0 measures, every rank takes its result: a rank
    that passed alone would wait at the final barrier for good) and writes no model.pt."""
    recipe = _recipe(tmp_path, stage="prompt", model="sam-vit-tiny", items_per_epoch=8, epochs=1,
                     batch_size=2, save_every=1, grid=8, lr=1e-6, min_box_iou=0.95)  # fmt: skip
    run = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29900 + os.getpid() % 90), "-m", "leansam.cli", "train",
            "prompt", "--recipe", recipe, "--out", str(tmp_path / "two"),
        ],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert run.returncode != 0
    assert run.stderr.count("leansam: error: the warm start draws boxes of 128 / 256 px") == 2
    assert not (tmp_path / "two" / "model.pt").exists()
    assert (tmp_path / "two" / "checkpoint.pt").exists()


def _val_subset(limit: int = 2):
    from leansam.eval.dataset import EvalDataset

    return EvalDataset.load(
        COCO_MINI / "val2017", COCO_MINI / "annotations" / "instances_val2017.json", limit=limit
    )


def test_learning_curve_is_logged_and_survives_a_resume(sa1b_small, tmp_path):
    """eval_every: the box diagnosis before the first step and every N steps, in curve.jsonl;
    a killed and resumed run logs each point once, and the last point is the final model's."""
    from leansam import create_model
    from leansam.eval.diagnose import diagnose_boxes

    val = COCO_MINI / "val2017"
    ann = COCO_MINI / "annotations" / "instances_val2017.json"
    cfg = _ft_cfg(
        sa1b_small, tmp_path / "c", epochs=2, eval_every=2, eval_images=str(val),
        eval_annotations=str(ann), eval_limit=2,
    )  # fmt: skip

    def kill_at_3(step):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        finetune(cfg, on_step=kill_at_3)
    finetune(cfg, resume=True)
    curve = [json.loads(x) for x in (tmp_path / "c" / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [0, 2, 4]
    final = diagnose_boxes(
        create_model(STUDENT, checkpoint=tmp_path / "c" / "model.pt"), _val_subset()
    )
    assert curve[-1]["mIoU"] == final["mIoU"] and curve[-1]["count"] == final["count"]
    assert curve[0]["mIoU"]["predicted"] != curve[-1]["mIoU"]["predicted"]
    with pytest.raises(InputError, match="eval_every needs eval_images"):
        _ft_cfg(sa1b_small, tmp_path / "d", eval_every=2)


def test_diagnose_script_writes_its_table_and_json_with_no_bar_when_asked(tmp_path):
    """scripts/diagnose_model.py on the shipped student, first val image: the table on stdout,
    the JSON beside it, a bar on stderr, and with --no-progress nothing there."""
    from conftest import REPO

    out = tmp_path / "d.json"
    cmd = [sys.executable, str(REPO / "scripts" / "diagnose_model.py"), "--limit", "1",
           "--json", str(out), "--name", "first"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "diagnose: 100%" in r.stderr
    r = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "diagnose:" not in r.stderr and "%|" not in r.stderr
    record = json.loads(out.read_text())
    assert record["name"] == "first" and record["limit"] == 1
    assert f"objects: {record['count']}" in r.stdout and "| first | predicted |" in r.stdout


def test_everything_recall_script_counts_objects_found_at_iou_half(tmp_path):
    """scripts/everything_recall.py: masks per image, and the share of non-crowd objects of area
    >= 32^2 that some generated mask covers at IoU >= 0.5, with the labelling run's record."""
    from conftest import REPO

    from leansam.io import mask_to_coco_rle

    h, w = 80, 100
    boxes = {1: (0, 0, 40, 40), 2: (50, 10, 40, 40), 3: (0, 50, 10, 10), 4: (60, 55, 35, 20)}
    anns = [
        {"id": i, "image_id": 1, "category_id": 1, "bbox": list(b), "area": b[2] * b[3],
         "iscrowd": int(i == 4), "segmentation": [[b[0], b[1], b[0] + b[2], b[1],
         b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
        for i, b in boxes.items()
    ]  # fmt: skip
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w}],
        "annotations": anns, "categories": [{"id": 1, "name": "x"}],
    }))  # fmt: skip
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    found = np.zeros((h, w), bool)
    found[0:40, 0:30] = True  # object 1 at IoU 0.75
    half = np.zeros((h, w), bool)
    half[10:50, 50:68] = True  # object 2 at IoU 0.45: not found
    records = [{"segmentation": mask_to_coco_rle(m)} for m in (found, half, ~found)]
    (labels / "sa_a.json").write_text(json.dumps({"annotations": records}))
    (labels / "run.json").write_text(json.dumps({"model": "m", "pred_iou_thresh": 0.88}))
    script = str(REPO / "scripts" / "everything_recall.py")
    cmd = [sys.executable, script, str(labels), "--images", str(images), "--annotations",
           str(coco), "--out", str(tmp_path / "r.json")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    # objects 1 and 2 count (3 is below 32^2, 4 is a crowd region); only 1 is found
    assert (r["images"], r["masks_per_image"], r["objects"]) == (1, 3.0, 2)
    assert r["object_recall"] == 0.5 and json.loads(done.stdout)["object_recall"] == 0.5
    assert r["run"]["pred_iou_thresh"] == 0.88 and r["environment"]["cpu"]
    assert subprocess.run([*cmd, "--limit", "1"], capture_output=True, timeout=120).returncode == 0
    assert json.loads((tmp_path / "r.json").read_text())["limit"] == 1
    (labels / "sa_a.json").unlink()
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert (
        missing.returncode == 1
        and missing.stderr.strip().startswith("everything_recall.py: ")
        and "missing: run leansam everything" in missing.stderr
        and "Traceback" not in missing.stderr
    )


def test_object_sizes_script_counts_coco_size_classes_at_640_pixels(tmp_path):
    """scripts/object_sizes.py: masks per size class, areas rescaled to a 640-px long side for
    SA-1B folders; COCO's own areas (crowd left out) for the evaluation file."""
    from conftest import REPO

    from leansam.data.sa1b import mask_record, write_sa1b_pair

    folder = tmp_path / "sa1b"
    folder.mkdir()
    mask = np.zeros((320, 200), bool)
    records = []
    for k, side in enumerate((10, 20, 60)):  # x4 in area at 640 px: 400, 1600, 14400 pixels
        m = mask.copy()
        m[:side, :side] = True
        records.append(mask_record(m, k))
    write_sa1b_pair(folder, 0, b"", 320, 200, records)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"area": 500.0}, {"area": 5000.0}, {"area": 9216.0}, {"area": 50.0, "iscrowd": 1},
    ]}))  # fmt: skip
    out = tmp_path / "sizes.json"
    cmd = [sys.executable, str(REPO / "scripts" / "object_sizes.py"), str(folder),
           "--coco", str(coco), "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["config"]["folders"] == [str(folder)] and record["long_side"] == 640
    assert "torch" in record["environment"]
    rows = record["rows"]
    assert rows[str(folder)] == {
        "images": 1, "masks": 3, "masks_per_image": 3.0, "small": 1 / 3, "medium": 1 / 3,
        "large": 1 / 3,
    }  # fmt: skip
    assert rows[str(coco)]["masks"] == 3 and rows[str(coco)]["large"] == 1 / 3  # 96^2 is large
    assert f"| {folder} | 1 | 3 | 3.0 | 33 % | 33 % | 33 % |" in r.stdout
    bad = subprocess.run([*cmd[:2], str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a folder of sa_" in bad.stderr


def test_diagnosis_box_fill_matches_the_baseline_and_oracle_bounds_the_choice():
    from leansam import create_model
    from leansam.eval import evaluate
    from leansam.eval.diagnose import diagnose_boxes, diagnosis_markdown
    from leansam.eval.predictors import BoxFill

    data = _val_subset()
    d = diagnose_boxes(create_model("sam-vit-tiny", seed=0), data)
    fill = evaluate(BoxFill(), data, "box", progress=False)["metrics"]
    assert d["mIoU"]["box_fill"] == fill["mIoU"] and d["count"] == fill["count"]
    for s in ("all", "small", "medium", "large"):
        if d["count"][s]:
            assert d["mIoU"]["predicted"][s] <= d["mIoU"]["oracle"][s]
            assert 0 <= d["empty"][s] <= 1 and 0 <= d["box_iou"][s] <= 1
            assert 0 <= d["cell_edges"][s] <= 1
    assert d["cell_edges"]["all"] < 1  # counted at 4 low-res pixels per cell, not every pixel
    assert "| tiny | oracle |" in diagnosis_markdown("tiny", d)
    assert "| tiny | low-res edges on cell boundaries (%) |" in diagnosis_markdown("tiny", d)
    # a mask of whole 4 x 4 cells has every edge on a boundary; one shifted by a pixel, none
    from leansam.eval.diagnose import _cell_edges

    cells = np.zeros((16, 16), bool)
    cells[4:12, 8:12] = True
    assert _cell_edges(cells, 4) == (24, 24)  # 8 rows x 2 + 4 columns x 2
    assert _cell_edges(np.roll(cells, 1, axis=1), 4) == (8, 24)  # the top and bottom stay on


def test_grid_ceiling_matches_the_fills_and_snaps_to_the_cells():
    """grid_ceiling: at pixel resolution, the box and ellipse baselines' own figures; quantized,
    a box on cell edges is exact and one off them loses the part of the cell its centre misses."""
    from dataclasses import replace
    from pathlib import Path

    from leansam.eval import evaluate
    from leansam.eval.dataset import EvalDataset
    from leansam.eval.diagnose import grid_ceiling
    from leansam.eval.predictors import BoxFill, EllipseFill

    data = _val_subset()
    d = grid_ceiling(data)
    for name, baseline in (("box", BoxFill()), ("ellipse", EllipseFill())):
        fill = evaluate(baseline, data, "box", progress=False)["metrics"]
        assert d["mIoU"][name] == fill["mIoU"] and d["count"] == fill["count"]
    assert d["mIoU"]["box_cells"]["all"] < d["mIoU"]["box"]["all"]

    def square(x0, y0, x1, y1, i):  # a box-shaped object, as a COCO polygon
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        area = (x1 - x0) * (y1 - y0)
        return {"id": i, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "segmentation": [poly]}

    # a 512 x 256 image: the long side becomes 1024, so a cell is 8 image px
    anns = {1: [square(16, 24, 48, 64, 1), square(21, 24, 48, 64, 2)]}
    info = {"id": 1, "height": 256, "width": 512, "file_name": "x.jpg"}
    toy = EvalDataset(Path("."), Path("a.json"), (info,), anns, False, frozenset({1}))
    per = [grid_ceiling(replace(toy, anns={1: [a]}))["mIoU"]["box_cells"]["all"] for a in anns[1]]
    assert per[0] == pytest.approx(100.0)
    # x0 = 21: the cell 16..24 has its centre (20) outside, so it is off: 24 of 27 px wide
    assert per[1] == pytest.approx(100 * 24 / 27)
    # the object on cells: the same cells as its box here (a box-shaped object)
    assert grid_ceiling(replace(toy, anns={1: anns[1][1:]}))["mIoU"]["object_cells"][
        "all"
    ] == pytest.approx(100 * 24 / 27)
    assert grid_ceiling(toy)["count"]["all"] == 2
    # the shared fills at given sample points: pixel centres by default, cell centres as above
    from leansam.eval.predictors import box_masks, ellipse_masks

    box = np.array([[2.0, 1.0, 10.0, 7.0]])
    ys, xs = np.arange(8) + 0.5, np.arange(12) + 0.5
    for fill in (box_masks, ellipse_masks):
        np.testing.assert_array_equal(fill(box, 8, 12, at=(ys, xs)), fill(box, 8, 12))
        with pytest.raises(ValueError, match="need 8 ys and 12 xs"):
            fill(box, 8, 12, at=(ys, xs[:-1]))
    cy, cx = (np.floor(ys / 4) + 0.5) * 4, (np.floor(xs / 4) + 0.5) * 4  # 4 px cells
    ell = ellipse_masks(box, 8, 12, at=(cy, cx))[0]
    # centre (6, 4), radii 4 and 3: of the cell centres (2|6|10, 2|6), only (6, 2) and (6, 6)
    # lie inside (the others are at a normalised distance of 1.0 + 0.44 or more)
    assert ell.sum() == 32 and ell[:, 4:8].all() and not ell[:, :4].any()


def test_pe_scale_draws_a_seeded_positional_encoding_that_the_checkpoint_keeps(tmp_path):
    from leansam import create_model
    from leansam.train.warmup import prompt_warmup

    cfg = TrainConfig(
        stage="prompt", model="sam-vit-tiny", data=[], out=str(tmp_path / "pw"), grid=4,
        items_per_epoch=32, epochs=1, batch_size=16, lr=1e-3, pe_scale=8.0, seed=5,
    )  # fmt: skip
    prompt_warmup(cfg)
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    matrix = create_model("sam-vit-tiny", checkpoint=tmp_path / "pw" / "model.pt").state_dict()[key]
    expected = 8.0 * torch.randn(matrix.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(matrix, expected)
    assert 6.0 < float(matrix.std()) < 10.0  # SAM's scale 1 would give ~1
    mixed = TrainConfig(**{**cfg.as_dict(), "pe_scale": [1.0, 4.0], "out": str(tmp_path / "m")})
    prompt_warmup(mixed)
    matrix = create_model("sam-vit-tiny", checkpoint=tmp_path / "m" / "model.pt").state_dict()[key]
    base = torch.randn(matrix.shape, generator=torch.Generator().manual_seed(5))
    half = matrix.shape[1] // 2
    assert torch.equal(matrix[:, :half], base[:, :half])
    assert torch.equal(matrix[:, half:], 4.0 * base[:, half:])
    # stage prompt may go on from a warm start with other frequencies
    assert TrainConfig(**{**cfg.as_dict(), "decoder_checkpoint": "x.pt"}).pe_scale == 8.0
    for bad in (dict(pe_scale=0.0), dict(pe_scale=[1.0, -2.0])):
        with pytest.raises(InputError, match="pe_scale must be a number > 0 or a list of them"):
            TrainConfig(**{**cfg.as_dict(), **bad})
    for bad in (
        dict(pe_scale=2.0, stage="finetune", data=["d"], decoder_checkpoint="x.pt"),
        dict(pe_scale=2.0, stage="distill", teacher="sam-vit-tiny", data=["d"]),
    ):
        with pytest.raises(InputError, match="pe_scale"):
            TrainConfig(**{**cfg.as_dict(), **bad})


def test_checkpoints_of_older_versions_resume_when_new_fields_keep_their_defaults(tmp_path):
    from leansam.train.loop import _comparable, _same_run

    now = _comparable(_ft_cfg("d", tmp_path))
    older = {k: v for k, v in now.items() if k not in ("box_sizes", "box_size_log", "pe_scale")}
    assert _same_run(older, now) and _same_run(now, now)
    assert not _same_run(older, _comparable(_ft_cfg("d", tmp_path, box_size_log=True)))
    assert not _same_run({**now, "gone": 1}, now)
    assert not _same_run({**now, "lr": 1.0}, now)


def test_box_drawing_measures_the_decoder_against_the_box():
    """In [0, 1], seeded; a decoder that draws nothing (all logits 0, not > 0) scores exactly 0."""
    from leansam import create_model
    from leansam.eval.diagnose import box_drawing

    model = create_model("sam-vit-tiny", seed=0).eval()
    drawn = box_drawing(model, (64, 256), count=4)
    assert set(drawn) == {64, 256} and all(0 <= v <= 1 for v in drawn.values())
    assert box_drawing(model, (64, 256), count=4) == drawn
    with torch.no_grad():  # the hypernetworks output 0: every mask logit is exactly 0
        for m in model.mask_decoder.output_hypernetworks_mlps:
            m.layers[-1].weight.zero_()
            m.layers[-1].bias.zero_()
    assert box_drawing(model, (64, 256), count=4) == {64: 0.0, 256: 0.0}


def test_amp_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    import leansam.train.loop as loop

    cfg = TrainConfig(stage="prompt", model="m", data=[], out="o", amp="auto")
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    assert not loop.train_autocast(cfg, cpu)._enabled
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    ctx = loop.train_autocast(cfg, cpu)
    assert ctx._enabled and ctx.fast_dtype == torch.bfloat16
    with pytest.raises(InputError, match="amp must be none, bf16, fp16 or auto"):
        TrainConfig(stage="prompt", model="m", data=[], out="o", amp="fp8")


def test_prompt_stage_on_real_masks_trains_the_content_free_prior(sa1b_small, tmp_path):
    """`leansam train prompt` with data: real objects' masks from their boxes on a zero image
    embedding; the curve measures that content-free model (step 0: the starting decoder on a zero
    embedding, not the random image encoder), and the encoder is untouched."""
    from leansam import create_model
    from leansam.eval.diagnose import diagnose_boxes
    from leansam.train.warmup import content_free, prompt_warmup

    val = COCO_MINI / "val2017"
    ann = COCO_MINI / "annotations" / "instances_val2017.json"
    cfg = TrainConfig(
        stage="prompt", model=STUDENT, data=[str(sa1b_small)], out=str(tmp_path / "p"), grid=16,
        epochs=2, batch_size=2, masks_per_image=3, lr=1e-3, bce_weight=1.0, box_prob=1.0,
        save_every=100, eval_every=100, eval_images=str(val), eval_annotations=str(ann),
        eval_limit=2,
    )  # fmt: skip
    start = create_model(STUDENT, seed=0)
    result = prompt_warmup(cfg)
    assert result["steps"] == result["total_steps"] == len(SA1BDataset(sa1b_small))  # 2 epochs
    curve = [json.loads(x) for x in (tmp_path / "p" / "curve.jsonl").read_text().splitlines()]
    assert curve[0]["mIoU"] == diagnose_boxes(content_free(start), _val_subset())["mIoU"]
    assert curve[0]["mIoU"] != diagnose_boxes(start, _val_subset())["mIoU"]
    after = create_model(STUDENT, checkpoint=tmp_path / "p" / "model.pt")
    assert curve[-1]["mIoU"] == diagnose_boxes(content_free(after), _val_subset())["mIoU"]
    for a, b in zip(
        start.image_encoder.state_dict().values(),
        after.image_encoder.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert not torch.equal(
        start.mask_decoder.output_upscaling[0].weight, after.mask_decoder.output_upscaling[0].weight
    )


def test_embedding_zero_init_starts_training_from_the_decoders_prior(sa1b_small, tmp_path):
    """embedding_zero_init: the encoder's last LayerNorm starts at zero (the embedding is zero,
    so step 0 is the content-free model) and then trains."""
    from leansam import create_model
    from leansam.train.finetune import zero_image_embedding
    from leansam.train.warmup import content_free

    for name in (STUDENT, "sam-vit-tiny"):
        m = create_model(name, seed=0).eval()
        zero_image_embedding(m)
        x = torch.randn(1, 3, m.image_size, m.image_size)
        assert m.image_encoder(x).abs().max() == 0
        with torch.no_grad():
            tokens = content_free(m).image_encoder(x)
        assert torch.equal(m.image_encoder(x), tokens)
    cfg = _ft_cfg(sa1b_small, tmp_path / "z", embedding_zero_init=True, epochs=1)
    finetune(cfg)
    trained = create_model(STUDENT, checkpoint=tmp_path / "z" / "model.pt")
    assert trained.image_encoder.norm.weight.abs().max() > 0
    with pytest.raises(InputError, match="embedding_zero_init starts an image encoder"):
        _ft_cfg(sa1b_small, tmp_path / "y", embedding_zero_init=True, init_checkpoint="x.pt")


def test_prior_distill_keeps_the_decoders_content_free_prior(sa1b_small, tmp_path):
    """prior_distill_weight: the loss is zero with zero gradient at the prior and positive away
    from it; trained with it, the decoder's content-free masks stay closer to the starting
    decoder's than without; the saved weights hold no copy of the prior; box prompts only; it
    needs a decoder_checkpoint in stage finetune."""
    from leansam import create_model
    from leansam.train.finetune import frozen_prompt_decoder
    from leansam.train.losses import prior_distill_loss

    prior_logits = torch.randn(2, 3, 16, 16) * 4
    x = prior_logits.clone().requires_grad_(True)
    at_prior = prior_distill_loss(x, prior_logits)
    at_prior.sum().backward()
    assert at_prior.shape == (2,) and at_prior.abs().max() < 1e-6
    assert x.grad.abs().max() == 0
    assert (prior_distill_loss(prior_logits + 1, prior_logits) > 0.01).all()
    # class-balanced: a 2 x 2 object and a 12 x 12 one, each shifted by one logit everywhere, cost
    # within a factor 2 of each other (a sum over the mask divided by its area differed ~100x)
    small, large = torch.full((1, 1, 16, 16), -8.0), torch.full((1, 1, 16, 16), -8.0)
    small[..., 7:9, 7:9], large[..., 2:14, 2:14] = 8.0, 8.0
    ratio = (prior_distill_loss(small + 1, small) / prior_distill_loss(large + 1, large)).item()
    assert 0.5 < ratio < 2, ratio
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs it (amp: auto)
        assert torch.allclose(prior_distill_loss(x.bfloat16(), prior_logits), at_prior, atol=1e-2)

    start = create_model(STUDENT, seed=4)
    torch.save(start.state_dict(), tmp_path / "decoder.pt")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(8, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 40 + torch.rand(8, 2, generator=g) * 200], 1)
    zero = torch.zeros(1, *start.image_encoder(torch.zeros(1, 3, 512, 512)).shape[1:])

    def content_free_logits(m):
        with torch.no_grad():
            return m.decode(zero, boxes=boxes, multimask_output=False)[0]

    want = content_free_logits(frozen_prompt_decoder(start))
    assert torch.equal(want, content_free_logits(start))
    drift = {}
    for weight in (0.0, 500.0):
        out = tmp_path / f"w{weight}"
        cfg = _ft_cfg(
            sa1b_small, out, decoder_checkpoint=str(tmp_path / "decoder.pt"), epochs=2,
            num_points=0, bce_weight=1.0, box_prob=1.0, prior_distill_weight=weight,
        )  # fmt: skip
        finetune(cfg)
        trained = create_model(STUDENT, checkpoint=out / "model.pt")
        assert set(trained.state_dict()) == set(start.state_dict())
        drift[weight] = (content_free_logits(trained) - want).abs().mean().item()
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        for r in log:  # the prior term is logged beside the others when it is on
            terms = r["loss_terms"]
            assert terms.keys() == ({"mask", "prior_distill"} if weight else {"mask"})
            total = terms["mask"] + weight * terms.get("prior_distill", 0.0)
            assert r["loss"] == pytest.approx(total, rel=1e-5)
        if weight:
            assert log[-1]["loss_terms"]["prior_distill"] > 0
    assert 0 < drift[500.0] < 0.5 * drift[0.0], drift
    # the term applies to box prompts only (a box prior knows no points): a decoder moved away
    # from its prior pays it on boxes, not on points
    ds = SA1BDataset(sa1b_small)
    for box_prob, extra in ((1.0, True), (0.0, False)):
        losses = []
        for weight in (0.0, 500.0):
            cfg = _ft_cfg(sa1b_small, tmp_path / "x", decoder_checkpoint="d", multimask_prob=0.0,
                          prior_distill_weight=weight)  # fmt: skip
            cfg.box_prob = box_prob  # 0: points only, past the check that refuses it
            m = create_model(STUDENT, seed=4).eval()
            step = FinetuneStep(m, cfg)
            with torch.no_grad():
                m.mask_decoder.output_upscaling[0].weight.mul_(1.5)
                sample = prepare_sample(ds[0], m.image_size, cfg, np.random.default_rng(1), "cpu")
                losses.append(float(step([sample], [0])))
        assert (losses[1] > losses[0]) if extra else (losses[1] == losses[0]), (box_prob, losses)
    for bad in (dict(), dict(stage="distill", teacher="sam-vit-tiny")):
        with pytest.raises(InputError, match="prior_distill_weight keeps the box prior"):
            _ft_cfg(sa1b_small, tmp_path / "bad", prior_distill_weight=1.0, **bad)
    with pytest.raises(InputError, match="prior_distill_weight must be 0 or positive"):
        _ft_cfg(sa1b_small, tmp_path / "bad", prior_distill_weight=-1.0, decoder_checkpoint="d")
    for bad in (dict(box_prob=0.0), dict(decoder_lr_scale=0.0)):
        with pytest.raises(InputError, match=r"^prior_distill_weight acts on box prompts"):
            _ft_cfg(sa1b_small, tmp_path / "bad", prior_distill_weight=1.0, decoder_checkpoint="d",
                    **bad)  # fmt: skip


def test_click_rounds_train_on_corrective_clicks_from_the_models_own_errors(sa1b_small, tmp_path):
    from leansam import create_model

    ds = SA1BDataset(sa1b_small)
    cfg = _ft_cfg(sa1b_small, tmp_path / "x", box_prob=0.0, click_rounds=3, num_points=0)
    m = create_model(STUDENT, seed=4).eval()
    calls = []
    decode = m.decode

    def spy(emb, points, labels, *args, **kw):
        out = decode(emb, points, labels, *args, **kw)
        calls.append((points.clone(), labels.clone(), out[0].detach(), out[1].detach()))
        return out

    m.decode = spy
    step = FinetuneStep(m, cfg)
    rounds = []
    for i in range(12):
        sample = prepare_sample(ds[i % len(ds)], m.image_size, cfg, np.random.default_rng(i), "cpu")
        assert sample["points"].shape[:2] == (4, 1) and (sample["labels"] == 1).all()
        rounds.append(sample["click_rounds"])
        calls.clear()
        loss = step([sample], [i])
        assert torch.isfinite(loss)
        r = sample["click_rounds"]
        assert len(calls) == r + 1  # r rounds without gradient, then the trained prediction
        if r:  # seeded: the same sample and seed give the same clicks
            first = calls[-1][0]
            calls.clear()
            step([sample], [i])
            assert torch.equal(calls[-1][0], first)
        h, w = sample["image"].shape[-2:]  # the resized image inside the padded frame
        gt = sample["gt"] > 0.5
        for k, (points, labels, *_) in enumerate(calls):
            assert points.shape[:2] == labels.shape == (4, k + 1)
            assert torch.equal(points[:, :1], sample["points"])  # earlier clicks are kept
            if k == 0:
                continue
            # click k was drawn from the error of round k-1's best predicted output
            prev_low, prev_iou = calls[k - 1][2], calls[k - 1][3]
            assert prev_low.shape[1] == 3  # the multimask outputs, as the click protocol takes
            best = prev_low[torch.arange(4), prev_iou.argmax(1)][:, None]
            pred = torch.nn.functional.interpolate(best, gt.shape[-2:], mode="bilinear")[:, 0] > 0
            xy = (points[:, k] / (1024 / gt.shape[-1])).round().long()
            for j in range(4):
                x, y = int(xy[j, 0]), int(xy[j, 1])
                assert x < w and y < h, (x, y, w, h)  # never on the padding
                inside = bool(gt[j, y, x])
                assert int(labels[j, k]) == int(inside)  # positive exactly on object pixels
                if (pred[j, :h, :w] != gt[j, :h, :w]).any():
                    assert bool(pred[j, y, x]) != inside  # on the error region
    assert set(rounds) == {0, 1, 2, 3}
    for bad, why in (
        (dict(click_rounds=-1), "click_rounds must be 0"),
        (dict(click_rounds=2, box_prob=1.0), "click_rounds simulates corrective clicks"),
    ):
        with pytest.raises(InputError, match=why):
            _ft_cfg(sa1b_small, tmp_path / "bad", **bad)


def test_two_gloo_processes_survive_a_batch_with_no_readable_sample(sa1b_small, tmp_path):
    """3 of 4 images truncated, 1 image per process and step: in some step one process has no
    readable sample while the other has one; the empty process's zero loss still goes through
    DDP, so the gradient all-reduce matches and the run finishes."""
    data = tmp_path / "data"
    shutil.copytree(sa1b_small, data)
    for f in sorted(data.glob("*.jpg"))[:3]:
        f.write_bytes(f.read_bytes()[:300])
    common = dict(model=STUDENT, epochs=1, lr=1e-3, save_every=10, seed=3, data=[str(data)],
                  masks_per_image=2, num_points=256, batch_size=1)  # fmt: skip
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29700 + os.getpid() % 200), "-m", "leansam.cli", "train",
            "finetune", "--recipe", _recipe(tmp_path, **common), "--out", str(tmp_path / "two"),
        ],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "model.pt").exists()
    # the empty process's zero terms are averaged in like its zero loss: loss == terms' sum
    log = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert log and all(r["loss_terms"].keys() == {"mask"} for r in log)
    assert all(r["loss"] == pytest.approx(r["loss_terms"]["mask"], rel=1e-5) for r in log)


def test_prompt_stage_with_data_takes_boxes_only():
    with pytest.raises(InputError, match="stage prompt with data trains the box prior"):
        TrainConfig(stage="prompt", model="m", data=["d"], out="o", box_prob=0.5)
    TrainConfig(stage="prompt", model="m", data=["d"], out="o", box_prob=1.0)


def test_run_folders_from_before_a_recorded_field_resume(tmp_path):
    from leansam.distributed import claim_run_folder

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"runtime": "onnx-int8"}))  # written before calib_images existed
    claim_run_folder(run, {"runtime": "onnx-int8", "calib_images": "/data/calib"})
    assert json.loads(run.read_text())["calib_images"] == "/data/calib"
    with pytest.raises(InputError, match="differs in calib_images"):
        claim_run_folder(run, {"runtime": "onnx-int8", "calib_images": "/other"})
