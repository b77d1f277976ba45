"""Boxes to masks over a dataset: a detector's boxes in, the same records with COCO RLE masks out
(``leansam segment --images DIR --detections FILE --out FILE``).

Detections are read from a COCO results file (``[{image_id, category_id, bbox XYWH, score}]``), a
COCO instances file (its non-crowd annotations' boxes, score 1) or a folder of YOLO label files
(``<image stem>.txt``, one ``class cx cy w h [confidence]`` line per box, normalised to [0, 1]).
Each image's boxes are decoded in one batched decoder call (up to ``BOXES_PER_CALL`` boxes; SPEC
section 6's detector protocol: multimask output, the mask with the highest predicted IoU). Images
are decoded and resized in background workers and embedded ``image_batch`` at a time; rank r of W
takes chunks r, r + W, ... of ``image_batch`` consecutive images (sorted by id, see
:func:`leansam.amg.dataset.shard_chunks`), so results do not depend on the number of ranks. Each
image's records are written atomically (in a thread beside the model) to
``OUT.parts/<image id>.json``, so a killed run resumes where it stopped (``OUT.parts/run.json``
holds the configuration, and a run with another one is refused), and rank 0 merges them into
``OUT`` (sorted by image id, detection order kept) and writes ``OUT.summary.json`` when all are
done.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .amg.dataset import (
    batch_config,
    check_throughput_args,
    embed_chunks,
    shard_chunks,
    write_behind,
)
from .distributed import all_gather_objects, barrier, claim_run_folder, init_from_env
from .errors import InputError
from .eval.dataset import is_results_list
from .eval.predictors import SamMaskSource
from .eval.runner import SCORES
from .io import (
    IMAGE_SUFFIXES,
    atomic_write_json,
    ensure_dir,
    mask_to_coco_rle,
    read_json,
)

#: boxes per decoder call: all of an image's boxes in one call up to this (bounds the memory of
#: the full-resolution masks, 3 per box)
BOXES_PER_CALL = 64
#: files of a YOLO label folder that are not labels (LabelImg writes the class names there)
YOLO_NOT_LABELS = ("classes.txt",)


def read_detections(
    detections: str | os.PathLike, images_dir: str | os.PathLike
) -> tuple[dict[int, Path], dict[int, list[dict]]]:
    """(image id -> image file, image id -> its detections) of a COCO results file, a COCO
    instances file or a YOLO label folder. COCO boxes are XYWH pixels; YOLO boxes stay normalised
    (``"yolo"`` key) until the image's size is known. Image files of a results file are found by
    COCO's naming (the file whose stem is the id as a number, e.g. ``000000000139.jpg``); YOLO
    images get ids in sorted order of their names and every record names its ``file_name``.
    Raises InputError naming what is wrong."""
    images_dir, path = Path(images_dir), Path(detections)
    if not images_dir.is_dir():
        raise InputError(f"image folder not found: {images_dir}")
    if not path.exists():
        raise InputError(f"detections not found: {path}")
    files: dict[str, Path] = {}
    for p in sorted(images_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(p.stem, p)  # a stem as .jpg and .png: the first by name
    if path.is_dir():
        return _yolo(path, files)
    data = read_json(path, "detections file")
    if isinstance(data, dict) and {"images", "annotations"} <= data.keys():
        by_file = {_image_id(im, path): images_dir / im["file_name"] for im in data["images"]}
        dets: dict[int, list[dict]] = {i: [] for i in by_file}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0) and _image_id(a, path, "image_id") in dets:
                d = {"image_id": a["image_id"], "category_id": a.get("category_id"),
                     "bbox": _bbox(a, path), "score": 1.0}  # fmt: skip
                dets[a["image_id"]].append(d)
        return by_file, {i: d for i, d in dets.items() if d}
    if not is_results_list(data):
        raise InputError(
            f"{path} is neither a COCO results file ([{{image_id, category_id, bbox, score}}]), "
            "a COCO instances file nor a folder of YOLO .txt labels"
        )
    by_id = {int(stem): p for stem, p in files.items() if stem.isdecimal() and stem.isascii()}
    dets = {}
    for d in data:
        _bbox(d, path)
        dets.setdefault(_image_id(d, path, "image_id"), []).append(d)
    missing = sorted(set(dets) - set(by_id))
    if missing:
        raise InputError(
            f"{len(missing)} image ids of {path.name} have no image in {images_dir}: a results "
            f"file names an image by its id as COCO does ({missing[0]:012d}.jpg); for other "
            "names pass the COCO instances file instead"
        )
    return {i: by_id[i] for i in dets}, dets


def _image_id(record: dict, path: Path, key: str = "id") -> int:
    v = record.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError(f"{path.name}: image ids must be integers (COCO), got {v!r}")
    return v


def _bbox(record: dict, path: Path) -> list[float]:
    b = record.get("bbox")
    if not (
        isinstance(b, list)
        and len(b) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in b)
        and all(math.isfinite(v) for v in b)
        and b[2] > 0
        and b[3] > 0
    ):
        raise InputError(
            f"{path.name}: a bbox must be [x, y, width, height] in pixels with width and height "
            f"> 0, got {b!r}"
        )
    return b


def _yolo(folder: Path, files: dict[str, Path]) -> tuple[dict, dict]:
    labels = [p for p in sorted(folder.glob("*.txt")) if p.name not in YOLO_NOT_LABELS]
    if not labels:
        raise InputError(f"no YOLO .txt label files in {folder}")
    orphans = [lab.name for lab in labels if lab.stem not in files]
    if orphans:
        raise InputError(
            f"{len(orphans)} YOLO label files have no image of the same name in the image "
            f"folder, e.g. {orphans[0]}"
        )
    by_id, dets = {}, {}
    for i, lab in enumerate(labels):
        rows = []
        for n, line in enumerate(lab.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = [float(v) for v in parts]
                if len(values) not in (5, 6) or not all(map(math.isfinite, values)):
                    raise ValueError
            except ValueError:
                raise InputError(
                    f"{lab.name}:{n}: expected 'class cx cy w h [confidence]', got {line!r}"
                ) from None
            if values[3] <= 0 or values[4] <= 0:
                raise InputError(f"{lab.name}:{n}: box width and height must be > 0: {line!r}")
            rows.append(
                {"image_id": i, "file_name": files[lab.stem].name, "category_id": int(values[0]),
                 "yolo": values[1:5], "score": values[5] if len(values) == 6 else 1.0}
            )  # fmt: skip
        by_id[i] = files[lab.stem]
        if rows:
            dets[i] = rows
    return by_id, dets


def _pixel_boxes(dets: list[dict], height: int, width: int) -> np.ndarray:
    """N x 4 XYXY pixel boxes; YOLO's normalised centre boxes are converted (and their ``bbox``
    set in XYWH pixels, COCO's form)."""
    out = []
    for d in dets:
        if "yolo" in d:
            cx, cy, w, h = d.pop("yolo")
            d["bbox"] = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        x, y, w, h = d["bbox"]
        out.append([x, y, x + w, y + h])
    return np.asarray(out, dtype=np.float64)


