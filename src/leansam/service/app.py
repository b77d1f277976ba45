"""The FastAPI application of ``leansam serve`` (see the package docstring)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, require
from ..io import ImageTooLargeError, image_to_rgb, open_image
from ..io import decode_image as io_decode_image

fastapi = require("fastapi", "serve")
from fastapi import Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

log = logging.getLogger("leansam.service")

#: upload formats, recognised by content (PIL's format detection), never by file name
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
STATIC = Path(__file__).parent / "static"
#: request bodies other than image uploads (prompts, parameters)
JSON_BODY_LIMIT = 1 << 20
#: multipart framing around an uploaded file
MULTIPART_SLACK = 64 << 10


@dataclass(frozen=True)
class Limits:
    """Operational limits of the service (``leansam serve --help`` sets each)."""

    max_upload_bytes: int = 16 << 20
    max_pixels: int = 36_000_000
    cache_images: int = 8  # embeddings kept in memory (LRU); ~4 MB each plus the upload
    max_concurrency: int = 1  # inference jobs at once (one predictor each)
    max_queue: int = 8  # jobs waiting for a slot; beyond: 429
    timeout_s: float = 60.0  # waiting + running, per request; beyond: 503
    max_prompts: int = 64  # boxes per mask request
    max_points: int = 64  # points per mask request
    max_points_per_side: int = 32  # segment-everything grid
    mask_inputs_per_image: int = 16  # previous low-res masks kept per image for refinement


class ServiceError(Exception):
    """An answer with an HTTP status and a one-line JSON error."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


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


# ---------------------------------------------------------------------------------------- engine
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


class Engine:
    """A model and ``size`` predictors sharing it (one per concurrent inference job)."""

    def __init__(self, model, *, name: str, runtime: str = "torch", size: int = 1, **info) -> None:
        from ..predictor import SamPredictor

        self.model, self.name, self.runtime = model, name, runtime
        self.info = {"name": name, "runtime": runtime, "image_size": model.image_size, **info}
        self._pool: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards the per-image mask-input memories
        for _ in range(size):
            self._pool.put(SamPredictor(model, runtime))

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


def _mask_record(mask: np.ndarray, score: float, output: list[str]) -> dict:
    from ..io import mask_to_coco_rle

    rec: dict[str, Any] = {"score": score, "area": int(mask.sum()), "bbox": _bbox(mask)}
    if "rle" in output:
        rec["rle"] = mask_to_coco_rle(mask)
    if "png" in output:
        rec["png"] = mask_png(mask)
    return rec


# ------------------------------------------------------------------------------------ requests
Output = list[Literal["rle", "png"]]


class MaskRequest(BaseModel):
    """Prompts in original image pixels: points (x, y) with labels (1 foreground, 0 background)
    and / or boxes XYXY. Several boxes are decoded in one batch (then without points);
    ``mask_input_id`` (from an earlier answer) refines that mask."""

    model_config = ConfigDict(extra="forbid")
    points: list[tuple[float, float]] | None = None
    labels: list[int] | None = None
    boxes: list[tuple[float, float, float, float]] | None = None
    mask_input_id: str | None = Field(default=None, max_length=64)
    multimask: bool = True
    output: Output = Field(default_factory=lambda: ["rle"])


class EverythingRequest(BaseModel):
    """SAM's automatic mask generator on the uploaded image (no crop layers)."""

    model_config = ConfigDict(extra="forbid")
    points_per_side: int = Field(default=16, ge=1)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, ge=0, le=1)
    min_mask_region_area: int = Field(default=0, ge=0)
    output: Output = Field(default_factory=lambda: ["rle"])


