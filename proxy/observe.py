"""Every request is measured and logged here, once, when its response has ended.

A pure ASGI middleware (streams pass through untouched): it counts the request
under its route template, times it, and writes one access-log line with what
the handlers noted about it (team, job, call, model group, model, tokens).
Handlers note those through `notes(request)`; keys and prompts are never noted.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

access_log = logging.getLogger("tollgate.access")
NOTES = "tollgate.notes"
UNMATCHED = "unmatched"


def notes(request: Request) -> dict[str, Any]:
    """The access-log fields of this request, for handlers to fill in."""
    return request.scope.setdefault(NOTES, {})


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, log_format: Literal["plain", "json", "off"]) -> None:
        self.app = app
        self.metrics = metrics
        self.log_format = log_format

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        scope[NOTES] = {}

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            seconds = time.perf_counter() - started
            self.metrics.observe_request(template, scope["method"], status, seconds)
            if self.log_format != "off":
                self._log(template, scope["method"], status, seconds, scope[NOTES])

    def _log(self, route: str, method: str, status: int, seconds: float, fields: dict[str, Any]) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        entry = {"route": route, "method": method, "status": status, "latency_ms": round(seconds * 1000, 1), **fields}
        if self.log_format == "json":
            line = json.dumps(entry, separators=(",", ":"))
        else:
            line = " ".join(f"{k}={v}" for k, v in entry.items() if v is not None)
        # The record is made here rather than by access_log.info(), which would first walk
        # the stack to find the line that called it: the same for every request.
        access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line, None, None))
