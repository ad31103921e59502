"""The one error shape of the HTTP API: ``{"error": {"type", "message"}}`` with a 4xx/5xx status.

Every client mistake becomes an :class:`APIError` raised anywhere in the ingress; one handler
turns it into JSON, so the service never answers a bad request with a traceback.
"""

from __future__ import annotations

from typing import Mapping

from model.processor import ImageError

RETRY_AFTER_S = 1  # what a 503 tells clients to wait before retrying


class APIError(Exception):
    """An HTTP error with a machine-readable ``type`` and a human-readable ``message``."""

    def __init__(self, status: int, type: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.type, self.message)


def error_body(type: str, message: str) -> dict:
    return {"error": {"type": type, "message": message}}


def bad_request(message: str, type: str = "invalid_request") -> APIError:
    return APIError(400, type, message)


def invalid_parameter(message: str) -> APIError:
    """A well-formed request whose values are not acceptable (unknown task/mode, bad max_tokens)."""
    return APIError(422, "invalid_parameter", message)


def overloaded(message: str) -> APIError:
    return APIError(503, "overloaded", message, {"Retry-After": str(RETRY_AFTER_S)})


def unavailable(message: str) -> APIError:
    return APIError(503, "service_unavailable", message, {"Retry-After": str(RETRY_AFTER_S)})


# ImageError.reason -> (status, type). Not-an-image (415) is decided by sniffing before this.
_IMAGE_ERRORS = {
    "empty": (400, "empty_image"),
    "unreadable": (400, "invalid_image"),
    "truncated": (400, "invalid_image"),
    "too_small": (400, "image_too_small"),
    "too_large": (413, "image_too_large"),
}


def from_image_error(exc: ImageError) -> APIError:
    """Map the processor's reasons onto HTTP statuses (empty/unreadable/truncated 400, too_large 413)."""
    status, type = _IMAGE_ERRORS.get(exc.reason, (400, "invalid_image"))
    return APIError(status, type, str(exc))