def validate_prompts(req, item: CachedImage, limits: Limits) -> None:
    """Prompt checks that need the image: counts, labels, coordinates inside the image."""
    if not req.points and not req.boxes:
        raise ServiceError(422, "give at least one point or box")
    if req.points:
        if req.labels is None or len(req.labels) != len(req.points):
            raise ServiceError(422, "give one label (1 foreground, 0 background) per point")
        if len(req.points) > limits.max_points:
            raise ServiceError(422, f"at most {limits.max_points} points per request")
        if any(v not in (0, 1) for v in req.labels):
            raise ServiceError(422, "labels must be 1 (foreground) or 0 (background)")
        for x, y in req.points:
            if not (0 <= x <= item.width and 0 <= y <= item.height):
                raise ServiceError(
                    422, f"point ({x:g}, {y:g}) lies outside the {item.width} x {item.height} image"
                )
    elif req.labels:
        raise ServiceError(422, "labels given without points")
    if req.boxes:
        if len(req.boxes) > limits.max_prompts:
            raise ServiceError(422, f"at most {limits.max_prompts} boxes per request")
        if req.points and len(req.boxes) > 1:
            raise ServiceError(422, "points can be combined with at most one box")
        for x0, y0, x1, y1 in req.boxes:
            inside = 0 <= x0 <= x1 <= item.width and 0 <= y0 <= y1 <= item.height
            if not inside:
                raise ServiceError(
                    422, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not x0 <= x1, y0 <= y1 inside "
                    f"the {item.width} x {item.height} image",
                )  # fmt: skip


