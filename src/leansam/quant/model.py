"""Quantize a whole SAM-family model: wrap, calibrate, reconstruct, report, save and load.

Mapping (SPEC section 7; the "role" of each layer input picks its quantizer):

=================================== ========================================================
SAM-ViT encoder                     ``blocks.i.attn.qkv`` / ``mlp.lin1`` (input: CAG role),
                                    ``mlp.lin2`` (post-GELU: HLUQ role), ``attn.proj`` (plain),
                                    q / k / v and softmax (log2), neck convs (plain)
EfficientViT encoder (BN folded)    first conv of every MBConv / FusedMBConv / ResBlock and
                                    LiteMLA's ``qkv`` (block input: CAG role), every conv fed by
                                    a GELU (depthwise and point convs: HLUQ role), LiteMLA's
                                    aggregation convs and ``proj`` (plain), LiteMLA's q, k
                                    (after ReLU), v and context ``v k^T`` (plain); neck
                                    ``input_ops`` convs (CAG), ``middle`` like the backbone,
                                    ``output_ops`` conv (plain)
mask decoder (both)                 every attention's ``q/k/v_proj`` (CAG), ``out_proj``
                                    (plain), projected q / k / v (plain), softmax (log2); MLP
                                    ``lin1`` (CAG), ``lin2`` (post-ReLU: HLUQ)
full precision                      patch embedding / stem conv, positional terms, LayerNorms,
                                    residual adds, the prompt encoder, output upscaling,
                                    hypernetwork MLPs, IoU head
=================================== ========================================================

Weights: per output channel, symmetric (round to nearest, or AdaRound for the methods with
reconstruction). Activations: one width for all; the CAG role is per-channel-then-grouped CAG
(``ahcptq``, ``ahcptq-no-hluq``) or per tensor; the HLUQ role is HLUQ (``ahcptq``,
``ahcptq-no-cag``) or per tensor; plain inputs are per tensor (MinMax for ``minmax``,
percentile for ``percentile``, MSE-initialised with learnable scale otherwise); softmax outputs
use the log2 quantizer in every method, by default with a calibrated granularity
(``QuantConfig.softmax``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import QUANTIZED_FORMAT, read_quantized
from ..errors import CheckpointError, InputError
from ..modeling import efficientvit, transformer, vit
from ..modeling.common import MLPBlock
from ..modeling.sam import Sam
from .config import CAG_GROUPS, QuantConfig
from .modules import (
    QuantConv2d,
    QuantDecoderAttention,
    QuantLinear,
    QuantLiteMLA,
    QuantViTAttention,
    _QuantLayer,
)
from .quantizers import (
    HLUQ,
    AdaRoundQuantizer,
    CAGQuantizer,
    Log2Quantizer,
    Quantizer,
    UniformQuantizer,
    sign_fold,
)

FORMAT = QUANTIZED_FORMAT
VERSION = 1


# ---------------------------------------------------------------------------------- wrapping
def _act_quantizer(role: str, cfg: QuantConfig, channel_axis: int) -> Quantizer:
    bits = cfg.a_bits
    if role == "softmax":
        return Log2Quantizer(bits, search=cfg.softmax == "agq")
    if role == "cag" and cfg.cag:
        return CAGQuantizer(bits, channel_axis=channel_axis)
    if role == "hluq" and cfg.hluq:
        return HLUQ(bits, kernel_bug=cfg.kernel_bug)
    init = cfg.method if cfg.method in ("minmax", "percentile") else "mse"
    return UniformQuantizer(bits, method=init, learn_scale=cfg.reconstruct)


def _w_quantizer(cfg: QuantConfig) -> Quantizer:
    if cfg.reconstruct:
        return AdaRoundQuantizer(cfg.w_bits)
    return UniformQuantizer(cfg.w_bits, channel_axis=0, symmetric=True, learn_scale=False)


def _linear(lin: nn.Linear, role: str, cfg: QuantConfig) -> QuantLinear:
    return QuantLinear(lin, _w_quantizer(cfg), _act_quantizer(role, cfg, -1), role)


def _conv(conv: nn.Conv2d, role: str, cfg: QuantConfig) -> QuantConv2d:
    return QuantConv2d(conv, _w_quantizer(cfg), _act_quantizer(role, cfg, 1), role)


def _matmul_points(cfg: QuantConfig, softmax: bool = True) -> list[Quantizer]:
    points = [_act_quantizer("plain", cfg, -1) for _ in range(3)]
    return [*points, _act_quantizer("softmax" if softmax else "plain", cfg, -1)]


def _wrap_mlp(mlp: MLPBlock, cfg: QuantConfig) -> None:
    mlp.lin1 = _linear(mlp.lin1, "cag", cfg)
    mlp.lin2 = _linear(mlp.lin2, "hluq", cfg)


def _wrap_decoder(decoder: nn.Module, cfg: QuantConfig) -> None:
    for mod in list(decoder.transformer.modules()):
        if type(mod) is transformer.Attention:
            mod.__class__ = QuantDecoderAttention
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(mod, name, _linear(getattr(mod, name), "cag", cfg))
            mod.out_proj = _linear(mod.out_proj, "plain", cfg)
            mod.add_quantizers(*_matmul_points(cfg))
        elif isinstance(mod, MLPBlock):
            _wrap_mlp(mod, cfg)


def _wrap_vit(encoder: vit.ViTImageEncoder, cfg: QuantConfig) -> None:
    for blk in encoder.blocks:
        attn = blk.attn
        attn.__class__ = QuantViTAttention
        attn.qkv = _linear(attn.qkv, "cag", cfg)
        attn.proj = _linear(attn.proj, "plain", cfg)
        attn.add_quantizers(*_matmul_points(cfg))
        _wrap_mlp(blk.mlp, cfg)
    encoder.neck[0] = _conv(encoder.neck[0], "plain", cfg)
    encoder.neck[2] = _conv(encoder.neck[2], "plain", cfg)


def _wrap_local(block: nn.Module, cfg: QuantConfig) -> None:
    """MBConv / FusedMBConv / ResBlock: the first conv sees the block input (CAG role), every
    later conv a GELU output (HLUQ role)."""
    names = {
        efficientvit.MBConv: ("inverted_conv", "depth_conv", "point_conv"),
        efficientvit.FusedMBConv: ("spatial_conv", "point_conv"),
        efficientvit.ResBlock: ("conv1", "conv2"),
    }[type(block)]
    for i, name in enumerate(names):
        layer = getattr(block, name)
        layer.conv = _conv(layer.conv, "cag" if i == 0 else "hluq", cfg)


def _wrap_efficientvit(encoder: efficientvit.EfficientViTImageEncoder, cfg: QuantConfig) -> None:
    locals_ = (efficientvit.MBConv, efficientvit.FusedMBConv, efficientvit.ResBlock)
    for mod in list(encoder.modules()):
        if isinstance(mod, locals_):
            _wrap_local(mod, cfg)
        elif type(mod) is efficientvit.LiteMLA:
            mod.__class__ = QuantLiteMLA
            mod.qkv.conv = _conv(mod.qkv.conv, "cag", cfg)
            seq = mod.aggreg[0]
            seq[0] = _conv(seq[0], "plain", cfg)
            seq[1] = _conv(seq[1], "plain", cfg)
            mod.proj.conv = _conv(mod.proj.conv, "plain", cfg)
            mod.add_quantizers(*_matmul_points(cfg, softmax=False))
    neck = encoder.neck
    for op in neck.input_ops:
        op.op_list[0].conv = _conv(op.op_list[0].conv, "cag", cfg)
    out = neck.output_ops[0].op_list[0]
    out.conv = _conv(out.conv, "plain", cfg)


def prepare(model: Sam, config: QuantConfig) -> Sam:
    """A copy of ``model`` with the quantized layers in place (quantizers not yet calibrated).
    EfficientViT's BatchNorms are folded into their convolutions first."""
    from ..runtime import fold_batchnorm

    q = copy.deepcopy(model).eval()
    if isinstance(q.image_encoder, efficientvit.EfficientViTImageEncoder):
        q.image_encoder = fold_batchnorm(q.image_encoder)
        _wrap_efficientvit(q.image_encoder, config)
    else:
        _wrap_vit(q.image_encoder, config)
    _wrap_decoder(q.mask_decoder, config)
    _keep_8bit(q, config.keep_8bit)
    q.quant_config = config
    return q.eval()


