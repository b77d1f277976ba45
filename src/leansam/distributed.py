"""torchrun support: one process per device, NCCL on GPUs and gloo on CPU."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def init_from_env(timeout_s: float = 1800) -> tuple[int, int]:
    """(rank, world size). Starts the process group when launched by torchrun with more than one
    process (WORLD_SIZE > 1) and none is running yet; a plain launch is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> str | None:
    """This process's GPU under torchrun (LOCAL_RANK), else None (CPU)."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


#: configuration fields recorded only by later versions: a run folder whose record lacks one was
#: written before it existed and resumes whatever its value now
LATER_FIELDS = ("calib_images",)


def claim_run_folder(
    run_file: str | os.PathLike,
    config: dict,
    *,
    fresh: bool = False,
    clear: Callable[[], None] | None = None,
) -> None:
    """Start or resume a resumable, sharded job whose results are kept next to ``run_file``.

    Refuses (one-line :class:`~leansam.errors.InputError`) when ``run_file`` records another
    ``config``, so that results of different configurations are never mixed; with ``fresh``, rank 0
    calls ``clear`` (which deletes the old results) instead. Rank 0 then writes ``config`` to
    ``run_file`` (atomically); every process returns once it is there."""
    from .errors import InputError
    from .io import atomic_write_json

    run_file = Path(run_file)
    config = json.loads(json.dumps(config))  # as it reads back (tuples -> lists)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if run_file.exists() and not fresh:
        old = json.loads(run_file.read_text())
        diff = sorted(
            k
            for k in set(old) | set(config)
            if old.get(k) != config.get(k) and not (k in LATER_FIELDS and k not in old)
        )
        if diff:
            raise InputError(
                f"{run_file.parent} holds results of another configuration (differs in "
                f"{', '.join(diff)}): use a new --out, or --fresh to discard them"
            )
    barrier()
    if rank == 0:
        if fresh and clear is not None:
            clear()
        atomic_write_json(run_file, config)
    barrier()
