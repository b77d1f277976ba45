"""Checkpoint loading: formats, strictness, and one clear error per kind of bad file."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import randomize_

from leansam import create_model
from leansam.checkpoint import identify_variant, load_state_dict, save_state_dict
from leansam.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny_l_state():
    torch.manual_seed(0)
    return randomize_(create_model("efficientvit-sam-tiny-l"), seed=3).state_dict()


def _assert_loaded(model, state):
    ours = model.state_dict()
    assert ours.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(ours[k], v.to(ours[k].dtype)), k


@pytest.mark.parametrize("form", ["flat.pt", "wrapped.pt", "model.pth", "weights.safetensors"])
def test_formats_load_strictly(tmp_path, tiny_l_state, form):
    path = tmp_path / form
    if form == "wrapped.pt":
        torch.save({"state_dict": tiny_l_state, "epoch": 3}, path)
    elif form == "model.pth":
        torch.save({"model": tiny_l_state}, path)
    else:
        save_state_dict(tiny_l_state, path)
    model = create_model("efficientvit-sam-tiny-l", checkpoint=path)
    _assert_loaded(model, tiny_l_state)
    assert not model.training
    assert model.pixel_mean.device.type == "cpu"  # rebuilt after loading onto the meta model


def test_safetensors_detected_by_content(tmp_path, tiny_l_state):
    path = tmp_path / "weights.bin"
    save_state_dict(tiny_l_state, tmp_path / "w.safetensors").rename(path)
    _assert_loaded(create_model("efficientvit-sam-tiny-l", checkpoint=path), tiny_l_state)


def test_half_precision_checkpoint_builds_float32(tmp_path, tiny_l_state):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in tiny_l_state.items()}, path)
    model = create_model("efficientvit-sam-tiny-l", checkpoint=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_identify_variant(tiny_l_state):
    assert identify_variant(tiny_l_state) == "efficientvit-sam-tiny-l"
    assert identify_variant({"x": torch.zeros(1)}) is None


def test_checkpoint_of_another_variant(tmp_path):
    path = tmp_path / "xl.pt"
    torch.save(create_model("efficientvit-sam-tiny-xl").state_dict(), path)
    with pytest.raises(
        CheckpointError,
        match=r"is for efficientvit-sam-tiny-xl, not efficientvit-sam-tiny-l: \d+ missing keys "
        r"such as image_encoder\.",
    ) as e:
        create_model("efficientvit-sam-tiny-l", checkpoint=path)
    assert "\n" not in str(e.value)


def test_wrong_shape_is_named(tmp_path, tiny_l_state):
    state = dict(tiny_l_state)
    state["image_encoder.norm.weight"] = torch.ones(8)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"does not match efficientvit-sam-tiny-l: 1 keys with the wrong shape such as "
        r"image_encoder\.norm\.weight \(checkpoint \[8\], model \[32\]\)",
    ):
        create_model("efficientvit-sam-tiny-l", checkpoint=path)


def test_missing_and_unexpected_keys(tmp_path, tiny_l_state):
    state = dict(tiny_l_state)
    del state["mask_decoder.iou_token.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"1 missing keys such as mask_decoder\.iou_token\.weight; "
        r"1 unexpected keys such as extra\.weight",
    ):
        create_model("efficientvit-sam-tiny-l", checkpoint=path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.pt"):
        create_model("efficientvit-sam-tiny-l", checkpoint=tmp_path / "nope.pt")


def test_empty_and_directory(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_state_dict(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_state_dict(tmp_path)


def test_truncated_file(tmp_path, tiny_l_state):
    full = tmp_path / "full.pt"
    torch.save(tiny_l_state, full)
    data = full.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.pt: .*truncated"):
        load_state_dict(tmp_path / "cut.pt")


def test_truncated_safetensors(tmp_path, tiny_l_state):
    full = save_state_dict(tiny_l_state, tmp_path / "w.safetensors")
    data = full.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors checkpoint"):
        load_state_dict(tmp_path / "cut.safetensors")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch or safetensors checkpoint"):
        load_state_dict(path)


def test_non_state_dict_contents(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"does not hold a state dict"):
        load_state_dict(tmp_path / "tensor.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="entries are not tensors, such as 'weights'"):
        load_state_dict(tmp_path / "list.pt")


class _Payload:
    def __reduce__(self):  # would run code on a plain unpickle
        return (print, ("pwned",))


def test_arbitrary_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(
        CheckpointError,
        match=r"refusing to load .*evil\.pt: it references the Python object print, .*weights-only",
    ):
        load_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_save_is_atomic(tmp_path, tiny_l_state):
    path = save_state_dict(tiny_l_state, tmp_path / "sub" / "w.pt")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["w.pt"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
