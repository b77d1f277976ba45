"""leansam's HTTP service (``leansam serve``) and its web page.

``create_app(engine, limits)`` builds a FastAPI application around an :class:`Engine` (a model with
a pool of predictors). Images are uploaded once (``POST /v1/images``): the encoder runs and the
embedding is kept in a bounded LRU cache under an id derived from the file's bytes; prompts
(``POST /v1/images/{id}/masks``) and segment-everything (``.../everything``) then only run the
decoder. Every input is validated and answered with a JSON error (``{"error": "..."}``, 4xx) when
wrong; inference runs in worker threads behind a bounded queue (429 when full, 503 on timeout).

One job per module: ``engine`` (upload checks, embedding cache, inference, prompt checks),
``limits`` (limits, request-body bounds, the inference gate), ``errors`` (:class:`ServiceError`),
``schemas`` (the pydantic request bodies), ``docs`` (the ``/docs`` page) and ``app`` (routes, error
handlers, middleware). Only ``schemas`` and ``app`` need FastAPI / pydantic, which come with
``pip install 'leansam[serve]'``: ``leansam.service.engine`` imports without them, and
``create_app`` is imported from ``app`` when first asked for. ``import leansam`` does not import
this package.
"""

from __future__ import annotations

from typing import Any

from .engine import Engine
from .limits import Limits

__all__ = ["Engine", "Limits", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI loads only with the app: the engine and the limits work without the `serve` extra
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
