"""Procedurally generated scenes for prompt-conditioned training (SA-1B layout).

Each scene is a textured background with 4-12 overlapping shapes (ellipses, rectangles, irregular
polygons) of random size, colour and texture; the masks are the visible part of every shape. Unlike
single-object photos, where the one annotated object is usually the salient one, these scenes can
only be segmented by following the prompt: leansam mixes them into the training of its own small
models (MODEL_CARD.md) so that a decoder trained from scratch learns box and point conditioning.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .sa1b import check_scene_folder, claim_scene_folder, mask_record, write_sa1b_scene


def _texture(rng: np.random.Generator, h: int, w: int, color: np.ndarray) -> np.ndarray:
    """Smooth random texture around ``color``: low-resolution noise, bicubically enlarged."""
    cells = int(rng.integers(2, 12))
    noise = rng.normal(0, rng.uniform(5, 40), (cells, cells, 3)).astype(np.float32)
    big = np.stack(
        [
            np.asarray(Image.fromarray(noise[..., c]).resize((w, h), Image.BICUBIC))
            for c in range(3)
        ],
        -1,
    )
    return np.clip(color[None, None] + big, 0, 255)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    size = float(np.exp(rng.uniform(np.log(8), np.log(0.6 * min(h, w)))))  # many small ones
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    kind = rng.integers(3)
    if kind == 0:
        a, b = size * rng.uniform(0.3, 1), size * rng.uniform(0.3, 1)
        draw.ellipse([cx - a, cy - b, cx + a, cy + b], fill=255)
    elif kind == 1:
        a, b = size * rng.uniform(0.3, 1), size * rng.uniform(0.3, 1)
        t = rng.uniform(0, np.pi)
        corners = [(-a, -b), (a, -b), (a, b), (-a, b)]
        pts = [
            (cx + x * np.cos(t) - y * np.sin(t), cy + x * np.sin(t) + y * np.cos(t))
            for x, y in corners
        ]
        draw.polygon(pts, fill=255)
    else:
        n = int(rng.integers(5, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = size * rng.uniform(0.35, 1.0, n)
        draw.polygon(
            [(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, angles, strict=True)],
            fill=255,
        )
    return np.asarray(im) > 127


def make_scene(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H x W x 3 uint8 image, N x H x W bool visible masks, N >= 1)."""
    h, w = (size, int(size * rng.uniform(0.6, 1.0)))[:: 1 if rng.random() < 0.5 else -1]
    image = _texture(rng, h, w, rng.uniform(0, 255, 3))
    owner = np.full((h, w), -1)
    n = int(rng.integers(4, 13))
    for k in range(n):
        m = _shape_mask(rng, h, w)
        image[m] = _texture(rng, h, w, rng.uniform(0, 255, 3))[m]
        owner[m] = k
    masks = np.stack([owner == k for k in range(n)])
    masks = masks[masks.reshape(n, -1).sum(1) >= 30]
    blur = ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2))
    image = np.asarray(Image.fromarray(image.astype(np.uint8)).filter(blur))
    return image, masks


def write_scenes(
    out_dir: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    size: int = 512,
    fresh: bool = False,
    progress: bool = True,
) -> int:
    """Write ``count`` scenes as ``sa_<i>.jpg`` + ``sa_<i>.json``; scene i depends only on (seed,
    i) and ``size`` (recorded in ``out_dir/synth.json``), and existing pairs are kept (a rerun
    resumes); ``fresh`` deletes the scenes there first. Returns the number written.
    A folder written before the settings were recorded is taken over when its first scene is the
    one these settings generate. Raises InputError for a file as ``out_dir``, other SA-1B files in
    it, a negative seed, or a rerun with other settings without ``fresh``."""
    from ..progress import progress_bar

    out = Path(out_dir)
    settings = {"seed": seed, "size": size}
    if out.is_dir() and not (out / "synth.json").exists() and seed >= 0:
        _adopt_unrecorded(out, settings)
    check_scene_folder(out, "synth.json", seed, "synth")
    todo = claim_scene_folder(out, "synth.json", settings, count, fresh=fresh)
    bar = progress_bar(
        total=count, initial=count - len(todo), desc="synthetic scenes", unit="scene",
        enabled=progress,
    )  # fmt: skip
    written = 0
    for i in todo:
        image, masks = make_scene(np.random.default_rng([seed, i]), size)
        bar.update()
        if not len(masks):
            continue
        write_sa1b_scene(out, i, image, masks, i * 100)
        written += 1
    bar.close()
    return written


def _adopt_unrecorded(out: Path, settings: dict) -> None:
    """Record ``settings`` for a folder of scenes written before ``synth.json`` existed, when its
    first scene's masks are, bit for bit, those the settings generate (else leave it unrecorded:
    the caller then refuses it)."""
    from ..errors import InputError
    from ..io import atomic_write_json, read_json

    files = sorted(out.glob("sa_*.json"), key=lambda f: (len(f.stem), f.stem))
    if not files or not files[0].stem[3:].isdigit():
        return
    i = int(files[0].stem[3:])
    try:
        recorded = [
            a["segmentation"]["counts"] for a in read_json(files[0], "SA-1B file")["annotations"]
        ]
    except (InputError, KeyError, TypeError):
        return
    _, masks = make_scene(np.random.default_rng([settings["seed"], i]), settings["size"])
    if recorded == [mask_record(m, 0)["segmentation"]["counts"] for m in masks]:
        atomic_write_json(out / "synth.json", settings)
