"""Block reconstruction (QDrop-style, AdaRound weights; SPEC section 7): each block of the
quantized model is tuned to reproduce the full-precision block's output on the calibration data."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable

import torch
from torch import nn

from ..modeling import efficientvit
from ..modeling.sam import Sam
from .calibrate import CalibSample, run_samples
from .config import CAG_GROUPS, QuantConfig
from .modules import QuantLayer
from .quantizers import AdaRoundQuantizer, CAGQuantizer, Quantizer
from .wrap import prepare, quantizers


def blocks(model: Sam) -> list[tuple[str, nn.Module]]:
    """The reconstruction units in execution order: encoder blocks (ViT blocks / EfficientViT
    stage ops with quantized layers), the neck, the decoder's two-way layers and its final
    attention."""
    enc = model.image_encoder
    units: list[tuple[str, nn.Module]] = []
    if isinstance(enc, efficientvit.EfficientViTImageEncoder):
        for s, stage in enumerate(enc.backbone.stages):
            for j, op in enumerate(stage.op_list):
                if any(isinstance(m, QuantLayer) for m in op.modules()):
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
def run_block(block: nn.Module, inputs: list) -> list:
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


def reconstruct_block(
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
    layers = {id(m.w_quant): m for m in block.modules() if isinstance(m, QuantLayer)}

    def error() -> float:
        outs = run_block(block, inputs)
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


def _chained(name: str, next_name: str) -> bool:
    """Whether ``next_name``'s only input is ``name``'s output (ViT blocks, backbone ops)."""
    chain = ("image_encoder.blocks.", "image_encoder.backbone.")
    return name.startswith(chain) and next_name.startswith(chain)


def _init_like(fp: Sam, q: Sam) -> None:
    """Copy ``q``'s weights into the full-precision twin (the sign folds changed them); its
    quantizers stay disabled and keep no state."""
    weights = {k: v for k, v in q.state_dict().items() if k in fp.state_dict()}
    fp.load_state_dict(weights, strict=False)


def reconstruct(
    model: Sam,
    q: Sam,
    config: QuantConfig,
    samples: list[CalibSample],
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Reconstruct every block of the calibrated quantized model ``q`` against ``model`` (full
    precision, untouched), in execution order; returns each block's last loss and which result
    was kept (:func:`_keep_best`)."""
    from ..progress import progress_bar

    losses: dict[str, float] = {}
    kept: dict[str, str] = {}
    fp = prepare(model, config)  # same graph (BN folded) with every quantizer off
    _init_like(fp, q)
    set_enabled(fp, False)
    for p in q.parameters():
        p.requires_grad_(False)
    rng = random.Random(config.seed)
    units = blocks(q)
    fp_units = dict(blocks(fp))
    bar = progress_bar(total=len(units), desc="reconstruct", enabled=progress, unit="block")
    fp_emb = q_emb = None
    fp_in = q_in = None  # inputs handed on from the previous block
    for k, (name, block) in enumerate(units):
        decoder = name.startswith("mask_decoder")
        if decoder and fp_emb is None:
            fp_emb, q_emb = _embeddings(fp, samples), _embeddings(q, samples)
        if fp_in is None:
            fp_in = _capture(fp, fp_units[name], samples, fp_emb)
            q_in = _capture(q, block, samples, q_emb)
        targets = run_block(fp_units[name], fp_in)
        for qz in block.modules():
            if isinstance(qz, Quantizer):
                for p in qz.learnable():
                    p.requires_grad_(True)
        prompts = [len(s.boxes) for s in samples] if decoder else None
        losses[name], kept[name] = reconstruct_block(block, q_in, targets, config, rng, prompts)
        for p in block.parameters():
            p.requires_grad_(False)
        # Encoder blocks form a chain: the next one's inputs are this one's outputs (the
        # quantized side through the block just reconstructed), no model pass needed.
        if k + 1 < len(units) and _chained(name, units[k + 1][0]):
            fp_in = [((t,), {}) for t in targets]
            q_in = [((t,), {}) for t in run_block(block, q_in)]
        else:
            fp_in = q_in = None
        del targets
        bar.update()
        bar.set_postfix_str(f"loss={losses[name]:.3g}")
        if log is not None:
            log(f"{name}: loss {losses[name]:.4g}")
    bar.close()
    return losses, kept


def set_enabled(model: nn.Module, on: bool) -> None:
    """Switch every quantizer of ``model`` on or off."""
    for _, qz in quantizers(model):
        qz.enabled = on