def _keep_8bit(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Mixed precision: the quantized tensors named ``prefix`` or ``prefix.*`` (names as
    :func:`report` lists them) use 8 bits."""
    tensors = dict(quantized_tensors(model))
    for prefix in prefixes:
        hits = [z for n, z in tensors.items() if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise InputError(
                f"keep_8bit {prefix!r} names no quantized tensor (see the tensor names in the "
                "report `leansam quantize` writes)"
            )
        for z in hits:
            z.bits = max(z.bits, 8)


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(name, quantizer) of every quantized tensor: ``LAYER.weight`` and ``LAYER.input`` of the
    quantized layers, then ``ATTENTION.q`` / ``.k`` / ``.v`` / ``.attn`` (softmax output) /
    ``.ctx`` (LiteMLA's context) of the attentions."""
    for name, mod in model.named_modules():
        if isinstance(mod, _QuantLayer):
            yield f"{name}.weight", mod.w_quant
            if mod.a_quant is not None:
                yield f"{name}.input", mod.a_quant
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantViTAttention, QuantDecoderAttention, QuantLiteMLA)):
            for attr in ("q_quant", "k_quant", "v_quant", "attn_quant", "ctx_quant"):
                qz = getattr(mod, attr, None)
                if qz is not None:
                    yield f"{name}.{attr.removesuffix('_quant')}", qz


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer):
            yield name, mod


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant_config", None) is not None


