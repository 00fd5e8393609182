"""Tollgate's minimal Redis client (proxy/resp.py) against the machine's real Redis,
and a silent server for what happens when Redis does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import subprocess
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from proxy.resp import Keys, Redis, RedisError, ReplyError, Script, _Connection, _Incomplete, encode, parse
from tests.support import RedisServer, free_port, start_process, stop_process

REDIS_URL = "redis://127.0.0.1:6379/0"


def client(url: str = REDIS_URL, timeout: float = 1.0) -> Redis:
    return Redis(url, connect_timeout=1.0, timeout=timeout)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_redis(handler: Handler, timeout: float = 1.0) -> AsyncIterator[Redis]:
    """A client of a server that is `handler` (asyncio.start_server's callback): a Redis
    that answers as a test needs, or not at all."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    redis = client(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=timeout)
    try:
        yield redis
    finally:
        await redis.close()
        server.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A Redis that reads nothing and answers nothing (for longer than any test waits)."""
    await asyncio.sleep(5)


def test_every_reply_type_parses_and_a_cut_reply_waits_for_more():
    raw = b"*5\r\n:42\r\n$3\r\nabc\r\n$-1\r\n+OK\r\n*1\r\n$0\r\n\r\n"
    assert parse(raw, 0) == ([42, b"abc", None, "OK", [b""]], len(raw))
    with pytest.raises(Exception):
        parse(raw[:-3], 0)
    assert encode(("SET", "k", 5)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"


def test_an_array_of_integers_cut_anywhere_waits_for_the_rest():
    raw = b"*5\r\n:1763795000123\r\n*2\r\n:1\r\n+OK\r\n:0\r\n$5\r\ntoken\r\n:-7\r\n"
    for buffer in (raw, bytearray(raw)):  # the connection parses from a bytearray
        assert parse(buffer, 0) == ([1763795000123, [1, "OK"], 0, b"token", -7], len(raw))
        for cut in range(len(raw)):
            with pytest.raises(_Incomplete):
                parse(buffer[:cut], 0)


def test_an_array_of_strings_cut_anywhere_waits_for_the_rest():
    # As the limiter's repair answers (the keys it deleted): a string whose text has come but not
    # its line's end is no reply yet, or that end is read as the next reply.
    raw = b"*2\r\n$3\r\nabc\r\n$5\r\ntoken\r\n"
    assert parse(raw, 0) == ([b"abc", b"token"], len(raw))
    for cut in range(len(raw)):
        with pytest.raises(_Incomplete):
            parse(raw[:cut], 0)


def test_a_null_array_reply_parses_as_none():
    assert parse(b"*-1\r\n", 0) == (None, 5)


def test_a_text_argument_is_sent_with_its_length_in_utf8_bytes():
    assert encode(("SET", "clé")) == b"*2\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n"


def test_a_bool_argument_is_sent_as_its_text_not_as_a_number():
    assert encode(("SET", True)) == b"*2\r\n$3\r\nSET\r\n$4\r\nTrue\r\n"


def test_a_script_run_on_encoded_keys_is_the_command_encoded_whole():
    sent: list[bytes] = []

    class Recording:
        def send(self, payload: bytes, replies: int) -> list[None]:
            sent.append(payload)
            return [None]

    script = Script("return 1")
    Redis._send_evalsha(Recording(), script, Keys(["a", "{team:t}:b"]), ["call-1", 42, b"raw"])  # type: ignore[arg-type]
    assert sent == [encode(("EVALSHA", script.sha, 2, "a", "{team:t}:b", "call-1", 42, b"raw"))]


def test_concurrent_commands_share_one_connection_and_get_their_own_replies():
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> list[int]:
        redis = client()
        replies = await asyncio.gather(*(redis.call("INCR", key) for _ in range(200)))
        await redis.call("DEL", key)
        await redis.close()
        return replies

    assert sorted(asyncio.run(run())) == list(range(1, 201))


def test_an_error_reply_raises_and_the_connection_stays_usable():
    async def run() -> None:
        redis = client()
        with pytest.raises(ReplyError):
            await redis.call("NO-SUCH-COMMAND")
        assert await redis.call("PING") == "PONG"
        await redis.close()

    asyncio.run(run())


def test_a_script_unknown_to_redis_is_sent_whole_and_then_known():
    script = Script(f"return {{KEYS[1], ARGV[1], '{uuid.uuid4().hex}'}}")

    async def run() -> None:
        redis = client()
        first = await redis.evalsha(script, Keys(["k"]), ["v"])
        assert first[:2] == [b"k", b"v"]
        assert await redis.call("SCRIPT", "EXISTS", script.sha) == [1]
        assert await redis.evalsha(script, Keys(["k"]), ["v"]) == first
        await redis.close()

    asyncio.run(run())


def test_a_script_that_fails_is_not_run_again():
    # Only NOSCRIPT sends a script whole: one that ran and failed may have written (a limiter's
    # admit counted twice).
    key = f"tollgate-test:{uuid.uuid4().hex}"
    script = Script(f"redis.call('INCR', KEYS[1]) return redis.error_reply('refused {uuid.uuid4().hex}')")

    async def run() -> bytes:
        redis = client()
        await redis.call("SCRIPT", "LOAD", script.source)
        with pytest.raises(ReplyError, match="refused"):
            await redis.evalsha(script, Keys([key]), [])
        runs = await redis.call("GET", key)
        await redis.call("DEL", key)
        await redis.close()
        return runs

    assert asyncio.run(run()) == b"1"


def test_a_script_sent_soon_after_the_connection_was_lost_connects_again_and_runs():
    token = uuid.uuid4().hex
    script = Script(f"return '{token}'")

    async def run() -> None:
        redis = client()
        await redis.connect()
        redis.drop("given up on, as after a timeout")
        assert await asyncio.wait_for(redis.evalsha_soon(script, Keys([]), []), 3) == token.encode()
        await redis.close()

    asyncio.run(run())


def test_a_script_sent_soon_is_written_before_the_next_command_without_being_awaited():
    script = Script(f"redis.call('SET', KEYS[1], ARGV[1]) return '{uuid.uuid4().hex}'")
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> None:
        redis = client()
        await redis.evalsha(script, Keys([key]), ["warm"])  # connected, and the script known
        reply = redis.evalsha_soon(script, Keys([key]), ["soon"])
        assert await redis.call("GET", key) == b"soon"  # sent after it, so answered after it
        assert isinstance(await reply, bytes)
        await redis.call("DEL", key)
        await redis.close()

    asyncio.run(run())


def test_a_command_sent_soon_once_connected_leaves_ahead_of_the_next_without_being_awaited():
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> None:
        redis = client()
        await redis.connect()
        reply = redis.call_soon("SET", key, "soon", "EX", 10)
        assert await redis.call("GET", key) == b"soon"  # sent after it, so answered after it
        assert await reply == "OK"
        await redis.call("DEL", key)
        await redis.close()

    asyncio.run(run())


def test_a_script_sent_soon_that_redis_forgot_is_sent_whole():
    script = Script(f"redis.call('SET', KEYS[1], ARGV[1]) return '{uuid.uuid4().hex}'")
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> None:
        redis = client()
        assert await redis.call("PING") == "PONG"  # connected; the script was never loaded
        assert isinstance(await redis.evalsha_soon(script, Keys([key]), ["whole"]), bytes)
        assert await redis.call("GET", key) == b"whole"
        await redis.call("DEL", key)
        await redis.close()

    asyncio.run(run())


def test_a_script_sent_soon_before_any_connection_still_runs():
    script = Script(f"redis.call('SET', KEYS[1], ARGV[1]) return '{uuid.uuid4().hex}'")
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> None:
        redis = client()
        await redis.evalsha_soon(script, Keys([key]), ["first"])
        assert await redis.call("GET", key) == b"first"
        await redis.call("DEL", key)
        await redis.close()

    asyncio.run(run())


def test_an_unreachable_redis_is_an_error_not_a_hang():
    async def run() -> None:
        redis = client(f"redis://127.0.0.1:{free_port()}")
        with pytest.raises(RedisError):
            await redis.call("PING")

    asyncio.run(run())


def test_an_ipv6_redis_address_is_logged_with_its_host_in_brackets():
    # "redis://::1:6379" named no Redis an operator could tell: a host "::1:6379" on 6379, or "::1"?
    redis = Redis("redis://user:hunter2@[fd00::5]:6380/1", 1.0, 1.0)
    assert redis.address == "redis://[fd00::5]:6380"


def test_a_silent_redis_times_out_and_the_next_command_reconnects():
    connections: list[int] = []

    async def silent_then_real(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.read(100)
        if len(connections) == 1:
            await asyncio.sleep(5)  # never answers the first connection
        else:
            writer.write(b"+PONG\r\n")
            await writer.drain()
            await asyncio.sleep(1)

    async def run() -> None:
        async with fake_redis(silent_then_real, timeout=0.2) as redis:
            with pytest.raises(RedisError):
                await redis.call("PING")
            assert await redis.call("PING") == "PONG"
            assert len(connections) == 2

    asyncio.run(run())


def test_an_unreadable_reply_fails_the_command_waiting_for_it_naming_it_unreadable():
    async def answers_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b":not-a-number\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def run() -> None:
        async with fake_redis(answers_garbage) as redis:
            with pytest.raises(RedisError, match="unreadable reply"):
                await asyncio.wait_for(redis.call("PING"), 3)

    asyncio.run(run())


def test_a_redis_silent_after_answering_part_of_a_connections_setup_times_out():
    # Every reply the setup waits for is timed, not only its first: connecting is bounded by
    # redis.connect_timeout only until the connection is made.
    async def answers_auth_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b"+OK\r\n")  # AUTH's answer; SELECT's never comes
        await writer.drain()
        await asyncio.sleep(5)

    async def run() -> None:
        server = await asyncio.start_server(answers_auth_only, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        redis = Redis(f"redis://:secret@127.0.0.1:{port}/2", connect_timeout=1.0, timeout=0.3)
        try:
            with pytest.raises(RedisError):
                await asyncio.wait_for(redis.call("PING"), 3)
        finally:
            await redis.close()
            server.close()

    asyncio.run(run())


def test_an_error_redis_wrote_before_closing_with_no_command_waiting_is_why_the_connection_was_lost():
    connection = _Connection(1.0)
    connection.data_received(b"-ERR max number of clients reached\r\n")
    connection.connection_lost(None)
    assert str(connection.error) == "Redis closed the connection, answering: ERR max number of clients reached"


def test_a_redis_url_without_a_port_is_reached_on_6379():
    async def run() -> tuple[str, int]:
        asked: list[tuple[str, int]] = []

        async def create_connection(factory: object, host: str, port: int) -> None:
            asked.append((host, port))
            raise ConnectionRefusedError("refused")

        loop = asyncio.get_running_loop()
        loop.create_connection = create_connection  # type: ignore[method-assign,assignment]
        with pytest.raises(RedisError):
            await Redis("redis://redis.example", connect_timeout=1.0, timeout=1.0).call("PING")
        return asked[0]

    assert asyncio.run(run()) == ("redis.example", 6379)


def test_a_command_sent_soon_before_any_connection_leaves_nothing_behind_once_answered():
    # Sent from a task of the client's own while it connects: the task is let go once done,
    # or a client that reconnects for good would hold every such command's task.
    async def run() -> int:
        redis = client()
        assert await redis.call_soon("PING") == "PONG"
        await asyncio.sleep(0)
        left = len(redis._background)
        await redis.close()
        return left

    assert asyncio.run(run()) == 0


def test_a_script_sent_soon_to_a_redis_gone_silent_fails_in_time():
    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"+PONG\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # and never again

    async def run() -> None:
        async with fake_redis(answers_once, timeout=0.2) as redis:
            assert await redis.call("PING") == "PONG"  # connected: the script goes out at once
            with pytest.raises(RedisError):
                await asyncio.wait_for(redis.evalsha_soon(Script("return 1"), Keys(["k"]), []), 2)

    asyncio.run(run())


def test_commands_answered_in_time_never_trip_the_timeout_however_long_the_traffic_lasts():
    async def answers_each_after_a_while(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"PING\r\n"):
            await asyncio.sleep(0.05)  # a quarter of the timeout: late, never too late
            writer.write(b"+PONG\r\n")

    async def run() -> None:
        async with fake_redis(answers_each_after_a_while, timeout=0.2) as redis:
            started = asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - started < 0.8:  # four timeouts' worth, one connection
                assert await redis.call("PING") == "PONG"

    asyncio.run(run())


def test_a_reply_late_but_within_the_timeout_is_taken():
    # Four fifths of the timeout: one that ended 0.3 s early or more would fail it.
    async def answers_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"PING\r\n")
        await asyncio.sleep(1.2)
        writer.write(b"+PONG\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def run() -> None:
        async with fake_redis(answers_late, timeout=1.5) as redis:
            await redis.connect()
            assert await redis.call("PING") == "PONG"

    asyncio.run(run())


def test_a_command_whose_caller_gave_up_still_counts_against_the_timeout():
    async def run() -> None:
        async with fake_redis(silent, timeout=1.0) as redis:
            await redis.connect()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(redis.call("PING"), 0.5)  # its reply is still owed
            later = asyncio.ensure_future(redis.call("PING"))
            # The first command's reply is overdue 1 s after it was sent: the connection is given
            # up then, and the command behind it with it, half a second before its own 1 s are up.
            # (Seconds, not tenths: a loaded machine's loop is late by tenths.)
            with pytest.raises(RedisError, match="in time"):
                await asyncio.wait_for(later, 0.9)

    asyncio.run(run())


async def first_command_of_a_connection(url_of: Callable[[int], str]) -> bytes:
    """What a client of the URL `url_of(port)` sends first to a Redis at that port."""
    received: list[bytes] = []

    async def records(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(1000))
        writer.close()

    server = await asyncio.start_server(records, "127.0.0.1", 0)
    redis = Redis(url_of(server.sockets[0].getsockname()[1]), connect_timeout=1.0, timeout=1.0)
    with contextlib.suppress(RedisError):
        await redis.call("PING")
    await redis.close()
    server.close()
    return received[0]


def test_a_url_with_only_a_password_authenticates_with_the_password_alone():
    sent = asyncio.run(first_command_of_a_connection(lambda port: f"redis://:s3cret@127.0.0.1:{port}"))
    assert sent.startswith(encode(("AUTH", "s3cret")))


def test_a_urls_user_and_password_are_sent_percent_decoded():
    sent = asyncio.run(first_command_of_a_connection(lambda port: f"redis://us%40er:p%2Fss@127.0.0.1:{port}"))
    assert sent.startswith(encode(("AUTH", "us@er", "p/ss")))


def test_the_database_number_in_the_url_is_selected():
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> None:
        db3, db0 = client("redis://127.0.0.1:6379/3"), client()
        await db3.call("SET", key, "x", "EX", 10)
        assert await db0.call("GET", key) is None
        assert await db3.call("GET", key) == b"x"
        await db3.call("DEL", key)
        await db3.close()
        await db0.close()

    asyncio.run(run())


def test_a_connect_whose_callers_all_went_away_does_not_leave_a_dead_connection_behind():
    async def run() -> None:
        redis = client()
        waiting = asyncio.create_task(redis.call("PING"))
        await asyncio.sleep(0)  # the connect has started
        waiting.cancel()
        await asyncio.sleep(0.2)  # ...and finished, with nobody waiting for it
        assert redis._connection is not None
        redis._connection.transport.close()  # the connection is lost later
        await asyncio.sleep(0.05)
        assert await redis.call("PING") == "PONG"  # a new one, at once
        await redis.close()

    asyncio.run(run())


def test_a_cancelled_caller_does_not_shift_the_next_callers_reply():
    key = f"tollgate-test:{uuid.uuid4().hex}"

    async def run() -> None:
        redis = client()
        await redis.call("SET", key, "first", "EX", 10)
        slow = asyncio.create_task(redis.call("BLPOP", f"{key}:empty", "0.1"))  # answers nil in 100 ms
        await asyncio.sleep(0.02)
        slow.cancel()
        assert await redis.call("GET", key) == b"first"
        await redis.call("DEL", key)
        await redis.close()

    asyncio.run(run())


def test_after_close_calls_fail_at_once():
    async def run() -> None:
        redis = client()
        assert await redis.call("PING") == "PONG"
        await redis.close()
        with pytest.raises(RedisError):
            await redis.call("PING")

    asyncio.run(run())


def test_closing_the_client_fails_the_commands_still_waiting_at_once():
    async def run() -> None:
        async with fake_redis(silent, timeout=5.0) as redis:
            waiting = asyncio.ensure_future(redis.call("PING"))
            await asyncio.sleep(0.1)
            await redis.close()
            with pytest.raises(RedisError, match="client closed"):
                await asyncio.wait_for(waiting, 1)

    asyncio.run(run())


def test_after_redis_became_a_replica_the_next_command_connects_again_to_whatever_now_answers(tmp_path):
    """A failover that keeps the address (a DNS name, a virtual IP, a proxy) and leaves the old
    primary running as a replica: it keeps its clients connected and refuses their writes for good."""
    old, new = RedisServer(tmp_path).start(), RedisServer(tmp_path).start()
    address = {"port": old.port}

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
        finally:
            sink.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", address["port"])
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    async def run() -> None:
        port = free_port()
        server = await asyncio.start_server(forward, "127.0.0.1", port)
        redis = client(f"redis://127.0.0.1:{port}")
        try:
            assert await redis.call("SET", "tollgate-test:k", "before") == "OK"
            assert old.cli("REPLICAOF", "127.0.0.1", str(new.port)) == "OK"
            address["port"] = new.port
            with pytest.raises(ReplyError, match="READONLY"):
                await redis.call("SET", "tollgate-test:k", "after")
            assert await redis.call("SET", "tollgate-test:k", "after") == "OK"
        finally:
            await redis.close()
            server.close()

    try:
        asyncio.run(run())
    finally:
        old.stop()
        new.stop()


def test_a_connection_whose_setup_redis_refused_leaves_no_reply_unheard(tmp_path):
    # A wrong password: Redis refuses AUTH, then each command sent behind it (the limiter's
    # SCRIPT LOADs) with NOAUTH. Those replies were never read: asyncio logged "Future exception
    # was never retrieved" at ERROR for each of them, on every try to connect.
    server = RedisServer(tmp_path).start()
    server.cli("CONFIG", "SET", "requirepass", "right")
    unheard: list[dict] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unheard.append(context))
        redis = Redis(f"redis://:wrong@127.0.0.1:{server.port}/0", connect_timeout=1.0, timeout=1.0,
                      scripts=[Script("return 1"), Script("return 2")])
        with pytest.raises(ReplyError, match="WRONGPASS"):
            await redis.call("PING")
        await redis.close()
        gc.collect()
        await asyncio.sleep(0)

    try:
        asyncio.run(run())
    finally:
        server.stop()
    assert unheard == []


LIMITER_LIKE_SCRIPTS = [Script("return 1"), Script("return 2"), Script("return 3")]  # loaded as each connection opens


def test_a_redis_refusing_a_connection_over_its_client_limit_is_named(tmp_path):
    # Redis answers `-ERR max number of clients reached` and closes: the limiter logged only
    # "connection to Redis lost", which sent the operator looking at the network.
    server = RedisServer(tmp_path).start()
    server.cli("CONFIG", "SET", "maxclients", "1")
    holder = socket.create_connection(("127.0.0.1", server.port))  # the one client Redis takes

    async def run() -> list[str]:
        errors = []
        for _ in range(10):  # Redis's answer may arrive before the set-up is sent, or after
            redis = Redis(server.url, connect_timeout=1.0, timeout=1.0, scripts=LIMITER_LIKE_SCRIPTS)
            with pytest.raises(RedisError) as caught:
                await redis.call("PING")
            errors.append(str(caught.value))
            await redis.close()
        return errors

    try:
        errors = asyncio.run(run())
    finally:
        holder.close()
        server.stop()
    assert all("max number of clients reached" in error for error in errors), errors


def test_a_tls_url_to_a_redis_without_tls_is_named_a_tls_handshake_failure(tmp_path):
    # rediss:// to a plain Redis: it takes the TLS hello for an inline command and waits for its
    # end, so the handshake never ends; the log said "connecting to Redis timed out".
    server = RedisServer(tmp_path).start()

    async def run() -> str:
        redis = Redis(server.url.replace("redis://", "rediss://"), connect_timeout=0.3, timeout=1.0)
        with pytest.raises(RedisError) as caught:
            await redis.call("PING")
        await redis.close()
        return str(caught.value)

    try:
        error = asyncio.run(run())
    finally:
        server.stop()
    assert "TLS handshake" in error and "redis://" in error, error


def test_a_redis_closing_a_new_connection_without_a_word_is_told_it_may_want_tls():
    # As a Redis serving TLS does to a redis:// client: the log said "connection to Redis lost".
    async def run() -> str:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        port = free_port()
        server = await asyncio.start_server(hang_up, "127.0.0.1", port)
        redis = Redis(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0, timeout=1.0, scripts=LIMITER_LIKE_SCRIPTS)
        with pytest.raises(RedisError) as caught:
            await redis.call("PING")
        await redis.close()
        server.close()
        return str(caught.value)

    assert "rediss://" in asyncio.run(run())


def test_a_connection_closed_without_a_word_where_redis_answered_before_is_not_blamed_on_tls(tmp_path):
    # A redis:// URL that has served is no TLS mismatch: a proxy in front of a Redis that is
    # down (Envoy, HAProxy) takes the connection and closes it, and the log told the operator
    # of an outage to change the URL to rediss://.
    server = RedisServer(tmp_path).start()

    async def run() -> str:
        redis = Redis(server.url, connect_timeout=1.0, timeout=1.0, scripts=LIMITER_LIKE_SCRIPTS)
        assert await redis.call("PING") == "PONG"
        server.stop()

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        proxy = await asyncio.start_server(hang_up, "127.0.0.1", server.port)  # its Redis down
        with pytest.raises(RedisError) as caught:
            await redis.call("PING")
        await redis.close()
        proxy.close()
        return str(caught.value)

    error = asyncio.run(run())
    assert "rediss://" not in error and "closed the connection before answering anything" in error, error


def start_tls_redis(tmp_path, monkeypatch, *options: str) -> tuple[int, Any]:
    """A redis-server serving TLS only, with a certificate the default context trusts."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # the default context's trust
    port = free_port()
    server = start_process(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-auth-clients", "no",
         "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), *options],
        tmp_path / "redis-tls.log",
    )
    return port, server


def test_a_tls_url_talks_to_a_redis_serving_tls(tmp_path, monkeypatch):
    # The handshake runs as a step of its own after the TCP connection (so that its failure is
    # told as one): the commands must still go over TLS, verified against the server's certificate.
    port, server = start_tls_redis(tmp_path, monkeypatch)

    async def run() -> list[Any]:
        redis = Redis(f"rediss://127.0.0.1:{port}/0", connect_timeout=1.0, timeout=1.0, scripts=LIMITER_LIKE_SCRIPTS)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                await redis.call("PING")
                break
            except RedisError:
                assert asyncio.get_running_loop().time() < deadline, "redis-server did not start"
                await asyncio.sleep(0.05)
        replies = [await redis.call("SET", "k", "v"), await redis.call("GET", "k"), await redis.evalsha(
            LIMITER_LIKE_SCRIPTS[1], Keys([]), [])]
        await redis.close()
        return replies

    try:
        assert asyncio.run(run()) == ["OK", b"v", 2]
    finally:
        stop_process(server)


LOOPS = pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])


