"""SA-1B layout: ``sa_<id>.jpg`` + ``sa_<id>.json`` (COCO RLE masks), reading and writing.

``coco_to_sa1b`` converts a COCO instances dataset into this layout so that leansam's trainers read
one format; the reader skips unreadable images or annotation files with a warning count instead of
stopping a run.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError, require
from ..io import atomic_write_bytes, atomic_write_json, load_image, read_json
from .coco import ann_to_mask, load_coco

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"


def mask_record(mask: np.ndarray, ann_id: int, category_id: int | None = None) -> dict:
    """One SA-1B annotation: the mask as compressed COCO RLE, with bbox and area from the mask."""
    mask_utils = require("pycocotools.mask", "data")
    h, w = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask.sum()),
        "category_id": category_id,
    }


def write_sa1b_pair(
    out: Path, image_id: int, jpeg: bytes, h: int, w: int, records: list[dict]
) -> None:
    """Write ``sa_<id>.jpg`` then ``sa_<id>.json`` atomically; the JSON, written last, marks the
    pair as complete."""
    stem = f"sa_{image_id}"
    atomic_write_bytes(out / f"{stem}.jpg", jpeg)
    atomic_write_json(
        out / f"{stem}.json",
        {
            "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"{stem}.jpg"},
            "annotations": records,
        },
    )


def write_sa1b_scene(
    out: Path, image_id: int, image: np.ndarray, masks: np.ndarray, first_ann_id: int
) -> None:
    """A generated scene (H x W x 3 uint8 image, N x H x W bool masks) as ``sa_<id>.jpg`` (JPEG,
    quality 90) + ``sa_<id>.json``, annotation ids ``first_ann_id`` + 0..N-1."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    records = [mask_record(m, first_ann_id + k) for k, m in enumerate(masks)]
    write_sa1b_pair(out, image_id, buf.getvalue(), *image.shape[:2], records)


