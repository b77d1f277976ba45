"""The service's one error type, free of FastAPI: the engine, the limits and the app raise it."""

from __future__ import annotations


class ServiceError(Exception):
    """An answer with an HTTP status and a one-line JSON error."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
