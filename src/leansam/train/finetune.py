"""Stage 2: end-to-end training on SA-1B folders (augmentation, prompts, the loss of a batch)."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict
from ..configs import PIXEL_MEAN
from ..errors import InputError
from ..modeling.common import LayerNorm2d
from ..registry import create_model
from ..transforms import ResizeLongestSide
from .config import TrainConfig
from .loop import (
    Run,
    channels_last,
    channels_last_input,
    curve_evaluator,
    finish_run,
    train_autocast,
    train_device,
)
from .losses import iou_loss, mask_loss, prior_distill_loss
from .prompts import error_clicks, sample_prompts


class FinetuneStep(nn.Module):
    """Loss of a batch of prepared samples; wrapped by DDP so that its forward syncs gradients."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        # the starting prompt encoder and decoder, frozen (prior_distill_weight). Built here, before
        # Run.resume loads trained weights, so a resumed run keeps the decoder_checkpoint's prior.
        # Kept out of the module tree, so that DDP neither broadcasts its buffers nor converts it.
        self.__dict__["prior"] = frozen_prompt_decoder(model) if cfg.prior_distill_weight else None

    def term_names(self) -> list[str]:
        """The loss terms this configuration computes (``metrics.jsonl``'s ``loss_terms``)."""
        names = ["mask"]
        if self.cfg.iou_loss_weight:
            names.append("iou")
        if self.prior is not None:
            names.append("prior_distill")
        return names

    def forward(self, samples: list[dict], seeds: list[int]) -> torch.Tensor:
        """The step's loss: the mean over its prompts of the mask loss, plus ``iou_loss_weight``
        x the IoU-head loss and ``prior_distill_weight`` x the prior term. Each unweighted term's
        mean over the same prompts (0 where a term does not apply) is left in ``self.terms``
        (detached), so that the loss is their weighted sum."""
        self.terms = {k: torch.zeros(()) for k in self.term_names()}
        if not samples:  # a batch with no readable sample: a zero loss that touches every weight,
            # computed here so that DDP's gradient all-reduce still runs on this process
            return sum(p.sum() for p in self.parameters()) * 0.0
        model = self.model
        x = channels_last_input(torch.cat([model.preprocess(s["image"][None]) for s in samples]))
        emb = model.image_encoder(x)
        terms: dict[str, list[torch.Tensor]] = {k: [] for k in self.terms}
        losses = []
        for i, s in enumerate(samples):
            points, labels = s["points"], s["labels"]
            if s.get("click_rounds"):
                points, labels = self.corrective_clicks(emb[i : i + 1].detach(), s, seeds[i])
            low, iou_pred = model.decode(
                emb[i : i + 1], points, labels, s["boxes"], None, s["multimask"]
            )
            g = torch.Generator(device=low.device).manual_seed(seeds[i])
            loss = mask_loss(
                low.float(), s["gt"], num_points=self.cfg.num_points, focal=self.cfg.focal,
                bce_weight=self.cfg.bce_weight, bce_balanced=self.cfg.bce_balanced, generator=g,
            )  # fmt: skip
            terms["mask"].append(loss)
            if self.cfg.iou_loss_weight:
                iou = iou_loss(low.float(), s["gt"], iou_pred)
                terms["iou"].append(iou)
                loss = loss + self.cfg.iou_loss_weight * iou
            if self.prior is not None:
                if s["points"] is None:  # a box prior: box prompts only
                    zero = torch.zeros_like(emb[i : i + 1])
                    with torch.no_grad():
                        want = all_masks(self.prior, zero, s["boxes"])
                    free = all_masks(model, zero, s["boxes"])
                    prior = prior_distill_loss(free, want)
                    loss = loss + self.cfg.prior_distill_weight * prior
                else:
                    prior = torch.zeros_like(loss)
                terms["prior_distill"].append(prior)
            losses.append(loss)
        self.terms = {k: torch.cat(v).detach().mean() for k, v in terms.items()}
        return torch.cat(losses).mean()

    def corrective_clicks(
        self, emb: torch.Tensor, s: dict, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s``'s point prompts after its ``click_rounds`` rounds of corrective clicks
        (``TrainConfig.click_rounds``): N x K x 2 points (1024 frame) and N x K labels, K = 1 +
        rounds. Each round decodes without gradient on ``emb`` (1 x D x 64 x 64, detached) and
        adds one click per mask drawn from the error of the output with the highest predicted IoU,
        compared with ``s["gt"]`` inside the resized image (never on the input frame's padding)."""
        rng = np.random.default_rng([seed, 1])  # apart from the loss's generator
        points, labels = s["points"], s["labels"]
        gt = s["gt"] > 0.5
        scale = 1024 / gt.shape[-1]  # input frame pixels -> the prompts' 1024 frame
        h, w = s["image"].shape[-2:]  # the resized image; the rest of the frame is padding
        for _ in range(s["click_rounds"]):
            with torch.no_grad():
                low, iou = self.model.decode(emb, points, labels, None, None, True)
                best = low[torch.arange(len(low)), iou.argmax(1)][:, None].float()
                pred = F.interpolate(best, gt.shape[-2:], mode="bilinear", align_corners=False)
            # errors inside the image only, as a user sees them (never a click on the padding)
            pred_in, gt_in = (pred[:, 0, :h, :w] > 0).cpu().numpy(), gt[:, :h, :w].cpu().numpy()
            xy, lab = error_clicks(pred_in, gt_in, rng)
            new = torch.as_tensor(xy * scale, dtype=points.dtype, device=points.device)
            points = torch.cat([points, new[:, None]], 1)
            labels = torch.cat([labels, torch.as_tensor(lab, device=labels.device)[:, None]], 1)
        return points, labels


def all_masks(model: nn.Module, image_embeddings: torch.Tensor, boxes: torch.Tensor):
    """The single-mask and the 3 multimask outputs at once, B x 4 x 256 x 256 low-res logits, for
    B boxes (1024 frame) on 1 x D x 64 x 64 image embeddings (``MaskDecoder.predict_masks``)."""
    sparse, dense = model.prompt_encoder(None, boxes, None)
    pe = model.prompt_encoder.get_dense_pe()
    return model.mask_decoder.predict_masks(image_embeddings, pe, sparse, dense)[0]


def frozen_prompt_decoder(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model``'s prompt encoder and mask decoder as they are now, with the
    model's ``decode``; it holds no image encoder (``prior_distill_weight``)."""
    import copy

    frozen = copy.copy(model)  # a shallow copy: new dicts below, so the model is never touched
    frozen._parameters, frozen._buffers = {}, dict(model._buffers)
    frozen._modules = {
        part: copy.deepcopy(model._modules[part]) for part in ("prompt_encoder", "mask_decoder")
    }
    frozen.requires_grad_(False)
    return frozen.eval()


def zoom(
    image: np.ndarray, masks: np.ndarray, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scale jitter that keeps the image size: zoom out (``scale`` < 1: the shrunk image sits at a
    random place on a canvas of the pixel mean, which normalises to ~0 like the padding) or zoom in
    (``scale`` > 1: a random crop of the enlarged image). Masks follow with nearest sampling."""
    from PIL import Image

    h, w = image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return image, masks
    image = np.array(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
    masks_t = torch.from_numpy(np.ascontiguousarray(masks))[:, None].float()
    masks = F.interpolate(masks_t, (nh, nw), mode="nearest")[:, 0].numpy() > 0.5
    # offsets of the scaled image in the canvas (zoom out) or of the crop window (zoom in)
    dy, dx = (int(rng.integers(abs(a - b) + 1)) for a, b in ((h, nh), (w, nw)))
    if scale < 1:
        canvas = np.empty((h, w, 3), np.uint8)
        canvas[:] = np.round(PIXEL_MEAN).astype(np.uint8)
        canvas[dy : dy + nh, dx : dx + nw] = image
        out_masks = np.zeros((len(masks), h, w), bool)
        out_masks[:, dy : dy + nh, dx : dx + nw] = masks
        return canvas, out_masks
    return image[dy : dy + h, dx : dx + w], masks[:, dy : dy + h, dx : dx + w]


def prepare_sample(sample, image_size: int, cfg: TrainConfig, rng: np.random.Generator, device):
    """Augment one SA-1B sample and draw its prompts (SPEC section 5): flip, optional scale
    jitter, ``masks_per_image`` masks (resampled if fewer), box or 1-10 points (or one point and
    0 to ``click_rounds`` corrective clicks, drawn during the step), multimask."""
    image, masks = sample.image, sample.masks
    if rng.random() < cfg.flip_prob:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if cfg.scale_jitter:
        zoomed = zoom(image, masks, float(rng.uniform(*cfg.scale_jitter)), rng)
        if zoomed[1].any():  # a zoom-in that crops every object away is not used
            image, masks = zoomed
    keep = masks.reshape(len(masks), -1).any(1)
    masks = masks[keep] if keep.any() else masks
    n = len(masks)
    idx = rng.choice(n, cfg.masks_per_image, replace=n < cfg.masks_per_image)
    masks = np.ascontiguousarray(masks[idx])
    prompts = sample_prompts(
        masks, rng, box_prob=cfg.box_prob, multimask_prob=cfg.multimask_prob,
        max_points=1 if cfg.click_rounds else 10,
    )  # fmt: skip
    rounds = 0
    if cfg.click_rounds and prompts.points is not None:
        rounds = int(rng.integers(cfg.click_rounds + 1))
    size = image.shape[:2]
    frame = ResizeLongestSide(1024)
    to_t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float, device=device)  # noqa: E731
    boxes = to_t(frame.apply_boxes(prompts.boxes, size) if prompts.boxes is not None else None)
    points = to_t(frame.apply_coords(prompts.points, size) if prompts.points is not None else None)
    labels = None if prompts.labels is None else torch.as_tensor(prompts.labels, device=device)
    resized = ResizeLongestSide(image_size).apply_image(np.ascontiguousarray(image))
    rh, rw = resized.shape[:2]
    gt = F.interpolate(torch.from_numpy(masks)[:, None].float(), (rh, rw))[:, 0]
    gt = F.pad(gt, (0, image_size - rw, 0, image_size - rh)).to(device)
    return {
        "image": torch.as_tensor(resized, device=device).permute(2, 0, 1),
        "boxes": boxes,
        "points": points,
        "labels": labels,
        "multimask": prompts.multimask,
        "gt": gt,
        "click_rounds": rounds,
    }


def load_prompt_decoder(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy the prompt encoder and mask decoder of ``checkpoint`` (any variant: they are the same
    for all) into ``model``, strictly."""
    state = load_state_dict(checkpoint)
    for part in ("prompt_encoder", "mask_decoder"):
        prefix = part + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise InputError(f"{checkpoint} holds no {part} weights")
        getattr(model, part).load_state_dict(sub, strict=True)


def redraw_positional_encoding(model: nn.Module, cfg: TrainConfig) -> None:
    """Give ``model`` a new random positional encoding of standard deviation ``cfg.pe_scale``
    (drawn with ``cfg.seed``; with a list of scales, the frequencies are split into equal
    consecutive groups, one per scale), for a prompt encoder trained from scratch; no-op when
    unset."""
    if cfg.pe_scale is None:
        return
    pe = model.prompt_encoder.pe_layer
    matrix = pe.positional_encoding_gaussian_matrix
    g = torch.Generator().manual_seed(cfg.seed)
    new = torch.randn(matrix.shape, generator=g, dtype=torch.float32)
    groups = torch.tensor_split(torch.arange(matrix.shape[1]), len(cfg.pe_scales()))
    for cols, scale in zip(groups, cfg.pe_scales(), strict=True):
        new[:, cols] *= scale
    matrix.copy_(new.to(matrix))


def zero_image_embedding(model: nn.Module) -> None:
    """Set the affine parameters of the image encoder's last LayerNorm2d (SAM-ViT: ``neck.3``,
    EfficientViT-SAM: ``norm``) to zero, so that the model's image embedding is exactly zero
    until training moves them (``TrainConfig.embedding_zero_init``)."""
    norms = [m for m in model.image_encoder.modules() if isinstance(m, LayerNorm2d)]
    if not norms:
        raise InputError(
            f"{type(model.image_encoder).__name__} has no LayerNorm2d to start at zero"
        )
    with torch.no_grad():
        norms[-1].weight.zero_()
        norms[-1].bias.zero_()


def training_items(cfg: TrainConfig) -> tuple[list, list[tuple[int, int]]]:
    """The SA-1B folders of ``cfg.data`` (``SA1BDataset``) and one epoch's items, (folder, index)
    pairs with each folder listed ``cfg.data_repeat`` times."""
    from ..data.sa1b import SA1BDataset

    datasets = [
        SA1BDataset(
            d,
            min_predicted_iou=cfg.min_predicted_iou,
            min_stability_score=cfg.min_stability_score,
        )
        for d in cfg.data
    ]
    repeat = cfg.data_repeat or [1] * len(datasets)
    items = [
        (k, i) for k, ds in enumerate(datasets) for _ in range(repeat[k]) for i in range(len(ds))
    ]
    return datasets, items


def batch_samples(
    datasets: list, items: list[tuple[int, int]], step: int, indices: list[int], image_size: int,
    cfg: TrainConfig, device,
) -> tuple[list[dict], list[int]]:  # fmt: skip
    """The prepared samples (:func:`prepare_sample`) of one step's ``indices`` into ``items``,
    unreadable ones left out, and a loss seed per sample; seeded by (``cfg.seed``, step, index),
    so a resumed or multi-process run draws the same ones."""
    samples, seeds = [], []
    for i in indices:
        k, j = items[i]
        raw = datasets[k][j]
        if raw is None:
            continue
        rng = np.random.default_rng([cfg.seed, step, i])
        samples.append(prepare_sample(raw, image_size, cfg, rng, device))
        seeds.append(int(rng.integers(2**62)))
    return samples, seeds


def finetune(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Stage 2: end-to-end training on SA-1B folders. Writes ``checkpoint.pt`` (resumable),
    ``metrics.jsonl`` and, at the end, ``model.pt`` (a plain state dict for ``create_model``)."""
    device = train_device()
    datasets, items = training_items(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, checkpoint=cfg.init_checkpoint, device=device, seed=cfg.seed)
    if cfg.decoder_checkpoint:
        load_prompt_decoder(model, cfg.decoder_checkpoint)
    redraw_positional_encoding(model, cfg)
    if cfg.embedding_zero_init:
        zero_image_embedding(model)
    channels_last(model.image_encoder)
    step_module = FinetuneStep(model, cfg)
    run = Run(cfg, len(items), model, step_module, progress=progress)
    resumed = run.resume(resume)

    def compute(step: int, indices: list[int]) -> tuple[torch.Tensor, dict]:
        samples, seeds = batch_samples(
            datasets, items, step, indices, model.image_size, cfg, device
        )
        if on_step is not None:
            on_step(step)
        with train_autocast(cfg, device):
            loss = run.step_module(samples, seeds)  # a zero loss when no sample was readable
        return loss, step_module.terms

    records = run.loop(compute, curve_evaluator(cfg, model))
    return finish_run(run, model, records, resumed, datasets)
