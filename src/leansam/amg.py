"""Segment everything: ``SamAutomaticMaskGenerator`` with SAM's parameters and record format.

Same algorithm and results as ``segment_anything.SamAutomaticMaskGenerator`` (a grid of single
point prompts per crop, filtering by predicted IoU and stability score, box NMS within and across
crops, optional small-region clean-up), and faster:

* masks are filtered by predicted IoU on the decoder's output, *before* their full-resolution
  up-sampling (the reference up-samples every candidate, most of which the filter then drops);
* the image embedding is shared by all prompts of a batch (no copies), see
  :meth:`leansam.modeling.mask_decoder.MaskDecoder.predict_masks`;
* stability score, mask boxes and box NMS are vectorised tensor code (no torchvision).

Records: ``segmentation`` (H x W bool array, uncompressed RLE or COCO RLE by ``output_mode``),
``area``, ``bbox`` (XYWH), ``predicted_iou``, ``point_coords`` ([[x, y]]), ``stability_score``,
``crop_box`` (XYWH).
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, require
from .modeling.sam import Sam
from .predictor import SamPredictor, check_image
from .progress import progress_bar

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


# ---------------------------------------------------------------------------- grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """n x n points evenly spaced in [0, 1]^2 (cell centres), x fastest: (n*n) x 2."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """XYXY crop boxes: the whole image, then (2^i)^2 overlapping crops in layer i."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops)

    for i in range(n_layers):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        cw, ch = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((cw - overlap) * k) for k in range(n)]
        y0s = [int((ch - overlap) * k) for k in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + cw, im_w), min(y0 + ch, im_h)])
            layers.append(i + 1)
    return boxes, layers


# ---------------------------------------------------------------------------- mask utilities
def stability_score(masks: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks binarised at ``threshold + offset`` and ``threshold - offset`` (the first
    is a subset of the second, so it is their area ratio). masks: N x H x W logits."""
    inter = (masks > threshold + offset).flatten(1).sum(1, dtype=torch.int32)
    union = (masks > threshold - offset).flatten(1).sum(1, dtype=torch.int32)
    return inter / union


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """N x H x W bool -> N x 4 XYXY (inclusive pixel indices); [0, 0, 0, 0] for an empty mask."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(1)
    top = torch.where(rows, ar_h, h).amin(1)
    right = (cols * ar_w).amax(1)
    left = torch.where(cols, ar_w, w).amin(1)
    out = torch.stack([left, top, right, bottom], 1)
    empty = (right < left) | (bottom < top)
    return out * ~empty[:, None]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy box NMS (torchvision's semantics: a box is dropped when its IoU with a kept,
    higher-scoring box exceeds the threshold; ties keep the earlier box). Returns the kept
    indices by decreasing score."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    boxes = boxes.float()
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    area = box_area(b)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    iou = inter / (area[:, None] + area[None, :] - inter)
    over = (iou > iou_threshold).cpu().numpy()
    removed = np.zeros(len(b), dtype=bool)
    keep = []
    for i in range(len(b)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long)]


