"""OpenAI-style errors, built in one place: every failure a client sees is
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (5xx only for a bug), never
FastAPI's own shapes, so OpenAI clients raise their usual exceptions (BadRequestError, ...)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("offload.server")

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """An error response: raise it from anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The one error shape, for JSON responses and for an error event inside a stream."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers
    )


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body that is not JSON is a 400; JSON that does not fit the schema keeps FastAPI's 422, in the
    OpenAI shape, naming the first offending field."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        message = f"the request body is not valid JSON{': ' + detail if detail else ''}"
        return error_response(APIError(400, message, code="invalid_json"))
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return error_response(
        APIError(422, "; ".join(parts), param=param, code=str(first.get("type", "invalid")))
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Unknown paths (404) and wrong methods (405) in the same shape."""
    assert isinstance(exc, StarletteHTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(
        APIError(
            exc.status_code, message, code="not_found" if exc.status_code == 404 else None, headers=headers
        )
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        APIError(
            500, f"internal server error: {type(exc).__name__}", type="server_error", code="internal_error"
        )
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
