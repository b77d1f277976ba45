"""Shared fixtures: real coco-mini data and deterministic random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_MINI = DATA / "coco-mini"


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))


#: parametrised cases that run only in the slow suite (`make test-slow`), by node id: each has a
#: sibling on the same code path in the default suite (the quantization tests on the other tiny
#: model, the other training stage over 2 gloo processes, torch-opt's encoder compile)
SLOW_CASES = (
    "test_quant_model.py::test_keep_8bit_is_mixed_precision_by_tensor_name[sam-vit-tiny]",
    "test_quant_model.py::test_save_load_and_every_entry_point[sam-vit-tiny]",
    "test_quant_model.py::test_reconstruction_lowers_the_block_error[sam-vit-tiny]",
    "test_quant_model.py::test_cag_groups_drive_the_forward[sam-vit-tiny]",
    "test_train.py::test_two_gloo_processes_match_one[distill]",
    "test_runtime.py::test_torch_opt_predictor_compiles_the_decoder",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark SLOW_CASES slow before `-m 'not slow'` deselects."""
    for item in items:
        if item.nodeid.endswith(SLOW_CASES):
            item.add_marker(pytest.mark.slow)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor of a state dict non-trivial values, deterministically.

    Default initialisation leaves many tensors at 0 or 1 (biases, norms, BN statistics, SAM's
    positional embeddings), which would hide a swapped or ignored tensor; this perturbs them all.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias", "pos_embed")) or "rel_pos" in name:
                t.copy_(0.1 * noise)
            elif t.ndim == 1:  # norm scales
                t.copy_(1.0 + 0.1 * noise)
            else:
                t.add_(0.02 * noise * (t.std() if t.numel() > 1 else 1.0))
    return module


@pytest.fixture(scope="session")
def coco_val():
    """(images, annotations by image id) of coco-mini val."""
    from leansam.data.coco import load_coco

    path = COCO_MINI / "annotations" / "instances_val2017.json"
    if not path.exists():
        pytest.fail(f"coco-mini not found at {COCO_MINI}: the tests read ../shared/data")
    return load_coco(path)


@pytest.fixture(scope="session")
def coco_image(coco_val):
    """A real non-square coco-mini val image (H x W x 3 uint8) with its annotations."""
    from leansam.io import load_image

    images, anns = coco_val
    info = next(
        im for im in images if im["width"] != im["height"] and len(anns.get(im["id"], [])) >= 2
    )
    return load_image(COCO_MINI / "val2017" / info["file_name"]), anns[info["id"]]


def require_extra(module: str):
    """``pytest.importorskip(module)``, except under ``CI=true``, where an optional extra that is
    missing fails the test: CI installs every extra, so a skip there would hide a broken set-up."""
    import importlib
    import os

    if os.environ.get("CI") == "true":
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is not installed under CI=true (make test installs it): {e}")
    return pytest.importorskip(module)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def cli_one_and_two_ranks(args: list[str], out_one, out_two, *, port_offset: int = 0):
    """Run ``leansam ARGS --out OUT`` as one process, then under torchrun with 2 gloo processes
    (one thread each, so that the numerics are comparable); both must exit 0. Returns the
    CompletedProcess of the single run."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "leansam.cli", *args, "--out", str(out_one)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29500 + os.getpid() % 1000 + port_offset), "-m", "leansam.cli",
            *args, "--out", str(out_two),
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    return one