# ------------------------------------------------------------------------------ concurrency
class Gate:
    """At most ``concurrency`` jobs run (in a thread pool), at most ``queue`` wait; each request
    gets ``timeout_s`` for waiting plus running. A job that overruns keeps its slot until it ends
    (the bound holds), while its request is answered 503."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.executor = ThreadPoolExecutor(limits.max_concurrency, thread_name_prefix="infer")
        self._slots: asyncio.Semaphore | None = None
        self.pending = 0

    async def run(self, fn: Callable[[], Any]) -> Any:
        lim = self.limits
        if self._slots is None:
            self._slots = asyncio.Semaphore(lim.max_concurrency)
        if self.pending >= lim.max_concurrency + lim.max_queue:
            raise ServiceError(
                429, f"server busy: {self.pending} requests in progress or queued; retry shortly",
                {"Retry-After": "1"},
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lim.timeout_s
        self.pending += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), lim.timeout_s)
            except TimeoutError:
                raise ServiceError(503, "timed out waiting for a free inference slot") from None
            job = loop.run_in_executor(self.executor, fn)
            try:
                return await asyncio.wait_for(asyncio.shield(job), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise ServiceError(
                    503, f"inference did not finish within {lim.timeout_s:g} s"
                ) from None
            finally:
                if job.done():
                    self._slots.release()
                else:
                    job.add_done_callback(lambda _: self._slots.release())
        finally:
            self.pending -= 1


class BodyLimit:
    """ASGI middleware: request bodies are read up to a limit (image uploads: the upload limit plus
    multipart framing; everything else: 1 MiB) and refused with 413 beyond it, streamed or not."""

    def __init__(self, app, upload_limit: int) -> None:
        self.app, self.upload_limit = app, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/") == "/v1/images"
        limit = self.upload_limit + MULTIPART_SLACK if upload else JSON_BODY_LIMIT
        what = "upload" if upload else "request body"
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, f"{what} of {int(declared)} bytes is too large")
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            if len(body) > limit:
                return await _send_json(send, 413, f"{what} exceeds {limit} bytes")
            if not msg.get("more_body", False):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------- app
def api_docs_html(schema: dict) -> str:
    """A self-contained HTML page (no scripts, no CDN) listing the API's endpoints from its
    OpenAPI ``schema``: method, path, summary and description, with a link to the full schema
    at ``/openapi.json`` for tools (Swagger UI, Postman, code generators)."""
    from html import escape

    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            text = op.get("description") or ""
            rows.append(
                f"<h2><code>{escape(method.upper())} {escape(path)}</code></h2>"
                f"<p><b>{escape(op.get('summary', ''))}</b></p><pre>{escape(text)}</pre>"
            )
    info = schema.get("info", {})
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{escape(info.get('title', 'API'))} API</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{white-space:pre-wrap}</style></head><body>"
        f"<h1>{escape(info.get('title', ''))} API {escape(str(info.get('version', '')))}</h1>"
        f"<p>{escape(info.get('description', ''))}</p>"
        "<p>The full machine-readable schema: <a href='/openapi.json'>/openapi.json</a> "
        "(load it into Swagger UI, Postman or a client generator). The web page: "
        "<a href='/'>/</a>.</p>" + "".join(rows) + "</body></html>"
    )


def create_app(engine: Engine, limits: Limits | None = None):
    """The FastAPI application serving ``engine`` under ``limits``."""
    limits = limits or Limits()
    cache = LRUCache(limits.cache_images)
    gate = Gate(limits)
    stats = {"started": time.time(), "requests": 0}

    app = fastapi.FastAPI(
        title="leansam",
        version="1",
        description="Segment Anything over HTTP: upload an image once, then prompt it.",
        # FastAPI's /docs and /redoc load their scripts from a CDN (blank offline); leansam
        # serves its own self-contained /docs below
        docs_url=None,
        redoc_url=None,
    )
    app.state.cache, app.state.gate, app.state.limits = cache, gate, limits

    def error(status: int, message: str, headers=None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error(400, "malformed JSON body")
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(InputError)
    async def _user_error(request, exc: InputError):
        # a bad image or prompt found below the request checks (e.g. by the predictor)
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error (logged on the server)")

    def lookup(image_id: str) -> CachedImage:
        item = cache.get(image_id)
        if item is None:
            raise ServiceError(
                404, f"unknown image id {image_id!r}: upload the image again (POST /v1/images); "
                "ids leave the cache when it is full",
            )  # fmt: skip
        return item

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(api_docs_html(app.openapi()))

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "model": engine.name,
            "cached_images": len(cache),
            "evicted_images": cache.evictions,
            "in_progress": gate.pending,
            "uptime_s": round(time.time() - stats["started"], 1),
        }

    @app.get("/v1/models")
    async def models():
        from ..registry import list_models

        return {
            "served": engine.info,
            "available": list_models(include_tiny=False),
            "limits": asdict(limits),
        }

    @app.post(
        "/v1/images",
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                            "required": ["file"],
                        }
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
                "required": True,
            }
        },
    )
    async def upload(request: Request):
        """Upload an image (multipart field ``file``, or the raw bytes); returns its id. The
        embedding is computed now and cached; uploading the same bytes again is free."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            file = form.get("file")
            if file is None or isinstance(file, str):
                raise ServiceError(400, "multipart upload needs the image in form field 'file'")
            data = await file.read()
        else:
            data = await request.body()
        image_id = hashlib.sha256(data).hexdigest()[:24]
        item = cache.get(image_id)
        if item is not None:
            return {"id": image_id, "width": item.width, "height": item.height, "cached": True}
        image = decode_image(data, limits)
        t0 = time.perf_counter()
        features = await gate.run(lambda: engine.embed(image))
        h, w = image.shape[:2]
        cache.put(CachedImage(image_id, features, h, w, data))
        return {
            "id": image_id,
            "width": w,
            "height": h,
            "cached": False,
            "embedding_ms": round(1000 * (time.perf_counter() - t0), 1),
        }

    @app.post("/v1/images/{image_id}/masks")
    async def masks(image_id: str, req: MaskRequest):
        """Masks for points / boxes (original image pixels), best first per prompt set."""
        item = lookup(image_id)
        validate_prompts(req, item, limits)
        return await gate.run(lambda: engine.masks(item, req, limits))

    @app.post("/v1/images/{image_id}/everything")
    async def everything(image_id: str, req: EverythingRequest):
        """Segment everything: SAM's automatic mask generator on a point grid."""
        item = lookup(image_id)
        if req.points_per_side > limits.max_points_per_side:
            raise ServiceError(
                422, f"points_per_side is at most {limits.max_points_per_side} on this server"
            )
        return await gate.run(lambda: engine.everything(item, req))

    app.add_middleware(BodyLimit, upload_limit=limits.max_upload_bytes)
    return app
