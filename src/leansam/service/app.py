"""The FastAPI application of ``leansam serve`` (see the package docstring): routes, error
handlers and middleware wiring around an :class:`~leansam.service.engine.Engine` under
:class:`~leansam.service.limits.Limits`."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import InputError, require

fastapi = require("fastapi", "serve")
from fastapi import Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from .docs import api_docs_html  # noqa: E402
from .engine import CachedImage, Engine, LRUCache, decode_image, validate_prompts  # noqa: E402
from .errors import ServiceError  # noqa: E402
from .limits import BodyLimit, Gate, Limits  # noqa: E402
from .schemas import EverythingRequest, MaskRequest  # noqa: E402

log = logging.getLogger("leansam.service")

STATIC = Path(__file__).parent / "static"


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