def mask_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """N x H x W bool -> uncompressed RLEs (column-major counts, starting with background), the
    format pycocotools' ``frPyObjects`` takes."""
    n, h, w = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1)
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero()
    starts = flat[:, 0].cpu().numpy()
    idx = change[:, 1].cpu().numpy() + 1
    bounds = np.searchsorted(change[:, 0].cpu().numpy(), np.arange(n + 1))
    out = []
    for i in range(n):
        cuts = np.concatenate([[0], idx[bounds[i] : bounds[i + 1]], [h * w]])
        counts = np.diff(cuts).tolist()
        out.append({"size": [h, w], "counts": [0, *counts] if starts[i] else counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    return np.repeat(values, rle["counts"]).reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    mask_utils = require("pycocotools.mask", "data")
    h, w = rle["size"]
    out = mask_utils.frPyObjects(rle, h, w)
    out["counts"] = out["counts"].decode("utf-8")
    return out


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than
    ``area_thresh`` pixels; returns the mask and whether it changed (SAM's post-processing)."""
    cv2 = require("cv2", "data")
    holes = mode == "holes"
    work = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(work, 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def _xywh(box) -> list:
    box = [v.item() if hasattr(v, "item") else v for v in box]
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


# ---------------------------------------------------------------------------- the generator
class SamAutomaticMaskGenerator:
    """Drop-in for ``segment_anything.SamAutomaticMaskGenerator`` (same arguments and records)
    for every leansam model; ``runtime`` selects the image encoder's runtime."""

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        runtime: str = "torch",
        predictor: SamPredictor | None = None,
        progress: bool = False,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise InputError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise InputError(
                f"unknown output_mode {output_mode!r}; choose one of {', '.join(OUTPUT_MODES)}"
            )
        if points_per_batch < 1:
            raise InputError("points_per_batch must be at least 1")
        if crop_n_layers < 0:
            raise InputError("crop_n_layers must be 0 or more")
        if points_per_side is not None:
            if points_per_side < 1:
                raise InputError("points_per_side must be at least 1")
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        if len(point_grids) < crop_n_layers + 1:
            raise InputError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1})")
        if output_mode == "coco_rle":
            require("pycocotools", "data")
        if min_mask_region_area > 0:
            require("cv2", "data")
        self.point_grids = point_grids
        self.points_per_side = points_per_side  # None when point_grids were given
        #: ``predictor`` shares an existing one (its runtime, compiled graphs) instead
        self.predictor = predictor if predictor is not None else SamPredictor(model, runtime)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        #: a progress bar on stderr per generate() call (crops x point batches); off by default
        self.progress = progress
        self._embedding: torch.Tensor | None = None  # set per generate() call
        self._bar = progress_bar(total=0, desc="", enabled=False)

    @torch.inference_mode()
    def generate(
        self, image: np.ndarray, *, embedding: torch.Tensor | None = None
    ) -> list[dict[str, Any]]:
        """All masks of an H x W x 3 uint8 RGB image, as SAM's records (see the module doc).
        ``embedding``: the whole image's embedding if already computed (``get_image_embedding``
        of a predictor on the same model): the first crop layer then skips the encoder."""
        self._embedding = embedding
        data = self._generate_masks(check_image(image))
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        rles = data["rles"]
        if self.output_mode == "coco_rle":
            segs = [coco_encode_rle(r) for r in rles]
        elif self.output_mode == "binary_mask":
            segs = [rle_to_mask(r) for r in rles]
        else:
            segs = rles
        return [
            {
                "segmentation": segs[i],
                "area": area_from_rle(rles[i]),
                "bbox": _xywh(data["boxes"][i]),
                "predicted_iou": data["iou_preds"][i].item(),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": data["stability_score"][i].item(),
                "crop_box": _xywh(data["crop_boxes"][i]),
            }
            for i in range(len(rles))
        ]

    # -- internals: a "data" dict holds equally long tensors (and the list "rles")
    @staticmethod
    def _cat(parts: list[dict]) -> dict:
        if not parts:
            return {
                "rles": [],
                "boxes": torch.zeros(0, 4),
                "iou_preds": torch.zeros(0),
                "points": torch.zeros(0, 2, dtype=torch.float64),
                "stability_score": torch.zeros(0),
                "crop_boxes": torch.zeros(0, 4),
            }
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "rles"}
        out["rles"] = [r for p in parts for r in p["rles"]]
        return out

    @staticmethod
    def _filter(data: dict, keep: torch.Tensor) -> dict:
        if keep.dtype == torch.bool:
            keep = keep.nonzero().flatten()
        idx = keep.tolist()
        out = {k: v[keep.to(v.device)] for k, v in data.items() if k != "rles"}
        out["rles"] = [data["rles"][i] for i in idx]
        return out

    def _generate_masks(self, image: np.ndarray) -> dict:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        batches = sum(-(-len(self.point_grids[k]) // self.points_per_batch) for k in layer_idxs)
        self._bar = progress_bar(
            total=batches, desc="segment everything", enabled=self.progress, unit="batch"
        )
        try:
            data = self._cat(
                [
                    self._process_crop(image, box, layer, orig_size)
                    for box, layer in zip(crop_boxes, layer_idxs, strict=True)
                ]
            )
        finally:
            self._bar.close()
        if len(crop_boxes) > 1:  # duplicates between crops: prefer masks from smaller crops
            keep = nms(data["boxes"], 1 / box_area(data["crop_boxes"]), self.crop_nms_thresh)
            data = self._filter(data, keep)
        return data

    def _process_crop(self, image, crop_box, layer, orig_size) -> dict:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        size = cropped.shape[:2]
        if layer == 0 and self._embedding is not None:
            self.predictor.set_embedding(self._embedding, size)  # the whole image, embedded
        else:
            self.predictor.set_image(cropped)
        points = self.point_grids[layer] * np.array(size)[None, ::-1]
        parts = []
        for i in range(0, len(points), self.points_per_batch):
            parts.append(
                self._process_batch(
                    points[i : i + self.points_per_batch], size, crop_box, orig_size
                )
            )
            self._bar.update(1)
        self.predictor.reset_image()
        data = self._cat(parts)
        keep = nms(data["boxes"], data["iou_preds"], self.box_nms_thresh)
        data = self._filter(data, keep)
        offset = torch.tensor([x0, y0, x0, y0])
        data["boxes"] = data["boxes"] + offset
        data["points"] = data["points"] + offset[:2]
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"])).reshape(-1, 4)
        return data

    def _process_batch(self, points, im_size, crop_box, orig_size) -> dict:
        pred, model = self.predictor, self.predictor.model
        orig_h, orig_w = orig_size
        # float64 coordinates into the prompt encoder, as the reference passes them (the +0.5 and
        # the normalisation then round the same way)
        coords = torch.as_tensor(pred.transform.apply_coords(points, im_size), device=pred.device)
        labels = torch.ones(len(coords), dtype=torch.int, device=pred.device)
        sparse, dense = model.prompt_encoder((coords[:, None, :], labels[:, None]), None, None)
        low_res, iou = model.mask_decoder(
            image_embeddings=pred.features[:1],
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            impl=pred.decode_impl,
        )
        c = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1).float()
        pts = torch.as_tensor(np.repeat(points, c, axis=0))
        keep = torch.arange(len(iou), device=iou.device)
        if self.pred_iou_thresh > 0.0:  # before up-sampling: same result, far less work
            keep = (iou > self.pred_iou_thresh).nonzero().flatten()
        masks = model.postprocess_masks(
            low_res[keep][:, None].float(), pred.input_size, pred.original_size
        )[:, 0]
        iou, pts = iou[keep], pts[keep.cpu()]
        stab = stability_score(masks, model.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            ok = stab >= self.stability_score_thresh
            masks, iou, pts, stab = masks[ok], iou[ok], pts[ok.cpu()], stab[ok]
        masks = masks > model.mask_threshold
        boxes = masks_to_boxes(masks)
        near = _near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if near.any():
            ok = ~near
            masks, iou, pts, stab, boxes = masks[ok], iou[ok], pts[ok.cpu()], stab[ok], boxes[ok]
        if tuple(crop_box) != (0, 0, orig_w, orig_h):
            x0, y0, x1, y1 = crop_box
            masks = F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=False)
        return {
            "rles": mask_to_rle(masks),
            "boxes": boxes.cpu(),
            "iou_preds": iou.cpu(),
            "points": pts,
            "stability_score": stab.cpu(),
        }

    @staticmethod
    def _postprocess_small_regions(data: dict, min_area: int, nms_thresh: float) -> dict:
        """Fill small holes, drop small islands, then NMS again preferring unchanged masks."""
        if not data["rles"]:
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            m, changed_h = remove_small_regions(rle_to_mask(rle), min_area, "holes")
            m, changed_i = remove_small_regions(m, min_area, "islands")
            masks.append(torch.as_tensor(m))
            scores.append(float(not (changed_h or changed_i)))
        masks_t = torch.stack(masks)
        boxes = masks_to_boxes(masks_t)
        keep = nms(boxes, torch.as_tensor(scores), nms_thresh)
        data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].clone())
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = mask_to_rle(masks_t[i][None])[0]
                data["boxes"][i] = boxes[i]
        return SamAutomaticMaskGenerator._filter(data, keep)


