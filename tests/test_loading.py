"""The one loading path (``leansam.load_model``) and the public ``create_model``."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import COCO_MINI, randomize_, require_extra

import leansam
from leansam.errors import CheckpointError, InputError, RandomWeightsWarning
from leansam.registry import create_model as create_plain

TINY = "efficientvit-sam-tiny-l"


def test_random_weights_warn_once_and_are_seeded():
    with pytest.warns(RandomWeightsWarning, match="has random weights") as record:
        a = leansam.load_model(TINY)
    assert len(record) == 1 and a.checkpoint_path is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        b = leansam.load_model(TINY)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoints_and_shipped_weights(tmp_path):
    sd = randomize_(create_plain(TINY, seed=0), seed=3).state_dict()
    torch.save(sd, tmp_path / "c.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # weights given: no warning
        m = leansam.load_model(TINY, tmp_path / "c.pt")
        assert m.checkpoint_path == str(tmp_path / "c.pt")
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
        shipped = leansam.load_model("leansam-efficientvit-s")  # its shipped weights
        assert shipped.checkpoint_path.endswith("leansam-efficientvit-s.safetensors")
    with pytest.warns(RandomWeightsWarning):
        leansam.load_model("leansam-efficientvit-s", pretrained=False)
    with pytest.raises(InputError, match="has no shipped weights"):
        leansam.load_model(TINY, pretrained=True)
    with pytest.raises(InputError, match="either checkpoint or pretrained"):
        leansam.load_model(TINY, tmp_path / "c.pt", pretrained=True)


def test_quantized_files_load_through_the_public_functions_only(tmp_path):
    require_extra("sklearn")

    from leansam.quant import QuantConfig, calibration_samples, quantize, save

    model = create_plain(TINY, seed=0)
    samples = calibration_samples(
        model, COCO_MINI / "train2017", COCO_MINI / "annotations" / "instances_train2017.json",
        count=1, max_boxes=1,
    )  # fmt: skip
    q = quantize(model, QuantConfig(method="minmax", w_bits=8, a_bits=8), samples, progress=False)
    path = save(q, tmp_path / "q.pt")
    for load in (leansam.create_model, leansam.load_model):
        got = load(TINY, path)
        assert got.quant_config.method == "minmax"
    assert leansam.load_model(TINY, path).checkpoint_path == str(path)
    # the core registry (below leansam.quant) refuses it with a pointer
    with pytest.raises(CheckpointError, match=r"is a quantized model .*leansam\.create_model"):
        create_plain(TINY, path)
