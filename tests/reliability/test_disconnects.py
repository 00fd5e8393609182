"""Clients hanging up mid-stream: the upstream is closed at once, every call is recorded,
no upstream connection is leaked, and the live-streams gauge returns to zero."""

import asyncio
import contextlib
import functools
import json
import re
import socket
import subprocess
import time
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from proxy.server import UNREAD_MARGIN, CoalescingHttpProtocol
from tests.support import fake_log, tag, wait_for
from tests.test_coalesce import RecordingTransport
from tests.test_operations import families, value

STREAMS = 100


def upstream_connections(pid: int, port: int) -> int:
    """Established TCP connections from process `pid` to `port`."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True).stdout
    return sum(f"pid={pid}," in line for line in out.splitlines())


def test_100_disconnects_mid_stream_close_the_upstream_and_are_all_recorded(make_tollgate, litellm, fake_url):
    server = make_tollgate(upstream={"max_keepalive_connections": 10})
    team = server.admin().team(credits=10, rpm_limit=10_000, tpm_limit=100_000_000)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "hang-ups"}).json()["job_id"]
    label = tag()
    body = {"messages": [{"role": "user", "content": f"long [chunks=100] [delay_ms=200] [tag={label}]"}]}

    async def hang_up(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", f"/api/jobs/{job_id}/llm-call-stream", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            for _ in range(4):
                await anext(lines)

    async def run() -> float:
        limits = httpx.Limits(max_connections=STREAMS)
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {team.key}"}, timeout=60, limits=limits
        ) as http:
            await asyncio.gather(*(hang_up(http) for _ in range(STREAMS)))
        return time.time()

    hung_up = asyncio.run(run())
    def closed_now():
        return [e for e in fake_log(fake_url, label) if e["disconnected"]]
    wait_for(lambda: len(closed_now()) == STREAMS, timeout=10)
    closed = closed_now()
    assert len(closed) == STREAMS, f"{len(closed)} of {STREAMS} upstream streams closed"
    assert max(e["disconnected"] for e in closed) - hung_up < 1.0

    def recorded():
        calls = client.get(f"/api/jobs/{job_id}").json()["calls"]
        return len(calls) == STREAMS and all(c["status"] == "cancelled" for c in calls) and calls
    calls = wait_for(recorded, timeout=10)
    assert calls and all(c["usage_estimated"] and c["completion_tokens"] > 0 for c in calls)

    litellm_port = int(litellm.url.rsplit(":", 1)[1])
    assert wait_for(lambda: upstream_connections(server.process.pid, litellm_port) <= 10, timeout=5)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r"^tollgate_active_streams 0\.0$", metrics, re.M)
    # And the pool still works.
    answer = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "still there?"}]})
    assert answer.status_code == 200


def test_a_client_that_stops_reading_is_let_go_soon_after_the_calls_deadline(make_tollgate, fake_url):
    # It holds the connection, its send buffers full: the relay must not wait on it for good.
    server = make_tollgate(upstream_url=fake_url, upstream={"timeouts": {"total": "2s"}})
    team = server.admin().team()
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "stuck"}).json()["job_id"]
    body = json.dumps({"messages": [{"role": "user", "content": "flood [chunks=200000]"}]}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(
            f"POST /api/jobs/{job_id}/llm-call-stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        assert stuck.recv(100).startswith(b"HTTP/1.1 200")  # then it reads nothing more
        assert wait_for(lambda: value(families(server), "tollgate_active_streams", "") == 0, timeout=20)
        (call,) = client.get(f"/api/jobs/{job_id}").json()["calls"]
        assert call["status"] == "error"


def test_a_stream_whose_client_reads_nothing_from_its_start_is_cut_at_the_calls_deadline(make_tollgate, fake_url):
    # The client sends its next request without reading the answer before it, which fills its
    # connection's buffers: the stream's own head and first events then wait on that client, and
    # must not hold the call (running, its job not completable) or its upstream past the deadline.
    server = make_tollgate(upstream_url=fake_url, upstream={"timeouts": {"total": "3s"}})
    team = server.admin().team(rpm_limit=1000, tpm_limit=100_000_000)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "unread"}).json()["job_id"]
    label = tag()
    big = {"messages": [{"role": "user", "content": "a long answer [chunks=1500000]"}], "max_tokens": 1_500_000}
    slow = {"messages": [{"role": "user", "content": f"slow [chunks=500] [delay_ms=20] [tag={label}]"}]}

    def request(path: str, body: dict) -> bytes:
        data = json.dumps(body).encode()
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data

    with socket.socket() as unread:
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        unread.connect(("127.0.0.1", server.port))
        unread.sendall(request(f"/api/jobs/{job_id}/llm-call", big) + request(f"/api/jobs/{job_id}/llm-call-stream", slow))
        assert unread.recv(100).startswith(b"HTTP/1.1 200")  # then it reads nothing more
        (upstream,) = wait_for(lambda: fake_log(fake_url, label), timeout=10)
        closed = wait_for(lambda: fake_log(fake_url, label)[0]["disconnected"], timeout=10)
        assert closed and closed - upstream["started"] < 4, "the upstream stream was held past the call's deadline"
        calls = wait_for(lambda: (c := client.get(f"/api/jobs/{job_id}").json()["calls"]) and
                         all(call["status"] != "running" for call in c) and c, timeout=5)
        assert calls and [call["status"] for call in calls] == ["success", "error"]


@contextlib.contextmanager
def unread_call(server, key: str, content: str, stream: bool) -> Iterator[tuple[socket.socket, str]]:
    """A /v1 call whose client takes its answer's head, then nothing more: the socket, the job's id."""
    body = json.dumps({"model": "Main", "stream": stream, "messages": [{"role": "user", "content": content}]})
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window it offers
        client.connect(("127.0.0.1", server.port))
        client.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body.encode()
        )
        head = client.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")
        yield client, re.search(rb"x-job-id: ([0-9a-f-]+)", head).group(1).decode()


def connections_from(pid: int, port: int, client_port: int) -> int:
    """Established TCP connections of process `pid`, listening on `port`, to a client's `client_port`."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
        capture_output=True, text=True,
    ).stdout
    return sum(f"pid={pid}," in line for line in out.splitlines())


