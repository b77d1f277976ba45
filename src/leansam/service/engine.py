"""The service's inference side, free of FastAPI and pydantic (``import leansam.service.engine``
works without the ``serve`` extra): upload checks (:func:`decode_image`), the embedding cache
(:class:`LRUCache` of :class:`CachedImage`), the :class:`Engine` (a model and a pool of
predictors) with its mask records, and the prompt checks that need the image
(:func:`validate_prompts`). Requests are read by attribute: the models of
:mod:`leansam.service.schemas` or anything with the same fields."""

from __future__ import annotations

import base64
import hashlib
import io
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..io import ImageTooLargeError, image_to_rgb, mask_to_coco_rle, open_image
from ..io import decode_image as io_decode_image
from ..prompts import check_prompts
from .errors import ServiceError
from .limits import Limits

if TYPE_CHECKING:  # typing only: the engine runs without pydantic
    from .schemas import EverythingRequest, MaskRequest

#: upload formats, recognised by content (PIL's format detection), never by file name
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


# ---------------------------------------------------------------------------------------- images
def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Upload bytes -> H x W x 3 uint8 RGB, checking format by content, size from the header
    before any pixel is decoded (413, also for decompression bombs), and completeness. Modes are
    converted as :func:`leansam.io.image_to_rgb` says (16-bit scaled, 32-bit / float refused with
    400); the pixel grid is used as stored (no EXIF rotation), like ``leansam segment``."""
    if not data:
        raise ServiceError(400, "empty upload: send the image as form field 'file'")
    if len(data) > limits.max_upload_bytes:
        raise ServiceError(413, _too_large(len(data), limits))
    try:
        im = open_image(io.BytesIO(data), max_pixels=limits.max_pixels)
    except ImageTooLargeError as e:
        raise ServiceError(413, str(e)) from None
    except InputError:
        raise ServiceError(
            415, f"not an image: accepted formats are {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    with im:
        if im.format not in ACCEPTED_FORMATS:
            raise ServiceError(
                415, f"{im.format} images are not accepted: use {', '.join(ACCEPTED_FORMATS)}"
            )
        try:
            return image_to_rgb(im, what=f"{im.format} image")
        except InputError as e:
            raise ServiceError(400, str(e)) from None


def _too_large(n: int, limits: Limits) -> str:
    return f"upload of {n} bytes exceeds the limit of {limits.max_upload_bytes} bytes"


def mask_png(mask: np.ndarray) -> str:
    """H x W bool -> base64 PNG (8-bit grey, 255 = mask)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(ys):
        return [0, 0, 0, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def _mask_record(mask: np.ndarray, score: float, output: list[str]) -> dict:
    rec: dict[str, Any] = {"score": score, "area": int(mask.sum()), "bbox": _bbox(mask)}
    if "rle" in output:
        rec["rle"] = mask_to_coco_rle(mask)
    if "png" in output:
        rec["png"] = mask_png(mask)
    return rec


# ----------------------------------------------------------------------------------------- cache
@dataclass
class CachedImage:
    """One uploaded image: its embedding, size, upload bytes and recent low-res masks."""

    image_id: str
    features: torch.Tensor
    height: int
    width: int
    data: bytes
    mask_inputs: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)


