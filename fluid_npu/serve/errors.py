"""The server's errors: ``APIError``, an HTTP error answered as the OpenAI API writes one
(``{"error": {"message", "type", "param", "code"}}``), and ``error_body`` for the handlers that
answer other failures the same way."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An HTTP error answered as an OpenAI-style JSON body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` as the OpenAI API writes it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
