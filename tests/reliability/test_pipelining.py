"""HTTP/1.1 pipelining: a client may send its next request before the answer to the one before
has ended. Every request is answered once, in the order sent; one refused before the app (its
head over 64 KiB, unparsable, or not all there in time) is answered after the answers before
it and counted as itself; the request running meanwhile is neither cut short nor left running
for a client that has hung up."""

import contextlib
import json
import socket
import struct
import time

import pytest

from tests.support import wait_for
from tests.test_operations import families, value

LIVE = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
LIVE_LAST = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
BIG_HEAD = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
LONG_TARGET = b"GET /health/live?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
# Requests refused before the app, by the status they are refused with.
REFUSED = {
    414: LONG_TARGET,
    431: BIG_HEAD,
    400: b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    408: b"GET /health/live HTTP/1.1\r\nHost: x\r\n",  # the head's end never comes
}
CALL_ROUTE = "/api/jobs/{job_id}/llm-call"


@pytest.fixture(scope="module")
def server(tmp_path_factory, litellm):
    from tests.support import Tollgate

    tollgate = Tollgate(tmp_path_factory.mktemp("pipelining"), litellm.url, litellm.master_key,
                        server={"read_timeout": "1s"}).start()
    yield tollgate
    tollgate.stop()


@pytest.fixture(scope="module")
def team(server):
    return server.admin().team(credits=100, rpm_limit=10_000, tpm_limit=100_000_000)


def new_job(server, team) -> str:
    return server.client(team.key).post("/api/jobs/create", json={"job_type": "pipelined"}).json()["job_id"]


