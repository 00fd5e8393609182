"""Hostile input: every request below gets a 4xx with a message, and the gateway stays healthy."""

import contextlib
import json
import socket
import time
from typing import Iterator

import httpx
import pytest

from tests.reliability.test_pipelining import answers, send_in_reads
from tests.support import Tollgate

HI = [{"role": "user", "content": "hi"}]
JSON = "application/json"
BIG = 11 * 1024 * 1024


def call_body(**fields) -> dict:
    return {"messages": HI, **fields}


# (name, method, path template, body: dict | bytes | None, content type, which key)
# Paths may use {job} (an open job of the team) and {team}.
CASES = [
    ("malformed json", "POST", "/api/jobs/{job}/llm-call", b"{", JSON, "virtual"),
    ("truncated json", "POST", "/api/jobs/{job}/llm-call", b'{"messages": [{"role": "user", "content": "hi"', JSON, "virtual"),
    ("top-level array", "POST", "/api/jobs/{job}/llm-call", b"[1, 2]", JSON, "virtual"),
    ("top-level string", "POST", "/api/jobs/{job}/llm-call", b'"hi"', JSON, "virtual"),
    ("empty body", "POST", "/api/jobs/{job}/llm-call", b"", JSON, "virtual"),
    ("text/plain", "POST", "/api/jobs/{job}/llm-call", b'{"messages": []}', "text/plain", "virtual"),
    ("multipart", "POST", "/api/jobs/{job}/llm-call", b"--x\r\n", "multipart/form-data; boundary=x", "virtual"),
    ("form encoded", "POST", "/api/jobs/create", b"job_type=x", "application/x-www-form-urlencoded", "virtual"),
    ("huge body", "POST", "/api/jobs/{job}/llm-call", b'{"a": "' + b"x" * BIG + b'"}', JSON, "virtual"),
    ("deep arrays", "POST", "/api/jobs/{job}/llm-call", b"[" * 200_000 + b"]" * 200_000, JSON, "virtual"),
    ("deep objects", "POST", "/api/jobs/{job}/llm-call", b'{"a":' * 5000 + b"1" + b"}" * 5000, JSON, "virtual"),
    ("lone surrogate in value", "POST", "/api/jobs/{job}/llm-call", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', JSON, "virtual"),
    ("lone surrogate in key", "POST", "/api/jobs/{job}/llm-call", b'{"\\ud800": 1, "messages": []}', JSON, "virtual"),
    ("NaN", "POST", "/api/jobs/{job}/llm-call", b'{"messages": [], "top_p": NaN}', JSON, "virtual"),
    ("-Infinity", "POST", "/api/jobs/{job}/llm-call", b'{"messages": [], "top_p": -Infinity}', JSON, "virtual"),
    ("1e999", "POST", "/api/jobs/create", b'{"job_type": "x", "metadata": {"n": 1e999}}', JSON, "virtual"),
    ("invalid utf-8", "POST", "/api/jobs/{job}/llm-call", b'{"messages": "\xc3\x28"}', JSON, "virtual"),
    ("messages null", "POST", "/api/jobs/{job}/llm-call", {"messages": None}, JSON, "virtual"),
    ("messages object", "POST", "/api/jobs/{job}/llm-call", {"messages": {"role": "user"}}, JSON, "virtual"),
    ("message null", "POST", "/api/jobs/{job}/llm-call", {"messages": [None]}, JSON, "virtual"),
    ("role number", "POST", "/api/jobs/{job}/llm-call", {"messages": [{"role": 1, "content": "x"}]}, JSON, "virtual"),
    ("content object", "POST", "/api/jobs/{job}/llm-call", {"messages": [{"role": "user", "content": {"a": 1}}]}, JSON, "virtual"),
    ("temperature string", "POST", "/api/jobs/{job}/llm-call", call_body(temperature="0.5"), JSON, "virtual"),
    ("temperature negative", "POST", "/api/jobs/{job}/llm-call", call_body(temperature=-1), JSON, "virtual"),
    ("top_p list", "POST", "/api/jobs/{job}/llm-call", call_body(top_p=[1]), JSON, "virtual"),
    ("max_tokens negative", "POST", "/api/jobs/{job}/llm-call", call_body(max_tokens=-5), JSON, "virtual"),
    ("max_tokens string", "POST", "/api/jobs/{job}/llm-call", call_body(max_tokens="100"), JSON, "virtual"),
    ("max_tokens bool", "POST", "/api/jobs/{job}/llm-call", call_body(max_tokens=True), JSON, "virtual"),
    ("n zero", "POST", "/api/jobs/{job}/llm-call", call_body(n=0), JSON, "virtual"),
    ("stop numbers", "POST", "/api/jobs/{job}/llm-call", call_body(stop=[1, 2]), JSON, "virtual"),
    ("stop too many", "POST", "/api/jobs/{job}/llm-call", call_body(stop=["s"] * 100), JSON, "virtual"),
    ("stop oversize", "POST", "/api/jobs/{job}/llm-call", call_body(stop="x" * 100_000), JSON, "virtual"),
    ("model_group list", "POST", "/api/jobs/{job}/llm-call", call_body(model_group=["Main"]), JSON, "virtual"),
    ("model_group unknown", "POST", "/api/jobs/{job}/llm-call", call_body(model_group="../../etc"), JSON, "virtual"),
    ("purpose too long", "POST", "/api/jobs/{job}/llm-call", call_body(purpose="p" * 10_000), JSON, "virtual"),
    ("tools object", "POST", "/api/jobs/{job}/llm-call", call_body(tools={"a": 1}), JSON, "virtual"),
    ("tool_choice number", "POST", "/api/jobs/{job}/llm-call", call_body(tool_choice=5), JSON, "virtual"),
    ("response_format string", "POST", "/api/jobs/{job}/llm-call", call_body(response_format="json"), JSON, "virtual"),
    ("user number", "POST", "/api/jobs/{job}/llm-call", call_body(user=5), JSON, "virtual"),
    ("metadata string", "POST", "/api/jobs/{job}/llm-call", call_body(metadata="x"), JSON, "virtual"),
    ("job_type missing", "POST", "/api/jobs/create", {}, JSON, "virtual"),
    ("job_type number", "POST", "/api/jobs/create", {"job_type": 5}, JSON, "virtual"),
    ("job metadata list", "POST", "/api/jobs/create", {"job_type": "x", "metadata": [1]}, JSON, "virtual"),
    ("complete bad status", "POST", "/api/jobs/{job}/complete", {"status": "done"}, JSON, "virtual"),
    ("complete no status", "POST", "/api/jobs/{job}/complete", {}, JSON, "virtual"),
    ("complete error_message number", "POST", "/api/jobs/{job}/complete", {"status": "failed", "error_message": 5}, JSON, "virtual"),
    ("no authorization", "GET", "/api/teams/{team}", None, None, None),
    ("bearer without token", "GET", "/api/teams/{team}", None, None, "Bearer"),
    ("basic auth", "GET", "/api/teams/{team}", None, None, "Basic dXNlcjpwYXNz"),
    ("garbled authorization", "GET", "/api/teams/{team}", None, None, "Bearer \xff\xfe\xfd"),
    ("huge bearer token", "GET", "/api/teams/{team}", None, None, "Bearer sk-" + "x" * 10_000),
    ("master key on /api", "GET", "/api/teams/{team}", None, None, "master"),
    ("virtual key on /admin", "GET", "/admin/organizations", None, None, "virtual"),
    ("traversal job id", "GET", "/api/jobs/..%2F..%2Fadmin%2Forganizations", None, None, "virtual"),
    ("dot-dot job id", "POST", "/api/jobs/../../admin/organizations/llm-call", call_body(), JSON, "virtual"),
    ("nul in job id", "GET", "/api/jobs/abc%00def", None, None, "virtual"),
    ("very long job id", "GET", "/api/jobs/" + "a" * 8000, None, None, "virtual"),
    ("traversal team id", "GET", "/api/teams/..%2F..%2Fadmin", None, None, "virtual"),
    ("crlf in path", "GET", "/api/jobs/x%0d%0aSet-Cookie:%20evil=1", None, None, "virtual"),
    ("v1 job header not a uuid", "POST", "/v1/chat/completions", {"model": "Main", "messages": HI}, JSON, "virtual+job-header"),
    ("v1 missing model", "POST", "/v1/chat/completions", {"messages": HI}, JSON, "virtual"),
    ("v1 stream not bool", "POST", "/v1/chat/completions", {"model": "Main", "messages": HI, "stream": "yes"}, JSON, "virtual"),
    ("admin team id traversal", "POST", "/admin/teams", {"team_id": "../x", "organization_id": "o"}, JSON, "master"),
    ("admin amount string", "POST", "/admin/teams/{team}/credits", {"amount": "10", "reason": "x"}, JSON, "master"),
    ("admin unknown field", "PATCH", "/admin/teams/{team}", {"credits_used": 0}, JSON, "master"),
]


@pytest.fixture(scope="module")
def target(tollgate, admin):
    team = admin.team()
    job = httpx.post(
        f"{tollgate.url}/api/jobs/create", json={"job_type": "hostile"}, headers={"Authorization": f"Bearer {team.key}"}
    ).json()["job_id"]
    return tollgate, team, job


def message_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]["message"]
    return str(body.get("detail", "")) if isinstance(body, dict) else ""


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name, method, path, body, content_type, key", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_gets_a_4xx_with_a_message(target, name, method, path, body, content_type, key):
    server, team, job = target
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    if key == "virtual" or key == "virtual+job-header":
        headers["Authorization"] = f"Bearer {team.key}"
    elif key == "master":
        headers["Authorization"] = f"Bearer {server.master_key}"
    elif key:
        headers["Authorization"] = key
    if key == "virtual+job-header":
        headers["X-Job-Id"] = "../../etc/passwd"
    content = body if isinstance(body, bytes) or body is None else httpx.Request("POST", "/", json=body).content
    url = server.url + path.format(job=job, team=team.team_id)
    # Raw bytes for paths and headers a polite client would refuse to send.
    response = httpx.request(method, httpx.URL(url), content=content, headers=[(k, v.encode("latin-1")) for k, v in headers.items()], timeout=30)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert message_of(response).strip(), response.text[:300]
    assert "set-cookie" not in response.headers


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /api/teams/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\rb\r\n\r\n",
        b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nX-Job-Id: a\r\n X-Folded: 1\r\n\r\n",
    ],
    ids=["garbage request line", "bad content-length", "bare CR in header", "folded header"],
)
def test_protocol_level_garbage_gets_a_400(target, request_bytes):
    server, _, _ = target
    reply = raw_exchange(server.port, request_bytes)
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:200]


