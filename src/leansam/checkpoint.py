"""Checkpoint I/O: weights-only loading, safetensors, strict checks with a readable report.

Official files load as they are: ``efficientvit_sam_*.pt`` (a flat state dict or
``{"state_dict": ...}``) and ``sam_vit_*.pth`` (flat). Nothing is unpickled beyond tensors and
containers (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .configs import VARIANTS
from .errors import CheckpointError

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
#: keys under which training frameworks nest the weights
_WRAPPER_KEYS = ("state_dict", "model")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pt`` / ``.pth`` / ``.safetensors`` file, weights only."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    if path.suffix in _SAFETENSORS_SUFFIXES or _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(
                f"{path} is a safetensors file: install the `safetensors` package to read it"
            ) from None
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found:  # a real pickle that would construct (or call) an arbitrary Python object
                raise CheckpointError(
                    f"refusing to load {path}: it references the Python object {found[1]}, and "
                    "leansam only loads weights-only checkpoints (re-save its state_dict)"
                ) from None
            raise CheckpointError(
                f"cannot read {path}: not a PyTorch or safetensors checkpoint, or truncated"
            ) from None
        except Exception as e:  # torch.load fails in many ways on foreign or truncated bytes
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"cannot read {path}: not a PyTorch or safetensors checkpoint, or truncated ({msg})"
            ) from None
    return _unwrap(obj, path)


#: ``format`` field of a quantized-model file written by ``leansam quantize``
QUANTIZED_FORMAT = "leansam-quant"


def read_quantized(path: str | os.PathLike) -> dict | None:
    """The contents of a quantized-model file (``leansam quantize``: a dict with ``format``,
    ``version``, ``model``, ``config``, ``state_dict``), or None when ``path`` is another kind of
    checkpoint or no file. Loaded weights-only."""
    path = Path(path)
    if not path.is_file() or path.suffix in _SAFETENSORS_SUFFIXES:
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == QUANTIZED_FORMAT else None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    obj = strip_wrapper_prefixes(obj)
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(
            f"{path} does not hold a state dict: {len(bad)} entries are not tensors, "
            f"such as {bad[0]!r}"
        )
    return obj


#: key prefixes that wrappers put on every key: DataParallel / DistributedDataParallel
#: (``module.``) and ``torch.compile`` (``_orig_mod.``)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Remove a prefix of :data:`WRAPPER_PREFIXES` that *every* key carries (a state dict saved
    from ``nn.DataParallel(model)`` or a compiled model), repeatedly; a prefix on only some keys
    is left for the strict key check to report."""
    while state_dict:
        keys = list(state_dict)
        prefix = next(
            (
                p
                for p in WRAPPER_PREFIXES
                if all(isinstance(k, str) and k.startswith(p) for k in keys)
            ),
            None,
        )
        if prefix is None:
            break
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically (temp file + rename); ``.safetensors`` or torch format."""
    from .io import atomic_replace

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        return atomic_replace(path, lambda tmp: save_file(tensors, tmp))
    return atomic_replace(path, lambda tmp: torch.save(tensors, tmp))


@functools.cache
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a variant's state dict, computed on the meta device (no memory)."""
    from .modeling.sam import Sam

    return {k: tuple(v.shape) for k, v in Sam(VARIANTS[name], device="meta").state_dict().items()}


def _examples(keys: list[str], n: int = 2) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def mismatch_report(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of ``state_dict`` against ``expected`` shapes."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(s)})"
        for k, s in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != s
    ]
    return missing, unexpected, wrong


def identify_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered variant whose keys and shapes this state dict matches exactly, if any."""
    for name in VARIANTS:
        if not any(mismatch_report(state_dict, _signature(name))):
            return name
    return None


def check_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, name: str, source: str = "checkpoint"
) -> None:
    """Raise :class:`CheckpointError` naming missing / unexpected / wrong-shape keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, wrong = mismatch_report(state_dict, expected)
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys such as {_examples(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys such as {_examples(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} keys with the wrong shape such as {_examples(wrong, 1)}")
    other = identify_variant(state_dict)
    what = f"is for {other}, not {name}" if other else f"does not match {name}"
    raise CheckpointError(f"{source} {what}: " + "; ".join(parts))


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint file into a leansam :class:`~leansam.modeling.sam.Sam`, strictly.

    The model may live on the meta device: its tensors are then replaced by the checkpoint's.
    """
    state_dict = load_state_dict(path)
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    check_state_dict(state_dict, model, name, source=f"checkpoint {os.fspath(path)}")
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    if on_meta:
        model.init_pixel_stats()
    # Checkpoints saved in half precision still build a float32 model unless asked otherwise.
    model.float()
    return model
