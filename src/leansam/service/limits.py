"""The service's operational limits and their enforcement, free of FastAPI: :class:`Limits`, the
request-body bounds (:class:`BodyLimit`, plain ASGI middleware) and the inference :class:`Gate`
(bounded concurrency and queue, a timeout per request)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import ServiceError

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
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes before 3.11
                raise ServiceError(503, "timed out waiting for a free inference slot") from None
            job = loop.run_in_executor(self.executor, fn)
            try:
                return await asyncio.wait_for(asyncio.shield(job), max(deadline - loop.time(), 0))
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes before 3.11
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
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