def test_protocol_level_refusals_are_json(target):
    server, _, _ = target
    reply = raw_exchange(server.port, b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    if not body:  # the body may come in a later read
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, body = reply.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n", 1)[0] and b"application/json" in head.lower()
    assert json.loads(body)["detail"]


def read_all(sock: socket.socket) -> bytes:
    return b"".join(iter(lambda: sock.recv(65536), b""))


@contextlib.contextmanager
def kept_alive(port: int, timeout: float = 10) -> Iterator[socket.socket]:
    """A connection to `port` kept alive after one request answered on it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        yield sock


@pytest.mark.parametrize(
    "path", [b"/v1/chat/completions", b"http://x:8003/v1/chat/completions", "/v1/models/Çhat".encode()],
)
def test_a_protocol_level_refusal_under_v1_is_in_openai_shape(target, path):
    # What the OpenAI SDKs read an error from: {"error": {"message", "type", "code"}}. A proxy may
    # send the target in absolute form (the second), which uvicorn serves as its path. A target
    # the parser refuses (the third: a byte no URL may hold, as curl sends a path typed in UTF-8)
    # was never read, and the refusal was `{"detail": ...}`.
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n")
        reply = read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n", 1)[0]
    error = json.loads(body)["error"]
    assert error["message"] and (error["type"], error["code"]) == ("invalid_request_error", "bad_request")


def test_a_protocol_level_refusal_under_v1_is_in_openai_shape_though_its_query_holds_a_url(target):
    # Not an absolute-form target: its `://` comes after the path began.
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions?next=http://x/y HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n")
        reply = read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n", 1)[0]
    assert json.loads(body)["error"]["type"] == "invalid_request_error", body


def test_a_request_head_over_64_kib_is_431_and_the_connection_closed(target):
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):  # the server may close while this still sends
            for _ in range(200):  # 20 MB of one header, never finished
                sock.sendall(b"X-Big: " + b"a" * 100_000)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert "64 KiB" in json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]


def test_a_refusal_of_the_http_layer_is_written_as_compactly_as_every_other_answer(target):
    # It alone was written by json.dumps, with a space after each colon and comma.
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        reply = read_all(sock)
    assert reply.partition(b"\r\n\r\n")[2].startswith(b'{"detail":"')


def test_what_a_client_sends_on_after_its_refusal_is_read_and_dropped_not_answered_with_a_reset(target):
    # Closed at once, its bytes unread, a socket resets: a reset overtaking the refusal on the way
    # destroys it unread at the client. The server reads on for a while (two seconds) first.
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")  # and the server's end
        sock.sendall(b"still sending " * 1000)
        time.sleep(0.3)  # a reset would be back by now
        sock.sendall(b"still sending " * 1000)
        assert sock.recv(65536) == b""


def test_a_whole_head_over_64_kib_sent_at_once_is_431_too(target):
    # One read may bring all of it, as a client's single sendall on loopback does.
    server, _, _ = target
    reply = raw_exchange(server.port, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_head_under_64_kib_with_a_large_body_in_the_same_read_is_served(target):
    server, team, job = target
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
    request = (
        f"POST /api/jobs/{job}/llm-call HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    assert raw_exchange(server.port, request).startswith(b"HTTP/1.1 200 ")


def test_an_oversized_head_on_a_kept_alive_connection_is_answered_431_too(target):
    server, _, _ = target
    with kept_alive(server.port) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(b"X-Big: " + b"a" * 100_000)
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_a_request_target_over_64_kib_is_414_saying_so(target):
    # RFC 9112, 3: a target longer than the server will parse is a 414, not a 431 about the
    # header fields, which a client would look for in vain.
    server, _, _ = target
    reply = send_in_reads(server.port, b"GET /health/live?q=", *[b"a" * 30_000] * 4)
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]
    detail = json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]
    assert "target" in detail and "64 KiB" in detail, detail


def test_a_whole_request_line_over_64_kib_sent_at_once_is_414_too(target):
    server, _, _ = target
    reply = raw_exchange(server.port, b"GET /health/live?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]


def test_a_request_target_over_64_kib_after_empty_lines_is_414_too(target):
    # RFC 9112, 2.2: a server should skip empty lines before a request line; they end no line.
    server, _, _ = target
    reply = send_in_reads(server.port, b"\r\n\r\nGET /health/live?q=", *[b"a" * 30_000] * 3)
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]


def test_a_request_target_over_64_kib_under_v1_is_414_in_openai_shape(target):
    server, _, _ = target
    reply = send_in_reads(server.port, b"POST /v1/chat/completions?q=" + b"a" * 30_000, *[b"a" * 30_000] * 3)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 "), head
    error = json.loads(body)["error"]
    assert "target" in error["message"] and error["type"] == "invalid_request_error", error
    assert error["code"] == "uri_too_long", error  # RFC 9110's name, whatever Python's version calls it


def test_a_long_request_line_ending_within_64_kib_with_header_fields_past_it_is_431(target):
    # The line (60 KB of it) ends in a read of its own, before the fields: they are what is too large.
    server, _, _ = target
    line = b"GET /health/live?q=" + b"a" * 60_000 + b" HTTP/1.1\r\n"
    reply = send_in_reads(server.port, line[:40_000], line[40_000:] + b"Host: x\r\n", b"X-Big: " + b"a" * 10_000)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_request_line_ending_in_the_read_that_takes_the_head_past_64_kib_is_431(target):
    server, _, _ = target
    line = b"GET /health/live?q=" + b"a" * 60_000 + b" HTTP/1.1\r\n"
    reply = send_in_reads(server.port, line[:40_000], line[40_000:] + b"Host: x\r\nX-Big: " + b"a" * 10_000)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_request_target_over_64_kib_after_a_head_sent_in_two_reads_is_414(target):
    # The request before's line ended in an earlier read than its head did: that is no part of
    # what is known of the next one's.
    server, _, _ = target
    reply = send_in_reads(
        server.port, b"GET /health/live HTTP/1.1\r\n", b"Host: x\r\n\r\n", b"GET /health/live?q=", b"a" * 70_000
    )
    assert reply.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 414 " in reply, reply[:400]


def test_a_head_at_the_64_kib_bound_is_answered_alike_whether_its_blank_line_comes_with_it_or_alone(target):
    # Its request line and fields fill 64 KiB to the byte; the blank line that ends it comes after
    # them. Where the reads split a head is the network's doing, not the client's.
    server, _, _ = target
    lines = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
    lines += b"a" * (64 * 1024 - len(lines) - 2) + b"\r\n"
    whole = raw_exchange(server.port, lines + b"\r\n")
    split = send_in_reads(server.port, lines, b"\r\n")
    assert whole.partition(b"\r\n")[0] == split.partition(b"\r\n")[0], (whole[:200], split[:200])


def test_a_head_over_64_kib_whose_read_ends_between_a_fields_cr_and_lf_is_431(target):
    # The next read, beginning with that LF, was taken for the end of the head (its blank line
    # begun in the read before), and read whole however much of the head it still held.
    server, _, _ = target
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n"
    edge = head.index(b"\r\n", 60_000) + 1  # within 64 KiB, between a CR and its LF
    reply = send_in_reads(server.port, head[:edge], head[edge:])
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


@pytest.mark.parametrize("part", ["body", "head"])
def test_a_request_that_trickles_in_is_408_once_the_read_timeout_is_over(make_tollgate, part):
    server = make_tollgate(server={"read_timeout": "1s"})
    start = {
        "body": f"POST /admin/organizations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.master_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode(),
        "head": b"GET /health/live HTTP/1.1\r\nX-Slow: ",
    }[part]
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(start)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(5):  # a byte at a time, never the whole request
                time.sleep(0.4)
                sock.sendall(b"a")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 10
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]


def test_a_request_on_a_kept_alive_connection_has_the_read_timeout_from_its_own_start(make_tollgate):
    # Not from the start of the request before it: that one's time is over once it is read whole.
    server = make_tollgate(server={"read_timeout": "3s"})
    with kept_alive(server.port, timeout=15) as sock:
        time.sleep(1.8)
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        time.sleep(1.8)  # past the first request's 3 s, well within this one's
        sock.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_a_connection_that_sends_nothing_is_closed_once_the_read_timeout_is_over(make_tollgate):
    server = make_tollgate(server={"read_timeout": "1s"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
    assert time.monotonic() - started < 10


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_clients_host(target):
    server, team, job = target
    response = httpx.get(
        f"{server.url}/api/jobs/{job}/", headers={"Authorization": f"Bearer {team.key}", "Host": "evil.example"}
    )
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["detail"]


def test_injected_header_lines_are_not_reflected(target):
    server, team, _ = target
    request = (
        f"GET /api/teams/{team.team_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        "X-Job-Id: abc\r\nX-Evil: injected\r\n\r\n"
    ).encode()
    reply = raw_exchange(server.port, request)
    assert b" 200 " in reply.split(b"\r\n", 1)[0] and b"injected" not in reply


def test_the_gateway_is_healthy_after_all_of_it(target):
    server, team, job = target
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "ok"}
    response = httpx.post(
        f"{server.url}/api/jobs/{job}/llm-call", json=call_body(), headers={"Authorization": f"Bearer {team.key}"}
    )
    assert response.status_code == 200


def refusal(port: int, request: bytes) -> tuple[int, dict]:
    """The status and JSON body of the one answer to `request`, the connection closed after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)  # a second answer after it fails here