# ------------------------------------------------------------------------------ calibration
@dataclass
class CalibSample:
    """One calibration image: encoder input (1 x 3 x R x R) and box prompts (B x 4, 1024 frame)."""

    image: torch.Tensor
    boxes: torch.Tensor


def calibration_samples(
    model: Sam,
    images_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    *,
    count: int = 32,
    max_boxes: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> list[CalibSample]:
    """The first ``count`` images (by id) of a COCO instances file that have objects, each with
    up to ``max_boxes`` of its ground-truth boxes (a seeded random choice) as prompts;
    ``progress`` shows a bar while they load."""
    from ..eval.dataset import EvalDataset
    from ..io import load_image
    from ..predictor import SamPredictor
    from ..progress import progress_bar

    if count < 1:
        raise InputError(f"--calib-count must be at least 1, got {count}")
    data = EvalDataset.load(images_dir, annotations)
    pred = SamPredictor(model)
    rng = random.Random(seed)
    out: list[CalibSample] = []
    bar = progress_bar(total=count, desc="load calibration images", enabled=progress, unit="img")
    for info in data.images:
        objs = data.objects(info["id"])
        if not objs:
            continue
        image = load_image(data.path(info))
        boxes = np.array([o["bbox"] for o in objs], dtype=np.float64)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        pick = sorted(rng.sample(range(len(boxes)), min(max_boxes, len(boxes))))
        boxes = pred.transform.apply_boxes(boxes[pick], image.shape[:2])
        out.append(
            CalibSample(
                pred.encoder_input(image).to(model.dtype),
                torch.as_tensor(boxes, dtype=model.dtype, device=model.device),
            )
        )
        bar.update(1)
        if len(out) == count:
            break
    bar.close()
    if not out:
        raise InputError(f"{annotations} has no annotated image to calibrate on")
    return out


def _decode_boxes(model: Sam, emb: torch.Tensor, boxes: torch.Tensor):
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    return model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)


