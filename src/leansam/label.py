"""Boxes to masks over a dataset: a detector's boxes in, the same records with COCO RLE masks out
(``leansam segment --images DIR --detections FILE --out FILE``).

Detections are read from a COCO results file (``[{image_id, category_id, bbox XYWH, score}]``), a
COCO instances file (its non-crowd annotations' boxes, score 1) or a folder of YOLO label files
(``<image stem>.txt``, one ``class cx cy w h [confidence]`` line per box, normalised to [0, 1]).
Each image's boxes are decoded in one batched decoder call (up to ``BOXES_PER_CALL`` boxes; SPEC
section 6's detector protocol: multimask output, the mask with the highest predicted IoU). Rank r
of W takes images r, r + W, ...; each image's records are written atomically to
``OUT.parts/<image id>.json``, so a killed run resumes where it stopped, and rank 0 merges them
into ``OUT`` (sorted by image id, detection order kept) when all are done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .distributed import all_gather_objects, barrier, init_from_env
from .errors import InputError
from .io import IMAGE_SUFFIXES, atomic_write_json, load_image, mask_to_coco_rle, read_json

SCORES = ("detector", "detector*iou")
#: boxes per decoder call: all of an image's boxes in one call up to this (bounds the memory of
#: the full-resolution masks, 3 per box)
BOXES_PER_CALL = 64


def read_detections(
    detections: str | os.PathLike, images_dir: str | os.PathLike
) -> tuple[dict[int, Path], dict[int, list[dict]]]:
    """(image id -> image file, image id -> its detections) of a COCO results file, a COCO
    instances file or a YOLO label folder. COCO boxes are XYWH pixels; YOLO boxes stay normalised
    (``"yolo"`` key) until the image's size is known. Image files of a results file are found by
    COCO's naming (the file whose stem is the id as a number, e.g. ``000000000139.jpg``); YOLO
    images get ids in sorted order of their names. Raises InputError naming what is wrong."""
    images_dir, path = Path(images_dir), Path(detections)
    if not images_dir.is_dir():
        raise InputError(f"image folder not found: {images_dir}")
    files = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if path.is_dir():
        return _yolo(path, files)
    data = read_json(path, "detections file")
    if isinstance(data, dict) and {"images", "annotations"} <= data.keys():
        by_file = {im["id"]: images_dir / im["file_name"] for im in data["images"]}
        dets = {i: [] for i in by_file}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0) and a["image_id"] in dets:
                dets[a["image_id"]].append(
                    {"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": a["bbox"], "score": 1.0}
                )  # fmt: skip
        return by_file, {i: d for i, d in dets.items() if d}
    if not isinstance(data, list) or not all(
        isinstance(d, dict) and {"image_id", "bbox", "score", "category_id"} <= d.keys()
        for d in data
    ):
        raise InputError(
            f"{path} is neither a COCO results file ([{{image_id, category_id, bbox, score}}]), "
            "a COCO instances file nor a folder of YOLO .txt labels"
        )
    by_id = {}
    for stem, p in files.items():
        if stem.isdigit():
            by_id[int(stem)] = p
    dets: dict[int, list[dict]] = {}
    for d in data:
        dets.setdefault(d["image_id"], []).append(d)
    missing = sorted(set(dets) - set(by_id), key=str)
    if missing:
        raise InputError(
            f"{len(missing)} image ids of {path.name} have no image in {images_dir} (COCO names a "
            f"file by its id, e.g. {int(missing[0]):012d}.jpg): wrong --images folder?"
        )
    return {i: by_id[i] for i in dets}, dets


def _yolo(folder: Path, files: dict[str, Path]) -> tuple[dict, dict]:
    labels = sorted(folder.glob("*.txt"))
    if not labels:
        raise InputError(f"no YOLO .txt label files in {folder}")
    by_id, dets = {}, {}
    for i, lab in enumerate(labels):
        if lab.stem not in files:
            raise InputError(f"{lab.name}: no image {lab.stem}.jpg / .png in the image folder")
        rows = []
        for n, line in enumerate(lab.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = [float(v) for v in parts]
                if len(values) not in (5, 6):
                    raise ValueError
            except ValueError:
                raise InputError(
                    f"{lab.name}:{n}: expected 'class cx cy w h [confidence]', got {line!r}"
                ) from None
            rows.append(
                {"image_id": i, "category_id": int(values[0]), "yolo": values[1:5],
                 "score": values[5] if len(values) == 6 else 1.0}
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
    progress: bool = True,
) -> dict:
    """Masks for every detection of every image (see the module docstring); writes ``out_file``
    (a COCO results list with ``segmentation`` and ``predicted_iou``) and returns a summary."""
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}: choose from {', '.join(SCORES)}")
    rank, world = init_from_env()
    out = Path(out_file)
    parts = out.with_name(out.name + ".parts")
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
    barrier()
    ids = sorted(detections)
    mine = ids[rank::world]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="boxes to masks", unit="img")
    done = skipped = 0
    failures: list[dict] = []
    t0 = time.perf_counter()
    for i in mine:
        part = parts / f"{i}.json"
        if part.exists():
            skipped += 1
        else:
            try:
                image = load_image(images[i])
            except InputError as e:
                failures.append({"image": os.fspath(images[i]), "reason": str(e)})
            else:
                atomic_write_json(part, _records(predictor, image, detections[i], score))
                done += 1
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    gathered = all_gather_objects({"done": done, "already": skipped, "failures": failures})
    summary = {
        "images": len(ids),
        "labelled": sum(g["done"] for g in gathered),
        "already_done": sum(g["already"] for g in gathered),
        "skipped": sorted((f for g in gathered for f in g["failures"]), key=lambda f: f["image"]),
        "seconds_rank0": seconds,
        "world_size": world,
    }
    if rank == 0:
        records = []
        for i in ids:
            p = parts / f"{i}.json"
            if p.exists():
                records += json.loads(p.read_text())
        atomic_write_json(out, records)
        summary["detections"] = len(records)
    barrier()
    return summary


def _records(predictor, image: np.ndarray, dets: list[dict], score: str) -> list[dict]:
    import torch

    h, w = image.shape[:2]
    dets = [dict(d) for d in dets]
    boxes = _pixel_boxes(dets, h, w)
    predictor.set_image(image)
    t = torch.as_tensor(boxes, dtype=torch.float, device=predictor.device)
    t = predictor.transform.apply_boxes_torch(t, predictor.original_size)
    chunks_m, chunks_q = [], []
    for k in range(0, len(t), BOXES_PER_CALL):  # one call for up to BOXES_PER_CALL boxes
        m, q, _ = predictor.predict_torch(
            None, None, t[k : k + BOXES_PER_CALL], multimask_output=True
        )
        best = q.argmax(dim=1)
        idx = torch.arange(len(best), device=best.device)
        chunks_m.append(m[idx, best].cpu().numpy())
        chunks_q.append(q[idx, best].float().cpu().numpy())
    masks, iou = np.concatenate(chunks_m), np.concatenate(chunks_q)
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
