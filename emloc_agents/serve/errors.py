"""Every failure as OpenAI's error shape with its HTTP status, so OpenAI clients raise their own typed
errors (``openai.NotFoundError``, ...) with the server's one-line message."""

from __future__ import annotations

from typing import Any

from ..images import UnsupportedContentError
from ..registry import UnknownSkillError
from ..skills import SkillError
from .schema import ErrorBody, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    499: "invalid_request_error",  # the client left: nobody reads it, the access log shows it
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error the server answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = ErrorBody(message=self.message, type=_TYPES.get(self.status, "invalid_request_error"),
                          param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def one_line(text: str, limit: int = 500) -> str:
    """A message on one line, cut at ``limit`` characters (errors may quote user input)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def from_exception(e: BaseException, *, param: str | None = None) -> APIError:
    """The status a failure inside the chat model or the registry deserves: an unknown skill is a 404,
    a request the model cannot take (bad content, bad arguments, a bad skill) a 400, anything else a 500
    whose message does not leak internals."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UnknownSkillError):
        return APIError(404, one_line(str(e)), param=param, code="skill_not_found")
    if isinstance(e, UnsupportedContentError):
        return APIError(400, one_line(str(e)), param="messages", code="unsupported_content")
    if isinstance(e, SkillError | ValueError | TypeError):
        return APIError(400, one_line(str(e)), param=param, code="invalid_value")
    return APIError(500, f"internal error ({type(e).__name__}); the server logged it", code="internal_error")
