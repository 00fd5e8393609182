"""Tollgate's own HTTP/1.1 client to LiteLLM (proxy/upstream.py), against the fake
upstream and, for misbehaving servers, a few lines of raw asyncio."""

from __future__ import annotations

import asyncio
import math
import contextlib
import json
import socket
import struct
from typing import Awaitable, Callable

import pytest

from proxy.config import Secret, UpstreamConfig, UpstreamTimeouts
from proxy.upstream import (
    ConnectError,
    DeadlineExceeded,
    PoolExhausted,
    ReadError,
    RemoteProtocolError,
    TransportError,
    Upstream,
    UpstreamStatusError,
    UpstreamTimeout,
)
from tests.support import fake_log, free_port, never_connecting, tag, wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def upstream(url: str, first_byte: float = 5.0, max_connections: int = 10, keepalive: int = 10) -> Upstream:
    """`first_byte`: the wait for an answer's head, and each silence in it, streamed or not."""
    config = UpstreamConfig(
        url=url,
        timeouts=UpstreamTimeouts(connect=1.0, first_byte=first_byte, answer=first_byte, total=30.0),
        max_connections=max_connections,
        max_keepalive_connections=keepalive,
    )
    return Upstream(config, Secret("sk-upstream-test"))


def chat(content: str, stream: bool = False, model: str = "primary") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    return json.dumps(body).encode()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    return head + await reader.readexactly(length)