def llm_call(team, job: str, content: str, close: bool = False) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    return (
        f"POST /api/jobs/{job}/llm-call HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode() + body


def answers(reply: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole responses at the start of `reply`, in order, as (status, body); and what is left."""
    found = []
    while True:
        head, blank, rest = reply.partition(b"\r\n\r\n")
        if not blank:
            return found, reply
        lines = head.split(b"\r\n")
        fields = {name.strip().lower(): v.strip() for name, _, v in (line.partition(b":") for line in lines[1:])}
        if b"content-length" in fields:
            size = int(fields[b"content-length"])
            if len(rest) < size:
                return found, reply
            body, rest = rest[:size], rest[size:]
        else:  # chunked
            body = b""
            while True:
                size_line, crlf, after = rest.partition(b"\r\n")
                if not crlf or len(after) < int(size_line, 16) + 2:
                    return found, reply
                size = int(size_line, 16)
                body, rest = body + after[:size], after[size + 2:]
                if size == 0:
                    break
        found.append((int(lines[0].split(b" ")[1]), body))
        reply = rest


def send_in_reads(port: int, *parts: bytes, pause: float = 0.3, timeout: float = 10) -> bytes:
    """Send `parts` on one connection, `pause` seconds apart (each its own read, as a rule),
    answered or not; then read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause)
            with contextlib.suppress(OSError):  # the server may close while this still sends
                sock.sendall(part)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def pipeline(port: int, *parts: bytes, pause: float = 0.3) -> list[tuple[int, bytes]]:
    """Send `parts` as `send_in_reads` does; then every answer, read until the server closes
    the connection."""
    found, rest = answers(send_in_reads(port, *parts, pause=pause, timeout=20))
    assert not rest, rest[:200]
    return found


def statuses(found: list[tuple[int, bytes]]) -> list[int]:
    return [status for status, _ in found]


def test_a_pipelined_head_over_64_kib_sent_with_the_request_before_is_431(server):
    # Both in one read: the second head was never counted.
    assert statuses(pipeline(server.port, LIVE + BIG_HEAD)) == [200, 431]
    assert "Traceback" not in server.log()  # refused once: the parser it stopped refuses nothing more


def test_a_pipelined_head_is_counted_from_where_it_began_not_from_the_next_read(server):
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert statuses(pipeline(server.port, LIVE + head[:60_000], head[60_000:])) == [200, 431]


def test_a_pipelined_head_is_counted_from_its_own_request_line_not_the_same_line_before_it(server):
    # The request before, in the same read, has the very same request line.
    before = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    assert statuses(pipeline(server.port, before + head[:30_000], head[30_000:])) == [200, 200]


def test_a_pipelined_request_target_over_64_kib_sent_with_the_request_before_is_414(server):
    # Its head read whole in the read the request before ended in.
    assert statuses(pipeline(server.port, LIVE + LONG_TARGET)) == [200, 414]


def test_a_pipelined_request_target_over_64_kib_never_ended_is_414(server):
    # The read the request before ended in takes the next one's target past 64 KiB.
    assert statuses(pipeline(server.port, LIVE + b"GET /health/live?q=" + b"a" * 100_000)) == [200, 414]


def test_a_pipelined_request_target_is_judged_from_where_it_began_not_from_the_next_read(server):
    assert statuses(pipeline(server.port, LIVE + LONG_TARGET[:60_000], LONG_TARGET[60_000:])) == [200, 414]


def test_a_pipelined_head_under_64_kib_sent_with_the_request_before_is_served(server):
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
    assert statuses(pipeline(server.port, LIVE + head)) == [200, 200]


@pytest.mark.parametrize("begun", [20, 3], ids=["in-its-target", "in-its-method"])
def test_a_pipelined_head_after_a_large_body_is_not_charged_for_the_body(server, team, begun):
    # The read where the next head begins holds 60 KB of the body before it, and the head,
    # 40 KB, continues in the next read: the head alone counts, wherever that read ended in it.
    big = llm_call(team, new_job(server, team), "x" * 150_000)
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    found = pipeline(server.port, big[:-60_000], big[-60_000:] + head[:begun], head[begun:])
    assert statuses(found) == [200, 200]


@pytest.mark.parametrize("refused", sorted(REFUSED))
def test_a_pipelined_request_refused_while_the_one_before_runs_is_answered_after_it(server, team, refused):
    job = new_job(server, team)
    found = pipeline(server.port, llm_call(team, job, "slow [first_byte_ms=1500]"), REFUSED[refused])
    assert statuses(found) == [200, refused]
    assert json.loads(found[0][1])["call_id"]


def test_a_pipelined_request_refused_while_the_one_before_runs_is_counted_as_itself(make_tollgate):
    server = make_tollgate(logging={"access_log": "json"})
    team = server.admin().team()
    job = new_job(server, team)
    assert statuses(pipeline(server.port, llm_call(team, job, "slow [first_byte_ms=1500]"), BIG_HEAD)) == [200, 431]

    def logged():
        return sorted(
            (entry["route"], entry["status"]) for line in server.log().splitlines() if "tollgate.access: " in line
            for entry in [json.loads(line.split("tollgate.access: ", 1)[1])] if entry["route"] in (CALL_ROUTE, "unmatched")
        )

    assert wait_for(lambda: len(logged()) == 2) and logged() == [(CALL_ROUTE, 200), ("unmatched", 431)]
    metrics = families(server)
    assert value(metrics, "tollgate_requests", route=CALL_ROUTE, status="200") == 1
    assert value(metrics, "tollgate_requests", route=CALL_ROUTE, status="431") == 0
    assert value(metrics, "tollgate_requests", route="unmatched", status="431") == 1


def test_a_request_waiting_behind_a_slow_one_has_the_read_timeout_from_its_turn(server, team):
    # Its head is in, its body not: it cannot be read while it waits (what comes is held
    # unparsed), so its time starts with its turn.
    slow = llm_call(team, new_job(server, team), "slow [first_byte_ms=2500]")
    body = b'{"job_type": "pipelined"}'
    waiting = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(slow + waiting + body[:5])
        reply = b""
        while not answers(reply)[0] and (chunk := sock.recv(65536)):
            reply += chunk
        sock.sendall(body[5:])  # once the answer before it is in
        reply += b"".join(iter(lambda: sock.recv(65536), b""))
    found, rest = answers(reply)
    assert statuses(found) == [200, 200] and not rest
    assert json.loads(found[1][1])["job_id"]


def test_a_request_half_sent_when_the_answer_before_it_ends_has_the_read_timeout_not_the_keep_alive_one(
    make_tollgate, fake_url
):
    # uvicorn's keep-alive timeout (5 s) starts as an answer ends: it is for an idle connection,
    # not one whose next request is half read. The upstream is the fake itself: an answer LiteLLM
    # was slow to give ended so late that the rest came within the keep-alive timeout after it.
    server = make_tollgate(upstream_url=fake_url, upstream_key="sk-upstream", server={"read_timeout": "10s"})
    team = server.admin().team()
    slow = llm_call(team, new_job(server, team), "slow [first_byte_ms=500]")
    found = pipeline(server.port, slow + LIVE_LAST[:20], LIVE_LAST[20:], pause=6.5)
    assert statuses(found) == [200, 200]


def test_a_client_hanging_up_with_a_request_queued_cancels_the_running_call(server, team):
    job = new_job(server, team)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(llm_call(team, job, "slow [first_byte_ms=3000]") + LIVE)
        time.sleep(0.5)
    client = server.client(team.key)
    calls = wait_for(lambda: [c for c in client.get(f"/api/jobs/{job}").json()["calls"] if c["status"] != "running"],
                     timeout=10)
    assert [c["status"] for c in calls] == ["cancelled"]


def test_a_client_resetting_its_connection_with_a_request_queued_cancels_the_running_call(server, team):
    # A reset brings no end of the client's sending first (eof_received): only the loss of the
    # connection tells the call running ahead of the queued request.
    job = new_job(server, team)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(llm_call(team, job, "slow [first_byte_ms=3000]") + LIVE)
        time.sleep(0.5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset
    client = server.client(team.key)
    calls = wait_for(lambda: [c for c in client.get(f"/api/jobs/{job}").json()["calls"] if c["status"] != "running"],
                     timeout=10)
    assert [c["status"] for c in calls] == ["cancelled"]


def test_a_client_hanging_up_after_pipelining_a_request_behind_a_running_call_cancels_it(server, team):
    # The request comes once the call is under way (uvicorn stopped reading as it queued it, and
    # never saw the hang-up: the call ran to its end and was charged).
    job = new_job(server, team)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(llm_call(team, job, "slow [first_byte_ms=3000]"))
        time.sleep(0.5)
        sock.sendall(LIVE)
        time.sleep(0.5)
    client = server.client(team.key)
    calls = wait_for(lambda: [c for c in client.get(f"/api/jobs/{job}").json()["calls"] if c["status"] != "running"],
                     timeout=10)
    assert [c["status"] for c in calls] == ["cancelled"]


def test_what_a_client_sends_behind_a_queued_request_is_read_only_up_to_a_bound(server, team):
    # Held unparsed while the call ahead runs, for a hang-up to be seen: past 64 KiB the
    # connection is no longer read, and a client sending without end is held back by TCP, not
    # kept in the gateway's memory.
    job = new_job(server, team)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(llm_call(team, job, "slow [first_byte_ms=3000]") + LIVE)
        time.sleep(0.5)  # what follows in reads of its own, held: not parsed (and refused) with LIVE
        sock.settimeout(1)
        with contextlib.suppress(OSError):  # a send that no longer goes through in time
            while sent < 256 * 1024 * 1024:
                sent += sock.send(b"a" * 1024 * 1024)
    assert sent < 128 * 1024 * 1024, f"{sent / 2**20:.0f} MiB taken from a client behind a queued request"


@pytest.mark.parametrize("size", [10, 200_000], ids=["small", "over-64-kib"])
def test_requests_pipelined_while_a_call_runs_are_answered_after_it_in_order(server, team, size):
    # Sent in reads of their own once the call is under way, the second with a body of `size`.
    job = new_job(server, team)
    body = b'{"job_type": "pipelined"}' + b" " * size
    create = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    found = pipeline(server.port, llm_call(team, job, "slow [first_byte_ms=1500]"), LIVE, create[:100], create[100:],
                     LIVE_LAST)
    assert statuses(found) == [200, 200, 200, 200]
    assert json.loads(found[0][1])["call_id"] and json.loads(found[2][1])["job_id"]


def test_pipelined_requests_are_answered_in_the_order_sent(server, team):
    job = new_job(server, team)
    found = pipeline(server.port, llm_call(team, job, "slow [first_byte_ms=1000]") + LIVE + LIVE_LAST)
    assert statuses(found) == [200, 200, 200]
    assert json.loads(found[0][1])["call_id"] and json.loads(found[1][1]) == {"status": "ok"}


def test_a_request_pipelined_after_a_refused_one_is_not_served(server):
    found = pipeline(server.port, REFUSED[400] + LIVE_LAST)
    assert statuses(found) == [400]


def test_a_refused_connection_lingering_past_the_read_timeout_is_refused_once(make_tollgate):
    # The refusal is answered and the connection kept open a while for the client to read it:
    # the read timeout passing meanwhile is no second refusal (which wrote after the end).
    server = make_tollgate(server={"read_timeout": "1s"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(REFUSED[400])
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
        time.sleep(1.8)  # the client does not hang up at once
    time.sleep(0.3)
    assert value(families(server), "tollgate_requests", status="408") == 0
    assert "Traceback" not in server.log()


def test_a_queued_request_whose_body_is_malformed_is_answered_400_after_the_one_before(server, team):
    # Its head was read and queued; its chunked body is not HTTP: refused, it is never run, and
    # its refusal waits for the answer before it, which is not cut short.
    job = new_job(server, team)
    malformed = b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nnot-a-size\r\n"
    found = pipeline(server.port, llm_call(team, job, "slow [first_byte_ms=1000]") + malformed)
    assert statuses(found) == [200, 400]
    assert json.loads(found[0][1])["call_id"]


def test_a_request_waiting_behind_a_slow_one_whose_body_never_comes_is_408_a_read_timeout_after_its_turn(server, team):
    slow = llm_call(team, new_job(server, team), "slow [first_byte_ms=2500]")
    waiting = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 25\r\n\r\n{"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(slow + waiting)
        reply = b""
        while not answers(reply)[0] and (chunk := sock.recv(65536)):
            reply += chunk
        turn = time.monotonic()
        reply += b"".join(iter(lambda: sock.recv(65536), b""))
        waited = time.monotonic() - turn
    found, rest = answers(reply)
    assert statuses(found) == [200, 408] and not rest
    assert 0.8 < waited < 5  # read_timeout is 1 s


def test_a_request_pipelined_after_one_that_closes_the_connection_is_not_answered(server):
    assert statuses(pipeline(server.port, LIVE_LAST + REFUSED[400])) == [200]


def test_a_request_sent_with_the_end_of_an_answered_ones_body_outlives_the_keep_alive_timeout(server, team):
    # The first is answered (a wrong key) before its body is in; the connection is idle once that
    # body is, but not when the next request comes in the same read: it runs past the 5 s.
    early = (
        b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    )
    slow = llm_call(team, new_job(server, team), "slow [first_byte_ms=6000]", close=True)
    found = pipeline(server.port, early, b"0123456789" + slow)
    assert statuses(found) == [401, 200]
