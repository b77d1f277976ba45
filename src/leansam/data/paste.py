"""Copy-paste scenes: real objects cut out with their masks and pasted onto other real images.

Simple Copy-Paste (Ghiasi et al., "Simple Copy-Paste is a Strong Data-Augmentation Method for
Instance Segmentation", CVPR 2021): objects of one image, cut along their masks, pasted at a random
scale and place onto another image, with no blending beyond a softened edge; the masks of the
result are the visible part of every object, the background image's own annotated objects
included (occluded where something was pasted over them). Written in SA-1B layout, so that the
trainers read the scenes like any other dataset: more objects per image, in more sizes and
contexts, from the same few real masks.

Scene ``i`` depends only on (seed, i) and the source folders; existing scenes are kept, so a
rerun resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import InputError
from ..io import read_json
from ..progress import progress_bar
from .sa1b import SA1BDataset, check_scene_folder, claim_scene_folder, write_sa1b_scene

#: masks smaller than this many pixels are dropped (objects to cut, and visible parts kept)
MIN_PIXELS = 30


def _resize(image: np.ndarray, masks: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """An image (bilinear) and its masks (nearest) scaled by ``scale``."""
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    im = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    ms = np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST))
            for m in masks
        ]
    )
    return im, ms > 127


def _areas(ds: SA1BDataset, i: int) -> np.ndarray | None:
    """The pixel areas of file ``i``'s masks from its annotation file's ``area`` fields (masks
    decoded only where one is missing), or None when the file cannot be read."""
    try:
        anns = read_json(ds.files[i], "SA-1B annotation file")["annotations"]
        areas = [a["area"] for a in anns if ds._keep(a)]
    except (InputError, KeyError, TypeError):
        masks = ds.masks(i)  # counts and names the unreadable file once
        return None if masks is None else masks.reshape(len(masks), -1).sum(1)
    return np.asarray(areas, dtype=float) if areas else None


class ObjectPool:
    """Every mask of at least ``min_pixels`` pixels in the SA-1B folders ``sources``, as (folder,
    file, mask) indices; cut-outs are read when drawn."""

    def __init__(self, sources: list[str | os.PathLike], *, min_pixels: int = 100) -> None:
        if not sources:
            raise InputError("copy-paste needs at least one source folder")
        self.datasets = [SA1BDataset(s) for s in sources]
        self.images, self.objects = [], []
        for d, ds in enumerate(self.datasets):
            for i in range(len(ds)):
                areas = _areas(ds, i)
                if areas is None:  # unreadable: neither a background nor a source of objects
                    continue
                self.images.append((d, i))
                self.objects += [(d, i, int(k)) for k in np.flatnonzero(areas >= min_pixels)]
        if not self.objects:
            raise InputError(f"no object of at least {min_pixels} pixels in {list(sources)}")

    def background(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random image of the sources and its masks (retried past unreadable ones)."""
        for _ in range(100):
            d, i = self.images[int(rng.integers(len(self.images)))]
            sample = self.datasets[d][i]
            if sample is not None:
                return sample.image, sample.masks
        raise InputError("no readable image in the copy-paste sources")

    def cut_out(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """A random object cropped to its box: (h x w x 3 pixels, h x w mask), or None if its
        image cannot be read."""
        d, i, k = self.objects[int(rng.integers(len(self.objects)))]
        sample = self.datasets[d][i]
        if sample is None:
            return None
        mask = sample.masks[k]
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        return sample.image[y0:y1, x0:x1], mask[y0:y1, x0:x1]


def make_paste_scene(
    pool: ObjectPool,
    rng: np.random.Generator,
    *,
    size: int = 512,
    objects: tuple[int, int] = (3, 10),
    object_sizes: tuple[float, float] = (0.03, 0.6),
) -> tuple[np.ndarray, np.ndarray, int]:
    """One scene: (H x W x 3 uint8 image with long side ``size``, N x H x W bool visible masks,
    number of pasted objects among the N, which come last).

    The background is a random source image resized to ``size``, its annotated objects kept.
    Then ``objects`` (inclusive range) cut-outs are pasted one over the other, each flipped with
    p 0.5 and scaled so that its box's longer side is log-uniform in ``object_sizes`` x ``size``,
    at a random place wholly inside the frame; each alpha edge is softened over about one pixel.
    A mask keeps its visible part, and is dropped when that is under ``MIN_PIXELS`` pixels."""
    image, masks = pool.background(rng)
    image, masks = _resize(image, masks, size / max(image.shape[:2]))
    canvas = image.astype(np.float32)
    h, w = canvas.shape[:2]
    visible = list(masks)
    n_bg = len(visible)
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        cut = pool.cut_out(rng)
        if cut is None:
            continue
        pixels, mask = cut
        if rng.random() < 0.5:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        side = float(np.exp(rng.uniform(*np.log(np.array(object_sizes) * size))))
        scale = min(side / max(mask.shape), h / mask.shape[0], w / mask.shape[1])
        pixels, mask = _resize(np.ascontiguousarray(pixels), mask[None], scale)
        mask = mask[0]
        if mask.sum() < MIN_PIXELS:
            continue
        oh, ow = mask.shape
        y, x = int(rng.integers(h - oh + 1)), int(rng.integers(w - ow + 1))
        alpha = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(0.7))
        a = np.asarray(alpha, np.float32)[..., None] / 255
        region = canvas[y : y + oh, x : x + ow]
        region[:] = region * (1 - a) + pixels.astype(np.float32) * a
        placed = np.zeros((h, w), bool)
        placed[y : y + oh, x : x + ow] = mask
        visible = [v & ~placed for v in visible] + [placed]
    areas = [int(v.sum()) for v in visible]
    keep = [k for k, a in enumerate(areas) if a >= MIN_PIXELS]
    n_pasted = sum(1 for k in keep if k >= n_bg)
    out = np.stack([visible[k] for k in keep]) if keep else np.zeros((0, h, w), bool)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), out, n_pasted