@torch.no_grad()
def run_samples(
    model: Sam, samples: list[CalibSample], embeddings=None, *, progress: str | None = None
) -> None:
    """Encoder and decoder over every sample (calibration and capture passes); ``progress``: the
    label of a progress bar (none without it)."""
    from ..progress import progress as bar

    for i, s in bar(
        list(enumerate(samples)), desc=progress or "", enabled=bool(progress), unit="img"
    ):
        emb = model.image_encoder(s.image) if embeddings is None else embeddings[i]
        _decode_boxes(model, emb, s.boxes)


# ---------------------------------------------------------------------------- reconstruction
def blocks(model: Sam) -> list[tuple[str, nn.Module]]:
    """The reconstruction units in execution order: encoder blocks (ViT blocks / EfficientViT
    stage ops with quantized layers), the neck, the decoder's two-way layers and its final
    attention."""
    enc = model.image_encoder
    units: list[tuple[str, nn.Module]] = []
    if isinstance(enc, efficientvit.EfficientViTImageEncoder):
        for s, stage in enumerate(enc.backbone.stages):
            for j, op in enumerate(stage.op_list):
                if any(isinstance(m, _QuantLayer) for m in op.modules()):
                    units.append((f"image_encoder.backbone.stages.{s}.op_list.{j}", op))
    else:
        units += [(f"image_encoder.blocks.{i}", b) for i, b in enumerate(enc.blocks)]
    units.append(("image_encoder.neck", enc.neck))
    tr = model.mask_decoder.transformer
    units += [(f"mask_decoder.transformer.layers.{i}", la) for i, la in enumerate(tr.layers)]
    final = tr.final_attn_token_to_image
    units.append(("mask_decoder.transformer.final_attn_token_to_image", final))
    return units


class _Stop(Exception):
    pass


def _tree(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _tree(v, fn) for k, v in x.items()}
    return x


def _capture(model: Sam, module: nn.Module, samples, embeddings) -> list:
    """(args, kwargs) of ``module``'s first call per sample; each pass stops right after it."""
    got: list = []

    def hook(mod, args, kwargs, out):
        got.append(_tree((args, kwargs), lambda t: t.detach()))
        raise _Stop

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        for i, s in enumerate(samples):
            with contextlib.suppress(_Stop):
                run_samples(model, [s], None if embeddings is None else [embeddings[i]])
    finally:
        handle.remove()
    if len(got) != len(samples):
        raise RuntimeError("a reconstruction block did not run once per calibration sample")
    return got


@torch.no_grad()
def _run_block(block: nn.Module, inputs: list) -> list:
    return [_tree(block(*args, **kwargs), lambda t: t.detach()) for args, kwargs in inputs]


def _mse(out, target) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return (out - target).pow(2).mean()
    return sum(_mse(o, t) for o, t in zip(out, target, strict=True))


@torch.no_grad()
def _embeddings(model: Sam, samples) -> list[torch.Tensor]:
    return [model.image_encoder(s.image) for s in samples]


def _one_prompt(x, n: int, j: int):
    """Prompt set ``j`` of a decoder block's captured tensors (those with a leading batch of
    ``n`` prompt sets; a shared 1-image side stays as it is)."""
    return _tree(x, lambda t: t[j : j + 1] if n > 1 and t.shape[0] == n else t)


