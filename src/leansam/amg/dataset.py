"""Segment everything over a dataset (SAM's data engine as a tool): many images in, one SA-1B JSON
per image out, sharded over ``torchrun`` processes, resumable, and readable by ``leansam train``.

The sorted input list is cut into chunks of ``image_batch`` consecutive images, one encoder batch
each; rank r of W takes chunks r, r + W, ... (:func:`shard_chunks`), so every image is embedded in
the same batch whatever the number of ranks and the outputs do not depend on it. Each image's
result ``OUT/sa_<name>.json`` is written atomically, so a killed run resumes where it stopped (on
any number of ranks). An image that cannot be read is skipped, counted and named with its reason in
``OUT/summary.json``; it never stops the run. Throughput: decoding and resizing run in background
workers (``torch.utils.data.DataLoader``) while the model works, the encoder embeds a chunk in one
batch, the decoder takes ``points_per_batch`` prompts per call, and writing runs in a thread.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..distributed import all_gather_objects, barrier, claim_run_folder, init_from_env
from ..errors import InputError
from ..io import (
    IMAGE_SUFFIXES,
    atomic_write_json,
    atomic_write_png,
    coco_rle_to_mask,
    draw_overlay,
    ensure_dir,
    image_files,
    load_image,
)
from ..predictor import SamPredictor, resize_image
from .files import GENERATOR_ARGS, finite_or_none
from .generator import SamAutomaticMaskGenerator


def list_images(spec: str | os.PathLike) -> tuple[list[Path], Path]:
    """The images named by ``spec`` and the root their output names are relative to.

    ``spec`` is a folder (its image files, recursively, sorted), a glob pattern (``"imgs/*.jpg"``;
    ``**`` recurses), or a ``.txt`` list file (one path per line, relative to the list's folder;
    blank lines and ``#`` comments ignored). Image files are those with a suffix in
    ``leansam.io.IMAGE_SUFFIXES`` (any case). Raises InputError when nothing matches.
    """
    spec = os.fspath(spec)
    path = Path(spec)
    if path.is_dir():
        files = image_files(path)
        root = path
    elif path.suffix.lower() == ".txt" and not path.exists():
        raise InputError(f"image list not found: {spec}")
    elif path.suffix.lower() == ".txt" and path.is_file():
        root = path.parent
        files = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else root / p)
    elif glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        root = Path(_glob_root(spec))
    elif path.suffix.lower() in IMAGE_SUFFIXES and not path.exists():
        raise InputError(f"image not found: {spec}")
    else:
        raise InputError(
            f"{spec} is not an image, a folder, a glob pattern or a .txt list of images"
        )
    files = list(dict.fromkeys(files))  # a file listed twice is labelled once
    if not files:
        raise InputError(f"no images found in {spec} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: os.fspath(p)), root


def _glob_root(pattern: str) -> str:
    """The longest leading part of a glob pattern without wildcards."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return os.path.join(*fixed) if fixed else "."


def output_name(image: Path, root: Path) -> str:
    """``sa_<path relative to root, without suffix>`` with path separators and anything but
    letters, digits, ``-``, ``_`` and ``.`` replaced by ``_`` (unique for the files of one input
    unless two differ only in those characters, which :func:`label_images` refuses)."""
    try:
        rel = image.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(image.name)
    stem = rel.with_suffix("").as_posix()
    return "sa_" + re.sub(r"[^A-Za-z0-9._-]", "_", stem.replace("/", "__"))


def _check_image_batch(image_batch: int) -> None:
    if image_batch < 1:
        raise InputError(f"the encoder batch size must be at least 1, got {image_batch}")


def check_throughput_args(workers: int, image_batch: int) -> None:
    """Raise InputError for fewer than 0 ``workers`` or an ``image_batch`` below 1."""
    if workers < 0:
        raise InputError(f"workers must be 0 or more, got {workers}")
    _check_image_batch(image_batch)


def batch_config(image_batch: int) -> dict:
    """What a run records of its encoder batch: nothing at 1 (so that folders of runs from before
    the option resume), ``{"image_batch": n}`` otherwise (kernels may round differently)."""
    return {} if image_batch == 1 else {"image_batch": image_batch}


def shard_chunks(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Rank ``rank`` of ``world``'s chunks of the indices 0..n-1: consecutive chunks of
    ``batch_size`` (the last may be shorter), chunk c to rank c mod world. A chunk is one encoder
    batch; its images are the same whatever the number of ranks, so the embeddings (and all
    results) are too, even where a kernel's numerics depend on the batch."""
    _check_image_batch(batch_size)
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return chunks[rank::world]


class _Chunks(torch.utils.data.Dataset):
    """Chunk k: [(index, image or None, resized image or None, error or None)] of its files.
    Decoding and resizing run here, in the loader's worker; their errors are returned, not
    raised, so that one bad file does not stop the loader."""

    def __init__(self, files, chunks, image_size: int, model_format: str) -> None:
        self.files, self.chunks = files, chunks
        self.image_size, self.model_format = image_size, model_format

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        items = []
        for i in self.chunks[k]:
            try:
                image = load_image(self.files[i])
                resized = resize_image(image, self.image_size, "RGB", self.model_format)
            except Exception as e:
                items.append((i, None, None, str(e) or type(e).__name__))
            else:
                items.append((i, image, resized, None))
        return items


def _as_is(item):
    return item


def embed_chunks(
    predictor: SamPredictor, files: list[Path], chunks: list[list[int]], *, workers: int = 1
) -> Iterator[tuple[int, np.ndarray | None, torch.Tensor | None, str | None]]:
    """``(index, image, embedding, None)`` for every readable image of the chunks of indices into
    ``files`` (embedding 1 x C x h x w, from one encoder batch per chunk), ``(index, None, None,
    reason)`` for the others, in chunk order. Images are decoded and resized by ``workers``
    background processes (``torch.utils.data.DataLoader``; 0: in this process) while the model
    works."""
    loader = torch.utils.data.DataLoader(
        _Chunks(files, chunks, predictor.model.image_size, predictor.model.image_format),
        batch_size=None,
        collate_fn=_as_is,  # keep numpy images (the default converts them to tensors)
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    for items in loader:
        ok = [(image, resized) for _, image, resized, _ in items if image is not None]
        embeddings = iter(())
        if ok:
            predictor.set_torch_images(
                [torch.as_tensor(r).permute(2, 0, 1) for _, r in ok],
                [image.shape[:2] for image, _ in ok],
            )
            embeddings = iter(predictor.get_image_embedding().split(1))
            predictor.reset_image()
        for i, image, _, error in items:
            yield i, image, None if image is None else next(embeddings), error


@contextlib.contextmanager
def write_behind() -> Iterator[Callable[..., None]]:
    """``submit(fn, *args)`` running ``fn(*args)`` in one thread beside the caller, at most one
    call behind: each submit first waits for the previous call, whose error it raises; leaving
    the block waits for the last one (and raises its error)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None

        def submit(fn: Callable[..., None], *args) -> None:
            nonlocal pending
            if pending is not None:
                pending.result()
            pending = pool.submit(fn, *args)

        yield submit
        if pending is not None:
            pending.result()


def label_images(
    images: str | os.PathLike | tuple[list[Path], Path],
    sam,
    out_dir: str | os.PathLike,
    *,
    write_png: bool = False,
    write_overlay: bool = False,
    workers: int = 1,
    image_batch: int = 1,
    progress: bool = True,
    config: dict | None = None,
    fresh: bool = False,
    **generator_args,
) -> dict:
    """Segment everything in every image of ``images`` (a spec for :func:`list_images`, or its
    result) with ``sam`` and write ``out_dir/sa_<name>.json`` per image. Images inside
    ``out_dir`` (earlier outputs, when it lies in the input folder) are never inputs.

    Each JSON is SA-1B's layout, which ``leansam train finetune --data OUT`` reads as it is:
    ``{"image": {"image_id", "file_name" (relative to OUT), "height", "width"}, "annotations":
    [SAM's generator records in COCO RLE with an "id"], "config": {...}}``. With ``write_png`` the
    masks also go to ``OUT/<name>/<i>.png`` (0/255, by decreasing area), with ``write_overlay``
    to ``OUT/<name>.overlay.png``. Images whose JSON exists are skipped (resume); ``OUT/run.json``
    holds ``config`` and the generator's parameters, and a run with others is refused (``fresh``:
    discard the earlier results). ``image_batch`` images are embedded per encoder call (1 by
    default: no faster on a CPU, BENCHMARKS.md; try 8 for EfficientViT on a GPU), ``workers``
    processes decode and resize.
    ``generator_args`` are :class:`SamAutomaticMaskGenerator`'s. Returns the summary that rank 0
    writes to ``OUT/summary.json`` (images; labelled, masks and seconds of this run; images done
    by earlier runs; skipped images with reasons; ``masks_in_dataset``, the masks of every
    finished image; ``seconds_rank0`` and ``seconds_max``, the slowest rank's), the same on
    every rank.
    """
    check_throughput_args(workers, image_batch)
    files, root = images if isinstance(images, tuple) else list_images(images)
    out = Path(out_dir)
    inside = out.resolve()
    files = [f for f in files if inside not in f.resolve().parents]
    if not files:
        raise InputError(f"no input images outside the output folder {out}")
    names = [output_name(f, root) for f in files]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise InputError(f"two input images map to the same output name {dup[0]}: rename one")
    rank, world = init_from_env()
    if rank == 0:
        ensure_dir(out)
    barrier()
    gen = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **generator_args)
    run_config = {
        **(config or {}),
        **{k: getattr(gen, k) for k in GENERATOR_ARGS},
        **batch_config(image_batch),
    }
    claim_run_folder(out / "run.json", run_config, fresh=fresh, clear=lambda: _clear(out))
    chunks = shard_chunks(len(files), image_batch, rank, world)
    finished = {i for c in chunks for i in c if (out / f"{names[i]}.json").exists()}
    done_before = len(finished)  # by earlier runs
    masks_before = sum(
        len(json.loads((out / f"{names[i]}.json").read_text())["annotations"]) for i in finished
    )
    # a chunk with any image left is embedded whole: the same batch as in an uninterrupted run
    todo = [c for c in chunks if any(i not in finished for i in c)]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        total = sum(map(len, chunks))
        bar = tqdm(total=total, initial=done_before, desc="everything", unit="img")
    counts = {"labelled": 0, "masks": 0}
    skipped: list[dict] = []
    t0 = time.perf_counter()
    # writing (JSON, PNGs, overlays) runs in a thread beside the model, at most one image behind
    with write_behind() as submit:
        for i, image, embedding, error in embed_chunks(gen.predictor, files, todo, workers=workers):
            if i in finished:
                continue
            if image is None:
                skipped.append({"image": os.fspath(files[i]), "reason": error})
            else:
                records = gen.generate(image, embedding=embedding)
                records.sort(key=lambda r: r["area"], reverse=True)
                submit(_write, out, names[i], files[i], i, image, records, run_config,
                       write_png, write_overlay)  # fmt: skip
                counts["labelled"] += 1
                counts["masks"] += len(records)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    parts = all_gather_objects(
        {**counts, "skipped": skipped, "already_done": done_before, "masks_before": masks_before,
         "seconds": seconds}
    )  # fmt: skip
    summary = {
        "images": len(files),
        "labelled": sum(p["labelled"] for p in parts),
        "already_done": sum(p["already_done"] for p in parts),
        "masks": sum(p["masks"] for p in parts),
        # the whole dataset's masks, also those of images finished by earlier runs
        "masks_in_dataset": sum(p["masks"] + p["masks_before"] for p in parts),
        "skipped": sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["image"]),
        "seconds_rank0": seconds,
        # the run's labelling time: its slowest rank
        "seconds_max": max(p["seconds"] for p in parts),
        "world_size": world,
        "config": run_config,
    }
    if rank == 0:
        atomic_write_json(out / "summary.json", summary)
    barrier()
    return summary


def _clear(out: Path) -> None:
    """Delete the results of an earlier run in ``out`` (JSONs, PNG folders, overlays)."""
    for p in out.glob("sa_*"):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name.endswith((".json", ".overlay.png")):
            p.unlink()


def _write(out, name, path, image_id, image, records, config, write_png, write_overlay) -> None:
    h, w = image.shape[:2]
    anns = [
        {"id": k, **{key: finite_or_none(v) for key, v in r.items()}} for k, r in enumerate(records)
    ]
    if write_png or write_overlay:
        masks = [coco_rle_to_mask(r["segmentation"]) for r in records]
        if write_png:
            folder = out / name
            folder.mkdir(exist_ok=True)
            for k, m in enumerate(masks):
                atomic_write_png(folder / f"{k}.png", m.astype(np.uint8) * 255)
        if write_overlay:
            atomic_write_png(out / f"{name}.overlay.png", draw_overlay(image, masks))
    # the JSON last: its presence marks the image as done
    atomic_write_json(
        out / f"{name}.json",
        {
            "image": {
                "image_id": image_id,
                "file_name": os.path.relpath(path, out),
                "height": h,
                "width": w,
            },
            "annotations": anns,
            "config": config,
        },
    )
