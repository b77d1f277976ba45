"""Stage 1 (distillation) and stage 2 (end-to-end) training, one process or many under torchrun.

Determinism is by construction: the image order of epoch e is a permutation seeded by (seed, e);
every augmentation, prompt and loss point of an image is drawn from generators seeded by (seed,
step, image index). A run therefore does not depend on how the global batch is split over processes,
and a resumed run replays exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict, save_state_dict
from ..configs import PIXEL_MEAN
from ..distributed import barrier, init_from_env
from ..errors import InputError, require
from ..io import (
    IMAGE_SUFFIXES,
    atomic_replace,
    atomic_write_bytes,
    atomic_write_json,
    load_image,
)
from ..provenance import describe_environment
from ..registry import create_model
from ..transforms import ResizeLongestSide
from .config import TrainConfig
from .losses import iou_loss, mask_loss
from .prompts import sample_prompts


# ------------------------------------------------------------------ shared machinery
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms and biases (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _atomic_torch_save(obj: object, path: Path) -> None:
    # straight to the temp file: no second in-memory copy of model + optimizer state
    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def lr_factor(step: int, *, total: int, warmup: int = 0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up to 1, then cosine decay to 0 at
    ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class _Run:
    """Order, optimisation, checkpoints and logs common to both stages."""

    def __init__(
        self, cfg: TrainConfig, n_items: int, trainable: nn.Module, step_module: nn.Module
    ):
        self.cfg = cfg
        self.rank, self.world = init_from_env()
        self.out = Path(cfg.out)
        self.n = n_items
        self.global_batch = cfg.batch_size * self.world
        self.steps_per_epoch = n_items // self.global_batch
        if self.steps_per_epoch < 1:
            raise InputError(
                f"{n_items} training items are fewer than one global batch of {self.global_batch}"
            )
        self.total_steps = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.last_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(
            param_groups(trainable, cfg.weight_decay), lr=cfg.lr * self.world
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(lr_factor, total=self.total_steps, warmup=cfg.warmup_steps),
        )
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            if not cfg.freeze_bn and torch.cuda.is_available():
                step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
            # prompt-encoder parts unused by a given prompt kind (mask input, padding point)
            step_module = DistributedDataParallel(step_module, find_unused_parameters=True)
        self.step_module = step_module
        self.step = 0

    def indices(self, step: int) -> list[int]:
        """This process's items of global step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)
        start = pos * self.global_batch + self.rank * self.cfg.batch_size
        return [int(i) for i in perm[start : start + self.cfg.batch_size]]

    def resume(self, allowed: bool) -> bool:
        """Continue from ``checkpoint.pt`` if asked; refuse to overwrite one otherwise."""
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return False
        if not allowed:
            raise InputError(
                f"{self.out} holds a run: pass --resume to continue it, or a new --out"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != _comparable(self.cfg):
            raise InputError(
                f"{path} was written by another configuration: use a new --out, or the same recipe"
            )
        self.trainable.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        return True

    def save(self) -> None:
        if self.rank == 0:
            _atomic_torch_save(
                {
                    "model": self.trainable.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                    "config": _comparable(self.cfg),
                    "torch_rng": torch.get_rng_state(),
                },
                self.out / "checkpoint.pt",
            )
        barrier()

    def optimise(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_value_(self.trainable.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        value = loss.detach().float()
        if self.world > 1:
            torch.distributed.all_reduce(value)
            value /= self.world
        return float(value)

    def loop(self, compute_loss: Callable[[int, list[int]], torch.Tensor]) -> list[dict]:
        """Run steps from the current one to the last; returns this run's log records."""
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            kept = []
            if self.step and log_path.exists():  # drop records past the resumed checkpoint
                kept = [
                    line
                    for line in log_path.read_text().splitlines()
                    if json.loads(line)["step"] <= self.step
                ]
            atomic_write_bytes(log_path, "".join(x + "\n" for x in kept).encode())
            atomic_write_json(
                self.out / "run.json",
                {
                    "config": self.cfg.as_dict(),
                    "world_size": self.world,
                    "steps": self.total_steps,
                    "environment": describe_environment(),
                },
            )
        bar = None
        if self.rank == 0:
            tqdm = require("tqdm", "data").tqdm
            bar = tqdm(
                total=self.last_step, initial=self.step, desc=f"train {self.cfg.stage}", unit="step"
            )
        records = []
        self.trainable.train()
        if self.cfg.freeze_bn:
            for m in self.trainable.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        while self.step < self.last_step:
            t0 = time.perf_counter()
            loss = self.optimise(compute_loss(self.step, self.indices(self.step)))
            self.step += 1
            dt = time.perf_counter() - t0
            rec = {
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": dt,
                "images_per_s": self.global_batch / dt,
            }
            records.append(rec)
            if self.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update()
            if self.step % self.cfg.save_every == 0 or self.step == self.last_step:
                self.save()
        if bar is not None:
            bar.close()
        self.trainable.eval()
        return records


def _comparable(cfg: TrainConfig) -> dict:
    """The configuration fields that must match for a checkpoint to be resumed."""
    d = cfg.as_dict()
    d.pop("max_steps", None)
    d.pop("save_every", None)
    return d


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none" or (cfg.amp == "fp16" and device.type != "cuda"):
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _device() -> torch.device:
    from ..distributed import default_device

    return torch.device(default_device() or "cpu")


# ------------------------------------------------------------------ stage 2
class _FinetuneStep(nn.Module):
    """Loss of a batch of prepared samples; wrapped by DDP so that its forward syncs gradients."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, samples: list[dict], seeds: list[int]) -> torch.Tensor:
        model = self.model
        x = torch.cat([model.preprocess(s["image"][None]) for s in samples])
        emb = model.image_encoder(x)
        pe = model.prompt_encoder.get_dense_pe()
        losses = []
        for i, s in enumerate(samples):
            points = (s["points"], s["labels"]) if s["points"] is not None else None
            sparse, dense = model.prompt_encoder(points, s["boxes"], None)
            low, iou_pred = model.mask_decoder(emb[i : i + 1], pe, sparse, dense, s["multimask"])
            g = torch.Generator(device=low.device).manual_seed(seeds[i])
            loss = mask_loss(
                low.float(), s["gt"], num_points=self.cfg.num_points, focal=self.cfg.focal,
                bce_weight=self.cfg.bce_weight, generator=g,
            )  # fmt: skip
            if self.cfg.iou_loss_weight:
                loss = loss + self.cfg.iou_loss_weight * iou_loss(low.float(), s["gt"], iou_pred)
            losses.append(loss)
        return torch.cat(losses).mean()


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
    jitter, ``masks_per_image`` masks (resampled if fewer), box or 1-10 points, multimask."""
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
    prompts = sample_prompts(masks, rng, box_prob=cfg.box_prob, multimask_prob=cfg.multimask_prob)
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


def finetune(
    cfg: TrainConfig, *, resume: bool = False, on_step: Callable[[int], None] | None = None
) -> dict:
    """Stage 2: end-to-end training on SA-1B folders. Writes ``checkpoint.pt`` (resumable),
    ``metrics.jsonl`` and, at the end, ``model.pt`` (a plain state dict for ``create_model``)."""
    from ..data.sa1b import SA1BDataset

    device = _device()
    datasets = [SA1BDataset(d) for d in cfg.data]
    repeat = cfg.data_repeat or [1] * len(datasets)
    items = [
        (k, i) for k, ds in enumerate(datasets) for _ in range(repeat[k]) for i in range(len(ds))
    ]
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, checkpoint=cfg.init_checkpoint, device=device, seed=cfg.seed)
    if cfg.decoder_checkpoint:
        load_prompt_decoder(model, cfg.decoder_checkpoint)
    step_module = _FinetuneStep(model, cfg)
    run = _Run(cfg, len(items), model, step_module)
    resumed = run.resume(resume)

    def compute(step: int, indices: list[int]) -> torch.Tensor:
        samples, seeds = [], []
        for i in indices:
            k, j = items[i]
            raw = datasets[k][j]
            if raw is None:
                continue
            rng = np.random.default_rng([cfg.seed, step, i])
            samples.append(prepare_sample(raw, model.image_size, cfg, rng, device))
            seeds.append(int(rng.integers(2**62)))
        if on_step is not None:
            on_step(step)
        with _autocast(cfg, device):
            if not samples:  # keep every process in step: a zero loss that touches all weights
                return sum(p.sum() for p in model.parameters()) * 0.0
            return run.step_module(samples, seeds)

    records = run.loop(compute)
    return _finish(run, model, records, resumed, datasets)


# ------------------------------------------------------------------ prompt warm start
def synthetic_box(rng: np.random.Generator, frame: int = 1024) -> np.ndarray:
    """A random XYXY box in the ``frame`` x ``frame`` prompt frame: width and height uniform in 3 %
    to 60 % of the frame, top-left corner uniform in the first 88 %, clipped to the frame. (Many
    tiny boxes make "all background" the easy answer the decoder does not leave.)"""
    x0, y0 = rng.uniform(0, 0.88 * frame, size=2)
    w, h = rng.uniform(0.03 * frame, 0.6 * frame, size=2)
    return np.array([x0, y0, min(x0 + w, frame), min(y0 + h, frame)], np.float32)


def box_target(boxes: torch.Tensor, size: int, frame: int = 1024) -> torch.Tensor:
    """N x size x size masks of ``boxes`` (XYXY in the frame) sampled at pixel centres."""
    c = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) * (frame / size)
    inside_x = (c >= boxes[:, 0, None]) & (c <= boxes[:, 2, None])  # N x size
    inside_y = (c >= boxes[:, 1, None]) & (c <= boxes[:, 3, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


class _PromptStep(nn.Module):
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

    def forward(self, boxes: torch.Tensor, multimask: bool) -> torch.Tensor:
        pe, g = self.prompt_encoder, self.cfg.grid
        sparse, dense = pe(None, boxes, None)
        dense = dense[..., :g, :g]  # the "no mask" embedding is the same at every cell
        image_pe = pe.pe_layer((g, g)).unsqueeze(0)  # resolution-free: any grid
        emb = dense.new_zeros((1, pe.embed_dim, g, g))
        low, iou_pred = self.mask_decoder(emb, image_pe, sparse, dense, multimask)
        gt = box_target(boxes, 16 * g)  # 4x the logits' side: soft edges after area averaging
        loss = mask_loss(low.float(), gt, num_points=0, bce_weight=self.cfg.bce_weight)
        if self.cfg.iou_loss_weight:
            loss = loss + self.cfg.iou_loss_weight * iou_loss(low.float(), gt, iou_pred)
        return loss.mean()


def prompt_warmup(
    cfg: TrainConfig, *, resume: bool = False, on_step: Callable[[int], None] | None = None
) -> dict:
    """Warm start for a mask decoder trained from scratch: boxes -> the box's own mask, on a
    content-free image embedding and a ``cfg.grid`` x ``cfg.grid`` grid.

    From scratch, SAM's decoder first learns a prompt-independent "salient object" mask on real
    images and does not leave it within a CPU budget (MODEL_CARD.md); on this pretext only the
    prompt's position can lower the loss, and it is learned in minutes. Then stage 2 starts from
    this decoder (``decoder_checkpoint``). ``batch_size`` boxes per process and step; multimask
    output on every other step (best of 3, as in stage 2)."""
    device = _device()
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, checkpoint=cfg.init_checkpoint, device=device, seed=cfg.seed)
    if cfg.decoder_checkpoint:
        load_prompt_decoder(model, cfg.decoder_checkpoint)
    prompt_parts = nn.ModuleDict(
        {"prompt_encoder": model.prompt_encoder, "mask_decoder": model.mask_decoder}
    )
    run = _Run(cfg, cfg.items_per_epoch, prompt_parts, _PromptStep(model, cfg))
    resumed = run.resume(resume)

    def compute(step: int, indices: list[int]) -> torch.Tensor:
        boxes = np.stack(
            [synthetic_box(np.random.default_rng([cfg.seed, step, i])) for i in indices]
        )
        if on_step is not None:
            on_step(step)
        with _autocast(cfg, device):
            return run.step_module(torch.as_tensor(boxes, device=device), step % 2 == 1)

    records = run.loop(compute)
    return _finish(run, model, records, resumed)


# ------------------------------------------------------------------ stage 1
def list_images(folders: list[str]) -> list[Path]:
    files = []
    for d in folders:
        root = Path(d)
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
        files += [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(f"no .jpg/.png images in {', '.join(folders)}")
    return sorted(files)


class _DistillStep(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.encoder(x).float(), target.float())


def _embed(model, path: Path, device, flip: bool = False) -> torch.Tensor:
    image = load_image(path)
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    image = ResizeLongestSide(model.image_size).apply_image(image)
    x = torch.as_tensor(image, device=device).permute(2, 0, 1)[None]
    return model.preprocess(x)


def build_teacher_cache(
    cfg: TrainConfig, items: list[tuple[Path, bool]], shard_size: int = 32
) -> Path:
    """Teacher embeddings of every image, computed once: ``teacher_cache/shard_NNNNN.pt`` (fp16
    unless ``cache_fp16`` is off), written atomically; finished shards are kept on a rerun and
    processes share the shards under torchrun."""
    rank, world = init_from_env()
    device = _device()
    cache = Path(cfg.out) / "teacher_cache"
    cache.mkdir(parents=True, exist_ok=True)
    teacher = create_model(cfg.teacher, checkpoint=cfg.teacher_checkpoint, device=device, seed=0)
    n_shards = math.ceil(len(items) / shard_size)
    dtype = torch.float16 if cfg.cache_fp16 else torch.float32
    for k in range(rank, n_shards, world):
        path = cache / f"shard_{k:05d}.pt"
        if path.exists():
            continue
        chunk = items[k * shard_size : (k + 1) * shard_size]
        with torch.inference_mode():
            emb = torch.cat(
                [teacher.image_encoder(_embed(teacher, f, device, flip)) for f, flip in chunk]
            )
        names = [f.name + (" (mirrored)" if flip else "") for f, flip in chunk]
        _atomic_torch_save({"files": names, "emb": emb.to(dtype).cpu()}, path)
    barrier()
    return cache


def distill(
    cfg: TrainConfig, *, resume: bool = False, on_step: Callable[[int], None] | None = None
) -> dict:
    """Stage 1: MSE between the student's and the teacher's 256 x 64 x 64 image embeddings. The
    resulting ``model.pt`` holds the student encoder with the teacher's prompt encoder and mask
    decoder."""
    device = _device()
    files = list_images(cfg.data)
    # with flips, every image also appears mirrored, with the teacher's embedding of the mirror
    items = [
        (f, flip) for flip in ((False, True) if cfg.distill_flips else (False,)) for f in files
    ]
    cache = build_teacher_cache(cfg, items)
    shards = sorted(cache.glob("shard_*.pt"))
    targets = torch.cat([torch.load(p, weights_only=True)["emb"] for p in shards])
    if len(targets) != len(items):
        raise InputError(f"teacher cache in {cache} does not match the images: delete it")
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.model, checkpoint=cfg.init_checkpoint, device=device, seed=cfg.seed)
    teacher = create_model(cfg.teacher, checkpoint=cfg.teacher_checkpoint, device="cpu", seed=0)
    encoder = student.image_encoder
    run = _Run(cfg, len(items), encoder, _DistillStep(encoder))
    resumed = run.resume(resume)

    def compute(step: int, indices: list[int]) -> torch.Tensor:
        x = torch.cat([_embed(student, items[i][0], device, items[i][1]) for i in indices])
        y = targets[indices].to(device)
        if on_step is not None:
            on_step(step)
        with _autocast(cfg, device):
            return run.step_module(x, y)

    records = run.loop(compute)
    # The student takes over SAM's prompt encoder and mask decoder from the teacher.
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    return _finish(run, student, records, resumed)


def _finish(run: _Run, model: nn.Module, records: list[dict], resumed: bool, datasets=()) -> dict:
    skipped = sum(getattr(d, "skipped", 0) for d in datasets)
    if skipped:
        import logging

        logging.getLogger(__name__).warning("%d unreadable samples were skipped", skipped)
    if run.rank == 0 and run.step >= run.last_step:
        save_state_dict(model.state_dict(), Path(run.cfg.out) / "model.pt")
    barrier()
    return {
        "steps": run.step,
        "total_steps": run.total_steps,
        "resumed": resumed,
        "records": records,
        "skipped_samples": skipped,
        "world_size": run.world,
    }
