"""Stage 1: distillation of a teacher's image embeddings into a student image encoder."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import barrier, init_from_env
from ..errors import InputError
from ..io import IMAGE_SUFFIXES, image_files, load_image
from ..progress import progress_bar
from ..registry import create_model
from ..transforms import ResizeLongestSide
from .config import TrainConfig
from .loop import (
    Run,
    atomic_torch_save,
    channels_last,
    channels_last_input,
    curve_evaluator,
    finish_run,
    train_autocast,
    train_device,
)


def list_images(folders: list[str]) -> list[Path]:
    files = []
    for d in folders:
        root = Path(d)
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
        files += image_files(root)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(folders)}")
    return sorted(files)


class DistillStep(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.encoder(x).float(), target.float())


def encoder_input(model, path: Path, device, flip: bool = False) -> torch.Tensor:
    """The image at ``path`` (mirrored if ``flip``) as ``model``'s 1 x 3 x R x R encoder input."""
    image = load_image(path)
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    image = ResizeLongestSide(model.image_size).apply_image(image)
    x = torch.as_tensor(image, device=device).permute(2, 0, 1)[None]
    return model.preprocess(x)


def build_teacher_cache(
    cfg: TrainConfig,
    items: list[tuple[Path, bool]],
    shard_size: int = 32,
    *,
    progress: bool = True,
) -> Path:
    """Teacher embeddings of every image, computed once: ``teacher_cache/shard_NNNNN.pt`` (fp16
    unless ``cache_fp16`` is off), written atomically; finished shards are kept on a rerun and
    processes share the shards under torchrun."""
    rank, world = init_from_env()
    device = train_device()
    cache = Path(cfg.out) / "teacher_cache"
    cache.mkdir(parents=True, exist_ok=True)
    teacher = create_model(cfg.teacher, checkpoint=cfg.teacher_checkpoint, device=device, seed=0)
    n_shards = math.ceil(len(items) / shard_size)
    dtype = torch.float16 if cfg.cache_fp16 else torch.float32
    mine = list(range(rank, n_shards, world))
    todo = [k for k in mine if not (cache / f"shard_{k:05d}.pt").exists()]
    # rank 0's share of the shards (each process computes its own), counting finished ones
    bar = progress_bar(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc="teacher embeddings",
        unit="shard",
        enabled=progress and rank == 0 and bool(todo),
    )
    for k in todo:
        path = cache / f"shard_{k:05d}.pt"
        chunk = items[k * shard_size : (k + 1) * shard_size]
        with torch.inference_mode():
            emb = torch.cat(
                [
                    teacher.image_encoder(encoder_input(teacher, f, device, flip))
                    for f, flip in chunk
                ]
            )
        names = [f.name + (" (mirrored)" if flip else "") for f, flip in chunk]
        atomic_torch_save({"files": names, "emb": emb.to(dtype).cpu()}, path)
        bar.update()
    bar.close()
    barrier()
    return cache


def distill(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Stage 1: MSE between the student's and the teacher's 256 x 64 x 64 image embeddings. The
    resulting ``model.pt`` holds the student encoder with the teacher's prompt encoder and mask
    decoder."""
    device = train_device()
    files = list_images(cfg.data)
    # with flips, every image also appears mirrored, with the teacher's embedding of the mirror
    items = [
        (f, flip) for flip in ((False, True) if cfg.distill_flips else (False,)) for f in files
    ]
    cache = build_teacher_cache(cfg, items, progress=progress)
    shards = sorted(cache.glob("shard_*.pt"))
    targets = torch.cat([torch.load(p, weights_only=True)["emb"] for p in shards])
    if len(targets) != len(items):
        raise InputError(f"teacher cache in {cache} does not match the images: delete it")
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.model, checkpoint=cfg.init_checkpoint, device=device, seed=cfg.seed)
    teacher = create_model(cfg.teacher, checkpoint=cfg.teacher_checkpoint, device="cpu", seed=0)
    # The student takes over SAM's prompt encoder and mask decoder from the teacher (not trained
    # in stage 1; taken now so that the learning curve measures the whole student).
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    encoder = channels_last(student.image_encoder)
    run = Run(cfg, len(items), encoder, DistillStep(encoder), progress=progress)
    resumed = run.resume(resume)

    def compute(step: int, indices: list[int]) -> torch.Tensor:
        x = torch.cat([encoder_input(student, items[i][0], device, items[i][1]) for i in indices])
        x = channels_last_input(x)
        y = targets[indices].to(device)
        if on_step is not None:
            on_step(step)
        with train_autocast(cfg, device):
            return run.step_module(x, y)

    records = run.loop(compute, curve_evaluator(cfg, student))
    return finish_run(run, student, records, resumed)
