"""Quantized-model files: :func:`save` and :func:`load` (format ``leansam-quant``).

Version 2 stores what the quantized model computes with, compactly, and loads back the identical
model (bit for bit the same outputs):

- every quantized weight as its integer codes ``q - z`` (``LAYER.weight_codes``): int8 for 5-8
  bits, two 4-bit codes per byte for 2-4 bits (uint8 ``LAYER.weight_codes4`` plus
  ``LAYER.weight_shape``), next to its per-channel scale and zero point; the float weight is
  rebuilt as ``codes x scale`` (exactly what the fake quantizer produced) and AdaRound's rounding
  decisions (``w_quant.up``, one byte per weight in memory) are derived from the codes;
- every other floating-point tensor (LayerNorms, biases, the full-precision layers, quantizer
  scales) in float16 when float16 holds its value exactly (true of every tensor of leansam's
  float16 release), else unchanged;
- all of them in one zlib-compressed blob (``packed``, with its ``index``): one file record
  instead of hundreds, and the codes of trained weights, far from uniform, compress.

A W8 file of leansam's student is about 0.28x of its float32 file, a W4 file about 0.16x
(QUANTIZATION.md). Version 1 files (float weights) still load.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from ..checkpoint import QUANTIZED_FORMAT, read_quantized
from ..errors import CheckpointError, InputError
from ..modeling.sam import Sam
from .config import QuantConfig
from .modules import QuantLayer
from .quantizers import AdaRoundQuantizer
from .quantizers.base import broadcast
from .wrap import is_quantized, prepare, quantizers

FORMAT = QUANTIZED_FORMAT
VERSION = 2
#: versions :func:`load` reads
READABLE = (1, 2)
#: tensor types a version-2 file may hold
PACKED_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")


def _coded_layers(model: Sam) -> dict[str, QuantLayer]:
    """The layers whose weights are stored as codes: quantizer enabled and calibrated, <= 8 bits."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, QuantLayer)
        and mod.w_quant.enabled
        and bool(mod.w_quant.initialized)
        and mod.w_quant.bits <= 8
    }


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7] -> uint8, two per byte (low nibble first; odd counts padded)."""
    flat = (codes.flatten().to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes of ``shape``."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().to(torch.int16)
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    n = 1
    for d in shape:
        n *= d
    return signed[:n].reshape(shape)


def _compact_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float16 when that holds every value exactly, else unchanged."""
    if t.dtype == torch.float32 and t.numel():
        half = t.half()
        if torch.equal(half.float(), t):
            return half
    return t


def pack_tensors(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list]]:
    """Every tensor of ``state`` in one zlib-compressed byte blob (a uint8 tensor) and its index
    ``[[key, dtype, shape, byte offset, byte length], ...]``: one file record instead of one per
    tensor (hundreds of small records cost ~0.3 MB of zip headers and padding), and the codes of
    a trained model's weights, far from uniform, compress. Lossless (:func:`unpack_tensors`)."""
    parts, index, offset = [], [], 0
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        index.append([key, str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(raw)])
        parts.append(raw)
        offset += len(raw)
    blob = zlib.compress(b"".join(parts), 6)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), index


