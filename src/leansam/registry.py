"""Model registry (core): ``list_models()``, configs, and ``create_model`` for plain checkpoints.

Quantized files belong to :mod:`leansam.quant`, above the core: :func:`leansam.create_model` and
:func:`leansam.load_model` (:mod:`leansam.loading`) load those too.
"""

from __future__ import annotations

import difflib
import os

import torch

from .checkpoint import load_checkpoint_into, read_quantized
from .configs import VARIANTS, SamConfig
from .errors import CheckpointError, InputError, UnknownModelError
from .modeling.sam import Sam
from .pretrained import pretrained_path


def list_models(*, include_tiny: bool = True) -> list[str]:
    """Names of the registered variants (test-size ``tiny`` ones last unless excluded)."""
    names = [n for n, c in VARIANTS.items() if not c.tiny]
    if include_tiny:
        names += [n for n, c in VARIANTS.items() if c.tiny]
    return names


def get_config(name: str) -> SamConfig:
    """The config of a registered variant; unknown names raise with the closest suggestions."""
    try:
        return VARIANTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(VARIANTS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}: {hint}`leansam models` lists the variants "
            "(`--all` adds the test-size ones)"
        ) from None


def resolve_device(device: torch.device | str | None) -> torch.device | None:
    """Parse a device and check that it exists here, with a one-line error if not."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def create_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    seed: int | None = None,
    pretrained: bool = False,
) -> Sam:
    """Build a registered model in eval mode.

    Arguments:
      name: a name from :func:`list_models`, e.g. ``"efficientvit-sam-l0"`` or ``"sam-vit-h"``.
      checkpoint: an official ``efficientvit_sam_*.pt`` / ``sam_vit_*.pth`` file or a safetensors
        file; loaded weights-only and strictly. Without it the weights are random. A quantized
        model written by ``leansam quantize`` raises :class:`CheckpointError` here: the public
        :func:`leansam.create_model` loads it.
      device, dtype: where and in which precision the model lives (default CPU, float32).
      seed: make random weights reproducible (without touching the caller's global RNG).
      pretrained: load leansam's own trained weights shipped in ``weights/`` (only for
        ``leansam-vit-s`` and ``leansam-efficientvit-s``; see MODEL_CARD.md).
    """
    cfg = get_config(name)
    device = resolve_device(device)
    if pretrained:
        if checkpoint is not None:
            raise InputError("pass either checkpoint or pretrained=True, not both")
        checkpoint = pretrained_path(name)
    if checkpoint is None and seed is None:
        model = Sam(cfg, device=device)
    elif checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Sam(cfg, device=device)
    elif read_quantized(checkpoint) is not None:
        raise CheckpointError(
            f"{os.fspath(checkpoint)} is a quantized model (leansam quantize): load it with "
            "leansam.create_model or leansam.load_model"
        )
    else:
        # Build without allocating or initialising weights, then take the checkpoint's tensors.
        model = Sam(cfg, device="meta")
        load_checkpoint_into(model, checkpoint)
    model.to(device=device, dtype=dtype)
    return model.eval()


def model_for_checkpoint(path: str | os.PathLike) -> str:
    """The registered variant a checkpoint file is for: the name stored in a quantized file,
    else the variant whose state-dict keys and shapes the file matches exactly. Raises a
    one-line :class:`~leansam.errors.CheckpointError` when no variant matches."""
    from .checkpoint import identify_variant, load_state_dict

    quantized = read_quantized(path)
    if quantized is not None:
        return str(quantized["model"])
    name = identify_variant(load_state_dict(path))
    if name is None:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} matches no registered model: pass --model "
            "(`leansam models` lists them); loading with --model names the mismatched keys"
        )
    return name


def model_info(name: str) -> dict:
    """Name, family, encoder input size, parameter count (counted on the meta device)."""
    cfg = get_config(name)
    model = Sam(cfg, device="meta")
    return {
        "name": name,
        "family": cfg.family,
        "image_size": cfg.image_size,
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": sum(p.numel() for p in model.image_encoder.parameters()),
        "state_dict_keys": len(model.state_dict()),
        "tiny": cfg.tiny,
        "description": cfg.description,
    }
