"""leansam's own trained weights (``weights/``): lookup, integrity check and publishing.

Official upstream checkpoints cannot be shipped; these two small models are trained by this project
on COCO subsets with its own pipeline (``make weights``; data, recipe and results in MODEL_CARD.md).
They are stored as float16 safetensors and load into float32 models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError
from .io import file_sha256

#: variant name -> file in the weights folder
PRETRAINED: dict[str, str] = {
    "leansam-vit-s": "leansam-vit-s.safetensors",
    "leansam-efficientvit-s": "leansam-efficientvit-s.safetensors",
}
MANIFEST = "manifest.json"
#: the folder searched when ``$LEANSAM_WEIGHTS`` is not set: the repository's ``weights/``
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "weights"


def weights_dir() -> Path:
    """``$LEANSAM_WEIGHTS`` if set, else the repository's ``weights/`` folder."""
    return Path(os.environ.get("LEANSAM_WEIGHTS") or DEFAULT_DIR)


def has_pretrained(name: str) -> bool:
    """Whether leansam ships trained weights for variant ``name``."""
    return name in PRETRAINED


def pretrained_path(name: str) -> Path:
    """The verified weights file of ``name``; one-line :class:`CheckpointError` otherwise."""
    if name not in PRETRAINED:
        raise CheckpointError(
            f"leansam ships trained weights only for {', '.join(PRETRAINED)}, not {name}: "
            "pass --checkpoint with an official file instead"
        )
    folder = weights_dir()
    path = folder / PRETRAINED[name]
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: run from a leansam checkout (weights/ is in the repository), set "
            "LEANSAM_WEIGHTS to a folder holding it, or rebuild it with `make weights`"
        )
    manifest = folder / MANIFEST
    if manifest.is_file():
        expected = json.loads(manifest.read_text()).get(name, {}).get("sha256")
        if expected and file_sha256(path) != expected:
            raise CheckpointError(
                f"{path} does not match its sha256 in {manifest}: the file is damaged or was "
                "replaced (a Git LFS pointer?); restore it with `git checkout weights/`"
            )
    return path


def publish(
    name: str, checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> Path:
    """Store a trained ``model.pt`` of variant ``name`` as ``<out_dir>/<name>.safetensors`` in
    float16 and record its sha256 and size in ``manifest.json``. Returns the written path."""
    from .checkpoint import check_state_dict, load_state_dict, save_state_dict
    from .configs import VARIANTS
    from .io import atomic_write_json
    from .modeling.sam import Sam

    if name not in PRETRAINED:
        raise CheckpointError(
            f"{name} is not one of leansam's own models ({', '.join(PRETRAINED)})"
        )
    state = load_state_dict(checkpoint)
    check_state_dict(state, Sam(VARIANTS[name], device="meta"), name, f"checkpoint {checkpoint}")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    folder = Path(out_dir) if out_dir is not None else weights_dir()
    path = save_state_dict(half, folder / PRETRAINED[name])
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[name] = {
        "file": PRETRAINED[name],
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "params": sum(v.numel() for v in state.values()),
        "dtype": str(torch.float16),
    }
    atomic_write_json(manifest_path, manifest)
    return path


def default_checkpoint(name: str, checkpoint: str | os.PathLike | None) -> str | None:
    """What the CLI loads for ``--model name``: the given checkpoint, else leansam's shipped
    weights when ``name`` has some, else ``None`` (random weights)."""
    if checkpoint is None and has_pretrained(name):
        checkpoint = pretrained_path(name)
    return None if checkpoint is None else os.fspath(checkpoint)
