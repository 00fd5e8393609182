"""The request target `*` (RFC 9112, 3.2.4): it names no resource but the server as a whole, and
is for OPTIONS alone (RFC 9110, 9.3.7), which some proxies and load balancers send as a probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError

ASTERISK = "*"
# The order `Allow` names methods in; any other comes after them.
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_NOT_OPTIONS = (
    "The request target * is for OPTIONS alone, which asks about the server as a whole; "
    "send a path such as /api/jobs/create"
)


def served_methods(routes: Iterable[BaseRoute]) -> str:
    """`Allow` for the server as a whole: every method a route takes, and OPTIONS (for `*`)."""
    methods = {"OPTIONS"}
    for route in routes:
        methods |= getattr(route, "methods", None) or set()
    order = {method: index for index, method in enumerate(_METHOD_ORDER)}
    return ", ".join(sorted(methods, key=lambda method: (order.get(method, len(order)), method)))


@dataclass(frozen=True)
class ServerWide:
    """What the router runs for a request that matched no route (in place of its 404, which
    every other such request still gets): `OPTIONS *` is a 200 with `Allow` and no content, any
    other method with the target `*` a 400 saying `*` is for OPTIONS. Starlette read the target
    as the path "/*", which no route has: it was a 404 naming a path nobody sent."""

    allow: str
    not_found: ASGIApp
    path: ClassVar[str] = ASTERISK  # the route template the metrics and access log name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != ASTERISK:
            await self.not_found(scope, receive, send)
            return
        scope["route"] = self
        if scope["method"] != "OPTIONS":
            raise ApiError(400, _NOT_OPTIONS)
        # RFC 9110, 9.3.7: an answer with no content says Content-Length: 0 (Starlette's does).
        await Response(headers={"Allow": self.allow})(scope, receive, send)
