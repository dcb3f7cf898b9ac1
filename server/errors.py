"""Client errors as JSON: `{"error": {"type": ..., "message": ..., "details"?: [...]}}`, never a 500.

Every 4xx names the problem. Validation details drop the offending input so a huge body is not
echoed back.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 2xx, raised from routes and dependencies."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers


def error_response(
    status: int, kind: str, message: str, *, details: list[Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    error: dict[str, Any] = {"type": kind, "message": message}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    # "body" is FastAPI's root; <tags> and pydantic's member labels ("function-after[...]") are union
    # members, not fields a client could name.
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p.startswith("<") or "[" in p))]
    return ".".join(parts) or "body"


async def _api_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ApiError)
    return error_response(err.status, err.kind, err.message, headers=err.headers)


async def _validation_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    errors = list(err.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        reason = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return error_response(
            400, "invalid_json",
            f"the request body is not valid JSON: {reason}".rstrip(": ") + " (every POST takes a JSON object)",
        )
    details = [
        {"field": _where(e.get("loc", ())), "problem": e.get("msg", "").removeprefix("Value error, "),
         "type": e.get("type", "")}
        for e in errors
    ]
    first = details[0] if details else {"field": "body", "problem": "invalid"}
    return error_response(422, "invalid_request", f"{first['field']}: {first['problem']}", details=details)


async def _http_error(_: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    kinds = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "too_large"}
    headers = dict(err.headers) if err.headers else None
    return error_response(err.status_code, kinds.get(err.status_code, "http_error"), str(err.detail), headers=headers)


async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    logger.error("unexpected server error", exc_info=err)
    return error_response(500, "internal_error", "the server failed to answer; see its log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