class LRUCache:
    """Bounded, thread-safe map of image id -> :class:`CachedImage` (least recently used out)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: str) -> CachedImage | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, item: CachedImage) -> None:
        with self._lock:
            self._items[item.image_id] = item
            self._items.move_to_end(item.image_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------------------- engine
class Engine:
    """A model and ``size`` predictors sharing it (one per concurrent inference job); except
    for ``torch-opt``, they share one encoder and decoder runtime too
    (:meth:`SamPredictor.copy`)."""

    def __init__(
        self,
        model,
        *,
        name: str,
        runtime: str = "torch",
        size: int = 1,
        calibration_images: list | None = None,
        **info,
    ) -> None:
        from ..predictor import SamPredictor

        self.model, self.name, self.runtime = model, name, runtime
        self.info = {"name": name, "runtime": runtime, "image_size": model.image_size, **info}
        self._pool: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the per-image mask-input memories
        first = SamPredictor(model, runtime, calibration_images=calibration_images)
        self._pool.put(first)
        for _ in range(size - 1):
            # torch-opt compiles per predictor (a shared torch.compile function would be
            # compiled by the first concurrent calls at once); every other runtime is built once
            # (an INT8 graph's calibration, a runtime session) and shared by the pool
            if runtime == "torch-opt":
                self._pool.put(SamPredictor(model, runtime))
            else:
                self._pool.put(first.copy())

    def _with_predictor(self, fn: Callable):
        predictor = self._pool.get()
        try:
            return fn(predictor)
        finally:
            self._pool.put(predictor)

    def embed(self, image: np.ndarray) -> torch.Tensor:
        def run(p):
            p.set_image(image)
            out = p.get_image_embedding().clone()
            p.reset_image()
            return out

        return self._with_predictor(run)

    def masks(self, item: CachedImage, req: MaskRequest, limits: Limits) -> dict:
        points = np.asarray(req.points, dtype=np.float64) if req.points else None
        labels = np.asarray(req.labels, dtype=np.int64) if req.points else None
        boxes = np.asarray(req.boxes, dtype=np.float64) if req.boxes else None
        n_sets = len(boxes) if boxes is not None else 1  # several boxes come without points
        mask_input = None
        if req.mask_input_id is not None:
            with self._lock:
                mask_input = item.mask_inputs.get(req.mask_input_id)
            if mask_input is None:
                raise ServiceError(
                    404, f"unknown mask_input_id {req.mask_input_id!r} for this image (only the "
                    f"last {limits.mask_inputs_per_image} masks are kept)",
                )  # fmt: skip

        if boxes is not None and len(boxes) == 1:
            boxes = boxes[0]  # one prompt set: SAM's shapes

        def run(p):
            p.set_embedding(item.features, (item.height, item.width))
            try:
                return p.predict(points, labels, boxes, mask_input, req.multimask)
            finally:
                p.reset_image()

        masks, scores, low_res = self._with_predictor(run)
        if n_sets == 1:
            masks, scores, low_res = masks[None], scores[None], low_res[None]
        results = []
        for m, s, lr in zip(masks, scores, low_res, strict=True):
            order = np.argsort(-s, kind="stable")
            best_id = hashlib.sha1(lr[order[0]].tobytes()).hexdigest()[:16]
            with self._lock:
                item.mask_inputs[best_id] = lr[order[0]][None].astype(np.float32)
                while len(item.mask_inputs) > limits.mask_inputs_per_image:
                    item.mask_inputs.popitem(last=False)
            results.append(
                {
                    "masks": [_mask_record(m[k], float(s[k]), req.output) for k in order],
                    "mask_input_id": best_id,
                }
            )
        return {"image_id": item.image_id, "results": results}

    def everything(self, item: CachedImage, req: EverythingRequest) -> dict:
        from ..amg import SamAutomaticMaskGenerator

        # checked on upload; decoded the same way again (16-bit scaling included)
        image = io_decode_image(item.data, max_pixels=item.height * item.width)

        def run(p):
            amg = SamAutomaticMaskGenerator(
                self.model,
                points_per_side=req.points_per_side,
                pred_iou_thresh=req.pred_iou_thresh,
                stability_score_thresh=req.stability_score_thresh,
                box_nms_thresh=req.box_nms_thresh,
                min_mask_region_area=req.min_mask_region_area,
                predictor=p,
            )
            return amg.generate(image, embedding=item.features)

        records = self._with_predictor(run)
        out = []
        for r in records:
            rec = _mask_record(r["segmentation"], float(r["predicted_iou"]), req.output)
            rec.update(
                stability_score=float(r["stability_score"]),
                point_coords=[[float(v) for v in pt] for pt in r["point_coords"]],
            )
            out.append(rec)
        return {"image_id": item.image_id, "masks": out}


# --------------------------------------------------------------------------------------- prompts
def validate_prompts(req: MaskRequest, item: CachedImage, limits: Limits) -> None:
    """Prompt checks that need the image (:func:`leansam.prompts.check_prompts`, the CLI's
    rules too, with the service's limits); a failed check is a 422."""
    try:
        check_prompts(
            req.points,
            req.labels,
            req.boxes,
            item.width,
            item.height,
            max_points=limits.max_points,
            max_boxes=limits.max_prompts,
        )
    except InputError as e:
        raise ServiceError(422, str(e)) from None