def write_paste_scenes(
    sources: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    size: int = 512,
    fresh: bool = False,
    progress: bool = True,
) -> int:
    """Write ``count`` copy-paste scenes (:func:`make_paste_scene`) from the SA-1B folders
    ``sources`` as ``sa_<i>.jpg`` + ``sa_<i>.json`` in ``out_dir``; scene i depends only on
    (seed, i), ``size`` and the sources (recorded in ``out_dir/paste.json``), and existing pairs
    are kept (a rerun resumes); ``fresh`` deletes the scenes there first. Returns the
    number written. Raises InputError for a missing or empty source folder, an ``out_dir`` that is
    a source or a file, a negative seed, or a rerun with other settings without ``fresh``."""
    out = Path(out_dir)
    if any(Path(s).resolve() == out.resolve() for s in sources):
        raise InputError(f"--out {out} is one of the sources: write the scenes elsewhere")
    check_scene_folder(out, "paste.json", seed, "copy-paste")
    pool = ObjectPool(sources)
    # the settings the scenes depend on: a rerun into the same folder must use the same ones
    settings = {"seed": seed, "size": size, "sources": [str(Path(p).resolve()) for p in sources]}
    todo = claim_scene_folder(out, "paste.json", settings, count, fresh=fresh)
    bar = progress_bar(
        total=count, initial=count - len(todo), desc="copy-paste scenes", unit="scene",
        enabled=progress,
    )  # fmt: skip
    written = 0
    for i in todo:
        for attempt in range(10):  # a scene left with no mask is drawn again, deterministically
            rng = np.random.default_rng([seed, i] + ([attempt] if attempt else []))
            image, masks, _ = make_paste_scene(pool, rng, size=size)
            if len(masks):
                break
        else:
            raise InputError(f"no mask of {MIN_PIXELS} pixels survives in 10 draws of scene {i}")
        bar.update()
        write_sa1b_scene(out, i, image, masks, i * 1000)
        written += 1
    bar.close()
    return written
