"""Quantized-model files: :func:`save` and :func:`load` (format ``leansam.quantized``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import QUANTIZED_FORMAT, read_quantized
from ..errors import CheckpointError, InputError
from ..modeling.sam import Sam
from .config import QuantConfig
from .wrap import is_quantized, prepare, quantizers

FORMAT = QUANTIZED_FORMAT
VERSION = 1


def save(model: Sam, path: str | os.PathLike) -> Path:
    """Write a quantized model (atomically); :func:`load` reads it back."""
    from ..io import atomic_replace

    if not is_quantized(model):
        raise InputError("save() takes a model returned by leansam.quant.quantize")
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.name,
        "config": model.quant_config.to_dict(),
        "info": getattr(model, "quant_info", {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_replace(path, lambda f: torch.save(obj, f))


def load(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    device: torch.device | str | None = None,
) -> Sam:
    """A quantized model saved by ``leansam quantize`` / :func:`save`, ready for
    ``SamPredictor`` (runtime ``torch``). ``model``: the expected variant name (checked)."""
    from ..registry import create_model

    obj = read_quantized(path)  # memory-mapped
    if obj is None:
        raise CheckpointError(f"{path} is not a leansam quantized model (leansam quantize)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: quantized-model format version {obj.get('version')}")
    if model is not None and model != obj["model"]:
        raise CheckpointError(f"{path} holds a quantized {obj['model']}, not {model}")
    cfg = QuantConfig.from_dict(obj["config"])
    q = prepare(create_model(obj["model"], seed=0), cfg)
    try:
        q.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match {obj['model']}: {e}") from None
    for _, qz in quantizers(q):
        if not bool(qz.initialized):
            raise CheckpointError(f"{path}: quantizer {_} was saved uncalibrated")
    q.quant_info = obj.get("info", {})
    for p in q.parameters():
        p.requires_grad_(False)
    return q.to(device=device).eval()
