"""What the evaluation runs: SAM-family models, and baselines that need no weights.

Every mask source has the same small interface, so protocols never special-case a model:

    set_image(image: H x W x 3 uint8 RGB)
    predict_boxes(boxes: P x 4 XYXY) -> (masks P x H x W bool, scores P)
    predict_clicks(coords: P x K x 2 (x, y), labels: P x K) -> (masks P x H x W bool, scores P)
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import numpy as np
import torch

from ..errors import InputError, require

BASELINES = ("box-fill", "ellipse-fill", "grabcut")


class MaskSource(Protocol):
    name: str

    def set_image(self, image: np.ndarray) -> None: ...

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def predict_clicks(
        self, coords: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


class SamMaskSource:
    """A SAM-family model through :class:`~leansam.SamPredictor`: multimask output, keep the mask
    with the highest predicted IoU (the papers' protocol); prompts decoded in batches."""

    def __init__(self, predictor, *, name: str = "sam", batch_size: int = 16) -> None:
        self.predictor = predictor
        self.name = name
        self.batch_size = batch_size
        #: the file the model's weights came from (None: random weights or not known)
        self.checkpoint = getattr(predictor.model, "checkpoint_path", None)

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def _predict_batched(self, **prompts: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        n = next(len(v) for v in prompts.values() if v is not None)
        masks, scores = [], []
        for i in range(0, n, self.batch_size):
            chunk = {
                k: None if v is None else v[i : i + self.batch_size] for k, v in prompts.items()
            }
            m, iou, _ = self.predictor.predict_torch(
                chunk["coords"], chunk["labels"], chunk["boxes"], multimask_output=True
            )
            best = iou.argmax(dim=1)
            idx = torch.arange(len(best), device=best.device)
            masks.append(m[idx, best].cpu().numpy())
            scores.append(iou[idx, best].float().cpu().numpy())
        return np.concatenate(masks), np.concatenate(scores)

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.predictor
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float64), dtype=torch.float, device=p.device)
        t = p.transform.apply_boxes_torch(t, p.original_size)
        return self._predict_batched(coords=None, labels=None, boxes=t)

    def predict_clicks(
        self, coords: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        p = self.predictor
        c = torch.as_tensor(
            np.asarray(coords, dtype=np.float64), dtype=torch.float, device=p.device
        )
        c = p.transform.apply_coords_torch(c, p.original_size)
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.int, device=p.device)
        return self._predict_batched(coords=c, labels=lab, boxes=None)


def _sample_points(
    h: int, w: int, at: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    if at is None:
        return np.arange(h, dtype=np.float64) + 0.5, np.arange(w, dtype=np.float64) + 0.5
    ys, xs = (np.asarray(v, dtype=np.float64).reshape(-1) for v in at)
    if len(ys) != h or len(xs) != w:
        raise ValueError(f"at: need {h} ys and {w} xs, got {len(ys)} and {len(xs)}")
    return ys, xs


def box_masks(
    boxes: np.ndarray, h: int, w: int, *, at: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """P x H x W masks of the pixels whose centres lie inside each XYXY box (image pixels).

    With ``at = (ys, xs)`` (an H- and a W-vector, in image pixels) mask[p, i, j] tests the sample
    point (xs[j], ys[i]) instead of the pixel centre (``leansam.eval.diagnose.grid_ceiling``
    passes each pixel's cell centre). Raises ValueError when their lengths are not H and W."""
    ys, xs = _sample_points(h, w, at)
    ys, xs = ys[None, :, None], xs[None, None, :]
    b = np.asarray(boxes, dtype=np.float64)[:, :, None, None]
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])


class BoxFill:
    """Baseline: the mask is the box (pixel centres inside it). Needs a box prompt."""

    name = "box-fill"

    def set_image(self, image: np.ndarray) -> None:
        self.shape = image.shape[:2]

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return box_masks(boxes, *self.shape), np.ones(len(boxes), dtype=np.float32)

    def predict_clicks(self, coords, labels):
        raise InputError("box-fill needs a box: use --protocol box or detector")


