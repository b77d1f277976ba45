"""The one way applications load a model: :func:`load_model` (and the public
:func:`create_model`, which also takes quantized files).

The CLI, the service, evaluation, the demo, ``bench`` and ``quantize`` all call
:func:`load_model`: leansam's shipped weights for its own models, official checkpoints, quantized
files, and one :class:`~leansam.errors.RandomWeightsWarning` when the weights are random. It sits
above the core (:mod:`leansam.registry` builds plain models) because quantized files need
:mod:`leansam.quant`.
"""

from __future__ import annotations

import os
import warnings

import torch

from .checkpoint import read_quantized
from .errors import InputError, RandomWeightsWarning
from .modeling.sam import Sam
from .pretrained import default_checkpoint
from .registry import create_model as _create_plain
from .registry import get_config


def create_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    seed: int | None = None,
    pretrained: bool = False,
) -> Sam:
    """Build a registered model in eval mode (:func:`leansam.registry.create_model`: official
    and safetensors checkpoints, ``pretrained=True`` for leansam's shipped weights), and load a
    quantized model written by ``leansam quantize`` (:func:`leansam.quant.load`; it runs in
    float32, fake quantization) when ``checkpoint`` is one.

    Raises :class:`~leansam.errors.UnknownModelError`, :class:`~leansam.errors.CheckpointError`
    and :class:`~leansam.errors.InputError` with one line."""
    get_config(name)
    if checkpoint is not None and read_quantized(checkpoint) is not None:
        if pretrained:
            raise InputError("pass either checkpoint or pretrained=True, not both")
        if dtype not in (None, torch.float32):
            raise InputError("a quantized model runs in float32 (fake quantization)")
        from .quant.io import load

        return load(checkpoint, model=name, device=device)
    return _create_plain(name, checkpoint, device, dtype, seed=seed, pretrained=pretrained)


def load_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    pretrained: bool | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Sam:
    """The model an application runs for ``--model name [--checkpoint FILE]``.

    ``pretrained=None`` (the default) means: leansam's shipped weights for its own models when no
    checkpoint is given (:func:`leansam.pretrained.default_checkpoint`); ``False`` never takes
    them (random weights unless ``checkpoint`` is given); ``True`` requires them. Without weights
    the model is seeded with ``seed`` (every process of a run builds the same one) and a
    :class:`~leansam.errors.RandomWeightsWarning` is issued. The returned model carries
    ``checkpoint_path``: the file its weights came from, or None.
    """
    get_config(name)  # unknown names fail before any file is read
    if pretrained is None:
        path = default_checkpoint(name, checkpoint)
    elif pretrained:
        if checkpoint is not None:
            raise InputError("pass either checkpoint or pretrained=True, not both")
        path = default_checkpoint(name, None)
        if path is None:
            raise InputError(f"{name} has no shipped weights (only leansam's own models do)")
    else:
        path = None if checkpoint is None else os.fspath(checkpoint)
    if path is None:
        warnings.warn(
            RandomWeightsWarning(
                f"{name} has random weights (no --checkpoint): its masks are meaningless; pass "
                "official weights with --checkpoint (README: Checkpoints)"
            ),
            stacklevel=2,
        )
    model = create_model(name, path, device, dtype, seed=seed)
    model.checkpoint_path = path
    return model
