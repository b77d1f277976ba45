"""Image reading, mask encoding and drawing, atomic file writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from .errors import InputError, require

#: image files that folder readers pick up (stage 1, calibration, datasets): the formats
#: ``load_image`` reads
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``, any case) under ``folder``, recursively, sorted."""
    return sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


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


#: the largest image (pixels) :func:`load_image` decodes by default: Pillow's own
#: decompression-bomb threshold (89.5 MP; a 12 MP photo is far below it). SAM resizes every image
#: to a long side of 1024 (512) anyway; larger images only cost memory.
MAX_IMAGE_PIXELS = 89_478_485

#: Pillow modes with 16 bits per sample (greyscale PNG / TIFF)
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")

# serialises leansam's header reads: Pillow's limit and the warning filters are process-wide
_PROBE_LOCK = threading.RLock()


class ImageTooLargeError(InputError):
    """The image declares more pixels than the limit; raised before any pixel is decoded."""

    def __init__(self, what: str, width: int | None, height: int | None, limit: int) -> None:
        size = f"{width} x {height} = {width * height / 1e6:.1f} MP" if width else "too large"
        super().__init__(f"{what} is {size}; the limit is {limit / 1e6:.1f} MP: downscale it first")
        self.width, self.height, self.limit = width, height, limit


def _open_unchecked(fp, max_pixels: int) -> tuple[Image.Image | None, int | None, int | None]:
    """Re-open an image Pillow refused as a decompression bomb (more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS``) with Pillow's check lifted, header only: (image, W, H), the
    image only when it fits ``max_pixels`` (a caller's limit above Pillow's). Pillow's limit is
    a process-wide setting: it is lifted under a lock, for the header read only."""
    with _PROBE_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            fp.seek(0)
            im = Image.open(fp)
        except Exception:  # the header itself is unreadable: report no size
            return None, None, None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w * h <= max_pixels:
        return im, w, h
    im.close()
    return None, w, h


def open_image(fp, *, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image from a binary file object and check its declared size, reading the header
    only (no pixel is decoded here; :func:`image_to_rgb` decodes).

    Raises :class:`ImageTooLargeError` above ``max_pixels`` (also for files Pillow itself
    refuses as decompression bombs) and :class:`InputError` for data that is not an image."""
    try:
        # leansam checks the size itself, against its own limit, just below; the lock keeps
        # leansam's own threads from interleaving the (process-wide) warning filters
        with _PROBE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError:
        im, w, h = _open_unchecked(fp, max_pixels)
        if im is None:
            raise ImageTooLargeError(what, w, h, max_pixels) from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read {what}: not an image file, or corrupt") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read {what}: {e} (truncated or corrupt file?)") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLargeError(what, w, h, max_pixels)
    return im


def image_to_rgb(im: Image.Image, *, what: str = "image") -> np.ndarray:
    """Decode an opened image to H x W x 3 uint8 RGB, the pixel grid as stored (no EXIF
    rotation, so that coordinates match COCO-style annotations).

    Conversion by mode: 8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, HSV, with or without
    alpha) through Pillow's ``convert("RGB")`` (alpha dropped, as ``cv2.imread`` drops it);
    16-bit greyscale (I;16*, and mode I of a PNG, which is 16-bit by the PNG format) scaled to
    8 bits by ``>> 8``, as ``cv2.imread`` does, then repeated to 3 channels. 32-bit integer and
    floating-point images (mode I of TIFF etc., mode F) have no standard scale and raise a one-line
    :class:`InputError` (Pillow's own conversion would clip them to white without a word)."""
    try:
        im.load()
        if im.mode in _MODES_16BIT or (im.mode == "I" and im.format == "PNG"):
            grey = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
            return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        if im.mode in ("I", "F"):
            kind = "an integer" if im.mode == "I" else "a floating-point"
            source = f" {im.format}" if im.format else ""
            raise InputError(
                f"{what} is {kind} single-channel{source} image (mode {im.mode}), which has no "
                "standard 0..255 scale: convert it to 8 or 16 bits per channel first"
            )
        if im.mode == "La":  # premultiplied grey + alpha: Pillow has no direct conversion
            im = im.convert("LA")
        return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read {what}: {e} (truncated or corrupt file?)") from None


def decode_image(data: bytes, *, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS):
    """Encoded image bytes -> H x W x 3 uint8 RGB (:func:`open_image`, :func:`image_to_rgb`)."""
    with open_image(io.BytesIO(data), what=what, max_pixels=max_pixels) as im:
        return image_to_rgb(im, what=what)


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB (pixel grid as stored, no EXIF rotation, so that
    coordinates match COCO-style annotations). Modes are converted as :func:`image_to_rgb` says;
    the size is checked against ``max_pixels`` from the header, before decoding.

    Raises :class:`InputError` (one line) for a missing, unreadable or unsupported file and
    :class:`ImageTooLargeError` for one larger than ``max_pixels``."""
    path = _existing_file(path, "image")
    what = f"image {path}"
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise InputError(f"cannot open {what}: {e.strerror}") from None
    with f, open_image(f, what=what, max_pixels=max_pixels) as im:
        return image_to_rgb(im, what=what)


def read_json(path: str | os.PathLike, what: str) -> object:
    """Parse a JSON file; a missing or malformed file is one :class:`InputError` naming ``what``."""
    path = _existing_file(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


def _hash_file(h, path: str | os.PathLike) -> None:
    """Feed a file's contents to the hash ``h``, 1 MiB at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's contents (what ``sha256sum`` prints), read in 1 MiB chunks."""
    h = hashlib.sha256()
    _hash_file(h, path)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 over a file, or over a folder's files (sorted), each as its name, a zero byte and
    its contents, read in 1 MiB chunks: what a resumable job records of an input whose content may
    change under the same path (detections). Not a file's plain sha256: see :func:`file_sha256`."""
    h = hashlib.sha256()
    path = Path(path)
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            _hash_file(h, f)
    return h.hexdigest()


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create an output folder (and parents) or raise a one-line :class:`InputError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {path}: {e.strerror}") from None
    return path


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


#: the process's umask, read once at import: reading it means setting it, which would race with
#: files other threads create (labelling writes from a thread beside the model)
_UMASK = _read_umask()


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
        os.chmod(tmp, 0o666 & ~_UMASK)
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
    label_points: list[tuple[float, float] | None] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend coloured masks over the image, outline them, draw box and point prompts.

    ``labels[i]`` (e.g. a score) is written at the top-left corner of ``boxes[i]``, or, for a
    prompt without a box, beside ``label_points[i]`` (e.g. its first click)."""
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
        anchor = label_points[i] if label_points and i < len(label_points) else None
        if box is not None:
            draw.rectangle(box, outline=tuple(int(c) for c in color), width=2)
            anchor = (box[0] + 3, box[1] + 2)
        elif anchor is not None:
            anchor = (anchor[0] + 8, anchor[1] - 6)  # beside the point's marker
        if labels and i < len(labels) and anchor is not None:
            draw.text(anchor, labels[i], fill=(255, 255, 255))
    for x, y, lab in points or []:
        r = 5
        fill = (40, 220, 40) if lab == 1 else (230, 40, 40)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255), width=2)
    return im
