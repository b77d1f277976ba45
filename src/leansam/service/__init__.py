"""leansam's HTTP service (``leansam serve``) and its web page.

``create_app(engine, limits)`` builds a FastAPI application around an :class:`Engine` (a model with
a pool of predictors). Images are uploaded once (``POST /v1/images``): the encoder runs and the
embedding is kept in a bounded LRU cache under an id derived from the file's bytes; prompts
(``POST /v1/images/{id}/masks``) and segment-everything (``.../everything``) then only run the
decoder. Every input is validated and answered with a JSON error (``{"error": "..."}``, 4xx) when
wrong; inference runs in worker threads behind a bounded queue (429 when full, 503 on timeout).

FastAPI, uvicorn and python-multipart come with ``pip install 'leansam[serve]'``; ``import leansam``
does not import this package.
"""

from .app import Engine, Limits, create_app

__all__ = ["Engine", "Limits", "create_app"]
