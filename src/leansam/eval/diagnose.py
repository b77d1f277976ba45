"""Box-protocol diagnosis of a SAM-family model: where its box mIoU is lost.

For every ground-truth object of a COCO dataset, prompted with its box (SPEC section 6), this
measures the IoU with the ground truth of

- ``predicted``: the multimask output with the highest predicted IoU (the published protocol);
- ``oracle``: the best of the 3 multimask outputs by true IoU (what a perfect IoU head would pick);
- ``single``: the single-mask output (``multimask_output=False``);
- ``box_fill``: the box itself (the trivial baseline);

and, for the predicted mask, the share of empty masks, the ratio of its area to the ground truth's,
its IoU with the box (how much of a box the model draws) and the share of its low-res edges that
lie on the embedding grid's cell boundaries (``cell_edges``: 1 / 4 by chance at SAM's 4 low-res
pixels per cell, 1 for masks that only switch whole cells). Results are mIoU x 100 by COCO size
(``metrics.miou_by_size``). Used by MODEL_CARD.md's diagnosis and as the learning curve of
``leansam train`` (``eval_every``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.coco import ann_to_mask, xywh_to_xyxy
from ..io import load_image
from .dataset import EvalDataset
from .metrics import SIZES, mask_iou, miou_by_size, size_of
from .predictors import box_masks, ellipse_masks

CHOICES = ("predicted", "oracle", "single", "box_fill")


@torch.inference_mode()
def diagnose_boxes(model, dataset: EvalDataset, *, progress: bool = False) -> dict:
    """Run the box diagnosis of ``model`` (a ``Sam``) over ``dataset``.

    Returns ``{"mIoU": {choice: {size: mIoU x 100}}, "count": {size: n}, "empty": {size: share},
    "area_ratio": {size: median pred/gt area}, "box_iou": {size: mean IoU(pred, box)}}``; None
    where a size has no object. The model is put in eval mode and left there.
    """
    from ..predictor import SamPredictor

    model.eval()
    predictor = SamPredictor(model)
    rows: list[dict] = []
    images = dataset.images
    if progress:
        from tqdm import tqdm

        images = tqdm(images, desc="diagnose", unit="img")
    for info in images:
        objects = dataset.objects(info["id"])
        if not objects:
            continue
        image = load_image(dataset.path(info))
        h, w = image.shape[:2]
        predictor.set_image(image)
        boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in objects])
        t = torch.as_tensor(boxes, dtype=torch.float, device=predictor.device)
        t = predictor.transform.apply_boxes_torch(t, predictor.original_size)
        multi, iou_pred, low = predictor.predict_torch(None, None, t, multimask_output=True)
        single, _, _ = predictor.predict_torch(None, None, t, multimask_output=False)
        multi, single = multi.cpu().numpy(), single[:, 0].cpu().numpy()
        best = iou_pred.argmax(dim=1).cpu().numpy()
        chosen = low[torch.arange(len(best)), torch.as_tensor(best)] > model.mask_threshold
        per_cell = chosen.shape[-1] // max(model.prompt_encoder.image_embedding_size)
        edges = [_cell_edges(m, per_cell) for m in chosen.cpu().numpy()]
        fills = box_masks(boxes, h, w)
        for i, a in enumerate(objects):
            gt = ann_to_mask(a, h, w)
            fill = fills[i]
            ious3 = [mask_iou(m, gt) for m in multi[i]]
            pred = multi[i, best[i]]
            gt_area = max(int(gt.sum()), 1)
            rows.append(
                {
                    "area": float(a["area"]),
                    "predicted": ious3[best[i]],
                    "oracle": max(ious3),
                    "single": mask_iou(single[i], gt),
                    "box_fill": mask_iou(fill, gt),
                    "empty": not pred.any(),
                    "area_ratio": float(pred.sum()) / gt_area,
                    "box_iou": mask_iou(pred, fill),
                    "edges": edges[i],
                }
            )
    areas = [r["area"] for r in rows]
    out: dict = {"mIoU": {}, "count": miou_by_size(areas, [0.0] * len(rows))["count"]}
    for c in CHOICES:
        out["mIoU"][c] = miou_by_size(areas, [r[c] for r in rows])["mIoU"]
    for key, reduce in (("empty", np.mean), ("area_ratio", np.median), ("box_iou", np.mean)):
        out[key] = {}
        for s in SIZES:
            vals = [float(r[key]) for r in rows if s == "all" or size_of(r["area"]) == s]
            out[key][s] = float(reduce(vals)) if vals else None
    out["cell_edges"] = {}
    for s in SIZES:
        pairs = [r["edges"] for r in rows if s == "all" or size_of(r["area"]) == s]
        total = sum(n for _, n in pairs)
        out["cell_edges"][s] = sum(k for k, _ in pairs) / total if total else None
    return out


def _cell_edges(mask: np.ndarray, per_cell: int) -> tuple[int, int]:
    """(edges on a cell boundary, all edges) of a low-res H x W bool mask: an edge is a pair of
    neighbouring pixels that differ; it lies on the embedding grid's cell boundary when it falls
    between pixels ``per_cell * k - 1`` and ``per_cell * k``. Edges placed anywhere land there
    1 / ``per_cell`` of the time; masks that switch whole cells on and off, always."""
    cols = np.nonzero(mask[:, 1:] != mask[:, :-1])[1] + 1
    rows = np.nonzero(mask[1:] != mask[:-1])[0] + 1
    on = int((cols % per_cell == 0).sum() + (rows % per_cell == 0).sum())
    return on, len(cols) + len(rows)


def grid_ceiling(dataset: EvalDataset, *, cell: float = 16.0, frame: int = 1024) -> dict:
    """How well masks that only switch whole embedding cells on or off can do: for every object,
    the IoU with the ground truth of the box and of its inscribed ellipse, at pixel resolution and
    quantized to ``cell`` x ``cell`` cells of the ``frame`` (SAM's 64 x 64 grid over the 1024
    frame: 16 px; the image's long side resized to ``frame``, padding at the bottom / right, as
    in SAM's preprocessing), a cell being on where its centre lies in the shape; and of the object
    itself quantized the same way (a cell on where its centre lies in the object).

    A shape prior that switches whole cells (no image read) is bounded by the quantized box and
    ellipse; a mask of whole cells that follows the object, which needs the image, by the
    quantized object. Returns ``{"mIoU": {name: {size: mIoU x 100}}, "count": {size: n}}`` with
    names ``box``, ``ellipse``, ``box_cells``, ``ellipse_cells``, ``object_cells``."""
    rows: list[dict] = []
    for info in dataset.images:
        h, w = int(info["height"]), int(info["width"])
        side = cell * max(h, w) / frame  # a cell's side in image pixels
        # each pixel's cell centre, in image pixels
        cy = (np.floor((np.arange(h) + 0.5) / side) + 0.5) * side
        cx = (np.floor((np.arange(w) + 0.5) / side) + 0.5) * side
        for a in dataset.objects(info["id"]):
            gt = ann_to_mask(a, h, w)
            box = xywh_to_xyxy(a["bbox"])
            fill, ell = box_masks([box], h, w)[0], ellipse_masks([box], h, w)[0]
            fill_c = box_masks([box], h, w, at=(cy, cx))[0]
            ell_c = ellipse_masks([box], h, w, at=(cy, cx))[0]
            # the object itself on cells: each pixel takes the ground truth at its cell's centre
            iy = np.minimum(cy, h - 0.5).astype(int)
            ix = np.minimum(cx, w - 0.5).astype(int)
            obj_c = gt[iy[:, None], ix[None, :]]
            rows.append(
                {
                    "area": float(a["area"]),
                    "box": mask_iou(fill, gt),
                    "ellipse": mask_iou(ell, gt),
                    "box_cells": mask_iou(fill_c, gt),
                    "ellipse_cells": mask_iou(ell_c, gt),
                    "object_cells": mask_iou(obj_c, gt),
                }
            )
    areas = [r["area"] for r in rows]
    names = ("box", "ellipse", "box_cells", "ellipse_cells", "object_cells")
    return {
        "mIoU": {n: miou_by_size(areas, [r[n] for r in rows])["mIoU"] for n in names},
        "count": miou_by_size(areas, [0.0] * len(rows))["count"],
    }


def diagnosis_markdown(name: str, d: dict) -> str:
    """Markdown rows (one per choice, then the predicted mask's statistics) of a diagnosis."""
    fmt = lambda v, k=1.0: "n/a" if v is None else f"{v * k:.1f}"  # noqa: E731
    lines = [
        "| model | mask | all | small | medium | large |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in CHOICES:
        lines.append(f"| {name} | {c} | " + " | ".join(fmt(d["mIoU"][c][s]) for s in SIZES) + " |")
    for key, label, k in (
        ("empty", "empty predicted masks (%)", 100),
        ("area_ratio", "predicted / true area (median)", 1),
        ("box_iou", "IoU of predicted mask with its box x 100", 100),
        ("cell_edges", "low-res edges on cell boundaries (%)", 100),
    ):
        if key in d:  # older diagnoses have no cell_edges
            row = " | ".join(fmt(d[key][s], k) for s in SIZES)
            lines.append(f"| {name} | {label} | {row} |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def box_drawing(
    model, sides: tuple[int, ...] = (16, 32, 64, 128, 256, 512), *, count: int = 32, seed: int = 0
) -> dict[int, float]:
    """How well the prompt encoder and mask decoder alone draw a box: mean IoU between the box and
    the single-mask output (thresholded at 0, bilinearly upsampled to the 1024 frame) on a
    content-free (zero) image embedding, for ``count`` random boxes of about each side (0.7-1.4x,
    in pixels of SAM's 1024 frame). What a decoder can express from the prompt's positional encoding
    alone; SAM's own decoder relies on its image features instead."""
    pe = model.prompt_encoder
    frame = 1024
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    emb = torch.zeros(1, pe.embed_dim, *pe.image_embedding_size, device=device)
    out = {}
    for side in sides:
        wh = side * rng.uniform(0.7, 1.4, size=(count, 2))
        xy = rng.uniform(0, 1, size=(count, 2)) * (frame - wh)
        boxes = torch.as_tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        boxes = boxes.to(device)
        sparse, dense = pe(None, boxes, None)
        low, _ = model.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, False)
        drawn = torch.nn.functional.interpolate(low.float(), (frame, frame), mode="bilinear")[:, 0]
        drawn = drawn.cpu() > 0
        box = torch.from_numpy(box_masks(boxes.cpu().numpy(), frame, frame))
        inter = (drawn & box).flatten(1).sum(1).float()
        union = (drawn | box).flatten(1).sum(1).float().clamp(min=1)
        out[side] = float((inter / union).mean())
    return out
