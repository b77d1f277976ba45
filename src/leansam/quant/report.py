"""What a quantized model holds and does: the per-tensor report, the active-quantizer check and
per-layer SQNR."""

from __future__ import annotations

import math

import torch

from ..modeling.sam import Sam
from .calibrate import CalibSample, run_hooked
from .modules import QuantLayer, QuantLinear
from .quantizers import CAGQuantizer, Log2Quantizer, Quantizer, sqnr_db
from .wrap import quantized_tensors, quantizers


def report(model: Sam) -> dict:
    """Each quantized tensor with its quantizer, bits, state and the parameters a datapath holds;
    totals of the per-channel vs grouped activation parameters (CAG's register saving)."""
    rows = []
    per_channel = grouped = 0
    channels = {
        f"{n}.input": m.in_features if isinstance(m, QuantLinear) else m.in_channels
        for n, m in model.named_modules()
        if isinstance(m, QuantLayer)
    }
    for name, qz in quantized_tensors(model):
        row = _row(name, qz)
        if name in channels:
            # what a datapath holds for this input: per channel it would be c (scale, zero
            # point) pairs; CAG holds its groups, per-tensor quantizers one set
            c = row["channels"] = channels[name]
            if isinstance(qz, CAGQuantizer):
                per_channel += c
                grouped += qz.num_groups
        rows.append(row)
    cfg = model.quant_config
    return {
        "method": cfg.method,
        "bits": cfg.bits,
        "keep_8bit": list(cfg.keep_8bit),
        "tensors": rows,
        "cag_registers": {
            "per_channel_pairs": per_channel,
            "cag_pairs": grouped,
            "reduction": (1 - grouped / per_channel) if per_channel else 0.0,
        },
    }


def _row(name: str, qz: Quantizer) -> dict:
    row = {
        "tensor": name,
        "quantizer": qz.kind,
        "bits": qz.bits,
        "enabled": bool(qz.enabled),
        "calibrated": bool(qz.initialized),
        "params": int(qz.num_params()) if hasattr(qz, "num_params") else 0,
    }
    if isinstance(qz, Log2Quantizer):  # levels s * 2^(-k / tau): a shift and a tau-entry table
        row["tau"], row["scale"] = float(qz.tau), float(qz.scale)
    return row


@torch.no_grad()
def check_active(model: Sam, samples: list[CalibSample]) -> dict[str, float]:
    """Run ``samples`` and return, for every quantizer, the fraction of its input elements it
    changed. Raises if any quantizer is disabled, uncalibrated, never ran or changed nothing:
    a result reported for this model then really is the quantized model's."""
    changed: dict[str, float] = {}
    hooks = []
    for name, qz in quantizers(model):
        if not qz.enabled or not bool(qz.initialized):
            raise RuntimeError(f"quantizer {name} is disabled or uncalibrated")

        def hook(mod, args, out, name=name):
            frac = float((out != args[0]).float().mean())
            changed[name] = max(changed.get(name, 0.0), frac)

        hooks.append((qz, hook))
    run_hooked(model, samples, hooks)
    names = [n for n, _ in quantizers(model)]
    silent = [n for n in names if changed.get(n, 0.0) == 0.0]
    if silent:
        raise RuntimeError(
            f"{len(silent)} of {len(names)} quantizers changed nothing on real data, e.g. "
            f"{silent[0]}"
        )
    return changed


@torch.no_grad()
def layer_sqnr(model: Sam, samples: list[CalibSample]) -> dict[str, float]:
    """Per quantized layer: SQNR (dB) of its quantized output against the same layer in full
    precision on the same input (the layer's own quantization noise), worst over ``samples``."""

    worst: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):

            def hook(m, args, out, name=name):
                db = sqnr_db(m.fp(args[0].float()), out)
                worst[name] = min(worst.get(name, math.inf), db)

            hooks.append((mod, hook))
    run_hooked(model, samples, hooks)
    return worst