def run_on(loop_name: str, coroutine: Any) -> Any:
    import uvloop

    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.SelectorEventLoop  # whatever the policy
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


@LOOPS
def test_a_command_whose_write_a_long_turn_of_the_loop_held_up_is_timed_from_its_write(loop_name):
    # A busy loop (a load spike) holds the turn's writes until the turn ends: the command has
    # not reached Redis yet, so its timeout cannot have started. Redis answers in 20 ms, well
    # within the timeout: a local one answered before the timer's second look, and the test
    # passed with the command timed from its queueing.
    port, stop = redis_answering_after(0.02)

    async def run() -> None:
        redis = client(f"redis://127.0.0.1:{port}", timeout=0.1)
        await redis.connect()
        reply = redis.call_soon("PING")
        time.sleep(0.3)  # this turn of the loop runs three timeouts long before the write goes
        assert await asyncio.wait_for(reply, 2) == "PONG"
        await redis.close()

    try:
        run_on(loop_name, run())
    finally:
        stop()


@LOOPS
def test_a_reply_that_arrived_while_another_socket_was_being_served_at_length_is_in_time(loop_name):
    # uvloop runs due timers before it polls the sockets again: a reply that came in while a
    # long I/O callback ran is unread when the timer fires, and still in time.
    class Slow(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            time.sleep(0.3)  # a large body parsed, a slow hook: three timeouts long

    # Redis answers in 20 ms, so its reply comes while the slow callback runs: a local one
    # answered within the poll that read the slow socket, and the test passed without the
    # timer's second look.
    port, stop = redis_answering_after(0.02)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        redis = client(f"redis://127.0.0.1:{port}", timeout=0.1)
        await redis.connect()
        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(Slow, ours)
        reply = redis.call_soon("PING")  # leaves at the end of this turn
        # The slow socket is ready once the command has left (sooner, uvloop reads it first).
        loop.call_soon(theirs.send, b"x")
        assert await asyncio.wait_for(reply, 2) == "PONG"
        await redis.close()
        theirs.close()

    try:
        run_on(loop_name, run())
    finally:
        stop()


def redis_answering_after(delay: float) -> tuple[int, Any]:
    """A Redis answering each PING `delay` seconds after it came. Returns its port and a
    function that stops it."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    size = len(encode(("PING",)))

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        received = answered = 0
        with connection:
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                received += len(data)
                time.sleep(delay)
                try:
                    connection.sendall(b"+PONG\r\n" * (received // size - answered))
                except OSError:
                    return
                answered = received // size

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stopped() -> None:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        listener.close()
        thread.join(5)

    return listener.getsockname()[1], stopped


@LOOPS
def test_a_silent_redis_still_times_out_on_either_loop(loop_name):
    async def run() -> None:
        async with fake_redis(silent, timeout=0.2) as redis:
            await redis.connect()
            with pytest.raises(RedisError, match="in time"):
                await asyncio.wait_for(redis.call("PING"), 2)

    run_on(loop_name, run())


def redis_falling_behind(every: float) -> tuple[int, Any]:
    """A live Redis answering one PING every `every` seconds, however many wait: replies keep
    coming while the wait for each grows. Returns its port and a function that stops it."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    size = len(encode(("PING",)))

    def serve() -> None:
        connection, _ = listener.accept()
        connection.setblocking(False)
        received = answered = 0
        with connection:
            while not stop.is_set():
                try:
                    data = connection.recv(65536)
                    if not data:
                        return
                    received += len(data)
                except BlockingIOError:
                    pass
                except OSError:  # the client gave the connection up
                    return
                if answered < received // size:
                    try:
                        connection.send(b"+PONG\r\n")
                    except OSError:
                        return
                    answered += 1
                time.sleep(every)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stopped() -> None:
        stop.set()
        listener.close()
        thread.join(5)

    return listener.getsockname()[1], stopped


@LOOPS
def test_replies_that_keep_coming_ever_later_still_fail_once_past_their_timeout(loop_name):
    # A Redis falling behind answers the oldest command between any two looks of the timer, so
    # the oldest is never the same twice; each reply is later than the last all the same, and
    # the commands waiting beyond their timeout must fail then, not when Redis gets to them.
    port, stop = redis_falling_behind(every=0.0003)

    async def run() -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        redis = client(f"redis://127.0.0.1:{port}", timeout=0.2)
        await redis.connect()
        written = loop.time()
        replies = [redis.call_soon("PING") for _ in range(4000)]  # six timeouts' worth of answers, and more
        outcomes = await asyncio.gather(*replies, return_exceptions=True)
        took = loop.time() - written
        await redis.close()
        return outcomes[-1], took

    try:
        last, took = run_on(loop_name, run())
    finally:
        stop()
    assert isinstance(last, RedisError) and "in time" in str(last), last
    assert took < 0.8, took  # its timeout and a loaded machine's delay, not the time Redis took to get to it


@LOOPS
def test_a_tls_redis_at_its_client_limit_is_named_and_never_waited_for(loop_name, tmp_path, monkeypatch):
    # Over TLS, Redis refuses a client past maxclients by closing the connection about the end of
    # the handshake. uvloop may hand the connection over closed already: the set-up sent on it was
    # then neither answered nor failed, and every later command waited for that connect for good.
    port, server = start_tls_redis(tmp_path, monkeypatch, "--maxclients", "1")

    async def run() -> list[str]:
        deadline = time.monotonic() + 10
        while True:  # the one client Redis takes, once it serves
            try:
                _, holder = await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context())
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.05)
        errors = []
        for _ in range(10):
            redis = Redis(f"rediss://127.0.0.1:{port}/0", connect_timeout=1.0, timeout=1.0, scripts=LIMITER_LIKE_SCRIPTS)
            with pytest.raises(RedisError) as caught:
                await asyncio.wait_for(redis.call("PING"), 5)
            errors.append(str(caught.value))
            await redis.close()
        holder.close()
        return errors

    try:
        errors = run_on(loop_name, run())
    finally:
        stop_process(server)
    assert all("maxclients" in error for error in errors), errors


