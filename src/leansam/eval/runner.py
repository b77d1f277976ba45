"""``evaluate()``: run a protocol over a dataset, resumable and shardable, and report.

Each image is one unit of work whose result is written atomically to
``out/per_image/<id>.json``: an interrupted run resumes where it stopped, and under ``torchrun``
rank r takes images r, r + W, ...
The metrics are computed from the per-image records sorted by image id, so a sharded run reports
exactly what a single process reports.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..data.coco import ann_to_mask, xywh_to_xyxy
from ..distributed import all_gather_objects, barrier, claim_run_folder, init_from_env
from ..errors import InputError, require
from ..io import atomic_write_bytes, atomic_write_json, load_image, mask_to_coco_rle
from ..provenance import describe_environment
from .clicks import Clicker
from .dataset import EvalDataset, load_detections
from .metrics import coco_mask_ap, lvis_mask_ap, mask_iou, miou_by_size
from .predictors import MaskSource, as_mask_source

PROTOCOLS = ("box", "click", "detector")
SCORES = ("detector", "detector*iou")


def _box_record(src: MaskSource, image: np.ndarray, objects: list[dict]) -> dict:
    h, w = image.shape[:2]
    boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in objects])
    masks, _ = src.predict_boxes(boxes)
    ious = [mask_iou(m, ann_to_mask(a, h, w)) for m, a in zip(masks, objects, strict=True)]
    return {"objects": [_obj(a, iou) for a, iou in zip(objects, ious, strict=True)]}


def _click_record(src: MaskSource, image: np.ndarray, objects: list[dict], clicks) -> dict:
    h, w = image.shape[:2]
    gts = [ann_to_mask(a, h, w) for a in objects]
    clickers = [Clicker(gt) for gt in gts]
    preds = [np.zeros((h, w), dtype=bool) for _ in objects]
    ious: list[dict[str, float]] = [{} for _ in objects]
    for k in range(1, max(clicks) + 1):
        for c, pred in zip(clickers, preds, strict=True):
            c.next_click(pred)
        coords = np.array([c.coords for c in clickers], dtype=np.float64)
        labels = np.array([c.labels for c in clickers])
        preds = list(src.predict_clicks(coords, labels)[0])  # all clicks so far, fed together
        if k in clicks:
            for i, (p, gt) in enumerate(zip(preds, gts, strict=True)):
                ious[i][str(k)] = mask_iou(p, gt)
    return {
        "objects": [
            {
                **_obj(a, None),
                "iou": iou,
                "clicks": [[*xy, lab] for xy, lab in zip(c.coords, c.labels, strict=True)],
            }
            for a, iou, c in zip(objects, ious, clickers, strict=True)
        ]
    }


def _detector_record(src: MaskSource, image: np.ndarray, dets: list[dict], score: str) -> dict:
    if not dets:
        return {"detections": []}
    boxes = np.array([xywh_to_xyxy(d["bbox"]) for d in dets])
    masks, pred_iou = src.predict_boxes(boxes)
    out = []
    for d, m, q in zip(dets, masks, pred_iou, strict=True):
        s = float(d["score"]) * (float(q) if score == "detector*iou" else 1.0)
        out.append(
            {
                "image_id": d["image_id"],
                "category_id": d["category_id"],
                "bbox": [float(v) for v in d["bbox"]],
                "score": s,
                "predicted_iou": float(q),
                "segmentation": mask_to_coco_rle(m),
            }
        )
    return {"detections": out}


def _obj(ann: dict, iou: float | None) -> dict:
    return {"ann_id": ann["id"], "area": float(ann["area"]), "iou": iou}


def evaluate(
    model_or_predictor,
    dataset: EvalDataset,
    protocol: str,
    *,
    clicks: tuple[int, ...] = (1, 3, 5),
    detections: str | os.PathLike | None = None,
    score: str = "detector",
    out_dir: str | os.PathLike | None = None,
    fresh: bool = False,
    save_per_object: bool = False,
    plot: bool = False,
    progress: bool = True,
    config: dict | None = None,
) -> dict:
    """Evaluate a model (``Sam``, ``SamPredictor``, a baseline or any mask source) on ``dataset``.

    Protocols (SPEC section 6): ``box`` (GT-box mIoU by size), ``click`` (k-click mIoU for each k in
    ``clicks``), ``detector`` (masks from the boxes of a COCO results file, or ``"gt"`` for oracle
    boxes, scored by the detector score or ``detector*iou``; COCO / LVIS mask AP).

    With ``out_dir``, per-image results are kept there (resumable) and ``results.json`` /
    ``results.md`` written (with ``plot``, also ``iou_by_size.png``). Returns the results record.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}: choose from {', '.join(SCORES)}")
    clicks = tuple(sorted(set(int(k) for k in clicks)))
    if protocol == "click" and (not clicks or clicks[0] < 1):
        raise InputError("--clicks needs positive click counts, e.g. 1,3,5")
    if protocol == "detector" and detections is None:
        raise InputError("the detector protocol needs --detections RESULTS.json (or 'gt')")
    src = as_mask_source(model_or_predictor)
    rank, world = init_from_env()
    dets = load_detections(detections, dataset) if protocol == "detector" else None
    if protocol != "detector" and dataset.num_objects() == 0:
        raise InputError(
            f"{dataset.annotations} has no annotation with area >= 1 in the evaluated images"
        )

    run_config = {
        "protocol": protocol,
        "model": src.name,
        # resolved: the same folder reached by another path (relative, symlinked) resumes
        "images": os.path.realpath(dataset.images_dir),
        "annotations": os.path.realpath(dataset.annotations),
        "num_images": len(dataset.images),
        "clicks": list(clicks) if protocol == "click" else None,
        "detections": os.fspath(detections) if detections is not None else None,
        "score": score if protocol == "detector" else None,
        **(config or {}),
    }
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        claim_run_folder(
            out / "run.json",
            run_config,
            fresh=fresh,
            clear=lambda: [f.unlink() for f in (out / "per_image").glob("*.json")],
        )

    mine = list(dataset.images[rank::world])
    records: dict[int, dict] = {}
    bar = None
    if progress and rank == 0:
        tqdm = require("tqdm", "data").tqdm
        bar = tqdm(
            total=len(mine), desc=f"eval {protocol} {src.name}", unit="img", dynamic_ncols=True
        )
    t0 = time.perf_counter()
    for info in mine:
        iid = info["id"]
        path = out / "per_image" / f"{iid}.json" if out is not None else None
        if path is not None and path.exists():
            records[iid] = json.loads(path.read_text())  # finished by an earlier run
        else:
            objects = dataset.objects(iid)
            todo = dets[iid] if protocol == "detector" else objects
            image = None
            if todo:
                image = load_image(dataset.path(info))
                src.set_image(image)
            if protocol == "box":
                rec = _box_record(src, image, objects) if objects else {"objects": []}
            elif protocol == "click":
                rec = _click_record(src, image, objects, clicks) if objects else {"objects": []}
            else:
                rec = _detector_record(src, image, todo, score)
            records[iid] = {"image_id": iid, **rec}
            if path is not None:
                atomic_write_json(path, records[iid])
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0

    merged: dict[int, dict] = {}
    for part in all_gather_objects(records):
        merged.update(part)
    ordered = [merged[i] for i in sorted(merged)]
    metrics = _metrics(protocol, ordered, dataset, clicks)
    result = {
        "protocol": protocol,
        "metrics": metrics,
        "config": run_config,
        "world_size": world,
        "elapsed_s_rank0": elapsed,
        "environment": describe_environment(),
    }
    if out is not None and rank == 0:
        atomic_write_json(out / "results.json", result)
        atomic_write_bytes(out / "results.md", markdown(result).encode())
        if save_per_object and protocol != "detector":
            lines = [
                json.dumps({"image_id": r["image_id"], **o}) for r in ordered for o in r["objects"]
            ]
            atomic_write_bytes(out / "per_object.jsonl", ("\n".join(lines) + "\n").encode())
        if plot and protocol != "detector":
            from .plot import plot_iou_by_size

            objs = [o for r in ordered for o in r["objects"]]
            plot_iou_by_size(objs, out / "iou_by_size.png", f"{src.name}, {protocol} protocol")
        if protocol == "detector":
            segm = [d for r in ordered for d in r["detections"]]
            atomic_write_json(out / "segm_results.json", segm)
    barrier()
    return result


