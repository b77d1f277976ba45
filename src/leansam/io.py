"""Image reading, mask encoding and drawing, atomic file writes."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from .errors import InputError, require

#: image files that folder readers pick up (stage 1, calibration)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it names a regular file; one-line :class:`InputError` otherwise (also
    for names the OS rejects, e.g. too long)."""
    path = Path(path)
    shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
    try:
        if not path.exists():
            raise InputError(f"{what} not found: {shown}")
        if not path.is_file():
            raise InputError(f"{what} path is not a file: {shown}")
    except OSError as e:
        raise InputError(f"{what} path {shown!r} is not usable: {e.strerror}") from None
    return path


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB (pixel grid as stored, no EXIF rotation, so that
    coordinates match COCO-style annotations)."""
    path = _existing_file(path, "image")
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {path}: not an image file, or corrupt") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e} (truncated or corrupt file?)") from None


def read_json(path: str | os.PathLike, what: str) -> object:
    """Parse a JSON file; a missing or malformed file is one :class:`InputError` naming ``what``."""
    path = _existing_file(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create an output folder (and parents) or raise a one-line :class:`InputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {path}: {e.strerror}") from None
    return path


def atomic_replace(path: str | os.PathLike, write) -> Path:
    """Write ``path`` through ``write(temp_path)`` on a temp file in the same folder, then rename:
    no half-written file is ever visible. The file gets the usual permissions (0666 less the
    umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (see :func:`atomic_replace`)."""
    return atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_png(path: str | os.PathLike, image: np.ndarray | Image.Image) -> Path:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def mask_to_coco_rle(mask: np.ndarray) -> dict:
    """H x W bool mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    mask_utils = require("pycocotools.mask", "data")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of :func:`mask_to_coco_rle`."""
    mask_utils = require("pycocotools.mask", "data")

    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


#: distinct colours for overlays (tab10)
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.float32,
)


def draw_overlay(
    image: np.ndarray,
    masks: list[np.ndarray],
    *,
    boxes: list[tuple[float, float, float, float] | None] | None = None,
    points: list[tuple[float, float, int]] | None = None,
    labels: list[str] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend coloured masks over the image, outline them, draw box and point prompts."""
    out = image.astype(np.float32).copy()
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(masks))]
    for m, color in zip(masks, colors, strict=True):
        out[m] = out[m] * (1 - alpha) + color * alpha
        # 1-px outline: mask pixels with a background 4-neighbour
        pad = np.pad(m, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        out[m & ~inner] = color
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for i, color in enumerate(colors):
        box = boxes[i] if boxes and i < len(boxes) else None
        if box is None:
            continue
        draw.rectangle(box, outline=tuple(int(c) for c in color), width=2)
        if labels and i < len(labels):
            draw.text((box[0] + 3, box[1] + 2), labels[i], fill=(255, 255, 255))
    for x, y, lab in points or []:
        r = 5
        fill = (40, 220, 40) if lab == 1 else (230, 40, 40)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255), width=2)
    return im
