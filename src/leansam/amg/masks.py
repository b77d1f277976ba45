"""Mask utilities of segment everything: point grids, crop boxes, stability score, mask boxes, box
NMS, SAM's uncompressed run-length encoding and small-region clean-up (torch / numpy, no
torchvision)."""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch

from ..errors import require


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
