"""``quantize``: the AHCPTQ pipeline on a model (wrap, fold signs, calibrate, reconstruct)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import InputError, require
from ..io import atomic_write_json, ensure_dir
from ..modeling import transformer
from ..modeling.sam import Sam
from .calibrate import CalibSample, calibration_samples, run_hooked, run_samples
from .config import QuantConfig
from .io import save
from .quantizers import sign_fold
from .reconstruct import reconstruct, set_enabled
from .report import check_active, report
from .wrap import init_activations, init_weights, observe_activations, prepare


@torch.no_grad()
def _fold_signs(model: Sam, samples: list[CalibSample]) -> list[str]:
    """PTQ4SAM's bimodal fold on every decoder attention whose projected keys get a smaller
    range from it; returns the folded attentions' names."""
    atts = [
        (n, m)
        for n, m in model.mask_decoder.named_modules()
        if isinstance(m, transformer.Attention) and m.quantized
    ]
    keys: dict[str, list[torch.Tensor]] = {n: [] for n, _ in atts}

    def keep(name: str):
        def hook(mod, args, out):
            keys[name].append(args[0].reshape(-1, args[0].shape[-1])[:4096])

        return hook

    set_enabled(model, False)
    folded = []
    try:
        run_hooked(model, samples, [(m.k_proj, keep(n)) for n, m in atts])
        for n, m in atts:
            x = torch.cat(keys[n])
            k = m.k_proj(x)
            signs = torch.where(k.mean(0) < 0, -1.0, 1.0)
            if float((k * signs).amax() - (k * signs).amin()) < 0.9 * float(k.amax() - k.amin()):
                sign_fold(m.q_proj, m.k_proj, x)
                folded.append(f"mask_decoder.{n}")
    finally:
        set_enabled(model, True)
    return folded


def quantize(
    model: Sam,
    config: QuantConfig,
    samples: list[CalibSample],
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Sam:
    """Post-training quantization of ``model`` (left untouched) with ``config`` on the calibration
    ``samples``; returns the quantized copy (eval mode, every quantizer enabled), with
    ``quant_info`` (timings, folded attentions, per-block losses)."""
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    q = prepare(model, config)
    folded = _fold_signs(q, samples) if config.reconstruct and config.sign_fold else []
    init_weights(q)
    observe_activations(q, True)  # activation ranges seen through the quantized weights
    run_samples(q, samples, progress="calibrate" if progress else None)
    observe_activations(q, False)
    init_activations(q)
    t_calib = time.perf_counter() - t0
    losses: dict[str, float] = {}
    kept: dict[str, str] = {}
    if config.reconstruct:
        losses, kept = reconstruct(model, q, config, samples, progress=progress, log=log)
    for p in q.parameters():
        p.requires_grad_(False)
    q.quant_info = {
        "calibration_images": len(samples),
        "calibration_s": round(t_calib, 2),
        "total_s": round(time.perf_counter() - t0, 2),
        "sign_folded": folded,
        "block_losses": losses,
        "kept": kept,
    }
    return q.eval()


def quantize_to_file(
    model: Sam,
    config: QuantConfig,
    calib_images: str | os.PathLike,
    calib_annotations: str | os.PathLike,
    out: str | os.PathLike,
    *,
    calib_count: int = 32,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """What ``leansam quantize`` does: calibrate ``model`` on the first ``calib_count`` annotated
    images of a COCO instances file (box prompts, seed ``config.seed``), :func:`quantize`, check
    that every quantizer changes real data, :func:`~leansam.quant.io.save` to ``out`` and write
    the report (:func:`~leansam.quant.report.report` plus timings) as JSON beside it
    (``OUT.report.json`` unless ``report_path``). Both writes are atomic.

    Returns the report with ``path``, ``report_path`` and ``active_quantizers`` added. Raises
    :class:`~leansam.errors.InputError` for an already quantized ``model``.
    """
    require("sklearn", "quant")
    checkpoint = getattr(model, "checkpoint_path", None)
    if getattr(model, "quant_config", None) is not None:
        raise InputError(f"{checkpoint} is already quantized: pass the full-precision weights")
    out = Path(out)
    ensure_dir(out.parent)
    samples = calibration_samples(
        model,
        calib_images,
        calib_annotations,
        count=calib_count,
        seed=config.seed,
        progress=progress,
    )
    q = quantize(model, config, samples, progress=progress)
    active = check_active(q, samples[:1])  # raises unless every quantizer changes real data
    save(q, out)
    rep = {
        **report(q),
        "info": q.quant_info,
        "model": model.config.name,
        "checkpoint": checkpoint,
    }
    rep_path = Path(report_path) if report_path else out.with_name(out.name + ".report.json")
    atomic_write_json(rep_path, rep)
    return {**rep, "path": str(out), "report_path": str(rep_path), "active_quantizers": len(active)}