def check_scene_folder(out: Path, record: str, seed: int, tool: str) -> None:
    """The cheap checks before generated scenes go to ``out`` (``leansam data synth`` / ``paste``;
    run them before slow set-up). Raises InputError for an ``out`` that is a file, a negative
    ``seed``, or a folder holding SA-1B files without ``record`` (not written by ``tool``: never
    deleted, even with ``--fresh``)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if seed < 0:
        raise InputError(f"--seed must be 0 or more, not {seed}")
    if out.is_dir() and not (out / record).exists() and any(out.glob("sa_*.json")):
        raise InputError(f"--out {out} holds SA-1B files not written by {tool}: use a new folder")


def claim_scene_folder(
    out: Path, record: str, settings: dict, count: int, *, fresh: bool
) -> list[int]:
    """Create ``out`` and record in ``out/record`` the settings its scenes depend on; a rerun with
    other ones is refused (one-line InputError), ``fresh`` deletes the scenes there first.
    Returns the indices among ``range(count)`` whose ``sa_<i>.json`` is not there yet."""
    from ..distributed import claim_run_folder

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --out {out}: {e.strerror}") from None

    def clear() -> None:
        for f in [*out.glob("sa_*.json"), *out.glob("sa_*.jpg")]:
            f.unlink()

    claim_run_folder(out / record, settings, fresh=fresh, clear=clear)
    return [i for i in range(count) if not (out / f"sa_{i}.json").exists()]


def coco_to_sa1b(
    images_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    include_crowd: bool = False,
    progress: bool = True,
) -> dict:
    """Write every COCO image with at least one annotation (area >= 1) as ``sa_<image id>.jpg``
    plus ``sa_<image id>.json``. Masks are stored as compressed RLE decoded from the COCO
    segmentation (polygons or RLE), so they round-trip exactly; bbox and area are recomputed from
    the mask. JPEG files are copied byte for byte, other formats re-encoded as JPEG (quality 95).
    Existing outputs are kept (a rerun resumes). Returns counts."""
    require("pycocotools.mask", "data")  # fail before any work if missing
    images_dir, out = Path(images_dir), Path(out_dir)
    images, anns = load_coco(annotations)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "masks": 0, "skipped_images": 0, "existing": 0}
    todo = [im for im in images if anns.get(im["id"])]
    if progress:
        todo = require("tqdm", "data").tqdm(todo, desc="coco-to-sa1b", unit="img")
    for info in todo:
        stem = f"sa_{info['id']}"
        if (out / f"{stem}.json").exists() and (out / f"{stem}.jpg").exists():
            counts["existing"] += 1
            continue
        src = images_dir / info["file_name"]
        h, w = info["height"], info["width"]
        records = []
        for a in sorted(anns[info["id"]], key=lambda a: a["id"]):
            if a.get("area", 0) < 1 or (a.get("iscrowd", 0) and not include_crowd):
                continue
            m = ann_to_mask(a, h, w)
            if m.any():
                records.append(mask_record(m, a["id"], a.get("category_id")))
        if not records:
            continue
        try:
            data = src.read_bytes()
            if not data.startswith(_JPEG_MAGIC):
                buf = io.BytesIO()
                Image.fromarray(load_image(src)).save(buf, format="JPEG", quality=95)
                data = buf.getvalue()
        except (OSError, InputError) as e:
            log.warning("skipping %s: %s", src, e)
            counts["skipped_images"] += 1
            continue
        write_sa1b_pair(out, info["id"], data, h, w, records)
        counts["images"] += 1
        counts["masks"] += len(records)
    return counts


@dataclass
class SA1BSample:
    image: np.ndarray  # H x W x 3 uint8 RGB
    masks: np.ndarray  # N x H x W bool
    ids: list[int] = field(default_factory=list)


class SA1BDataset:
    """``sa_*.json`` files of a folder (sorted), each with its ``sa_*.jpg``.

    ``dataset[i]`` is an :class:`SA1BSample` or ``None`` when the image or its annotations cannot
    be read; ``skipped`` counts those (per process) and a warning names each one.

    Masks generated by a model (``leansam everything`` over a dataset) can be filtered by quality:
    annotations whose ``predicted_iou`` or ``stability_score`` is below ``min_predicted_iou`` /
    ``min_stability_score`` (or missing, when the threshold is above 0) are left out; an image
    left without masks counts as skipped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        min_predicted_iou: float = 0.0,
        min_stability_score: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.thresholds = {
            "predicted_iou": min_predicted_iou,
            "stability_score": min_stability_score,
        }
        if not self.root.is_dir():
            raise InputError(f"SA-1B folder not found: {self.root}")
        self.files = sorted(self.root.glob("sa_*.json"))
        if not self.files:
            raise InputError(f"no sa_*.json files in {self.root}")
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> SA1BSample | None:
        read = self._read(i, with_image=True)
        return None if read is None else SA1BSample(*read)

    def masks(self, i: int) -> np.ndarray | None:
        """File ``i``'s kept masks (N x H x W bool, H x W from the annotation file's ``image``
        record) without decoding the image, or ``None`` (counted in ``skipped``) when the
        annotation file cannot be read or keeps no mask. Unlike ``dataset[i]``, a missing or
        corrupt image, or one whose size differs from the record, is not noticed."""
        read = self._read(i, with_image=False)
        return None if read is None else read[1]

    def _read(self, i: int, with_image: bool) -> tuple[np.ndarray | None, np.ndarray, list] | None:
        path = self.files[i]
        try:
            data = read_json(path, "SA-1B annotation file")
            info = data["image"]
            if with_image:
                image = load_image(self.root / info.get("file_name", path.with_suffix(".jpg").name))
                h, w = image.shape[:2]
            else:
                image, h, w = None, int(info["height"]), int(info["width"])
            anns = [a for a in data["annotations"] if self._keep(a)]
            masks = [_rle_mask(a["segmentation"], h, w) for a in anns]
        except (InputError, KeyError, TypeError, ValueError) as e:
            self.skipped += 1
            log.warning("skipping %s: %s", path.name, e)
            return None
        if not masks:
            self.skipped += 1
            log.warning("skipping %s: no masks", path.name)
            return None
        return image, np.stack(masks), [a.get("id", k) for k, a in enumerate(anns)]

    def _keep(self, ann: dict) -> bool:
        for key, low in self.thresholds.items():
            if low > 0:
                v = ann.get(key)
                if v is None or not v >= low:
                    return False
        return True


def _rle_mask(rle: dict, h: int, w: int) -> np.ndarray:
    from ..io import coco_rle_to_mask

    if list(rle["size"]) != [h, w]:
        raise ValueError(f"mask size {rle['size']} does not match image {h}x{w}")
    return coco_rle_to_mask(rle)