def endless(start: bytes, closed: list[bool]) -> Handler:
    """A Redis that answers the first command it reads with `start`, then sends bytes without end
    (64 MiB), unless the client closes first, which `closed` records."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(start)
        try:
            for _ in range(1024):
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            closed.append(True)
            return
        await asyncio.sleep(5)

    return handler


def test_a_reply_that_never_ends_fails_its_command_at_once_not_at_its_timeout():
    # The connection kept all of it until the timeout, however much came meanwhile.
    closed: list[bool] = []

    async def run() -> None:
        async with fake_redis(endless(b"$999999999999\r\n", closed), timeout=5.0) as redis:
            with pytest.raises(RedisError, match="larger than"):
                await asyncio.wait_for(redis.call("PING"), 3)
            await asyncio.sleep(0.2)
            assert closed == [True]

    asyncio.run(run())


def test_bytes_redis_sends_unasked_without_end_close_the_connection():
    # No command waits for them, so no timeout runs: the connection kept them all, for good.
    closed: list[bool] = []

    async def run() -> None:
        async with fake_redis(endless(b"+PONG\r\n", closed)) as redis:
            assert await redis.call("PING") == "PONG"
            for _ in range(100):
                if closed:
                    break
                await asyncio.sleep(0.05)
            assert closed == [True]

    asyncio.run(run())