def _reconstruct_block(
    block: nn.Module, inputs, targets, cfg: QuantConfig, rng, prompts: list[int] | None
) -> tuple[float, str]:
    """QDrop-style reconstruction of one block, batch 1 (one image; for decoder blocks one
    prompt of it: ``prompts`` gives each sample's count); returns the last iteration's loss and
    which result was kept (see :func:`_keep_best`)."""
    qs = [m for m in block.modules() if isinstance(m, Quantizer)]
    weights = [q for q in qs if isinstance(q, AdaRoundQuantizer)]
    acts = [q for q in qs if not isinstance(q, AdaRoundQuantizer)]
    cags = [q for q in acts if isinstance(q, CAGQuantizer)]
    regroup_at = {
        int(cfg.iters * f): g for f, g in zip((0.2, 0.4, 0.6, 0.8), CAG_GROUPS, strict=True)
    }

    def optimizers():
        w_params = [p for q in weights for p in q.learnable()]
        a_params = [p for q in acts for p in q.learnable()]
        opt_w = torch.optim.Adam(w_params, lr=cfg.lr_round) if w_params else None
        opt_a = torch.optim.Adam(a_params, lr=cfg.lr_scale) if a_params else None
        return opt_w, opt_a

    start = _state(acts)
    for q in acts:
        q.drop_prob = cfg.drop_prob
    opt_w, opt_a = optimizers()
    warm = int(cfg.iters * cfg.warmup)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for it in range(cfg.iters):
            if it in regroup_at and cags:
                for q in cags:
                    q.regroup(regroup_at[it], seed=cfg.seed, merge=cfg.cag_merge)
                opt_w_state = opt_w.state_dict() if opt_w else None
                opt_w, opt_a = optimizers()  # CAG: the optimiser restarts after each regroup
                if opt_w is not None and opt_w_state is not None:
                    opt_w.load_state_dict(opt_w_state)  # the rounding variables keep going
            i = rng.randrange(len(inputs))
            args, kwargs = inputs[i]
            target = targets[i]
            if prompts is not None:
                n = prompts[i]
                j = rng.randrange(n)
                args, kwargs, target = _one_prompt((args, kwargs, target), n, j)
            out = block(*args, **kwargs)
            loss = _mse(out, target)
            total = loss
            if it >= warm and weights:
                frac = (it - warm) / max(cfg.iters - warm, 1)
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - frac)
                total = loss + cfg.round_reg * sum(q.round_loss(beta) for q in weights)
            for opt in (opt_w, opt_a):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            total.backward()
            if opt_a is not None:  # cosine decay of the activation-scale learning rate
                for group in opt_a.param_groups:
                    group["lr"] = cfg.lr_scale * 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
            for opt in (opt_w, opt_a):
                if opt is not None:
                    opt.step()
    for q in cags:  # whatever the iteration count: CAG ends with 4 groups
        for g in CAG_GROUPS:
            q.regroup(g, seed=cfg.seed, merge=cfg.cag_merge)
    for q in acts:
        q.drop_prob = 0.0
    for q in weights:
        q.finalize()
    kept = _keep_best(block, weights, acts, start, inputs, targets, cfg)
    return float(loss.detach()), kept


def _state(qs: list[Quantizer]) -> list[dict]:
    return [{k: v.detach().clone() for k, v in q.state_dict().items()} for q in qs]


def _restore(qs: list[Quantizer], states: list[dict]) -> None:
    for q, st in zip(qs, states, strict=True):
        q.load_state_dict(st, strict=False)


@torch.no_grad()
def _keep_best(block, weights, acts, start, inputs, targets, cfg: QuantConfig) -> str:
    """Reconstruction only pays off once AdaRound's soft variables have converged (the paper
    runs 20,000 iterations per block); with a short CPU budget many are still undecided, and
    rounding them (or scales learned against the soft weights) can end up worse than plain
    calibration. Of (learned rounding + learned scales), (nearest rounding + learned scales) and
    (nearest rounding + calibrated scales, CAG regrouped straight away), keep the one with the
    lowest block error on the calibration data: reconstruction never makes a block worse there."""
    layers = {id(m.w_quant): m for m in block.modules() if isinstance(m, _QuantLayer)}

    def error() -> float:
        outs = _run_block(block, inputs)
        return sum(float(_mse(o, t)) for o, t in zip(outs, targets, strict=True))

    learned_up = [q.up.clone() for q in weights]
    nearest_up = [q.nearest(layers[id(q)].weight) for q in weights]
    trained = _state(acts)

    def use(ups, states=None):
        for q, up in zip(weights, ups, strict=True):
            q.up = up
        if states is not None:
            _restore(acts, states)

    errors = {"learned": error()}
    use(nearest_up)
    errors["nearest"] = error()
    _restore(acts, start)
    for q in acts:
        if isinstance(q, CAGQuantizer):
            for g in CAG_GROUPS:
                q.regroup(g, seed=cfg.seed, merge=cfg.cag_merge)
    errors["calibrated"] = error()
    best = min(errors, key=errors.get)
    if best == "learned":
        use(learned_up, trained)
    elif best == "nearest":
        use(nearest_up, trained)
    return best