def _near_crop_edge(boxes: torch.Tensor, crop_box, orig_box, atol: float = 20.0) -> torch.Tensor:
    """Masks touching a crop edge that is not also an image edge (cut by the crop)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    b = (boxes + crop[None, [0, 1, 0, 1]].long()).float()
    near_crop = torch.isclose(b, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(1)


# ---------------------------------------------------------------------------- `leansam everything`
METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def everything(
    image_path,
    *,
    model: str,
    out_dir,
    checkpoint=None,
    device: str | None = None,
    runtime: str = "torch",
    progress: bool = False,
    **generator_args,
) -> dict:
    """Segment everything in one image and write into ``out_dir``: ``NNN.png`` per mask (0/255, by
    decreasing area, as SAM's ``amg.py``), ``metadata.csv`` (SAM's columns), ``masks.json`` (the
    records with COCO RLE, the configuration and timings) and ``overlay.png``. Returns the JSON
    record."""
    import os
    import time

    from .io import (
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_png,
        coco_rle_to_mask,
        draw_overlay,
        ensure_dir,
        load_image,
    )
    from .loading import load_model
    from .provenance import describe_environment
    from .registry import get_config

    image = load_image(image_path)
    get_config(model)
    out = ensure_dir(out_dir)
    sam = load_model(model, checkpoint, device=device)
    checkpoint = sam.checkpoint_path
    gen = SamAutomaticMaskGenerator(
        sam, output_mode="coco_rle", runtime=runtime, progress=progress, **generator_args
    )
    t0 = time.perf_counter()
    records = gen.generate(image)
    seconds = time.perf_counter() - t0
    records.sort(key=lambda r: r["area"], reverse=True)

    masks = [coco_rle_to_mask(r["segmentation"]) for r in records]
    lines = [METADATA_HEADER]
    for i, (r, m) in enumerate(zip(records, masks, strict=True)):
        atomic_write_png(out / f"{i}.png", m.astype(np.uint8) * 255)
        lines.append(
            ",".join(
                str(v)
                for v in (
                    i,
                    r["area"],
                    *r["bbox"],
                    *r["point_coords"][0],
                    r["predicted_iou"],
                    r["stability_score"],
                    *r["crop_box"],
                )
            )
        )
    atomic_write_bytes(out / "metadata.csv", ("\n".join(lines) + "\n").encode())
    atomic_write_png(out / "overlay.png", draw_overlay(image, masks))
    h, w = image.shape[:2]
    record = {
        "image": {"path": os.fspath(image_path), "height": h, "width": w},
        "config": {
            "model": model,
            "checkpoint": os.fspath(checkpoint) if checkpoint else None,
            "runtime": runtime,
            "device": str(sam.device),
            **{k: getattr(gen, k) for k in GENERATOR_ARGS},
        },
        "seconds": seconds,
        "environment": describe_environment(),
        "masks": records,
    }
    # strict JSON: an empty mask's stability score is 0 / 0 (NaN, as in SAM), written as null
    safe = [{k: _finite_or_none(v) for k, v in r.items()} for r in records]
    atomic_write_json(out / "masks.json", {**record, "masks": safe})
    return record


#: the generator arguments `leansam everything` exposes (and records)
GENERATOR_ARGS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)


def _finite_or_none(value):
    """NaN / infinity -> None (JSON has no such numbers); anything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