async def answer_keep_alive(writer: asyncio.StreamWriter) -> None:
    """A complete answer that leaves the connection open for the next request."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    port = free_port()
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    return server, f"http://127.0.0.1:{port}"


def test_an_answer_is_read_whole_and_the_connection_kept_for_the_next_call(fake_url):
    async def run() -> None:
        client = upstream(fake_url)
        for _ in range(3):
            response = await client.open_chat(chat("hello [chunks=3]"))
            body = json.loads(await response.aread())
            await response.aclose()
            assert response.status_code == 200 and body["usage"]["completion_tokens"] == 3
        assert client.open_connections == 1
        await client.aclose()

    asyncio.run(run())


def test_the_request_carries_the_upstream_key_and_the_body_as_given(fake_url):
    label = tag()

    async def run() -> None:
        client = upstream(fake_url)
        response = await client.open_chat(chat(f"hi [tag={label}]"))
        await response.aread()
        await response.aclose()
        await client.aclose()

    asyncio.run(run())
    (entry,) = fake_log(fake_url, label)
    assert entry["headers"]["authorization"] == "Bearer sk-upstream-test"
    assert entry["body"]["messages"][0]["content"] == f"hi [tag={label}]"


def test_a_stream_arrives_in_pieces_with_chunked_coding_removed(fake_url):
    async def run() -> bytes:
        client = upstream(fake_url)
        response = await client.open_chat(chat("hi [chunks=4] [delay_ms=20]", stream=True))
        pieces = [chunk async for chunk in response.aiter_raw()]
        await response.aclose()
        await client.aclose()
        assert len(pieces) > 1
        return b"".join(pieces)

    text = asyncio.run(run()).decode()
    assert text.startswith("data: {") and text.endswith("data: [DONE]\n\n")


def test_closing_a_stream_early_closes_its_connection(fake_url):
    label = tag()

    async def run() -> None:
        client = upstream(fake_url)
        response = await client.open_chat(chat(f"long [chunks=200] [delay_ms=50] [tag={label}]", stream=True))
        chunks = response.aiter_raw()
        await anext(chunks)
        await chunks.aclose()
        await response.aclose()
        assert client.open_connections == 0
        # The fake upstream, another process, sees the close at its next write (50 ms on), or
        # later on a loaded machine: waited for, before the client's own close could do it.
        await asyncio.to_thread(wait_for, lambda: fake_log(fake_url, label)[0]["disconnected"], 10)
        await client.aclose()

    asyncio.run(run())
    (entry,) = fake_log(fake_url, label)
    assert entry["disconnected"] is not None


def test_a_refused_connection_is_a_connect_error():
    async def run() -> None:
        client = upstream(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ConnectError):
            await client.open_chat(chat("hi"))
        assert client.open_connections == 0

    asyncio.run(run())


def test_no_answer_before_the_first_byte_timeout_is_a_timeout():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def run() -> None:
        server, url = await serve(silent)
        client = upstream(url, first_byte=0.3)
        with pytest.raises(UpstreamTimeout):
            await client.open_chat(chat("hi"))
        assert client.open_connections == 0
        server.close()

    asyncio.run(run())


def test_a_silence_between_chunks_longer_than_the_timeout_is_a_timeout_after_waits_that_ended_in_time():
    async def drips_then_stops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # each gap a third of the timeout: 0.6 s of answers in all, twice the timeout
            await asyncio.sleep(0.1)
            writer.write(b"2\r\nok\r\n")
        await asyncio.sleep(5)  # then silence

    async def run() -> None:
        server, url = await serve(drips_then_stops)
        client = upstream(url, first_byte=0.3)
        response = await client.open_chat(chat("hi"))
        received = b""
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout, match="no data"):
            async for chunk in response.aiter_raw():
                received += chunk
        assert received == b"ok" * 6
        assert 0.8 <= asyncio.get_running_loop().time() - started < 1.5  # the silence, then 0.3 s
        await response.aclose()
        server.close()

    asyncio.run(run())


def test_requests_answered_in_time_on_one_connection_never_time_out_however_long_it_serves():
    async def answers_each_after_a_while(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.1)  # a third of the timeout
            await answer_keep_alive(writer)

    async def run() -> None:
        server, url = await serve(answers_each_after_a_while)
        client = upstream(url, first_byte=0.3, max_connections=1)
        for _ in range(8):  # 0.8 s on one connection: more than twice the timeout
            response = await client.open_chat(chat("hi"))
            assert await response.aread() == b"{}"
            await response.aclose()
        assert client.open_connections == 1
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_the_calls_deadline_ends_a_wait_before_its_own_timeout_would():
    async def answers_slowly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not answered:
            answered.append(1)
            await asyncio.sleep(5)  # the first request: no answer before the deadline
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await asyncio.sleep(5)  # the second: its body never ends

    answered: list[int] = []

    async def run() -> None:
        server, url = await serve(answers_slowly)
        client = upstream(url, first_byte=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceeded):
            await client.open_chat(chat("hi"), deadline=started + 0.3)
        assert loop.time() - started < 1.0
        started = loop.time()
        response = await client.open_chat(chat("hi"), deadline=started + 0.3)
        with pytest.raises(DeadlineExceeded):
            await response.aread()
        assert loop.time() - started < 1.0
        await response.aclose()
        server.close()

    asyncio.run(run())


def test_a_kept_alive_connection_closed_by_the_server_is_replaced_without_an_error():
    requests: list[bytes] = []

    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        # Claims keep-alive, then closes anyway: as a server whose idle timeout struck.
        await answer_keep_alive(writer)
        await asyncio.sleep(0.05)
        writer.close()

    async def run() -> None:
        server, url = await serve(one_answer_then_close)
        client = upstream(url)
        for _ in range(2):
            response = await client.open_chat(chat("hi"))
            assert await response.aread() == b"{}"
            await response.aclose()
            await asyncio.sleep(0.2)
        assert len(requests) == 2
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_a_request_racing_the_servers_idle_close_is_a_read_error_not_sent_again():
    connections: list[int] = []

    async def idle_close_races_the_second_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await read_request(reader)
        await answer_keep_alive(writer)
        if len(connections) == 1:
            await read_request(reader)  # arrived as the idle timeout struck, or as the server died on it
        writer.close()

    async def run() -> None:
        server, url = await serve(idle_close_races_the_second_request)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        assert await response.aread() == b"{}"
        await response.aclose()
        with pytest.raises(ReadError):  # the caller falls back to the group's next model
            await client.open_chat(chat("hi"))
        assert len(connections) == 1
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_an_answer_cut_mid_body_is_a_read_error():
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\":")
        await writer.drain()
        writer.close()

    async def run() -> None:
        server, url = await serve(cut)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        with pytest.raises(ReadError):
            await response.aread()
        await response.aclose()
        assert client.open_connections == 0
        server.close()

    asyncio.run(run())


def test_a_malformed_answer_is_a_protocol_error():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        server, url = await serve(garbage)
        client = upstream(url)
        with pytest.raises(RemoteProtocolError):
            await client.open_chat(chat("hi"))
        server.close()

    asyncio.run(run())


def test_calls_beyond_max_connections_wait_for_a_free_one(fake_url):
    async def run() -> None:
        client = upstream(fake_url, max_connections=2)

        async def one() -> int:
            response = await client.open_chat(chat("hi [chunks=3] [delay_ms=50]", stream=True))
            await response.aread()
            await response.aclose()
            return response.status_code

        assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6
        assert client.open_connections <= 2
        await client.aclose()

    asyncio.run(run())


def test_a_wait_for_a_free_connection_that_runs_out_is_the_pools_not_the_upstreams(fake_url):
    # Every connection in use for longer than the connect timeout: nobody was asked, and the
    # caller must not take it for LiteLLM or its model timing out.
    async def run() -> None:
        client = upstream(fake_url, max_connections=1)
        holder = await client.open_chat(chat("hi"))
        with pytest.raises(PoolExhausted):
            await client.open_chat(chat("hi"))
        await holder.aread()
        await holder.aclose()
        await client.aclose()

    asyncio.run(run())


def test_get_json_raises_on_an_error_status(fake_url):
    async def run() -> None:
        client = upstream(fake_url)
        assert await client.get_json("/v1/models", timeout=5) == {"object": "list", "data": []}
        with pytest.raises(UpstreamStatusError) as caught:
            await client.get_json("/no-such-path", timeout=5)
        assert caught.value.status_code == 404
        await client.aclose()

    asyncio.run(run())


def test_a_request_the_server_worked_on_before_dropping_it_is_not_sent_again():
    requests: list[bytes] = []

    async def answers_once_then_drops_a_slow_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        await answer_keep_alive(writer)
        requests.append(await read_request(reader))
        await asyncio.sleep(0.3)  # working on it, then gone: resending would run it twice
        writer.close()

    async def run() -> None:
        server, url = await serve(answers_once_then_drops_a_slow_one)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        await response.aread()
        await response.aclose()
        with pytest.raises(ReadError):
            await client.open_chat(chat("hi again"))
        assert len(requests) == 2
        assert client.open_connections == 0
        server.close()

    asyncio.run(run())


def test_a_waiter_cancelled_as_it_is_woken_passes_the_free_connection_on(fake_url):
    async def run() -> None:
        client = upstream(fake_url, max_connections=1)
        holder = await client.open_chat(chat("hi"))

        async def one() -> int:
            response = await client.open_chat(chat("hi"))
            await response.aread()
            await response.aclose()
            return response.status_code

        second, third = asyncio.create_task(one()), asyncio.create_task(one())
        await asyncio.sleep(0.1)  # both wait for the one connection
        await holder.aread()
        await holder.aclose()  # wakes the second...
        second.cancel()  # ...which goes away before it runs
        # Not passed on, it would wait for good: a few seconds tell that on any machine.
        assert await asyncio.wait_for(third, 5) == 200
        await client.aclose()

    asyncio.run(run())


def test_an_answer_ended_by_close_is_complete_and_one_ended_by_a_reset_is_an_error():
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        text = (await read_request(reader)).decode()
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"whole\": ")
        await writer.drain()
        await asyncio.sleep(0.05)
        if "reset" in text:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.write(b"true}")
            writer.close()

    async def run() -> None:
        server, url = await serve(until_close)
        client = upstream(url)
        response = await client.open_chat(chat("close"))
        assert json.loads(await response.aread()) == {"whole": True}
        await response.aclose()
        response = await client.open_chat(chat("reset"))
        with pytest.raises(ReadError):
            await response.aread()
        await response.aclose()
        assert client.open_connections == 0
        server.close()

    asyncio.run(run())


def test_a_connection_that_answered_a_5xx_is_not_used_again():
    connections: list[int] = []

    async def fails_then_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await read_request(reader)
        if len(connections) == 1:
            # Claims keep-alive, and will close without a word (as LiteLLM after its catch-all 500).
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    async def run() -> None:
        server, url = await serve(fails_then_answers)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        assert response.status_code == 500 and await response.aread() == b"{}"
        await response.aclose()
        assert client.open_connections == 0
        response = await client.open_chat(chat("hi"))
        assert response.status_code == 200
        await response.aclose()
        assert len(connections) == 2
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_a_connection_idles_from_the_end_of_its_answer_not_from_when_the_answer_was_let_go(monkeypatch):
    # The upstream's keep-alive timer starts as it ends its answer; a relay may let the answer go
    # much later (a slow client, the call's record waiting on the database). Counted from then,
    # the connection was still taken for fresh when the upstream's idle close came.
    monkeypatch.setattr("proxy.upstream.KEEPALIVE_EXPIRY", 0.5)
    connections: list[int] = []

    async def closes_connections_idle_past_its_timeout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        loop = asyncio.get_running_loop()
        answered_at = None
        while True:
            await read_request(reader)
            if answered_at is not None and loop.time() - answered_at > 0.6:
                writer.close()  # its keep-alive timeout struck as the request came: never answered
                return
            await answer_keep_alive(writer)
            answered_at = loop.time()

    async def run() -> None:
        server, url = await serve(closes_connections_idle_past_its_timeout)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        assert await response.aread() == b"{}"
        await asyncio.sleep(0.4)  # the answer is whole, but let go only now
        await response.aclose()
        await asyncio.sleep(0.3)  # 0.7 s after the answer's end, 0.3 s after it was let go
        response = await client.open_chat(chat("hi"))
        assert response.status_code == 200 and await response.aread() == b"{}"
        await response.aclose()
        assert len(connections) == 2
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_a_json_answer_that_drips_without_end_is_cut_at_its_timeout():
    # The timeout bounds the whole request (LiteLLM's prices are re-read with it, in a loop no
    # other timeout guards), not only each silence of an answer that never ends.
    async def drips(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # a byte every third of the timeout
                await asyncio.sleep(0.1)
                writer.write(b"1\r\n \r\n")
                await writer.drain()

    async def run() -> None:
        server, url = await serve(drips)
        client = upstream(url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await client.get_json("/model/info", timeout=0.3)
        assert loop.time() - started < 1.0
        assert client.open_connections == 0
        server.close()
        await client.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("interim", [b"", b"HTTP/1.1 100 Continue\r\n\r\n"], ids=["whole", "head-in-pieces"])
def test_a_get_on_a_kept_alive_connection_the_server_closed_unanswered_is_sent_again_on_a_new_one(interim: bytes):
    # A GET is safe to send twice (unlike a call, never resent): losing the race with the
    # server's idle close must not fail a readiness check or a refresh of the prices. Whether the
    # upstream answered anything is told by the bytes of this request's answer, not of the
    # answers before it on the same connection (one whose head came in pieces, after an interim).
    connections: list[int] = []

    async def one_answer_then_drops_the_next_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await read_request(reader)
        if interim:
            writer.write(interim)
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"data\":[]}")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)  # arrived as its idle timeout struck: closed unanswered
        writer.close()

    async def run() -> None:
        server, url = await serve(one_answer_then_drops_the_next_request)
        client = upstream(url)
        for _ in range(2):
            assert await client.get_json("/v1/models", timeout=5) == {"data": []}
        assert len(connections) == 2
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_an_answer_read_behind_its_upstream_stops_its_socket_being_read_past_64_kib():
    # A stream whose client reads nothing keeps what its upstream sent until the socket stops
    # being read, besides one such piece written toward the client: at 256 KiB that was ~680 KB
    # of memory per stalled stream (100 at once: +68 MB), at 64 KiB ~440 KB.
    from proxy.upstream import UpstreamResponse

    class Connection:
        paused = False

        def pause(self) -> None:
            self.paused = True

        def resume(self) -> None:
            self.paused = False

    connection = Connection()
    response = UpstreamResponse(connection, 30.0, math.inf, 0.0)  # type: ignore[arg-type]
    response._body(bytes(60 * 1024))  # as the connection feeds it
    assert not connection.paused
    response._body(bytes(8 * 1024))
    assert connection.paused


def test_an_answer_on_a_kept_alive_connection_has_only_its_own_headers():
    # LiteLLM names a call's cost in a header it leaves out when it has no figure: the answer before
    # it on the same connection must not lend it one.
    async def priced_then_not(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Litellm-Response-Cost: 0.5\r\nContent-Length: 2\r\n\r\n{}")
        await read_request(reader)
        await answer_keep_alive(writer)
        await asyncio.sleep(5)

    async def run() -> None:
        server, url = await serve(priced_then_not)
        client = upstream(url, max_connections=1)
        costs = []
        for _ in range(2):
            response = await client.open_chat(chat("hi"))
            await response.aread()
            await response.aclose()
            costs.append(response.headers.get("x-litellm-response-cost"))
        assert costs == ["0.5", None]
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_a_get_on_a_new_connection_the_server_closed_unanswered_is_not_sent_again():
    # Only a kept-alive connection races the server's idle close: on a new one the server itself
    # dropped the request, and would drop it again however often it was sent.
    requests: list[bytes] = []

    async def drops_every_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            requests.append(await read_request(reader))
        writer.close()

    async def run() -> None:
        server, url = await serve(drops_every_request)
        client = upstream(url)
        with pytest.raises(ReadError):
            await client.get_json("/v1/models", timeout=2)
        assert len(requests) == 1
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_the_headers_of_an_interim_answer_are_not_the_answers():
    async def hints_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(5)

    async def run() -> None:
        server, url = await serve(hints_then_answer)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        assert await response.aread() == b"{}"
        assert response.headers == {"content-length": "2"}
        await response.aclose()
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_the_calls_deadline_ends_a_wait_to_connect_before_the_connect_timeout_would():
    async def run(url: str) -> None:
        client = upstream(url)  # connect timeout 1 s
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceeded):
            await client.open_chat(chat("hi"), deadline=started + 0.2)
        assert loop.time() - started < 0.6
        await client.aclose()

    with never_connecting() as url:
        asyncio.run(run(url))


def test_a_connection_beyond_max_keepalive_connections_is_closed_once_its_answer_was_read():
    closed: list[int] = []

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await read_request(reader)
                await asyncio.sleep(0.1)
                await answer_keep_alive(writer)
        closed.append(1)

    async def run() -> None:
        server, url = await serve(answers)
        client = upstream(url, keepalive=1)

        async def one() -> None:
            response = await client.open_chat(chat("hi"))
            await response.aread()
            await response.aclose()

        await asyncio.gather(one(), one())  # two connections at once, one kept
        await asyncio.sleep(0.2)
        assert (client.open_connections, len(closed)) == (1, 1)
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_an_idle_connection_the_server_sends_bytes_on_is_not_used_again():
    # Nothing was asked: its bytes would be (part of) the next call's answer.
    connections: list[int] = []

    async def answers_then_chatters(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
            await answer_keep_alive(writer)
            await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            while True:
                await read_request(reader)
                await answer_keep_alive(writer)

    async def run() -> None:
        server, url = await serve(answers_then_chatters)
        client = upstream(url)
        for _ in range(2):
            response = await client.open_chat(chat("hi"))
            assert await response.aread() == b"{}"
            await response.aclose()
            await asyncio.sleep(0.3)
        assert len(connections) == 2
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_a_call_waiting_for_a_connection_takes_the_place_of_one_that_failed_to_connect():
    async def run() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued = socket.create_connection(listener.getsockname())  # the backlog full: connects hang
        client = upstream("http://%s:%d" % listener.getsockname(), max_connections=1)
        loop = asyncio.get_running_loop()
        connecting = asyncio.ensure_future(client.open_chat(chat("hi"), deadline=loop.time() + 0.3))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(client.open_chat(chat("hi")))  # no free connection: waits
        await asyncio.sleep(0.1)

        async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await read_request(reader)
                await answer_keep_alive(writer)

        server = await asyncio.start_server(answers, sock=listener)  # connects go through from now
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await connecting
        response = await waiting  # at once, not once its own wait for a free connection ran out
        assert response.status_code == 200 and loop.time() - started < 0.5
        await response.aclose()
        await client.aclose()
        queued.close()
        server.close()

    asyncio.run(run())


def test_a_get_on_a_kept_alive_connection_closed_partway_through_its_answer_is_not_sent_again():
    # Part of an answer came: no race with the server's idle close, which would be over before
    # any byte of one, but the server failing on this request; sent again, it fails again.
    connections: list[int] = []

    async def answers_then_breaks_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"data\":[]}")
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-")
            await writer.drain()
        writer.close()

    async def run() -> None:
        server, url = await serve(answers_then_breaks_off)
        client = upstream(url)
        assert await client.get_json("/v1/models", timeout=5) == {"data": []}
        with pytest.raises(ReadError):
            await client.get_json("/v1/models", timeout=5)
        assert len(connections) == 1
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_a_silence_after_a_head_that_came_halfway_through_its_timeout_is_a_timeout():
    # The connection's one timer, armed for the head's due time, fires while the wait for the
    # body is on and not yet due: it must arm itself again for that wait, or the wait never ends.
    async def head_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.15)  # half the timeout: the head in time, the body's wait due after the head's
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(5)

    async def run() -> None:
        server, url = await serve(head_then_silence)
        client = upstream(url, first_byte=0.3)
        response = await client.open_chat(chat("hi"))
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout, match="no data"):
            await asyncio.wait_for(response.aread(), 3)
        assert asyncio.get_running_loop().time() - started < 1.0
        await response.aclose()
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_an_answer_closed_twice_gives_its_connection_back_once():
    async def answers_each_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await read_request(reader)
                await answer_keep_alive(writer)

    async def run() -> None:
        server, url = await serve(answers_each_request)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        await response.aread()
        await response.aclose()
        await response.aclose()

        async def call() -> bytes:
            response = await client.open_chat(chat("hi"))
            try:
                return await response.aread()
            finally:
                await response.aclose()

        # Given back twice, one connection would be taken by both calls at once.
        assert await asyncio.wait_for(asyncio.gather(call(), call()), 3) == [b"{}", b"{}"]
        assert client.open_connections == 2
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_a_chunked_answer_named_in_any_case_and_cut_by_a_close_is_a_read_error():
    # Only an answer with neither a length nor chunked coding ends with its connection.
    async def cut_mid_chunk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n10\r\n{\"half\":")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    async def run() -> None:
        server, url = await serve(cut_mid_chunk)
        client = upstream(url)
        response = await client.open_chat(chat("hi"))
        with pytest.raises(ReadError):
            await response.aread()
        await response.aclose()
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_a_bound_on_the_body_sooner_than_the_read_timeout_ends_the_wait_at_that_bound():
    async def head_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(5)

    async def run() -> None:
        server, url = await serve(head_then_silence)
        client = upstream(url, first_byte=5.0)
        response = await client.open_chat(chat("hi"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        response.expect_by(started + 0.2, "no first event in time")
        with pytest.raises(UpstreamTimeout, match="no first event in time"):
            await asyncio.wait_for(response.aread(), 4)
        assert loop.time() - started < 1.0  # the bound's 0.2 s, not the read timeout's 5
        await response.aclose()
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_a_kept_alive_connection_the_server_closed_frees_its_place_under_max_connections():
    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await answer_keep_alive(writer)
        await asyncio.sleep(0.05)
        writer.close()

    async def run() -> None:
        server, url = await serve(one_answer_then_close)
        client = upstream(url, max_connections=1)
        for _ in range(3):
            response = await asyncio.wait_for(client.open_chat(chat("hi")), 3)
            assert await response.aread() == b"{}"
            await response.aclose()
            await asyncio.sleep(0.2)
        assert client.open_connections == 1
        server.close()
        await client.aclose()

    asyncio.run(run())


def test_the_calls_deadline_ends_a_wait_for_a_free_connection_before_the_connect_timeout_would():
    async def answers_never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def run() -> None:
        server, url = await serve(answers_never)
        client = upstream(url, max_connections=1)  # connect timeout 1 s
        loop = asyncio.get_running_loop()
        busy = asyncio.ensure_future(client.open_chat(chat("hi")))  # holds the only connection
        await asyncio.sleep(0.1)
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await client.open_chat(chat("hi"), deadline=started + 0.2)
        assert loop.time() - started < 0.6
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy
        await client.aclose()
        server.close()

    asyncio.run(run())


def test_an_https_url_without_a_port_is_reached_on_port_443_over_tls():
    async def run() -> tuple[str, int, bool]:
        asked: list[tuple[str, int, bool]] = []

        async def create_connection(factory: object, host: str, port: int, ssl: object = None) -> None:
            asked.append((host, port, ssl is not None))
            raise ConnectionRefusedError("refused")

        loop = asyncio.get_running_loop()
        loop.create_connection = create_connection  # type: ignore[method-assign,assignment]
        client = upstream("https://litellm.example")
        with pytest.raises(ConnectError):
            await client.open_chat(chat("hi"))
        return asked[0]

    assert asyncio.run(run()) == ("litellm.example", 443, True)


def test_a_closed_client_sends_no_more_requests(fake_url):
    async def run() -> None:
        client = upstream(fake_url)
        await client.aclose()
        with pytest.raises(TransportError, match="closed"):
            await client.open_chat(chat("hi"))
        assert client.open_connections == 0

    asyncio.run(run())
