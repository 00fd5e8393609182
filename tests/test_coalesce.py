"""Writes made in one turn of the event loop leave in one write (proxy/coalesce.py): the
served HTTP answers, through uvicorn's own protocol, and the Redis client's commands."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import cli, server
from proxy.coalesce import FLUSH_AT, CoalescedWrites, CoalescingTransport
from proxy.resp import _Connection
from proxy.server import CoalescingHttpProtocol


class RecordingTransport(asyncio.Transport):
    """What a transport was asked to do, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8003)}.get(name, default)

    def pause_reading(self) -> None:
        self.calls.append(("pause_reading", None))

    def resume_reading(self) -> None:
        self.calls.append(("resume_reading", None))

    @property
    def writes(self) -> list[bytes]:
        return [data for call, data in self.calls if call == "write"]


async def next_turn() -> None:
    """Let the loop run what is ready now, and what that made ready."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_writes_made_in_one_turn_reach_the_transport_as_one_write_in_order():
    async def run() -> list[bytes]:
        transport = RecordingTransport()
        writes = CoalescedWrites(transport, asyncio.get_running_loop())
        writes.write(b"head,")
        writes.write(b"body")
        assert transport.writes == []  # not before the loop has run what was ready
        await next_turn()
        writes.write(b"later")
        await next_turn()
        return transport.writes

    assert asyncio.run(run()) == [b"head,body", b"later"]


def test_writes_past_the_flush_mark_go_at_once():
    async def run() -> list[bytes]:
        transport = RecordingTransport()
        writes = CoalescedWrites(transport, asyncio.get_running_loop())
        writes.write(b"a")
        writes.write(b"b" * FLUSH_AT)
        sent_at_once = list(transport.writes)
        await next_turn()
        assert transport.writes == sent_at_once  # the turn's flush finds nothing left
        return sent_at_once

    assert asyncio.run(run()) == [b"a" + b"b" * FLUSH_AT]


def test_small_writes_adding_up_past_the_flush_mark_go_at_once():
    async def run() -> list[bytes]:
        transport = RecordingTransport()
        writes = CoalescedWrites(transport, asyncio.get_running_loop())
        for part in (b"a", b"b", b"c", b"d"):
            writes.write(part * (FLUSH_AT // 4 + 1))
        return list(transport.writes)  # before the turn's end

    assert asyncio.run(run()) == [b"".join(part * (FLUSH_AT // 4 + 1) for part in (b"a", b"b", b"c", b"d"))]


def test_writes_reaching_the_flush_mark_exactly_go_at_once():
    async def run() -> list[bytes]:
        transport = RecordingTransport()
        writes = CoalescedWrites(transport, asyncio.get_running_loop())
        writes.write(b"a" * (FLUSH_AT - 1))
        writes.write(b"b")
        return list(transport.writes)  # before the turn's end

    assert asyncio.run(run()) == [b"a" * (FLUSH_AT - 1) + b"b"]


def test_what_a_turn_sent_counts_for_nothing_towards_the_next_turns_flush_mark():
    async def run() -> list[bytes]:
        transport = RecordingTransport()
        writes = CoalescedWrites(transport, asyncio.get_running_loop())
        writes.write(b"a" * (FLUSH_AT // 2 + 1))
        await next_turn()
        writes.write(b"b" * (FLUSH_AT // 2))
        assert transport.writes == [b"a" * (FLUSH_AT // 2 + 1)]  # the second still held: under the mark
        await next_turn()
        return transport.writes

    assert asyncio.run(run()) == [b"a" * (FLUSH_AT // 2 + 1), b"b" * (FLUSH_AT // 2)]


def test_an_empty_write_sends_nothing():
    async def run() -> list[tuple[str, Any]]:
        transport = RecordingTransport()
        CoalescingTransport(transport, asyncio.get_running_loop()).write(b"")
        await next_turn()
        return transport.calls

    assert asyncio.run(run()) == []


def test_writes_held_when_the_peer_hangs_up_are_dropped_not_sent_to_the_closed_transport():
    async def run() -> list[bytes]:
        transport = RecordingTransport()
        writes = CoalescedWrites(transport, asyncio.get_running_loop())
        writes.write(b"an answer nobody will read")
        transport.closing = True  # the connection was lost before the turn's end
        await next_turn()  # uvloop would raise from the write, and the loop log it as an error
        return transport.writes

    assert asyncio.run(run()) == []


def test_closing_sends_what_was_written_first_and_aborting_drops_it():
    async def run() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        loop = asyncio.get_running_loop()
        closed, aborted = RecordingTransport(), RecordingTransport()
        for inner, end in ((closed, "close"), (aborted, "abort")):
            transport = CoalescingTransport(inner, loop)
            transport.write(b"last words")
            getattr(transport, end)()
        await next_turn()
        return closed.calls, aborted.calls

    closed, aborted = asyncio.run(run())
    assert closed == [("write", b"last words"), ("close", None)]
    assert aborted == [("abort", None)]


def test_ending_the_writing_side_sends_what_was_written_first():
    async def run() -> list[tuple[str, Any]]:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"the whole answer")
        transport.write_eof()
        await next_turn()
        return inner.calls

    assert asyncio.run(run()) == [("write", b"the whole answer"), ("write_eof", None)]


def test_the_coalescing_transport_passes_everything_else_to_the_wrapped_one():
    async def run() -> None:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.pause_reading()
        transport.resume_reading()
        assert transport.get_extra_info("peername") == ("127.0.0.1", 5000)
        assert not transport.is_closing()
        assert inner.calls == [("pause_reading", None), ("resume_reading", None)]

    asyncio.run(run())


def test_a_buffer_the_writer_reuses_at_once_is_sent_as_it_was_when_written():
    async def run() -> list[bytes]:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        buffer = bytearray(b"first")
        transport.write(buffer)
        buffer[:] = b"reused"
        transport.write(memoryview(buffer))
        buffer[:] = b"gone"
        await next_turn()
        return inner.writes

    assert asyncio.run(run()) == [b"firstreused"]


async def answer(request: Any) -> JSONResponse:
    return JSONResponse({"answer": "hello"})


def test_uvicorn_sends_a_plain_answers_head_and_body_in_one_write():
    app = Starlette(routes=[Route("/", answer)])

    async def run() -> list[bytes]:
        config = uvicorn.Config(app, http=CoalescingHttpProtocol, log_level="warning", lifespan="off")
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=uvicorn.server.ServerState(),
                                              app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        for _ in range(20):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport.writes

    (write,) = asyncio.run(run())
    assert write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b'{"answer":"hello"}')


def test_tollgate_serve_runs_uvicorn_with_the_coalescing_protocol(monkeypatch, tmp_path):
    seen: dict[str, Any] = {}
    monkeypatch.setattr(server, "listen", lambda host, port: [socket.socket()])  # no port of this machine's
    monkeypatch.setattr(server, "serve", lambda app, options, sockets: (seen.update(options), sockets[0].close()))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # serve's SIGTERM handler: not this process's
    monkeypatch.setenv("TOLLGATE_MASTER_KEY", "sk-master-test")
    monkeypatch.setenv("TOLLGATE_UPSTREAM_KEY", "sk-upstream-test")
    config = tmp_path / "tollgate.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path}/t.db\n")
    cli.main(["serve", "--config", str(config)])
    assert seen["http"].func is CoalescingHttpProtocol
    assert seen["http"].keywords == {"read_timeout": 30.0, "max_body_bytes": 10 * 1024 * 1024}


def test_redis_commands_sent_in_one_turn_leave_in_one_write():
    async def run() -> list[bytes]:
        connection = _Connection(timeout=1.0)
        transport = RecordingTransport()
        connection.connection_made(transport)
        first = connection.send(b"*1\r\n$4\r\nPING\r\n", 1)
        second = connection.send(b"*1\r\n$4\r\nTIME\r\n", 1)
        await next_turn()
        connection.data_received(b"+PONG\r\n*2\r\n$1\r\n1\r\n$1\r\n2\r\n")
        assert await first[0] == "PONG" and await second[0] == [b"1", b"2"]
        return transport.writes

    assert asyncio.run(run()) == [b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nTIME\r\n"]


def test_a_failed_redis_connection_never_sends_what_it_held():
    async def run() -> list[tuple[str, Any]]:
        connection = _Connection(timeout=1.0)
        transport = RecordingTransport()
        connection.connection_made(transport)
        (reply,) = connection.send(b"*1\r\n$4\r\nPING\r\n", 1)
        connection.connection_lost(ConnectionResetError())
        await next_turn()
        assert reply.done() and reply.exception() is not None
        return transport.calls

    assert asyncio.run(run()) == [("close", None)]


def test_a_dropped_connection_holds_nothing_untaken_rather_than_failing_the_stall_check():
    # A stream's stall check asks the connection what its client has not taken: asked of one
    # gone meanwhile (its socket's descriptor -1), the ioctl raised ValueError, not the OSError
    # it was ready for, and the check's timer failed with a traceback in the log.
    async def run() -> int:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[asyncio.Transport] = loop.create_future()

        class Accepting(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.set_result(transport)  # type: ignore[arg-type]

        listening = await loop.create_server(Accepting, "127.0.0.1", 0)
        client = socket.create_connection(listening.sockets[0].getsockname())
        try:
            transport = await made
            server._drop(transport)
            await asyncio.sleep(0.05)  # closed in a later turn of the loop
            return server._untaken(transport)
        finally:
            client.close()
            listening.close()

    assert asyncio.run(run()) == 0
