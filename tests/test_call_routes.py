"""The call routes' own dispatch (proxy/call_routes.py) answers exactly as Starlette's router
and exception middleware would: the same app is built with and without it and asked alike."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.call_routes import CallRoutes
from proxy.errors import ApiError, exception_handlers
from proxy.store import JobClosed

RAISED = {
    "api-error": ApiError(429, "slow down", code="rate_limit_exceeded", headers={"Retry-After": "3"}),
    "store-error": JobClosed("job-1", "completed"),
    "http-exception": HTTPException(413, "too large"),
    "unexpected": ZeroDivisionError("boom"),
}


class FailingResponse(Response):
    """A response that raises while it is being sent: before its start, or after it."""

    def __init__(self, exc: Exception, after_start: bool) -> None:
        super().__init__()
        self.exc, self.after_start = exc, after_start

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if self.after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise self.exc


async def call(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    if job_id in RAISED:
        raise RAISED[job_id]
    if job_id.startswith("send-"):
        _, kind, when = job_id.split("-", 2)
        return FailingResponse(RAISED[kind.replace("_", "-")], after_start=when == "after")
    if job_id == "stream":
        return StreamingResponse(iter([b"data: 1\n\n", b"data: 2\n\n"]), media_type="text/event-stream")
    route, endpoint = request.scope["route"].path, request.scope["endpoint"].__name__
    body = (await request.body()).decode()
    return JSONResponse({"job": job_id, "route": route, "endpoint": endpoint, "body": body}, headers={"x-a": "1"})


async def chat(request: Request) -> Response:
    return JSONResponse({"chat": True})


async def numbered(request: Request) -> Response:
    n = request.path_params["n"]
    return JSONResponse({"n": n, "type": type(n).__name__})


def app(with_call_routes: bool) -> Starlette:
    call_routes = [Route("/api/jobs/{job_id}/llm-call", call, methods=["POST"]),
                   Route("/v1/chat/completions", chat, methods=["POST"]),
                   Route("/numbered/{n:int}", numbered, methods=["POST"])]
    handlers = exception_handlers()
    middleware = [Middleware(CallRoutes, routes=call_routes, handlers=handlers)] if with_call_routes else []
    return Starlette(routes=call_routes, middleware=middleware, exception_handlers=handlers)


def answers(method: str, path: str, root_path: str = "") -> list[tuple[int, dict[str, str], bytes]]:
    seen = []
    for with_call_routes in (True, False):
        with TestClient(app(with_call_routes), raise_server_exceptions=False, root_path=root_path) as client:
            response = client.request(method, path, content=b'{"x": 1}', follow_redirects=False)
            headers = {k: v for k, v in response.headers.items() if k != "date"}
            seen.append((response.status_code, headers, response.content))
    return seen


@pytest.mark.parametrize("path", ["/api/jobs/job-7/llm-call", "/v1/chat/completions"])
def test_a_call_route_answers_as_through_starlette(path):
    ours, starlettes = answers("POST", path)
    assert ours == starlettes
    assert ours[0] == 200


def test_the_route_template_endpoint_and_path_parameters_reach_the_handler():
    ours, _ = answers("POST", "/api/jobs/job-7/llm-call")
    assert ours[2] == b'{"job":"job-7","route":"/api/jobs/{job_id}/llm-call","endpoint":"call","body":"{\\"x\\": 1}"}'


def test_path_parameters_are_converted_as_their_route_declares():
    ours, starlettes = answers("POST", "/numbered/7")
    assert ours == starlettes
    assert ours[2] == b'{"n":7,"type":"int"}'


def test_under_a_root_path_the_route_is_matched_below_it_as_starlette_does():
    # Starlette matches /chat/completions here, which is no route: a call route matched on the
    # whole path would have answered it.
    ours, starlettes = answers("POST", "/v1/chat/completions", root_path="/v1")
    assert ours == starlettes
    assert ours[0] == 404


@pytest.mark.parametrize("raised", sorted(RAISED))
def test_an_exception_in_a_call_route_answers_as_through_starlette(raised):
    ours, starlettes = answers("POST", f"/api/jobs/{raised}/llm-call")
    assert ours == starlettes
    assert ours[0] >= 400 and b"detail" in ours[2]


def test_a_handled_exception_keeps_no_traceback_as_one_instance_can_fail_many_requests():
    raised = RAISED["store-error"]
    raised.__traceback__ = None
    with TestClient(app(True), raise_server_exceptions=False) as client:
        assert client.post("/api/jobs/store-error/llm-call").status_code == 409
    assert raised.__traceback__ is None


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/jobs/job-7/llm-call"),
    ("POST", "/api/jobs/job-7/llm-call/"),
    ("POST", "/api/jobs/a/b/llm-call"),
    ("PUT", "/v1/chat/completions"),
])
def test_anything_else_is_left_to_starlette(method, path):
    ours, starlettes = answers(method, path)
    assert ours == starlettes
    assert ours[0] in (307, 404, 405)


@pytest.mark.parametrize("kind", ["store_error", "api_error", "unexpected"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_exception_while_the_answer_is_sent_ends_as_through_starlette(kind, when):
    ours, starlettes = answers("POST", f"/api/jobs/send-{kind}-{when}/llm-call")
    assert ours == starlettes


def test_a_streamed_answer_passes_as_through_starlette():
    ours, starlettes = answers("POST", "/api/jobs/stream/llm-call")
    assert ours == starlettes
    assert ours[2] == b"data: 1\n\ndata: 2\n\n"


def test_a_route_it_would_dispatch_differently_from_starlette_is_refused():
    def sync_endpoint(request: Request) -> Response:
        return Response()

    async def endpoint(request: Request) -> Response:
        return Response()

    for route in (Route("/a", sync_endpoint, methods=["POST"]), Route("/a", endpoint, methods=["POST"], max_body_size=10)):
        with pytest.raises(AssertionError):
            CallRoutes(app(True), [route], exception_handlers())


def sent_with_failing_send(with_call_routes: bool, path: str, failing: int, raised: Exception
                           ) -> tuple[list[dict], str]:
    """The messages an app sent before the `failing`-th send raised `raised` (a transport
    failing mid-answer), and what came out of the app."""
    sent: list[dict] = []
    received: list[dict] = []

    async def receive() -> dict:
        if received:
            await asyncio.Future()  # a client that stays: no disconnect
        received.append({"type": "http.request", "body": b'{"x": 1}', "more_body": False})
        return received[0]

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) == failing:
            raise raised

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def run() -> str:
        try:
            await app(with_call_routes)(scope, receive, send)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc} (from {exc.__cause__!r})"
        return "nothing raised"

    return sent, asyncio.run(run())


@pytest.mark.parametrize("path", ["/api/jobs/job-7/llm-call", "/api/jobs/stream/llm-call", "/v1/chat/completions"])
@pytest.mark.parametrize("failing", [1, 2])
@pytest.mark.parametrize("raised", [OSError("gone"), ApiError(400, "handled"), RAISED["store-error"]],
                         ids=["unhandled", "api-error", "store-error"])
def test_an_answer_whose_sending_fails_ends_as_through_starlette(path, failing, raised):
    """A plain answer is sent without the watch over its start (call_routes.py): it still ends as
    Starlette's would, whichever of its sends fails, with an exception that has a handler or not."""
    ours = sent_with_failing_send(True, path, failing, raised)
    starlettes = sent_with_failing_send(False, path, failing, raised)
    assert ours == starlettes
    assert "nothing raised" not in ours[1]