def ellipse_masks(
    boxes: np.ndarray, h: int, w: int, *, at: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """P x H x W masks of the pixels whose centres (or the sample points ``at``, as in
    :func:`box_masks`) lie in the ellipse inscribed in each XYXY box."""
    ys, xs = _sample_points(h, w, at)
    ys, xs = ys[:, None], xs[None, :]
    out = np.empty((len(boxes), h, w), dtype=bool)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        rx, ry = max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
        out[k] = ((xs - (x0 + x1) / 2) / rx) ** 2 + ((ys - (y0 + y1) / 2) / ry) ** 2 <= 1
    return out


class EllipseFill(BoxFill):
    """Baseline: the ellipse inscribed in the box (a shape prior without looking at the image:
    most objects fill their box's centre more than its corners). Needs a box prompt."""

    name = "ellipse-fill"

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ellipse_masks(boxes, *self.shape), np.ones(len(boxes), dtype=np.float32)

    def predict_clicks(self, coords, labels):
        raise InputError("ellipse-fill needs a box: use --protocol box or detector")


class GrabCut:
    """Baseline: OpenCV GrabCut (5 iterations, fixed RNG seed per object).

    From a box: initialised with the box as the region of interest (outside = sure background).
    From clicks: a small disk of sure foreground / background at each click, a disk of radius
    r = min(H, W) / 8 of probable foreground around positive clicks, probable background elsewhere,
    on a window of 2r around the positive clicks (outside it: background; the full image would cost
    about ten times as much)."""

    name = "grabcut"

    def __init__(self, iterations: int = 5, seed: int = 0) -> None:
        self.cv2 = require("cv2", "data")
        self.iterations = iterations
        self.seed = seed

    def set_image(self, image: np.ndarray) -> None:
        self.bgr = np.ascontiguousarray(image[..., ::-1])

    def _run(self, bgr: np.ndarray, mask: np.ndarray, rect=None) -> np.ndarray:
        cv2 = self.cv2
        cv2.setRNGSeed(self.seed)  # deterministic per object, whatever ran before
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        mode = cv2.GC_INIT_WITH_RECT if rect is not None else cv2.GC_INIT_WITH_MASK
        # degenerate input (e.g. a box with no background around it) leaves the init mask
        with contextlib.suppress(cv2.error):
            cv2.grabCut(bgr, mask, rect, bgd, fgd, self.iterations, mode)
        return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.bgr.shape[:2]
        out = []
        for box_mask, box in zip(box_masks(boxes, h, w), np.asarray(boxes), strict=True):
            x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
            x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
            if x1 - x0 < 2 or y1 - y0 < 2:
                out.append(box_mask)  # too small for GrabCut: fall back to the box
                continue
            seg = self._run(self.bgr, np.zeros((h, w), np.uint8), (x0, y0, x1 - x0, y1 - y0))
            out.append(seg if seg.any() else box_mask)
        return np.stack(out), np.ones(len(out), dtype=np.float32)

    def predict_clicks(
        self, coords: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        cv2 = self.cv2
        h, w = self.bgr.shape[:2]
        r = max(2, min(h, w) // 8)
        out = []
        for pts, labs in zip(np.asarray(coords), np.asarray(labels), strict=True):
            full = np.zeros((h, w), dtype=bool)
            pos = pts[labs == 1]
            if len(pos) == 0:
                out.append(full)  # nothing marked as object
                continue
            x0, y0 = np.maximum(pos.min(0).astype(int) - 2 * r, 0)
            x1, y1 = np.minimum(pos.max(0).astype(int) + 2 * r + 1, (w, h))
            mask = np.full((y1 - y0, x1 - x0), cv2.GC_PR_BGD, np.uint8)
            for (x, y), lab in zip(pts, labs, strict=True):
                if lab == 1:
                    cv2.circle(mask, (int(x) - x0, int(y) - y0), r, int(cv2.GC_PR_FGD), -1)
            for (x, y), lab in zip(pts, labs, strict=True):
                sure = cv2.GC_FGD if lab == 1 else cv2.GC_BGD
                cv2.circle(mask, (int(x) - x0, int(y) - y0), 3, int(sure), -1)
            window = np.ascontiguousarray(self.bgr[y0:y1, x0:x1])
            full[y0:y1, x0:x1] = self._run(window, mask)
            out.append(full)
        return np.stack(out), np.ones(len(out), dtype=np.float32)


def make_mask_source(
    model: str,
    *,
    checkpoint: str | None = None,
    device: str | None = None,
    batch_size: int = 16,
    runtime: str = "torch",
    calib_images: str | os.PathLike | None = None,
) -> MaskSource:
    """A baseline by name (``box-fill``, ``ellipse-fill``, ``grabcut``) or a registered model
    (leansam's shipped weights for its own models; otherwise random weights seeded with 0 when no
    checkpoint is given, so every process builds the same model). ``runtime`` /
    ``calib_images``: see :func:`leansam.segment.segment`."""
    if model == "box-fill":
        return BoxFill()
    if model == "ellipse-fill":
        return EllipseFill()
    if model == "grabcut":
        return GrabCut()
    from ..loading import load_model
    from ..predictor import SamPredictor
    from ..runtime import check_runtime, runtime_calibration

    check_runtime(runtime)
    calib = runtime_calibration(runtime, calib_images)
    sam = load_model(model, checkpoint, device=device)
    predictor = SamPredictor(sam, runtime, calibration_images=calib)
    return SamMaskSource(predictor, name=model_label(sam, model), batch_size=batch_size)


def model_label(sam, name: str) -> str:
    """The name a result row carries: ``name``, plus method and widths for a quantized model
    (``leansam-efficientvit-s ahcptq W8A8``), so quantized rows never pass for the plain model."""
    qc = getattr(sam, "quant_config", None)
    if qc is None:
        return name
    mixed = " mixed" if qc.keep_8bit else ""
    return f"{name} {qc.method} W{qc.w_bits}A{qc.a_bits}{mixed}"


def as_mask_source(obj) -> MaskSource:
    """Accept a Sam model, a SamPredictor, or anything with the mask-source interface."""
    from ..modeling.sam import Sam
    from ..predictor import SamPredictor

    if isinstance(obj, Sam):
        return SamMaskSource(SamPredictor(obj), name=model_label(obj, obj.config.name))
    if isinstance(obj, SamPredictor):
        return SamMaskSource(obj, name=model_label(obj.model, obj.model.config.name))
    if all(hasattr(obj, a) for a in ("set_image", "predict_boxes", "predict_clicks")):
        return obj
    raise TypeError(f"cannot evaluate a {type(obj).__name__}: pass a Sam model or SamPredictor")
