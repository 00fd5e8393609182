"""The routes every LLM call takes, dispatched before Starlette's router.

A call used to pass through the router, which tries routes in turn, and the exception
middleware with its wrappers; every await of the call that suspends went back through those
frames as well. Together they were 7.5% of Tollgate's own code per call (bench/RESULTS.md).

This middleware sits below ObserveMiddleware and above the rest of Starlette's stack. A POST
that matches one of the call routes goes straight to its handler, and an exception raised before
the answer starts becomes the answer the app's exception handlers give, as Starlette would make
it (after the start, as in Starlette, it goes up as a RuntimeError). Anything
else, a call route with the wrong method included, goes on to Starlette unchanged. An exception
with no handler (an unexpected error) goes up to Starlette's ServerErrorMiddleware, as it would
from the router.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Mapping, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]
_PLAIN = Response.__call__  # what sends a Response whose class does not send it its own way


class CallRoutes:
    def __init__(self, app: ASGIApp, routes: Sequence[Route], handlers: Mapping[Any, ExceptionHandler]) -> None:
        self.app = app
        # What Starlette would add around these, this does not: a route of its own middleware,
        # a body limit, a handler run in a thread, a handler for a status code.
        for route in routes:
            assert inspect.iscoroutinefunction(route.endpoint), route.path
            assert inspect.isfunction(route.app), f"{route.path}: route middleware or a body limit"
        for kind, handler in handlers.items():
            assert isinstance(kind, type) and inspect.iscoroutinefunction(handler), kind
        self._routes = [(route, route.path_regex.match, route.endpoint) for route in routes]
        # As Starlette's ExceptionMiddleware holds them: the catch-all belongs to ServerErrorMiddleware.
        self._handlers = {kind: handler for kind, handler in handlers.items() if kind is not Exception}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # With a root path Starlette matches on the path under it: left to Starlette.
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            for route, match_path, endpoint in self._routes:
                match = match_path(path)
                if match is not None:
                    scope["route"] = route
                    scope["endpoint"] = endpoint
                    scope["path_params"] = {
                        name: route.param_convertors[name].convert(value) for name, value in match.groupdict().items()
                    }
                    await self._handle(endpoint, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _handle(self, endpoint: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive,
                      send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            await (await handler(request, exc))(scope, receive, send)
            exc.__traceback__ = None  # one instance can fail several requests (a batch's store error)
            return
        if type(response).__call__ is _PLAIN:
            # A plain answer (every call's but a stream's) sends its start before anything else:
            # whatever it raises comes after the start, and is no answer's to give. Sent as it
            # is, without the watch below, a coroutine more on each of its sends.
            try:
                await response(scope, receive, send)
            except Exception as exc:
                if self._handler(exc) is None:
                    raise
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await response(scope, receive, watched)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if started:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            await (await handler(request, exc))(scope, receive, send)
            exc.__traceback__ = None  # one instance can fail several requests (a batch's store error)

    def _handler(self, exc: Exception) -> ExceptionHandler | None:
        for kind in type(exc).__mro__:
            handler = self._handlers.get(kind)
            if handler is not None:
                return handler
        return None