def boxes_to_masks(
    predictor,
    images: dict[int, Path],
    detections: dict[int, list[dict]],
    out_file: str | os.PathLike,
    *,
    score: str = "detector",
    config: dict | None = None,
    fresh: bool = False,
    workers: int = 1,
    image_batch: int = 1,
    progress: bool = True,
) -> dict:
    """Masks for every detection of every image (see the module docstring); writes ``out_file``
    (a COCO results list with ``segmentation`` and ``predicted_iou``) and
    ``out_file.summary.json``; returns the summary (the same on every rank). ``config`` (model,
    detections' digest, ...) is checked against the parts of an earlier run (``fresh``: discard
    them). ``workers`` processes decode and resize images; ``image_batch`` images share an
    encoder call (1 by default)."""
    check_throughput_args(workers, image_batch)
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}: choose from {', '.join(SCORES)}")
    out = Path(out_file)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: name the output .json file")
    rank, world = init_from_env()
    parts = out.with_name(out.name + ".parts")
    if rank == 0:
        ensure_dir(parts)
    barrier()
    claim_run_folder(
        parts / "run.json",
        {**(config or {}), "score": score, **batch_config(image_batch)},
        fresh=fresh,
        clear=lambda: [p.unlink() for p in parts.glob("*.json") if p.name != "run.json"],
    )
    ids = sorted(detections)
    chunks = shard_chunks(len(ids), image_batch, rank, world)
    mine = [ids[k] for c in chunks for k in c]
    finished = {i for i in mine if (parts / f"{i}.json").exists()}  # by earlier runs
    # a chunk with any image left is embedded whole: the same batch as in an uninterrupted run
    todo = [c for c in chunks if any(ids[k] not in finished for k in c)]
    source = SamMaskSource(predictor, batch_size=BOXES_PER_CALL)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(finished), desc="boxes to masks", unit="img")
    labelled = 0
    failures: list[dict] = []
    t0 = time.perf_counter()
    files = [images[i] for i in ids]
    with write_behind() as submit:  # writing beside the model
        for j, image, embedding, error in embed_chunks(predictor, files, todo, workers=workers):
            i = ids[j]
            if i in finished:
                continue
            if image is None:
                failures.append({"image": os.fspath(images[i]), "reason": error})
            else:
                records = _records(source, image, embedding, detections[i], score)
                submit(atomic_write_json, parts / f"{i}.json", records)
                labelled += 1
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    gathered = all_gather_objects(
        {"labelled": labelled, "already": len(finished), "failures": failures, "seconds": seconds}
    )
    summary = {
        "images": len(ids),
        "labelled": sum(g["labelled"] for g in gathered),
        "already_done": sum(g["already"] for g in gathered),
        "skipped": sorted((f for g in gathered for f in g["failures"]), key=lambda f: f["image"]),
        "detections": sum(len(detections[i]) for i in ids if (parts / f"{i}.json").exists()),
        "seconds_rank0": seconds,
        "seconds_max": max(g["seconds"] for g in gathered),  # the slowest rank's
        "world_size": world,
    }
    if rank == 0:
        records = []
        for i in ids:
            p = parts / f"{i}.json"
            if p.exists():
                records += json.loads(p.read_text())
        atomic_write_json(out, records)
        atomic_write_json(out.with_name(out.name + ".summary.json"), summary)
    barrier()
    return summary


def _records(
    source: SamMaskSource, image: np.ndarray, embedding, dets: list[dict], score: str
) -> list[dict]:
    h, w = image.shape[:2]
    dets = [dict(d) for d in dets]
    # the prompt is the box clipped to the image (detectors overshoot the border); a box wholly
    # outside gets an empty mask with predicted IoU 0, without a decoder call
    boxes = np.clip(_pixel_boxes(dets, h, w), 0, [w, h, w, h])
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks = np.zeros((len(dets), h, w), dtype=bool)
    iou = np.zeros(len(dets), dtype=np.float32)
    if inside.any():
        source.predictor.set_embedding(embedding, (h, w))
        masks[inside], iou[inside] = source.predict_boxes(boxes[inside])
        source.predictor.reset_image()
    out = []
    for d, m, q in zip(dets, masks, iou, strict=True):
        s = float(d["score"]) * (float(q) if score == "detector*iou" else 1.0)
        out.append(
            {
                **d,
                "bbox": [float(v) for v in d["bbox"]],
                "score": s,
                "predicted_iou": float(q),
                "segmentation": mask_to_coco_rle(m),
            }
        )
    return out
