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

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, require
from ..modeling.sam import Sam
from ..predictor import SamPredictor, check_image
from ..progress import progress_bar
from .masks import (
    area_from_rle,
    box_area,
    build_all_layer_point_grids,
    coco_encode_rle,
    generate_crop_boxes,
    mask_to_rle,
    masks_to_boxes,
    nms,
    remove_small_regions,
    rle_to_mask,
    stability_score,
)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _xywh(box) -> list:
    box = [v.item() if hasattr(v, "item") else v for v in box]
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


# ---------------------------------------------------------------------------- the generator
class SamAutomaticMaskGenerator:
    """Drop-in for ``segment_anything.SamAutomaticMaskGenerator`` (same arguments and records)
    for every leansam model; ``runtime`` selects the image encoder's runtime, and the decoder's for
    ``torch-opt`` and the ``openvino`` runtimes (``calibration_images``: for the INT8 runtimes,
    :class:`SamPredictor`)."""

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
        calibration_images: list[np.ndarray] | None = None,
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
        if predictor is None:
            predictor = SamPredictor(model, runtime, calibration_images=calibration_images)
        self.predictor = predictor
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
        low_res, iou = model.decode(
            pred.features[:1], coords[:, None, :], labels[:, None], impl=pred.decode_impl
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