def test_an_http_1_1_request_without_a_host_header_is_400_and_not_served(target):
    # RFC 9112, 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host. It was served.
    server, team, _ = target
    body = b'{"job_type": "no-host"}'
    status, answer = refusal(server.port, (
        f"POST /api/jobs/create HTTP/1.1\r\nAuthorization: Bearer {team.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body)
    assert status == 400 and "Host" in answer["detail"], answer
    jobs = httpx.get(f"{server.url}/api/teams/{team.team_id}/jobs", headers={"Authorization": f"Bearer {team.key}"})
    assert [job["job_type"] for job in jobs.json()["jobs"] if job["job_type"] == "no-host"] == []


def test_an_http_1_0_request_without_a_host_header_is_served(target):
    server, _, _ = target
    reply = raw_exchange(server.port, b"GET /health/live HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


def test_a_request_line_with_no_version_is_served_without_a_host_header_as_http_1_0s_is(target):
    # The parser reads such a line (HTTP/0.9's) as version 0.9, older than Host.
    server, _, _ = target
    reply = raw_exchange(server.port, b"GET /health/live\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_a_request_with_two_host_headers_is_400_naming_them(target, version):
    # RFC 9112, 3.2: more than one Host is a 400 whatever the version.
    server, _, _ = target
    status, answer = refusal(
        server.port, b"GET /health/live HTTP/" + version + b"\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    assert status == 400 and "Host" in answer["detail"], answer


def test_a_request_refused_as_its_head_is_read_is_refused_once_without_an_error_logged(target):
    # The refusal stops the parser, which raises in turn: that is no second refusal to write.
    server, _, _ = target
    logged = len(server.log())
    status, answer = refusal(server.port, b"GET /health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status == 400 and "Host" in answer["detail"], answer
    time.sleep(0.2)  # for a line logged as the connection closed
    assert "Traceback" not in server.log()[logged:]


def test_a_head_over_64_kib_is_refused_once_without_an_error_logged_as_the_client_sends_on(target):
    # What the client sends after its refusal is dropped unread, not refused again.
    server, _, _ = target
    logged = len(server.log())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close while this still sends
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 ") and reply.count(b"HTTP/1.1 ") == 1, reply[:300]
    time.sleep(0.2)  # for a line logged as the connection closed
    assert "Traceback" not in server.log()[logged:]


@pytest.mark.parametrize("second", ["2", "20"], ids=["identical", "conflicting"])
def test_two_content_length_headers_are_400_naming_them(target, second):
    # Two lengths are how requests are smuggled past an intermediary that reads the other one;
    # the refusal said only "Invalid HTTP request received."
    server, team, _ = target
    status, answer = refusal(server.port, (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: {second}\r\n\r\n{{}}"
    ).encode())
    assert status == 400 and "more than one Content-Length" in answer["detail"], answer


@pytest.mark.parametrize(
    "request_bytes, named",
    [
        (b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
         "both Content-Length and Transfer-Encoding"),
        (b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
         "both Content-Length and Transfer-Encoding"),
        (b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
         "chunk size"),
        (b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n", "Content-Length"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2"),
    ],
    ids=["content-length and chunked", "chunked and content-length", "bad chunk size", "content-length not a number", "http/2 preface"],
)
def test_a_request_the_http_parser_refuses_is_400_saying_what_is_wrong(target, request_bytes, named):
    server, _, _ = target
    status, answer = refusal(server.port, request_bytes)
    assert status == 400 and named in answer["detail"], answer


@pytest.mark.parametrize("host", [b"Host: x\r\n", b""], ids=["with host", "without host"])
def test_a_request_line_saying_http_2_is_505_saying_to_send_http_1_1(target, host):
    # HTTP/2 is not spoken in HTTP/1's syntax: such a request was served as HTTP/1.1 with a
    # Host, and told without one that an HTTP/1.1 request must carry a Host.
    server, _, _ = target
    status, answer = refusal(server.port, b"GET /health/live HTTP/2.0\r\n" + host + b"\r\n")
    assert status == 505 and "send HTTP/1.1" in answer["detail"], answer


def test_a_refusal_before_any_route_carries_a_date_as_every_answer_does(target):
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        head = read_all(sock).partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400 ") and b"\r\ndate: " in head, head


def test_a_target_that_is_not_a_path_is_400_saying_so(target):
    server, _, _ = target
    status, answer = refusal(server.port, b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and "target" in answer["detail"], answer


def test_a_request_head_that_stops_half_way_is_408_once_the_read_timeout_is_over(make_tollgate):
    server = make_tollgate(server={"read_timeout": "1s"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # in one piece, then nothing more
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_a_request_answered_before_its_body_arrived_gets_no_second_answer(make_tollgate):
    # Refused on its head (a wrong key): the body it never finishes sending must not earn it a
    # 408 as well, which a client would read as the answer to its next request.
    server = make_tollgate(server={"read_timeout": "1s"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(
            b"POST /admin/organizations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 401 ") and time.monotonic() - started < 10
    assert reply.count(b"HTTP/1.1 ") == 1, reply


def chunked_job_create(team_key: str | None, trailer: bytes = b"") -> bytes:
    body = b'{"job_type": "chunked"}'
    auth = f"Authorization: Bearer {team_key}\r\n" if team_key else ""
    return (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + trailer


def test_a_chunked_bodys_trailer_fields_over_64_kib_are_431(target):
    # uvicorn kept every trailer field, without bound: a few MB of short trailer lines grew the
    # process by hundreds of MB, within the read timeout.
    server, team, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(chunked_job_create(team.key))
        with contextlib.suppress(OSError):  # the server may close while this still sends
            for _ in range(100):
                sock.sendall(b"X-T: a\r\n" * 1000)
            sock.sendall(b"\r\n")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert "64 KiB" in json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]


def test_trailer_fields_over_64_kib_sent_with_their_request_are_431(target):
    # Counted only once a read was over, they were never counted when the request ended within
    # that read: served, however large.
    server, team, _ = target
    reply = raw_exchange(server.port, chunked_job_create(team.key, b"X-T: " + b"a" * 100_000 + b"\r\n\r\n"))
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_trailer_fields_under_64_kib_split_across_reads_are_served(target):
    # A field begun in one read and ended in the next was counted twice: once in the raw bytes
    # of the read it began in, then whole, as the request ended.
    server, team, _ = target
    request = chunked_job_create(team.key, b"X-T: " + b"a" * 50_000 + b"\r\n\r\n")
    end = request.index(b"0\r\n") + 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for part in (request[:end], request[end:end + 30_000], request[end + 30_000:]):
            sock.sendall(part)
            time.sleep(0.2)  # each its own read
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_trailer_fields_under_64_kib_written_without_a_space_after_the_colon_are_served(target):
    # Each field was counted with the ": " a client may leave out (RFC 9110, 5.6.3: the space is
    # optional): 60 kB of `a:b` fields were counted as 72 kB, and a valid upload was a 431.
    server, team, _ = target
    reply = raw_exchange(server.port, chunked_job_create(team.key, b"a:b\r\n" * 12_000 + b"\r\n"))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_an_endless_trailer_field_is_431_without_waiting_for_the_read_timeout(target):
    server, team, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(chunked_job_create(team.key, b"X-T: "))
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(b"a" * 100_000)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]


def test_a_trailer_field_is_not_read_as_a_request_header(target):
    server, team, _ = target
    reply = raw_exchange(server.port, chunked_job_create(None, f"Authorization: Bearer {team.key}\r\n\r\n".encode()))
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]


def test_a_chunked_body_with_small_trailer_fields_is_served(target):
    server, team, _ = target
    reply = raw_exchange(server.port, chunked_job_create(team.key, b"X-T: 1\r\nX-U: 2\r\n\r\n"))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_a_chunks_data_read_after_its_size_line_is_body_not_trailer(target):
    # A read begun right after a chunk's size line is trailer only if it brings no chunk data.
    server, team, job = target
    head, body = large_chunked_call(job, team.key)
    reply = send_in_reads(server.port, head + b"%x\r\n" % len(body), body[:100_000], body[100_000:] + b"\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_a_read_that_brings_a_chunks_data_and_ends_after_the_next_size_line_is_body_not_trailer(target):
    # It began right after a size line, and ended right after one: taken for a read that was all
    # trailer, its bytes were counted as trailer fields, and a body of two such chunks was a 431.
    server, team, job = target
    head, body = large_chunked_call(job, team.key)
    first, second = body[:100_000], body[100_000:]
    reply = send_in_reads(server.port, head + b"%x\r\n" % len(first), first + b"\r\n%x\r\n" % len(second),
                          second + b"\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def large_chunked_call(job: str, key: str) -> tuple[bytes, bytes]:
    """The head of a chunked call of `job` (its chunks for the caller to write), and its body of
    150 kB and more, read by the server in several reads."""
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 150_000}]}).encode()
    head = (
        f"POST /api/jobs/{job}/llm-call HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    return head, body


def test_a_kept_alive_connection_sent_only_an_empty_line_is_closed_once_idle(target):
    # An empty line before a request line is skipped (RFC 9112, 2.2); it begins no request. Its read
    # cancelled the keep-alive timeout, and nothing armed a timer again: the connection, sent
    # nothing more, stayed open for good.
    server, _, _ = target
    with kept_alive(server.port, timeout=20) as sock:
        time.sleep(0.2)
        sock.sendall(b"\r\n")
        started = time.monotonic()
        assert read_all(sock) == b""
    assert time.monotonic() - started < 10


@contextlib.contextmanager
def answered_before_its_body(port: int) -> Iterator[socket.socket]:
    """A connection whose request (10 bytes of body to come) was answered 401 on its head."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(
            b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        yield sock


def test_a_connection_answered_before_the_body_came_is_closed_once_idle(target):
    # Idle once the body is in, it is closed as any idle connection is (the body's read once
    # cancelled the keep-alive timeout the answer's end armed: it stayed open for good).
    server, _, _ = target
    with answered_before_its_body(server.port) as sock:
        time.sleep(0.2)
        sock.sendall(b"0123456789")
        started = time.monotonic()
        assert read_all(sock) == b""
    assert time.monotonic() - started < 10


def test_a_connection_answered_before_a_body_slower_than_the_keep_alive_timeout_is_closed_once_idle(target):
    # The keep-alive timeout (5 s) armed by the answer's end ran out while the body still came in,
    # a request under way: the body's end must arm it again.
    server, _, _ = target
    with answered_before_its_body(server.port) as sock:
        for digit in b"0123456789":  # over 6.3 s
            time.sleep(0.7)
            sock.sendall(bytes([digit]))
        started = time.monotonic()
        assert read_all(sock) == b""
    assert time.monotonic() - started < 10


def flood(port: int, start: bytes, seconds: float = 8.0) -> tuple[bytes, float]:
    """Send `start`, then bytes without end until the server stops taking them or `seconds`
    pass: the server's reply, and how long it took them."""
    with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:
        sock.sendall(start)
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the server closed while this still sent
            while time.monotonic() - started < seconds:
                sock.sendall(b"a" * 65536)
        taken = time.monotonic() - started
        with contextlib.suppress(OSError):
            return read_all(sock), taken
    return b"", taken


@pytest.fixture(scope="module")
def small_bodies(tmp_path_factory, litellm):
    # Bodies up to 64 KiB; the read timeout is the default 30 s, longer than any test here waits.
    server = Tollgate(tmp_path_factory.mktemp("small-bodies"), litellm.url, litellm.master_key,
                      server={"max_body_bytes": 65536}).start()
    yield server
    server.stop()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_request_answered_before_its_body_that_sends_on_without_end_is_cut_off(small_bodies, framing):
    # A 401 (no key needed) or a 413, then gigabytes of body: uvicorn read on and dropped them until
    # the read timeout, 30 s a connection, a core of the gateway busy and every other request slowed
    # thirtyfold. Past twice the body limit it is cut off (once the client had time to read its answer).
    length = "Content-Length: 100000000000" if framing == "content-length" else "Transfer-Encoding: chunked"
    first = b"" if framing == "content-length" else b"fffffffffff\r\n"
    reply, taken = flood(small_bodies.port, (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{length}\r\n\r\n"
    ).encode() + first)
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    assert taken < 6, f"the gateway took the body for {taken:.1f} s"


def endless_chunk_extension(server: Tollgate, path: str) -> tuple[bytes, float]:
    """`flood` of a chunked POST to `path` whose first chunk's size line has no end."""
    key = server.admin().team().key
    return flood(server.port, (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1;e="
    ).encode())


def test_a_chunk_extension_without_end_is_413_without_waiting_for_the_read_timeout(small_bodies):
    # Chunk extensions are no part of the body, so the body limit never counted them: one chunk's
    # size line without end was read (a core busy) until the read timeout, then a 408.
    reply, taken = endless_chunk_extension(small_bodies, "/api/jobs/create")
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert taken < 6, f"the gateway took the chunk extension for {taken:.1f} s"


def test_a_413_from_the_http_layer_names_the_configured_body_limit(small_bodies: Tollgate) -> None:
    reply, _ = endless_chunk_extension(small_bodies, "/api/jobs/create")
    detail = json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]
    assert detail.startswith("Request body is larger than 65536 bytes"), detail


def test_a_413_from_the_http_layer_is_named_as_rfc_9110_names_it_under_any_python(small_bodies):
    # Python named 413 "Request Entity Too Large" until 3.13: the status line and OpenAI's error
    # code (request_entity_too_large, then content_too_large) changed with the interpreter.
    reply, _ = endless_chunk_extension(small_bodies, "/v1/chat/completions")
    assert reply.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "content_too_large"


def test_the_body_limit_on_the_wire_is_each_requests_own_on_a_kept_alive_connection(small_bodies):
    # Four bodies of 60 KB, each within the limit, on one connection: together past twice the limit.
    key = small_bodies.admin().team().key
    body = json.dumps({"job_type": "kept-alive", "metadata": {"text": "x" * 59_000}}).encode()
    head = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    found = []
    with socket.create_connection(("127.0.0.1", small_bodies.port), timeout=10) as sock:
        for _ in range(4):
            sock.sendall(head)
            time.sleep(0.2)  # the body in reads of its own, after the head's
            sock.sendall(body)
            reply = b""
            while not answers(reply)[0] and (chunk := sock.recv(65536)):
                reply += chunk
            found += [status for status, _ in answers(reply)[0]]
    assert found == [200] * 4


def test_a_chunked_body_of_small_chunks_within_the_limit_is_served(small_bodies):
    # The limit on the wire leaves room for the framing of any chunks but the tiniest.
    admin = small_bodies.admin()
    key = admin.team().key
    body = json.dumps({"job_type": "small-chunks", "metadata": {"text": "x" * 60_000}}).encode()
    chunks = b"".join(b"%x;n=1\r\n%s\r\n" % (len(body[i:i + 16]), body[i:i + 16]) for i in range(0, len(body), 16))
    reply = raw_exchange(small_bodies.port, (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + chunks + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_a_target_with_no_path_on_a_kept_alive_connection_is_400(target):
    # uvicorn fails on `http://host` (a path of None) after the parser read the head: refused as
    # the request before it, already answered, it got no answer at all.
    server, _, _ = target
    with kept_alive(server.port) as sock:
        sock.sendall(b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]


def test_a_request_expecting_100_continue_answered_before_its_body_closes_the_connection(target):
    # The client, not asked for the body, may send its next request instead: read as the body,
    # its first bytes were swallowed and the rest answered 400.
    server, _, _ = target
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n"
        )
        started = time.monotonic()
        reply = read_all(sock)
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 401 ") and b"connection: close" in head
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("expectation", [b"100-Continue", b"100-continue \t"], ids=["capitalised", "trailing whitespace"])
def test_a_request_expecting_100_continue_however_written_is_asked_for_its_body(target, expectation):
    # RFC 9110, 10.1.1: the expectation is case-insensitive, and no whitespace around a field's
    # value is part of it (5.5). A client not asked waits, then sends its body all the same (curl
    # after a second).
    server, team, _ = target
    body = b'{"job_type": "continue"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((
            f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode() + b"Expect: " + expectation + b"\r\n\r\n")
        sock.settimeout(3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        assert b"HTTP/1.1 200 " in read_all(sock)


def test_a_request_expecting_100_continue_with_no_body_keeps_its_connection(target):
    # With no body to come there is nothing to tell from the next request: the connection stays.
    server, _, _ = target
    reply = send_in_reads(
        server.port,
        b"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Length: 0\r\nExpect: 100-continue\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 401 ") and b"HTTP/1.1 200 " in reply, reply[:400]


def test_a_body_sent_with_an_upgrade_header_is_not_read_as_the_next_request(target):
    # httptools reads no body after a head asking for a protocol switch: the body, a request of
    # its own here, was answered as the client's next. It is this request's body.
    server, team, _ = target
    smuggled = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    head = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\n"
        f"Content-Length: {len(smuggled)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.3)
        with contextlib.suppress(OSError):
            sock.sendall(smuggled)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 ") and reply.count(b"HTTP/1.1 ") == 1, reply[:300]
    assert "Malformed JSON" in json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]


def test_a_chunked_body_sent_with_an_upgrade_header_is_400_and_not_read_as_the_next_request(target):
    # The parser reads no body after a head asking for a switch; a chunked one's end is the parser's
    # alone to find, so the request is refused rather than its body read as the client's next.
    server, team, _ = target
    smuggled = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = raw_exchange(server.port, (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert "Upgrade" in json.loads(reply.partition(b"\r\n\r\n")[2])["detail"]


@pytest.mark.parametrize("split", [False, True])
def test_a_request_with_a_body_asking_for_h2c_is_served_as_http_1_1(target, split):
    # What curl --http2 sends on http://: the upgrade may be ignored (RFC 9110, 7.8), and was
    # refused with a 400 instead, though nothing in the request was wrong.
    server, team, _ = target
    body = b'{"job_type": "h2c"}'
    head = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    last = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        if split:  # the body in reads of its own, the next request after it in the last
            sock.sendall(head + body[:5])
            time.sleep(0.2)
            sock.sendall(body[5:9])
            time.sleep(0.2)
            sock.sendall(body[9:] + last)
        else:
            sock.sendall(head + body + last)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 200 ") == 2, reply[:600]
    job = json.loads(reply.split(b"\r\n\r\n")[1].partition(b"HTTP/1.1")[0])
    assert job["status"] == "pending"


def test_a_request_pipelined_after_one_asking_for_an_upgrade_is_answered(target):
    # The parser stops where the switch would begin: what came after it in the same read was dropped.
    server, _, _ = target
    upgrade = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    last = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(upgrade + last)
        reply = read_all(sock)
    assert reply.count(b"HTTP/1.1 200 ") == 2, reply[:400]


def test_a_websocket_handshake_is_answered_as_a_plain_request_in_json(target):
    # uvicorn took it to its WebSocket protocol: an empty 403 in plain text, neither counted nor logged.
    server, team, _ = target
    reply = raw_exchange(server.port, (
        f"GET /api/teams/{team.team_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode())
    assert reply.startswith(b"HTTP/1.1 200 ") and b"application/json" in reply.partition(b"\r\n\r\n")[0], reply[:300]
