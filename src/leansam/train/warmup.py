"""Prompt warm start: a mask decoder trained from scratch learns where a box is, on synthetic boxes
over a content-free image embedding, before stage 2; then, optionally, the box prior of real objects
(their masks from their boxes, still without the image: ``data`` given to stage ``prompt``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError, TrainingError
from ..registry import create_model
from .config import TrainConfig
from .finetune import (
    batch_samples,
    load_prompt_decoder,
    redraw_positional_encoding,
    training_items,
)
from .loop import Run, curve_evaluator, finish_run, train_autocast, train_device
from .losses import iou_loss, mask_loss


def synthetic_box(
    rng: np.random.Generator,
    frame: int = 1024,
    sizes: tuple[float, float] = (0.03, 0.6),
    log_sizes: bool = False,
    aspect: float | None = None,
    clip: bool = True,
) -> np.ndarray:
    """A random XYXY box in the ``frame`` x ``frame`` prompt frame: width and height drawn from
    ``sizes`` (fractions of the frame; uniformly, or log-uniformly with ``log_sizes`` so that small
    boxes are as common as large ones), top-left corner uniform in the first 88 %, clipped to the
    frame unless ``clip`` is False. With ``aspect`` (width / height), the drawn width is the
    shorter side and the longer one follows the aspect ratio, up to ``sizes``' maximum (so both
    sides stay within ``sizes``). (With uniform sizes, many tiny boxes make "all background" the
    easy answer the decoder does not leave.)"""
    x0, y0 = rng.uniform(0, 0.88 * frame, size=2)
    lo, hi = sizes
    if log_sizes:
        w, h = frame * np.exp(rng.uniform(np.log(lo), np.log(hi), size=2))
    else:
        w, h = rng.uniform(lo * frame, hi * frame, size=2)
    if aspect is not None:  # the shorter side is the drawn width; the longer one keeps the aspect
        side = w
        w, h = side * max(aspect, 1.0), side / min(aspect, 1.0)
        w, h = min(w, hi * frame), min(h, hi * frame)
    x1, y1 = (min(x0 + w, frame), min(y0 + h, frame)) if clip else (x0 + w, y0 + h)
    return np.array([x0, y0, x1, y1], np.float32)


class ShapeBank:
    """Object shapes for synthetic boxes (``shape_data``): every mask of the SA-1B folders (only
    the ``sa_*.json`` files are read), cropped to its bounding box and resampled to ``side`` x
    ``side`` (area average), with the box's aspect ratio (width / height). Masks whose box is
    under 2 px on a side are left out, and so are those that, resampled and thresholded at 0.5,
    no longer reach all four sides of their box (thin or sparse shapes), so that a target's box
    is its prompt box. Model-generated annotations below ``min_predicted_iou`` /
    ``min_stability_score`` are left out, and unreadable annotation files skipped with a warning,
    as in :class:`leansam.data.sa1b.SA1BDataset`, which reads them (images are not decoded).

    Raises:
        InputError: a folder that does not exist or has no ``sa_*.json`` files, or no usable mask
            at all."""

    def __init__(
        self,
        folders: list[str],
        side: int = 64,
        *,
        min_predicted_iou: float = 0.0,
        min_stability_score: float = 0.0,
    ) -> None:
        from ..data.sa1b import SA1BDataset

        shapes, aspects, skipped = [], [], 0
        for folder in folders:
            try:
                data = SA1BDataset(
                    folder,
                    min_predicted_iou=min_predicted_iou,
                    min_stability_score=min_stability_score,
                )
            except InputError as e:
                raise InputError(f"shape_data: {e}") from e
            for i in range(len(data)):
                masks = data.masks(i)  # None: unreadable or no mask kept (warned, counted)
                if masks is None:
                    continue
                for mask in masks:
                    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
                    if len(ys) < 2 or len(xs) < 2:
                        continue
                    crop = mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
                    t = torch.from_numpy(crop).float()[None, None]
                    shape = nn.functional.interpolate(t, (side, side), mode="area")[0, 0]
                    on = shape >= 0.5
                    if not (on[0].any() and on[-1].any() and on[:, 0].any() and on[:, -1].any()):
                        continue
                    shapes.append(shape)
                    aspects.append(crop.shape[1] / crop.shape[0])
            skipped += data.skipped
        if not shapes:
            raise InputError(
                f"shape_data: no usable mask in {', '.join(folders)} ({skipped} annotation files "
                "skipped, see the warnings; a mask needs a box of 2 px or more, and predicted_iou "
                "/ stability_score above the recipe's minimums)"
            )
        self.shapes = torch.stack(shapes)  # K x side x side, in [0, 1]
        self.aspects = np.array(aspects)

    def __len__(self) -> int:
        return len(self.shapes)

    def target(
        self, index: torch.Tensor, boxes: torch.Tensor, size: int, frame: float
    ) -> torch.Tensor:
        """N x size x size masks (bool) of a ``frame`` x ``frame`` square sampled at pixel centres:
        shape ``index[i]`` stretched over ``boxes[i]`` (XYXY in that frame, may extend past it;
        width and height > 0), bilinear, inside where the resampled shape is at least 0.5 (and
        nothing outside the box)."""
        c = (torch.arange(size, dtype=torch.float32, device=boxes.device) + 0.5) * (frame / size)
        b = boxes.float()
        u = (c[None] - b[:, 0, None]) / (b[:, 2] - b[:, 0])[:, None] * 2 - 1  # N x size, in box
        v = (c[None] - b[:, 1, None]) / (b[:, 3] - b[:, 1])[:, None] * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)
        shapes = self.shapes[index.cpu()][:, None].to(boxes.device)
        # border padding: the shape's edge pixels keep their value out to the box's edge, which
        # zero padding would halve (a filled corner pixel would fall below 0.5)
        out = nn.functional.grid_sample(
            shapes, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        inside = (grid.abs() <= 1).all(-1)
        return (out[:, 0] >= 0.5) & inside


def box_target(boxes: torch.Tensor, size: int, frame: int = 1024) -> torch.Tensor:
    """N x size x size masks of ``boxes`` (XYXY in the frame) sampled at pixel centres."""
    c = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) * (frame / size)
    inside_x = (c >= boxes[:, 0, None]) & (c <= boxes[:, 2, None])  # N x size
    inside_y = (c >= boxes[:, 1, None]) & (c <= boxes[:, 3, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


def window_pe(pe_layer: nn.Module, full: int, col: int, row: int, side: int) -> torch.Tensor:
    """C x side x side: the positional encoding of the ``full`` x ``full`` grid's cells in rows
    ``row`` .. ``row + side - 1`` and columns ``col`` .. ``col + side - 1``."""
    return pe_layer((full, full))[:, row : row + side, col : col + side]


def synthetic_batch(
    cfg: TrainConfig,
    step: int,
    indices: list[int],
    full: int,
    frame: int = 1024,
    bank: ShapeBank | None = None,
) -> tuple[np.ndarray, tuple[int, int] | None, torch.Tensor | None]:
    """The synthetic boxes of one step (N x 4 XYXY in the ``frame``; box ``i`` drawn from the
    generator seeded ``[seed, step, i]``, so every process and a resumed run draw the same), the
    step's window and, with a shape ``bank``, the targets (else None: the boxes themselves).

    With ``grid_window``, a ``grid_window_share`` of the steps (chosen per step) put every box
    inside a ``grid_window`` x ``grid_window`` window of the ``full`` x ``full`` grid, as (column,
    row) of its top-left cell, with the sizes of ``box_sizes`` that fit it; the other steps run on
    the coarse ``grid`` with sizes of at least the window's (where such sizes are in
    ``box_sizes``; boxes near the frame's edge are clipped to it). Window None: the coarse grid.
    With a ``bank``, box ``i`` takes a random shape at the shape's aspect ratio, moved inside the
    frame or window where it fits (else cut at its edge, as an object at the image's border); the
    target is N x 16 g x 16 g (g: the grid's or window's side) over the frame or the window, and
    the prompt is the shape's box clipped to it. ``box_sizes`` is the step's
    (:meth:`TrainConfig.box_sizes_at`: with a size curriculum it moves over the first steps)."""
    lo, hi = cfg.box_sizes_at(step)
    span, origin, window = frame, np.zeros(2), None
    if cfg.grid_window:
        cell = frame / full
        extent = cfg.grid_window * cell
        g = np.random.default_rng([cfg.seed, step, 1 << 40])  # a key that no box index takes
        if g.random() < cfg.grid_window_share:
            # Drawn over the starts of every window that overlaps the grid, then clipped into
            # it: each cell lies in grid_window of the full + grid_window - 1 draws or more, so
            # the border cells (where COCO's small objects often are) are trained at least as
            # often as the middle ones (those a few cells in up to ~2x as often); unclipped draws
            # would put column 0 in 1 window position of 49. (Exactly equal coverage would need
            # fixed tiles, which no box could cross.)
            start = g.integers(1 - cfg.grid_window, full, size=2)
            col, row = (int(v) for v in np.clip(start, 0, full - cfg.grid_window))
            span, origin, window = extent, np.array([col, row]) * cell, (col, row)
            lo, hi = lo * frame / span, min(hi * frame / span, 1.0)  # fractions of the window
        elif max(lo, extent / frame) <= hi:
            lo = max(lo, extent / frame)
    sizes = (min(lo, hi), hi)
    if bank is None:
        boxes = [
            synthetic_box(np.random.default_rng([cfg.seed, step, i]), span, sizes, cfg.box_size_log)
            for i in indices
        ]
        return np.stack(boxes) + np.tile(origin, 2).astype(np.float32), window, None
    rngs = [np.random.default_rng([cfg.seed, step, i]) for i in indices]
    index = np.array([int(r.integers(len(bank))) for r in rngs])
    shaped = np.stack(
        [
            synthetic_box(r, span, sizes, cfg.box_size_log, aspect=bank.aspects[k], clip=False)
            for r, k in zip(rngs, index, strict=True)
        ]
    )
    # moved back inside where it overhangs the far edge (never past the near one): a shape is
    # cut only where it is larger than the frame or window, not at a window's edge at random
    over = np.maximum(shaped[:, 2:] - span, 0)
    shaped -= np.tile(np.minimum(over, shaped[:, :2]), 2)
    side = 16 * (cfg.grid if window is None else cfg.grid_window)
    gt = bank.target(torch.as_tensor(index), torch.as_tensor(shaped), side, span)
    boxes = np.minimum(shaped, span) + np.tile(origin, 2)
    return boxes.astype(np.float32), window, gt


class PromptStep(nn.Module):
    """Decoder loss on synthetic boxes over a content-free (zero) image embedding: the only thing
    to learn is where the box is, i.e. how the prompt's and the grid's positional encodings relate.
    Trains the prompt encoder and mask decoder; the image encoder is untouched."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.cfg = cfg
        full = max(model.prompt_encoder.image_embedding_size)
        if cfg.grid > full:
            raise InputError(f"grid {cfg.grid} exceeds the model's {full} x {full} embedding grid")
        if cfg.grid_window > full:
            raise InputError(
                f"grid_window {cfg.grid_window} exceeds the model's {full} x {full} embedding grid"
            )
        for name in ("box_sizes", "box_sizes_start"):
            pair = getattr(cfg, name)
            if cfg.grid_window and pair is not None and pair[0] * full >= cfg.grid_window:
                raise InputError(
                    f"{name} starts at {pair[0]} of the frame, no smaller than the window "
                    f"({cfg.grid_window} of {full} cells): lower it or widen grid_window"
                )
        self.full = full

    def forward(
        self,
        boxes: torch.Tensor | None,
        multimask: bool,
        gt: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Loss of N ``boxes`` (N x 4, XYXY in the 1024 frame) against ``gt`` (N x H x W masks
        covering the padded square frame, or the window with ``window``; any resolution), or
        against the boxes themselves.
        ``window`` (with ``grid_window``): the (column, row) of the window's top-left cell in the
        full grid; the boxes (and ``gt``) must lie inside the window.
        ``boxes`` None (no readable sample in the batch): a zero loss that touches every weight,
        computed here so that DDP's gradient all-reduce still runs on this process."""
        if boxes is None:
            return sum(p.sum() for p in self.parameters()) * 0.0
        # Not Sam.decode: the warm start runs the decoder on a small g x g grid of zero image
        # embeddings with the positional encoding of that grid, not on a 64 x 64 image embedding.
        pe = self.prompt_encoder
        sparse, dense = pe(None, boxes, None)
        if window is None:
            g = self.cfg.grid
            image_pe = pe.pe_layer((g, g)).unsqueeze(0)  # resolution-free: any grid
        else:  # a g x g window of the full grid's encoding, at the full grid's resolution
            g, (col, row) = self.cfg.grid_window, window
            image_pe = window_pe(pe.pe_layer, self.full, col, row, g).unsqueeze(0)
        dense = dense[..., :g, :g]  # the "no mask" embedding is the same at every cell
        emb = dense.new_zeros((1, pe.embed_dim, g, g))
        low, iou_pred = self.mask_decoder(emb, image_pe, sparse, dense, multimask)
        if gt is None and window is None:  # 4x the logits' side: soft edges after area averaging
            gt = box_target(boxes, 16 * g)
        elif gt is None:  # the window's part of the frame, in the window's own frame
            cell = pe.input_image_size[0] / self.full
            origin = boxes.new_tensor([col, row, col, row]) * cell
            gt = box_target(boxes - origin, 16 * g, frame=g * cell)
        loss = mask_loss(
            low.float(), gt, num_points=0, focal=self.cfg.focal,
            bce_weight=self.cfg.bce_weight, bce_balanced=self.cfg.bce_balanced,
        )  # fmt: skip
        if self.cfg.iou_loss_weight:
            loss = loss + self.cfg.iou_loss_weight * iou_loss(low.float(), gt, iou_pred)
        return loss.mean()


def prompt_warmup(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Warm start for a mask decoder trained from scratch: boxes -> the box's own mask, on a
    content-free image embedding and a ``cfg.grid`` x ``cfg.grid`` grid.

    From scratch, SAM's decoder first learns a prompt-independent "salient object" mask on real
    images and does not leave it within a CPU budget (MODEL_CARD.md); on this pretext only the
    prompt's position can lower the loss, and it is learned in minutes. Then stage 2 starts from
    this decoder (``decoder_checkpoint``). ``batch_size`` boxes per process and step; multimask
    output on every other step (best of 3, as in stage 2).

    With ``cfg.data`` (SA-1B folders), the targets are real objects' masks from their boxes, still
    on a zero image embedding: ``batch_size`` images and ``masks_per_image`` masks each per step,
    augmented as in stage 2; ``box_prob`` must be 1 and ``multimask_prob`` has no effect (every
    other step, as above). The learning curve (``eval_every``) measures the content-free model
    (:func:`content_free`) in both cases."""
    device = train_device()
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, checkpoint=cfg.init_checkpoint, device=device, seed=cfg.seed)
    if cfg.decoder_checkpoint:
        load_prompt_decoder(model, cfg.decoder_checkpoint)
    redraw_positional_encoding(model, cfg)
    prompt_parts = nn.ModuleDict(
        {"prompt_encoder": model.prompt_encoder, "mask_decoder": model.mask_decoder}
    )
    datasets, items = training_items(cfg) if cfg.data else ([], [])
    per_epoch = len(items) if cfg.data else cfg.items_per_epoch
    run = Run(cfg, per_epoch, prompt_parts, PromptStep(model, cfg), progress=progress)
    resumed = run.resume(resume)

    full = max(model.prompt_encoder.image_embedding_size)
    frame = model.prompt_encoder.input_image_size[0]

    bank = None
    if cfg.shape_data:
        bank = ShapeBank(
            cfg.shape_data,
            min_predicted_iou=cfg.min_predicted_iou,
            min_stability_score=cfg.min_stability_score,
        )

    def synthetic(
        step: int, indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
        boxes, window, gt = synthetic_batch(cfg, step, indices, full, frame, bank)
        gt = None if gt is None else gt.to(device)
        return torch.as_tensor(boxes, device=device), gt, window

    def real(step: int, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        samples, _ = batch_samples(datasets, items, step, indices, model.image_size, cfg, device)
        if not samples:
            return None
        boxes = torch.cat([s["boxes"] for s in samples])
        return boxes, torch.cat([s["gt"] for s in samples]), None

    def compute(step: int, indices: list[int]) -> torch.Tensor:
        batch = (real if cfg.data else synthetic)(step, indices)
        if on_step is not None:
            on_step(step)
        boxes, gt, window = batch or (None, None, None)  # None: a zero loss (PromptStep)
        with train_autocast(cfg, device):
            return run.step_module(boxes, step % 2 == 1, gt, window)

    records = run.loop(compute, curve_evaluator(cfg, content_free(model)))
    drawn = None
    if cfg.min_box_iou and run.step >= run.total_steps:  # a run cut by max_steps: no check
        hint = cfg.box_sizes_start is None
        drawn = check_box_prior(
            model, cfg.min_box_iou, Path(cfg.out) / "model.pt", run.rank == 0, hint
        )
    return {**finish_run(run, model, records, resumed, datasets), "box_iou": drawn}


#: box sides (px of the 1024 frame) that ``min_box_iou`` checks: COCO's medium and large objects
BOX_CHECK_SIDES = (128, 256)


def check_box_prior(
    model: nn.Module,
    minimum: float,
    weights: Path,
    measure: bool = True,
    curriculum_hint: bool = True,
) -> dict[int, float]:
    """Box drawing of the content-free decoder (:func:`leansam.eval.diagnose.box_drawing` at
    :data:`BOX_CHECK_SIDES`: mean IoU with the box per side); raises :class:`TrainingError` when
    their mean is below ``minimum``: the decoder draws nothing (the all-background plateau),
    everything (the all-foreground one) or poor boxes, whatever the loss says. The process with
    ``measure`` (rank 0) measures and every process takes its result, so that all of them pass
    or fail together. On failure a
    ``weights`` file left by an earlier pass of the same run is removed, so that no later stage
    takes a rejected decoder. ``curriculum_hint``: the message suggests ``box_sizes_start``."""
    from ..distributed import all_gather_objects
    from ..eval.diagnose import box_drawing

    drawn = None
    if measure:
        with torch.no_grad():  # no dropout or batch norm in the prompt encoder and decoder
            drawn = box_drawing(model, BOX_CHECK_SIDES)
    drawn = all_gather_objects(drawn)[0]
    mean = sum(drawn.values()) / len(drawn)
    if mean < minimum:
        if measure:
            weights.unlink(missing_ok=True)
        sides = " / ".join(f"{v:.2f}" for v in drawn.values())
        hint = " or a size curriculum (box_sizes_start, box_size_ramp)" if curriculum_hint else ""
        raise TrainingError(
            f"the warm start draws boxes of {' / '.join(map(str, BOX_CHECK_SIDES))} px at a mean "
            f"IoU of {sides}, below min_box_iou {minimum} (a plateau: nothing or everything "
            f"drawn), so no model.pt was written; rerun in a new --out with another --seed{hint}"
        )
    return drawn


class _ZeroEmbedding(nn.Module):
    """An image encoder whose embedding is all zeros (D x 64 x 64 per image)."""

    def __init__(self, img_size: int, dim: int, side: int) -> None:
        super().__init__()
        self.img_size, self.dim, self.side = img_size, dim, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], self.dim, self.side, self.side))


def content_free(model: nn.Module) -> nn.Module:
    """A view of ``model`` that shares its prompt encoder and mask decoder and replaces the image
    encoder by an all-zero embedding: what the warm start trains, measured on real images by the
    learning curve (how much of the box mIoU the prompt alone gives)."""
    import copy

    view = copy.copy(model)
    view._modules = dict(model._modules)
    side = max(model.prompt_encoder.image_embedding_size)
    view.image_encoder = _ZeroEmbedding(
        model.image_encoder.img_size, model.prompt_encoder.embed_dim, side
    )
    return view
