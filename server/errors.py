"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, and the handlers that produce them."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

# The `type` OpenAI's clients map to their exception classes, by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    """Raised by handlers for anything the client should see as an error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    )
    return JSONResponse(body.model_dump(), status_code=status)


def _field_names() -> frozenset[str]:
    from pydantic import BaseModel

    from . import protocol

    models = [m for m in vars(protocol).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    return frozenset(name for m in models for name in m.model_fields)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The problem, phrased for a person, and the field it is about (dotted, like `messages.0.content`).

    pydantic puts the union member it tried (`str`, `list[int]`, ...) into an error's location; those
    are dropped, and the failures of one field's alternatives are reported together.
    """
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    fields = _field_names()

    def param_of(err: dict) -> str | None:
        loc = [str(p) for p in err.get("loc", ()) if isinstance(p, int) or p in fields]
        return ".".join(loc) or None

    param = param_of(errors[0])
    messages = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors if param_of(e) == param))
    text = "; or ".join(messages[:4])
    return (f"{param}: {text}" if param else text), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI clients and the API contract expect 400 for any bad input
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        status = 400 if exc.status_code == 422 else exc.status_code
        return error_response(status, message)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server log only; the client learns nothing about the internals
        log.exception("unhandled error while serving a request")
        return error_response(500, "internal server error", code="internal_error")
