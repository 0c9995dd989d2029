"""Errors of the server: `APIError` becomes an OpenAI-shaped JSON error; `ServeError` is a CLI failure."""

from __future__ import annotations

from qvlm.errors import QVLMError


class ServeError(QVLMError):
    """`qvlm serve` cannot start (unsafe bind, bad flag value, unusable model folder)."""


class APIError(Exception):
    """A request the server refuses; rendered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, type_=self.type)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