# ---------------------------------------------------------------------------------- quantize
def _observe(model: Sam, on: bool) -> None:
    """Activation quantizers observe (weight quantizers are set from the weights)."""
    weights = {id(m.w_quant) for m in model.modules() if isinstance(m, _QuantLayer)}
    for _, q in quantizers(model):
        if id(q) not in weights:
            q.observe(on)


def _set_enabled(model: nn.Module, on: bool) -> None:
    for _, q in quantizers(model):
        q.enabled = on


@torch.no_grad()
def _fold_signs(model: Sam, samples: list[CalibSample]) -> list[str]:
    """PTQ4SAM's bimodal fold on every decoder attention whose projected keys get a smaller
    range from it; returns the folded attentions' names."""
    atts = [
        (n, m)
        for n, m in model.mask_decoder.named_modules()
        if isinstance(m, QuantDecoderAttention)
    ]
    keys: dict[str, list[torch.Tensor]] = {n: [] for n, _ in atts}

    def keep(name: str):
        def hook(mod, args, out):
            keys[name].append(args[0].reshape(-1, args[0].shape[-1])[:4096])

        return hook

    _set_enabled(model, False)
    folded = []
    try:
        _run_hooked(model, samples, [(m.k_proj, keep(n)) for n, m in atts])
        for n, m in atts:
            x = torch.cat(keys[n])
            k = m.k_proj(x)
            signs = torch.where(k.mean(0) < 0, -1.0, 1.0)
            if float((k * signs).amax() - (k * signs).amin()) < 0.9 * float(k.amax() - k.amin()):
                sign_fold(m.q_proj, m.k_proj, x)
                folded.append(f"mask_decoder.{n}")
    finally:
        _set_enabled(model, True)
    return folded


@torch.no_grad()
def _init_weights(model: Sam) -> None:
    for mod in model.modules():
        if isinstance(mod, _QuantLayer):
            mod.w_quant.init_params(mod.weight)