def unpack_tensors(blob: torch.Tensor, index: list[list], path) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tensors`. Raises CheckpointError for a damaged blob or index."""
    try:
        raw = zlib.decompress(blob.numpy().tobytes())
        out = {}
        for key, dtype, shape, offset, length in index:
            if dtype not in PACKED_DTYPES or offset + length > len(raw):
                raise ValueError(f"entry {key}")
            dtype = getattr(torch, dtype)
            if length == 0:
                out[key] = torch.empty(shape, dtype=dtype)
            else:
                data = bytearray(raw[offset : offset + length])
                out[key] = torch.frombuffer(data, dtype=dtype).reshape(shape)
        return out
    except (zlib.error, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: the packed tensors are damaged ({e})") from None


def compact_state_dict(model: Sam) -> dict[str, torch.Tensor]:
    """The version-2 state dict of a quantized model (see the module docstring)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, layer in _coded_layers(model).items():
        codes = layer.w_quant.codes(layer.weight.detach()).cpu()
        del state[f"{name}.weight"]
        state.pop(f"{name}.w_quant.up", None)  # AdaRound: derived again from the codes
        if layer.w_quant.bits <= 4:
            state[f"{name}.weight_codes4"] = pack_int4(codes.to(torch.int8))
            state[f"{name}.weight_shape"] = torch.tensor(codes.shape, dtype=torch.int64)
        else:
            state[f"{name}.weight_codes"] = codes.to(torch.int8)
    return {k: _compact_float(v) for k, v in state.items()}


#: state-dict entries of the weight codes (version 2)
CODE_SUFFIXES = (".weight_codes", ".weight_codes4", ".weight_shape")


def _load_compact(model: Sam, state: dict[str, torch.Tensor], path) -> None:
    """Load a version-2 state dict into the prepared ``model``: every entry but the codes, then
    each coded layer's weight rebuilt from its codes. Raises RuntimeError naming missing or
    unexpected entries."""
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.endswith(CODE_SUFFIXES)}, strict=False
    )
    coded = {k.rsplit(".", 1)[0] for k in state if k.endswith(CODE_SUFFIXES)}
    rebuilt = {f"{n}.weight" for n in coded} | {f"{n}.w_quant.up" for n in coded}
    if unexpected or set(missing) - rebuilt:
        raise RuntimeError(
            f"missing {sorted(set(missing) - rebuilt)[:3]}, unexpected {unexpected[:3]}"
        )
    _restore_weights(model, state, path)


def _restore_weights(model: Sam, state: dict[str, torch.Tensor], path) -> None:
    """Rebuild each coded layer's float weight (and AdaRound's rounding) from its codes, after
    the quantizers' scales are loaded."""
    for name, layer in _coded_layers(model).items():
        expected = tuple(layer.weight.shape)
        if f"{name}.weight_codes4" in state:
            shape = tuple(state[f"{name}.weight_shape"].tolist())
            packed = state[f"{name}.weight_codes4"]
            if shape != expected or packed.numel() != (layer.weight.numel() + 1) // 2:
                raise CheckpointError(f"{path}: {name} codes are {shape}, the layer {expected}")
            codes = unpack_int4(packed, shape)
        elif f"{name}.weight_codes" in state:
            codes = state[f"{name}.weight_codes"]
            if tuple(codes.shape) != expected:
                raise CheckpointError(
                    f"{path}: {name} codes are {tuple(codes.shape)}, the layer {expected}"
                )
        else:
            raise CheckpointError(f"{path}: no weight codes for the quantized layer {name}")
        wq = layer.w_quant
        with torch.no_grad():
            s = broadcast(wq.scale.detach().float(), layer.weight, 0)
            w = codes.float() * s
            if isinstance(wq, AdaRoundQuantizer):
                up = codes.float() - torch.floor(w / s)  # floor(w / s) + up = codes
                wq.up = up.bool()
                if not bool(((up == 0) | (up == 1)).all()):
                    raise CheckpointError(f"{path}: {name} codes do not rebuild their weights")
            layer.weight.data = w.to(layer.weight.dtype)
        if not torch.equal(wq.codes(layer.weight), codes.float()):
            raise CheckpointError(f"{path}: {name} codes do not rebuild their weights")


def save(model: Sam, path: str | os.PathLike) -> Path:
    """Write a quantized model (atomically) in the compact version-2 layout; :func:`load` reads
    it back to the identical model. Raises InputError for a model that is not quantized."""
    from ..io import atomic_replace

    if not is_quantized(model):
        raise InputError("save() takes a model returned by leansam.quant.quantize")
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.name,
        "config": model.quant_config.to_dict(),
        "info": getattr(model, "quant_info", {}),
    }
    obj["packed"], obj["index"] = pack_tensors(compact_state_dict(model))
    return atomic_replace(path, lambda f: torch.save(obj, f))


def load(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    device: torch.device | str | None = None,
) -> Sam:
    """A quantized model saved by ``leansam quantize`` / :func:`save` (format version 1 or 2),
    ready for ``SamPredictor`` (runtime ``torch``). ``model``: the expected variant name
    (checked). Raises CheckpointError for another kind of file, another variant or a damaged
    one."""
    from ..registry import create_model

    obj = read_quantized(path)  # memory-mapped
    if obj is None:
        raise CheckpointError(f"{path} is not a leansam quantized model (leansam quantize)")
    version = obj.get("version")
    if version not in READABLE:
        raise CheckpointError(
            f"{path}: quantized-model format version {version}; this leansam reads "
            f"{', '.join(map(str, READABLE))} (upgrade leansam)"
        )
    if model is not None and model != obj["model"]:
        raise CheckpointError(f"{path} holds a quantized {obj['model']}, not {model}")
    cfg = QuantConfig.from_dict(obj["config"])
    q = prepare(create_model(obj["model"], seed=0), cfg)
    try:
        if version == 1:
            q.load_state_dict(obj["state_dict"], strict=True)
        else:
            _load_compact(q, unpack_tensors(obj["packed"], obj["index"], path), path)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match {obj['model']}: {e}") from None
    for _, qz in quantizers(q):
        if not bool(qz.initialized):
            raise CheckpointError(f"{path}: quantizer {_} was saved uncalibrated")
    q.quant_info = obj.get("info", {})
    for p in q.parameters():
        p.requires_grad_(False)
    return q.to(device=device).eval()