def test_a_client_that_takes_none_of_its_stream_does_not_hold_the_upstream_pool_from_other_teams(make_tollgate, fake_url):
    # Held until the call's deadline (10 minutes by default), each such stream kept a connection
    # of the pool to the upstream: one team could take them all, failing every other team's calls.
    server = make_tollgate(upstream_url=fake_url, upstream={"max_connections": 1}, server={"read_timeout": "1s"})
    stuck_team, other_team = server.admin().team(), server.admin().team()
    with unread_call(server, stuck_team.key, "flood [chunks=200000]", stream=True) as (_, job_id):
        answer = server.client(other_team.key).post(
            "/v1/chat/completions", json={"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert answer.status_code == 200
        (call,) = server.client(stuck_team.key).get(f"/api/jobs/{job_id}").json()["calls"]
        assert call["status"] == "cancelled" and "took none of the stream" in call["error"]


def test_the_connection_of_a_client_that_takes_none_of_its_answer_is_dropped_not_kept_for_good(make_tollgate, fake_url):
    # uvicorn bounds no write, and closes a connection only once what was written to it is sent:
    # an answer its client never read was kept in the process for good, with the connection (a
    # 50 MB answer, 47 MB of memory).
    server = make_tollgate(upstream_url=fake_url, server={"read_timeout": "1s"})
    team = server.admin().team(rpm_limit=1000, tpm_limit=100_000_000)
    with unread_call(server, team.key, "a long answer [chunks=1000000]", stream=False) as (unread, _):
        client_port = unread.getsockname()[1]
        assert wait_for(lambda: connections_from(server.process.pid, server.port, client_port) == 0, timeout=30)


class SocketTransport(RecordingTransport):
    """A transport over `sock`, for what the protocol sets on the connection's socket."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else super().get_extra_info(name, default)


class ResetSocket(socket.socket):
    """A socket whose connection was reset before the protocol had it."""

    def setsockopt(self, *args: Any) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")


def user_timeout_set_on(sock: socket.socket) -> int:
    """The TCP_USER_TIMEOUT the served protocol sets on a connection over `sock` (read timeout 2 s)."""
    config = uvicorn.Config(Starlette(), http=functools.partial(CoalescingHttpProtocol, read_timeout=2.0), lifespan="off")
    config.load()

    async def made() -> None:
        protocol = config.http_protocol_class(config=config, server_state=uvicorn.server.ServerState(), app_state={})
        protocol.connection_made(SocketTransport(sock))
        protocol.connection_lost(None)

    asyncio.run(made())
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["IPv4", "IPv6"])
def test_the_kernel_is_told_to_drop_a_connection_left_unread_for_twice_the_read_timeout_and_more(
    family: socket.AddressFamily,
) -> None:
    # In milliseconds, and over IPv6 as well (a gateway listening on `::`): the socket option is
    # all there is to see of it short of a client that reads nothing for that long.
    with socket.socket(family) as sock:
        assert user_timeout_set_on(sock) == (2 * 2.0 + UNREAD_MARGIN) * 1000


def test_a_connection_reset_before_it_was_served_is_no_error() -> None:
    with ResetSocket() as sock:
        assert user_timeout_set_on(sock) == 0  # left as it was


def test_a_stream_cut_for_a_client_that_takes_none_of_it_drops_its_connection_without_an_error_logged(make_tollgate,
                                                                                                     fake_url):
    # The cut stream's unsent rest stayed in the process with the connection until the kernel gave
    # up on the client (TCP_USER_TIMEOUT, 7 s here), and uvicorn logged "ASGI callable returned
    # without completing response" at ERROR for each such cut, an expected event.
    server = make_tollgate(upstream_url=fake_url, server={"read_timeout": "1s"})
    team = server.admin().team()
    with unread_call(server, team.key, "flood [chunks=200000]", stream=True) as (stuck, job_id):
        client_port = stuck.getsockname()[1]
        calls = wait_for(lambda: [c for c in server.client(team.key).get(f"/api/jobs/{job_id}").json()["calls"]
                                  if c["status"] != "running"], timeout=10)
        assert calls and "took none of the stream" in calls[0]["error"]
        # Dropped as the stream was cut: before the kernel would have given up on the client.
        assert connections_from(server.process.pid, server.port, client_port) == 0
    assert "without completing response" not in server.log_path.read_text()


def test_a_client_that_reads_its_stream_slowly_but_steadily_is_not_cut_off(make_tollgate, fake_url):
    # An upstream faster than its client fills the writes: one of them held all the upstream
    # had sent meanwhile (64 KiB and more), and the kernel's send buffer megabytes more, which a
    # client at 25 KiB/s takes for longer than the read timeout. Such a client, reading all
    # along, was cut off as one that "took none of the stream", its call recorded cancelled.
    server = make_tollgate(upstream_url=fake_url, server={"read_timeout": "1s"})
    team = server.admin().team()
    with unread_call(server, team.key, "flood [chunks=200000]", stream=True) as (slow, job_id):
        slow.settimeout(5)
        until = time.monotonic() + 6  # past twice the read timeout, and the kernel's margin
        while time.monotonic() < until:
            assert slow.recv(512), "the stream was cut off"
            time.sleep(0.02)
        (call,) = server.client(team.key).get(f"/api/jobs/{job_id}").json()["calls"]
        assert (call["status"], call["error"]) == ("running", None)


def test_a_slowly_read_stream_cut_at_its_deadline_drops_its_connection_without_an_error_logged(make_tollgate, fake_url):
    # Its last write, left untaken past the grace, left the response unfinished: uvicorn logged
    # "ASGI callable returned without completing response" at ERROR, an expected event, and kept
    # the connection, whose client read on a stream that ended without its error event.
    server = make_tollgate(upstream_url=fake_url, server={"read_timeout": "1s"}, upstream={"timeouts": {"total": "2s"}})
    team = server.admin().team()
    with unread_call(server, team.key, "flood [chunks=200000]", stream=True) as (slow, job_id):
        slow.settimeout(5)
        with pytest.raises(ConnectionResetError):
            until = time.monotonic() + 15  # the deadline, the last write's grace, and more
            while time.monotonic() < until and slow.recv(512):
                time.sleep(0.02)
        (call,) = server.client(team.key).get(f"/api/jobs/{job_id}").json()["calls"]
        assert (call["status"], call["error"]) == ("error", "The call took longer than the gateway allows")
    assert "without completing response" not in server.log_path.read_text()