def _metrics(protocol: str, records: list[dict], dataset: EvalDataset, clicks) -> dict:
    if protocol == "detector":
        results = [
            {k: d[k] for k in ("image_id", "category_id", "bbox", "score", "segmentation")}
            for r in records
            for d in r["detections"]
        ]
        ids = [r["image_id"] for r in records]
        ap = lvis_mask_ap if dataset.is_lvis else coco_mask_ap
        return {"segm": ap(dataset.annotations, results, ids), "detections": len(results)}
    objs = [o for r in records for o in r["objects"]]
    areas = [o["area"] for o in objs]
    if protocol == "box":
        return miou_by_size(areas, [o["iou"] for o in objs])
    return {f"{k} clicks": miou_by_size(areas, [o["iou"][str(k)] for o in objs]) for k in clicks}


def _fmt(v: float | None, scale: float = 1.0) -> str:
    return "n/a" if v is None or v < 0 else f"{v * scale:.2f}"


def markdown(result: dict) -> str:
    """A one-row markdown table of the result (the EVALUATION.md format)."""
    cfg, m = result["config"], result["metrics"]
    if result["protocol"] == "box":
        head = "| model | all | small | medium | large | objects |\n|---|---:|---:|---:|---:|---:|"
        row = " | ".join(_fmt(m["mIoU"][s]) for s in ("all", "small", "medium", "large"))
        return f"{head}\n| {cfg['model']} | {row} | {m['count']['all']} |\n"
    if result["protocol"] == "click":
        ks = list(m)
        head = "| model | " + " | ".join(ks) + " | objects |\n|---|" + "---:|" * (len(ks) + 1)
        row = " | ".join(_fmt(m[k]["mIoU"]["all"]) for k in ks)
        return f"{head}\n| {cfg['model']} | {row} | {m[ks[0]]['count']['all']} |\n"
    segm = m["segm"]
    keys = list(segm)
    head = "| model | " + " | ".join(keys) + " | detections |\n|---|" + "---:|" * (len(keys) + 1)
    row = " | ".join(_fmt(segm[k], 100) for k in keys)
    return f"{head}\n| {cfg['model']} | {row} | {m['detections']} |\n"
