"""The training loop both stages share: the image order, AdamW with its cosine schedule,
resumable checkpoints, logs, mixed precision and the end-of-run ``model.pt``.

Determinism is by construction: the image order of epoch e is a permutation seeded by (seed, e);
every augmentation, prompt and loss point of an image is drawn from generators seeded by (seed,
step, image index). A run therefore does not depend on how the global batch is split over processes,
and a resumed run replays exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_state_dict
from ..distributed import barrier, default_device, init_from_env
from ..errors import InputError
from ..io import atomic_replace, atomic_write_bytes, atomic_write_json
from ..progress import progress_bar
from ..provenance import cpu_has_bf16, describe_environment
from .config import TrainConfig

#: the parameters ``decoder_lr_scale`` applies to (SAM's prompt encoder and mask decoder)
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, decoder_lr_scale: float = 1.0
) -> list[dict]:
    """AdamW groups: no weight decay on norms and biases (1-D tensors); the prompt encoder's and
    mask decoder's learning rate ``lr * decoder_lr_scale`` (at 1, the two groups of earlier
    versions, so that their optimizer states load). Empty groups are left out."""
    groups: dict[tuple[bool, bool], list] = {}
    split = decoder_lr_scale != 1.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((no_decay, split and name.startswith(DECODER_PREFIXES)), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * (decoder_lr_scale if decoder else 1.0),
        }
        for (no_decay, decoder), params in sorted(groups.items())
    ]


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary name, renamed into place when complete."""
    # straight to the temp file: no second in-memory copy of model + optimizer state
    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def lr_factor(step: int, *, total: int, warmup: int = 0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up to 1, then cosine decay to 0 at
    ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class Run:
    """Order, optimisation, checkpoints and logs common to both stages."""

    def __init__(
        self,
        cfg: TrainConfig,
        n_items: int,
        trainable: nn.Module,
        step_module: nn.Module,
        *,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.progress = progress  # the bar on rank 0
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
        lr = cfg.lr * self.world
        self.optimizer = torch.optim.AdamW(
            param_groups(trainable, cfg.weight_decay, lr, cfg.decoder_lr_scale), lr=lr
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
        if not _same_run(state["config"], _comparable(self.cfg)):
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
            atomic_torch_save(
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

    def optimise(
        self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None
    ) -> tuple[float, dict[str, float]]:
        """One optimizer step on ``loss``; returns the loss and its ``terms`` (scalars), each
        averaged over the processes."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_value_(self.trainable.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        names = list(terms or {})
        values = torch.stack(  # on the loss's device: one transfer (one GPU sync) per step
            [loss.detach().float(), *(terms[k].float().to(loss.device) for k in names)]
        )
        if self.world > 1:  # every process has the same terms: their names follow the config
            torch.distributed.all_reduce(values)
            values /= self.world
        values = values.tolist()
        return values[0], dict(zip(names, values[1:], strict=True))

    def loop(
        self,
        compute_loss: Callable[[int, list[int]], torch.Tensor | tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict] | None = None,
    ) -> list[dict]:
        """Run steps from the current one to the last; returns this run's log records.
        ``compute_loss`` returns the step's loss, or the loss and a dict of its terms (scalar
        tensors, logged as ``loss_terms``). With
        ``evaluate`` and ``cfg.eval_every``, rank 0 appends ``{"step", "epoch", **evaluate()}``
        to ``curve.jsonl`` before the first step and every ``eval_every`` steps (the learning
        curve; the model is in eval mode meanwhile)."""
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "metrics.jsonl"
        curve_path = self.out / "curve.jsonl"
        if self.rank == 0:
            for path in (log_path, curve_path):  # drop records past the resumed checkpoint
                kept = []
                if self.step and path.exists():
                    kept = [
                        line
                        for line in path.read_text().splitlines()
                        if json.loads(line)["step"] <= self.step
                    ]
                atomic_write_bytes(path, "".join(x + "\n" for x in kept).encode())
            atomic_write_json(
                self.out / "run.json",
                {
                    "config": self.cfg.as_dict(),
                    "world_size": self.world,
                    "steps": self.total_steps,
                    "environment": describe_environment(),
                },
            )
        bar = progress_bar(
            total=self.last_step,
            initial=self.step,
            desc=f"train {self.cfg.stage}",
            unit="step",
            enabled=self.progress and self.rank == 0,
        )
        try:
            records = []
            every = self.cfg.eval_every if evaluate is not None else 0
            if every and self.step == 0:
                self._curve_point(evaluate, curve_path)
            self._train_mode()
            while self.step < self.last_step:
                t0 = time.perf_counter()
                out = compute_loss(self.step, self.indices(self.step))
                loss, terms = self.optimise(*out) if isinstance(out, tuple) else self.optimise(out)
                self.step += 1
                dt = time.perf_counter() - t0
                rec = {
                    "step": self.step,
                    "epoch": self.step / self.steps_per_epoch,
                    "loss": loss,
                    **({"loss_terms": terms} if terms else {}),
                    "lr": self.scheduler.get_last_lr()[0],
                    "seconds": dt,
                    "images_per_s": self.global_batch / dt,
                }
                records.append(rec)
                if self.rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix_str(f"loss={loss:.4f}")
                    bar.update()
                if every and (self.step % every == 0 or self.step == self.last_step):
                    self._curve_point(evaluate, curve_path)
                    self._train_mode()
                if self.step % self.cfg.save_every == 0 or self.step == self.last_step:
                    self.save()
        finally:  # also on an interruption: the next message starts on its own line
            bar.close()
        self.trainable.eval()
        return records

    def _train_mode(self) -> None:
        self.trainable.train()
        if self.cfg.freeze_bn:
            for m in self.trainable.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _curve_point(self, evaluate: Callable[[], dict], path: Path) -> None:
        if self.rank == 0:
            t0 = time.perf_counter()
            point = evaluate()
            rec = {
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "seconds": time.perf_counter() - t0,
                **point,
            }
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        barrier()


def curve_evaluator(cfg: TrainConfig, model: nn.Module) -> Callable[[], dict] | None:
    """The learning-curve measurement of ``cfg`` (box diagnosis of ``model`` on a fixed subset of
    a COCO dataset), or None when ``cfg.eval_every`` is 0."""
    if not cfg.eval_every:
        return None
    from ..eval.dataset import EvalDataset
    from ..eval.diagnose import diagnose_boxes

    data = EvalDataset.load(cfg.eval_images, cfg.eval_annotations, limit=cfg.eval_limit)
    return lambda: diagnose_boxes(model, data)


#: configuration fields that may change when a run is resumed (they do not change its steps)
FREE_ON_RESUME = (
    "max_steps", "save_every", "eval_every", "eval_images", "eval_annotations", "eval_limit",
    "min_box_iou",
)  # fmt: skip


def _same_run(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's configuration is ``now``'s; a field added to TrainConfig after the
    checkpoint was written counts as its default value."""
    defaults = TrainConfig.defaults()
    if set(saved) - set(now):
        return False
    return all(saved.get(k, defaults.get(k, object())) == v for k, v in now.items())


def _comparable(cfg: TrainConfig) -> dict:
    """The configuration fields that must match for a checkpoint to be resumed."""
    d = cfg.as_dict()
    for k in FREE_ON_RESUME:
        d.pop(k, None)
    return d


def train_autocast(cfg: TrainConfig, device: torch.device):
    """The autocast context of ``cfg.amp`` on ``device`` (fp16 only on CUDA; ``auto``: bf16 on
    CUDA or a CPU with native bf16, else off)."""
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" or cpu_has_bf16() else "none"
    if amp == "none" or (amp == "fp16" and device.type != "cuda"):
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def channels_last(encoder: nn.Module) -> nn.Module:
    """``encoder``'s convolution weights in channels-last (NHWC) layout, in place, for training:
    oneDNN's CPU convolutions and their backward are faster on NHWC weights and inputs
    (BENCHMARKS.md, "Training step"); the same function up to float rounding. Only convolutions
    change (other 4-D tensors, such as a ViT's position embedding, keep their layout). Callers
    pass the encoder's inputs through :func:`channels_last_input`. ``model.pt`` is saved
    contiguous (:func:`~leansam.checkpoint.save_state_dict`); ``checkpoint.pt`` keeps the
    layout, which loading copies into any."""
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            module.to(memory_format=torch.channels_last)
    return encoder


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """A B x 3 x H x W encoder input in channels-last layout (see :func:`channels_last`)."""
    return x.contiguous(memory_format=torch.channels_last)


def train_device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    return torch.device(default_device() or "cpu")


def finish_run(run: Run, model: nn.Module, records: list[dict], resumed: bool, datasets=()) -> dict:
    """Write ``model.pt`` once the last step is done; returns the run's summary."""
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