@torch.no_grad()
def _init_activations(model: Sam) -> None:
    for mod in model.modules():
        if not isinstance(mod, _QuantLayer):
            continue
        a = mod.a_quant
        if isinstance(a, HLUQ):
            sample = mod.input_sample()
            a.init_params(mod.fp, sample.to(mod.weight.device))
        elif a is not None:
            a.init_params()
        mod.release()
    for _, q in quantizers(model):
        if not bool(q.initialized):
            q.init_params()
        if hasattr(q, "release"):
            q.release()


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
    _init_weights(q)
    _observe(q, True)  # activation ranges seen through the quantized weights
    run_samples(q, samples, progress="calibrate" if progress else None)
    _observe(q, False)
    _init_activations(q)
    t_calib = time.perf_counter() - t0
    losses: dict[str, float] = {}
    kept: dict[str, str] = {}
    if config.reconstruct:
        fp = prepare(model, config)  # same graph (BN folded) with every quantizer off
        _init_like(fp, q)
        _set_enabled(fp, False)
        for p in q.parameters():
            p.requires_grad_(False)
        rng = random.Random(config.seed)
        units = blocks(q)
        fp_units = dict(blocks(fp))
        bar = None
        if progress:
            from ..errors import require

            bar = require("tqdm", "data").tqdm(total=len(units), desc="reconstruct", unit="block")
        fp_emb = q_emb = None
        fp_in = q_in = None  # inputs handed on from the previous block
        for k, (name, block) in enumerate(units):
            decoder = name.startswith("mask_decoder")
            if decoder and fp_emb is None:
                fp_emb, q_emb = _embeddings(fp, samples), _embeddings(q, samples)
            if fp_in is None:
                fp_in = _capture(fp, fp_units[name], samples, fp_emb)
                q_in = _capture(q, block, samples, q_emb)
            targets = _run_block(fp_units[name], fp_in)
            for qz in block.modules():
                if isinstance(qz, Quantizer):
                    for p in qz.learnable():
                        p.requires_grad_(True)
            prompts = [len(s.boxes) for s in samples] if decoder else None
            losses[name], kept[name] = _reconstruct_block(
                block, q_in, targets, config, rng, prompts
            )
            for p in block.parameters():
                p.requires_grad_(False)
            # Encoder blocks form a chain: the next one's inputs are this one's outputs (the
            # quantized side through the block just reconstructed), no model pass needed.
            if k + 1 < len(units) and _chained(name, units[k + 1][0]):
                fp_in = [((t,), {}) for t in targets]
                q_in = [((t,), {}) for t in _run_block(block, q_in)]
            else:
                fp_in = q_in = None
            del targets
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{losses[name]:.3g}")
            if log is not None:
                log(f"{name}: loss {losses[name]:.4g}")
        if bar is not None:
            bar.close()
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


def _chained(name: str, next_name: str) -> bool:
    """Whether ``next_name``'s only input is ``name``'s output (ViT blocks, backbone ops)."""
    chain = ("image_encoder.blocks.", "image_encoder.backbone.")
    return name.startswith(chain) and next_name.startswith(chain)


def _init_like(fp: Sam, q: Sam) -> None:
    """Copy ``q``'s weights into the full-precision twin (the sign folds changed them); its
    quantizers stay disabled and keep no state."""
    weights = {k: v for k, v in q.state_dict().items() if k in fp.state_dict()}
    fp.load_state_dict(weights, strict=False)


# ----------------------------------------------------------------------------- report, check
def report(model: Sam) -> dict:
    """Each quantized tensor with its quantizer, bits, state and the parameters a datapath holds;
    totals of the per-channel vs grouped activation parameters (CAG's register saving)."""
    rows = []
    per_channel = grouped = 0
    channels = {
        f"{n}.input": m.in_features if isinstance(m, QuantLinear) else m.in_channels
        for n, m in model.named_modules()
        if isinstance(m, _QuantLayer)
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
    _run_hooked(model, samples, hooks)
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
    from .quantizers import sqnr_db

    worst: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, _QuantLayer):

            def hook(m, args, out, name=name):
                db = sqnr_db(m.fp(args[0].float()), out)
                worst[name] = min(worst.get(name, math.inf), db)

            hooks.append((mod, hook))
    _run_hooked(model, samples, hooks)
    return worst


def _run_hooked(model: Sam, samples, hooks: list) -> None:
    """:func:`run_samples` with forward hooks (module, fn) attached for the pass only."""
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        run_samples(model, samples)
    finally:
        for h in handles:
            h.remove()


# -------------------------------------------------------------------------------- save, load
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


def read(path: str | os.PathLike) -> dict | None:
    """The contents of a quantized-model file, or None when ``path`` is another checkpoint
    (:func:`leansam.checkpoint.read_quantized`)."""
    return read_quantized(path)


def load(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    device: torch.device | str | None = None,
) -> Sam:
    """A quantized model saved by ``leansam quantize`` / :func:`save`, ready for
    ``SamPredictor`` (runtime ``torch``). ``model``: the expected variant name (checked)."""
    from ..registry import create_model

    obj = read(path)
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
