"""Every failure becomes a JSON answer: `{"detail": ...}` on /api and /admin,
OpenAI's `{"error": {...}}` on /v1. Unknown routes, wrong methods and
unexpected exceptions included."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .json_codec import JSONResponse
from .occasional import Occasional
from .store import (
    CallInProgress,
    Conflict,
    Forbidden,
    InsufficientCredits,
    JobClosed,
    NotFound,
    StoreBusy,
    StoreError,
    StoreUnavailable,
    TeamSuspended,
)

log = logging.getLogger("tollgate")

# Statuses a client must not retry: the OpenAI SDKs honour this header.
NO_RETRY = {"x-should-retry": "false"}
# A database that cannot be written (disk full, I/O errors) needs more than a moment.
STORE_RETRY_AFTER = "10"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A refusal with its status, a message for humans and optional headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        if status == 409:
            self.headers.update(NO_RETRY)


class ClientClosed(ApiError):
    """The client closed its connection before it was answered. Nobody reads the answer:
    its status, 499 (nginx's "client closed request"), is for the metrics and the access log."""

    def __init__(self, message: str = "The client closed the connection before it was answered") -> None:
        super().__init__(499, message, code="client_closed")


def shutting_down(what: str, headers: Mapping[str, str] | None = None) -> ApiError:
    """What a client gets when the shutdown cut its request (only a shutdown cancels one:
    uvicorn's, once server.shutdown_grace is over): a 503 to retry elsewhere, not uvicorn's
    bare 500."""
    return ApiError(
        503, f"The gateway is shutting down: {what}", code="shutting_down", headers={**(headers or {}), "Retry-After": "1"}
    )


# The OpenAI routes Tollgate serves under /v1, as a client would ask for them without it.
_OPENAI_PATHS = frozenset(["/chat/completions", "/models"])


def _openai_root_path(path: str) -> bool:
    """A route of /v1 asked for without /v1, as an SDK whose base URL lacks it asks: the paths
    above and models.retrieve's /models/{model}."""
    path = path.rstrip("/")
    model = path.removeprefix("/models/")
    return path in _OPENAI_PATHS or (model != path and "/" not in model)


def _unserved_openai_route(path: str) -> str:
    """What a client asking /v1 for an endpoint the gateway does not serve is told to call. The
    Vercel AI SDK's default model (`provider("Main")`, AI SDK 5 on) asks for the Responses API:
    its user, told only "Not found", would not guess that the chat model serves the same call."""
    if path.rstrip("/") == "/v1/responses" or path.startswith("/v1/responses/"):
        return (
            "the Responses API is not served: use chat completions, POST /v1/chat/completions; with the "
            "Vercel AI SDK, provider.chat(model) rather than provider(model)"
        )
    return "the gateway serves POST /v1/chat/completions, GET /v1/models and GET /v1/models/{model}"


# What a browser's CORS preflight is told (README's Decisions): its answer grants no origin.
_NO_CORS = (
    "a browser's CORS preflight: browsers are not served, since a key in a web page is anyone's to spend "
    "the team's credits; call Tollgate from a server"
)


def error_response(request: Request, error: ApiError) -> Response:
    return JSONResponse(error_body(request.url.path, error), status_code=error.status, headers=error.headers)


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    """OpenAI's error shape under /v1, where its SDKs read it, and at /v1's routes asked for
    without it (an SDK whose base URL lacks /v1 shows only `error.message`); `{"detail": ...}`
    elsewhere."""
    if path == "/v1" or path.startswith("/v1/") or _openai_root_path(path):
        return {
            "error": {
                "message": error.message,
                "type": _OPENAI_TYPES.get(error.status, "invalid_request_error"),
                "param": error.param,
                "code": error.code,
            }
        }
    return {"detail": error.message}


def from_store_error(error: StoreError) -> ApiError:
    if isinstance(error, NotFound):
        return ApiError(404, str(error), code="not_found")
    if isinstance(error, Forbidden):
        return ApiError(403, str(error), code="forbidden")
    if isinstance(error, (TeamSuspended, InsufficientCredits)):
        code = "team_suspended" if isinstance(error, TeamSuspended) else "insufficient_credits"
        return ApiError(403, str(error), code=code)
    if isinstance(error, JobClosed):
        return ApiError(409, str(error), code="job_closed")
    if isinstance(error, (Conflict, CallInProgress)):
        return ApiError(409, str(error), code="conflict")
    if isinstance(error, StoreBusy):
        return ApiError(503, str(error), code="store_busy", headers={"Retry-After": "1"})
    if isinstance(error, StoreUnavailable):
        return ApiError(503, str(error), code="store_unavailable", headers={"Retry-After": STORE_RETRY_AFTER})
    return ApiError(500, "Internal error", code="internal_error")


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request, exc)


def unwritable_database_log() -> Occasional:
    """The line that says the database cannot be written: one per app, for every request that
    finds so (a call's start included), as the fault fails every write alike while it lasts."""
    return Occasional(log, logging.WARNING)


# What a StoreBusy means to the operator: no request of Tollgate's holds a lock that long.
LOCKED = (
    "the database stayed locked by another process for longer than database.busy_timeout: "
    "end the transaction it keeps open (a sqlite3 shell, a backup made with .backup)"
)


def log_store_refusal(unwritable: Occasional, what: str, exc: BaseException) -> None:
    """Say, through the database's line, a 503 answered for the database's state rather than the
    request's: a database that cannot be written, or one another process keeps locked."""
    if isinstance(exc, StoreUnavailable):
        unwritable("%s: 503, the database cannot be written: %s", what, exc)
    elif isinstance(exc, StoreBusy):
        unwritable("%s: 503, %s", what, LOCKED)


class StoreErrorHandler:
    """A store error's answer; a database that cannot be written, or stays locked, is logged,
    once a minute at most."""

    def __init__(self, unwritable: Occasional) -> None:
        self._unwritable = unwritable

    async def handle(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StoreError)
        log_store_refusal(self._unwritable, f"{request.method} {request.url.path}", exc)
        return error_response(request, from_store_error(exc))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
    if exc.status_code in (404, 405):
        message = f"{message}: {request.method} {request.url.path}"
        if exc.status_code == 405 and request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            message += f" ({_NO_CORS})"
        if exc.status_code == 404 and _openai_root_path(request.url.path):
            # LiteLLM's proxy serves these at its root too, and its documentation has SDKs pointed
            # there: a client moved over unchanged would otherwise be told only "Not found".
            base = str(request.base_url).rstrip("/")
            message += f" (the OpenAI-compatible routes are under /v1: set the client's base URL to {base}/v1)"
        elif exc.status_code == 404 and request.url.path.startswith("/v1/"):
            message += f" ({_unserved_openai_route(request.url.path)})"
    return error_response(request, ApiError(exc.status_code, message, headers=exc.headers))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette raises the exception on to the server once this answer is sent, and uvicorn logs
    # it with its traceback ("Exception in ASGI application"): this line names the request, and
    # a traceback here as well made two of one fault.
    log.error("unexpected error on %s %s: %s (its traceback follows, as uvicorn's 'Exception in ASGI application')",
              request.method, request.url.path, type(exc).__name__)
    return error_response(request, ApiError(500, "Internal server error", code="internal_error"))


def exception_handlers(
    unwritable: Occasional | None = None,
) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """An app's handlers; `unwritable`: its `unwritable_database_log`, one of their own if none."""
    return {
        ApiError: handle_api_error,
        StoreError: StoreErrorHandler(unwritable or unwritable_database_log()).handle,
        HTTPException: handle_http_exception,
        Exception: handle_unexpected,
    }
