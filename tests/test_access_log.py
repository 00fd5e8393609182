"""The access log's records, lines and time stamps are what `logging` itself would make, only
made with less work, and written a turn of the loop at a time (proxy/observe.py)."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time

import pytest

from proxy import observe
from proxy.app import configure_logging
from proxy.metrics import Metrics
from proxy.observe import LogFormatter, ObserveMiddleware, access_log

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MADE_AT_EACH_CALL = {"msg", "created", "msecs", "relativeCreated", "taskName"}


def records(lines: list[str]) -> list[tuple[logging.LogRecord, logging.LogRecord]]:
    """For each line: (the middleware's record, the one `makeRecord` makes as `access_log.info(line)`
    calls it: no arguments, so `args` is an empty tuple)."""
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]

    async def pair(line: str) -> tuple[logging.LogRecord, logging.LogRecord]:
        ours = middleware._record(line)
        return ours, access_log.makeRecord(access_log.name, logging.INFO, observe.__file__, 0, line, (), None)

    async def make() -> list[tuple[logging.LogRecord, logging.LogRecord]]:
        # Each in a task of its own, as requests are: on Python 3.12+ records name their task.
        return [await asyncio.create_task(pair(line)) for line in lines]

    return asyncio.run(make())


def test_an_access_record_is_the_one_logging_would_make():
    for ours, theirs in records(["first line", "second line"]):
        assert ours.getMessage() == theirs.getMessage()
        assert abs(ours.created - theirs.created) < 1 and abs(ours.relativeCreated - theirs.relativeCreated) < 1000
        assert ours.msecs == int((ours.created - int(ours.created)) * 1000)
        assert getattr(ours, "taskName", None) == getattr(theirs, "taskName", None)
        same = {k: v for k, v in vars(ours).items() if k not in MADE_AT_EACH_CALL}
        assert same == {k: vars(theirs)[k] for k in same}


def test_each_access_record_has_its_own_line_and_time():
    (first, _), (second, _) = records(["one", "two"])
    assert (first.getMessage(), second.getMessage()) == ("one", "two")
    assert second.created >= first.created


def test_time_stamps_read_as_logging_formats_them_across_seconds():
    ours, theirs = LogFormatter(FORMAT), logging.Formatter(FORMAT)
    start = int(time.time())
    for created in (start + 0.001, start + 0.999, start + 1.0, start + 1.5, start + 3600.25, start + 0.5):
        record = logging.LogRecord("tollgate.access", logging.INFO, __file__, 1, "line", None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == theirs.format(record)
        assert ours.formatTime(record, "%H:%M") == theirs.formatTime(record, "%H:%M")


def test_a_record_factory_installed_by_the_application_makes_every_access_record():
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._record("made before the factory")  # a template is kept from here on
    counter = iter(range(1, 100))
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = previous(*args, **kwargs)
        record.request_number = next(counter)
        return record

    logging.setLogRecordFactory(factory)
    try:
        numbers = [middleware._record(line).request_number for line in ("a", "b")]  # type: ignore[attr-defined]
    finally:
        logging.setLogRecordFactory(previous)
    assert numbers == [1, 2]


def test_a_record_made_on_another_thread_names_that_thread():
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._record("on this thread")
    seen: list[logging.LogRecord] = []
    other = threading.Thread(target=lambda: seen.append(middleware._record("on another")), name="other-thread")
    other.start()
    other.join()
    assert seen[0].threadName == "other-thread" and seen[0].getMessage() == "on another"
    assert middleware._record("back here").threadName == threading.current_thread().name


def test_time_stamps_without_milliseconds_read_as_logging_formats_them():
    ours, theirs = LogFormatter(FORMAT), logging.Formatter(FORMAT)
    ours.default_msec_format = theirs.default_msec_format = None  # type: ignore[assignment]
    record = logging.LogRecord("tollgate.access", logging.INFO, __file__, 1, "line", None, None)
    assert ours.format(record) == theirs.format(record)


class Stream:
    """A stream that records each write it is given."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def tollgate_logging():
    """Logging as `tollgate serve` sets it up (configure_logging), into a Stream; put back after.
    Tests using it call `served_logging_only()` first."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers.clear()
    configure_logging("info")
    (handler,) = root.handlers
    stream = Stream()
    handler.setStream(stream)  # type: ignore[attr-defined]
    yield handler, stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def served_logging_only() -> None:
    """pytest adds a handler of its own to the root logger as each test starts: take it away."""
    root = logging.getLogger()
    root.handlers[:] = [handler for handler in root.handlers if isinstance(handler, observe.LogHandler)]


def test_an_access_line_written_directly_reads_as_logging_would_format_its_record():
    formatter = LogFormatter(FORMAT)
    start = int(time.time())
    for created in (start + 0.001, start + 0.999, start + 1.0, start + 61.5):
        record = logging.LogRecord("tollgate.access", logging.INFO, __file__, 1, "route=/x status=200", None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert formatter.access_line("route=/x status=200", created) == logging.Formatter(FORMAT).format(record)


def test_served_logging_sends_the_access_log_straight_to_its_handler(tollgate_logging):
    handler, _ = tollgate_logging
    served_logging_only()
    assert observe.sole_handler() is handler


@pytest.mark.parametrize("change", ["filter on the logger", "second handler", "filter on the handler",
                                    "another format", "record factory", "not propagated"])
def test_any_other_logging_set_up_gets_the_access_log_through_logging(tollgate_logging, change):
    handler, _ = tollgate_logging
    served_logging_only()
    seen: list[logging.LogRecord] = []
    undo = []
    if change == "filter on the logger":
        access_log.addFilter(seen.append)
        undo.append(lambda: access_log.removeFilter(seen.append))
    elif change == "second handler":
        other = logging.Handler()
        other.emit = seen.append  # type: ignore[method-assign]
        logging.getLogger("tollgate").addHandler(other)
        undo.append(lambda: logging.getLogger("tollgate").removeHandler(other))
    elif change == "filter on the handler":
        handler.addFilter(seen.append)
        undo.append(lambda: handler.removeFilter(seen.append))
    elif change == "another format":
        saved = handler.formatter
        handler.setFormatter(LogFormatter("%(levelname)s %(message)s"))
        undo.append(lambda: handler.setFormatter(saved))
    elif change == "record factory":
        previous = logging.getLogRecordFactory()
        logging.setLogRecordFactory(lambda *a, **k: seen.append(previous(*a, **k)) or seen[-1])
        undo.append(lambda: logging.setLogRecordFactory(previous))
    else:
        access_log.propagate = False
        undo.append(lambda: setattr(access_log, "propagate", True))
    try:
        assert observe.sole_handler() is None
        middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
        middleware._log("/x", "GET", 200, 0.001, {})
        if change not in ("another format", "not propagated"):
            assert [r.getMessage() for r in seen] == ["route=/x method=GET status=200 latency_ms=1.0"]
    finally:
        for step in undo:
            step()


def test_lines_logged_in_one_turn_of_the_loop_reach_the_stream_in_one_write_at_its_end(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()
    assert observe.sole_handler() is handler  # the access lines go the direct way
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]

    async def run() -> list[str]:
        middleware._log("/a", "GET", 200, 0.001, {})
        logging.getLogger("tollgate.calls").warning("a warning between them")
        middleware._log("/b", "GET", 200, 0.001, {})
        assert stream.writes == []  # held until the loop has run what was ready
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return stream.writes

    (write,) = asyncio.run(run())
    lines = write.splitlines()
    assert write.endswith("\n") and len(lines) == 3
    assert lines[0].endswith("INFO tollgate.access: route=/a method=GET status=200 latency_ms=1.0")
    assert lines[1].endswith("WARNING tollgate.calls: a warning between them")
    assert lines[2].endswith("route=/b method=GET status=200 latency_ms=1.0")


def test_an_app_stopped_in_the_process_leaves_the_next_loops_lines_held_for_one_write(tollgate_logging):
    # An app's shutdown has the lines of its own stop written as they come: that stayed so for
    # good, and an app run next in the same process (a test's, an embedding's) wrote a line each.
    handler, stream = tollgate_logging
    served_logging_only()

    async def stop_an_app() -> None:
        observe.write_log_lines_at_once()

    async def run() -> list[str]:
        logging.getLogger("tollgate.calls").warning("one")
        logging.getLogger("tollgate.calls").warning("two")
        await asyncio.sleep(0)
        return stream.writes

    asyncio.run(stop_an_app())
    (write,) = asyncio.run(run())
    assert len(write.splitlines()) == 2


def test_a_line_from_another_thread_goes_at_once_after_the_lines_the_loop_holds(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()

    async def run() -> None:
        logging.getLogger("tollgate.calls").warning("held by the loop")
        other = threading.Thread(target=lambda: logging.getLogger("tollgate.store").error("from the writer thread"))
        other.start()
        other.join()

    asyncio.run(run())
    text = "".join(stream.writes)
    assert text.index("held by the loop") < text.index("from the writer thread")
    assert stream.writes[0].endswith("from the writer thread\n")  # both went in that one write


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])  # uvloop: what `tollgate serve` runs on
def test_lines_held_when_logging_shuts_down_are_written(tollgate_logging, loop_name):
    import uvloop

    handler, stream = tollgate_logging
    served_logging_only()

    def last_words() -> None:
        logging.getLogger("tollgate").warning("the last words")

    loop = uvloop.new_event_loop() if loop_name == "uvloop" else asyncio.SelectorEventLoop()
    loop.call_soon(last_words)
    # Asked to stop before it runs, either loop runs what was ready once, and not the turn that
    # would send them. A stop asked for in a callback leaves that turn out on asyncio only: uvloop
    # stops as a callback of its own, queued behind the turn's.
    loop.stop()
    loop.run_forever()
    loop.close()
    assert stream.writes == []
    handler.flush()  # what logging.shutdown() does at exit
    assert stream.writes[0].endswith("WARNING tollgate: the last words\n")


class BrokenPipe(Stream):
    """A stream whose reader is gone (a log shipper that died): every write fails."""

    def write(self, text: str) -> None:
        self.writes.append(text)
        raise BrokenPipeError(32, "Broken pipe")


def test_a_stream_that_cannot_be_written_does_not_keep_the_loop_busy(tollgate_logging):
    # The failed flush, raised in a callback of the loop, was logged by asyncio through this
    # same handler, whose line scheduled another flush that failed in turn: the loop never
    # went idle, and a server whose stderr pipe broke spun at 100% CPU.
    handler, _ = tollgate_logging
    served_logging_only()
    broken = BrokenPipe()
    handler.setStream(broken)

    async def run() -> None:
        logging.getLogger("tollgate").warning("a line the pipe cannot take")
        await asyncio.sleep(0.2)

    asyncio.run(run())
    assert len(broken.writes) == 1


def test_lines_held_in_a_turn_reach_the_stream_in_writes_a_pipe_keeps_whole(tollgate_logging):
    # Workers share their stderr pipe: a write of more than PIPE_BUF bytes may interleave with
    # another worker's, within a line. A busy turn's lines go in pieces of whole lines.
    handler, stream = tollgate_logging
    served_logging_only()

    async def run() -> None:
        for n in range(200):
            logging.getLogger("tollgate").warning("line %d é %s", n, "x" * 60)
        await asyncio.sleep(0)

    asyncio.run(run())
    assert len(stream.writes) > 1
    assert all(len(write.encode()) <= observe.ATOMIC_WRITE and write.endswith("\n") for write in stream.writes)
    lines = "".join(stream.writes).splitlines()
    assert [line.split("line ")[1].split(" ")[0] for line in lines] == [str(n) for n in range(200)]


def test_no_access_line_is_written_when_the_access_log_is_off(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()
    middleware = ObserveMiddleware(app=None, metrics=Metrics(), log_format="off")  # type: ignore[arg-type]
    middleware.observe("/x", "GET", 200, 0.001, {"team": "t"})
    handler.flush()
    assert stream.writes == []


def test_a_field_noted_as_none_is_left_out_of_a_plain_line(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._log("/x", "GET", 429, 0.001, {"team": "t", "job": None})
    handler.flush()
    assert stream.writes[0].endswith("tollgate.access: route=/x method=GET status=429 latency_ms=1.0 team=t\n")


def test_a_handler_set_above_info_writes_no_access_line(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()
    handler.setLevel(logging.WARNING)
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._log("/x", "GET", 200, 0.001, {})
    handler.flush()
    assert stream.writes == []


def test_no_access_line_is_written_when_logging_is_set_above_info(tollgate_logging):
    # logging.level: warning keeps the access log out, as it keeps uvicorn's own.
    handler, stream = tollgate_logging
    served_logging_only()
    logging.getLogger().setLevel(logging.WARNING)
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._log("/x", "GET", 200, 0.001, {})
    handler.flush()
    assert stream.writes == []


def test_a_handlers_note_named_as_a_field_of_the_line_takes_its_place(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._log("/x", "GET", 200, 0.001, {"status": 499, "team": "t", "job": None})
    handler.flush()
    assert stream.writes[0].endswith("tollgate.access: route=/x method=GET status=499 latency_ms=1.0 team=t\n")


def test_each_access_record_counts_its_time_since_logging_started():
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]

    async def two() -> tuple[logging.LogRecord, logging.LogRecord]:
        first = middleware._record("a")
        await asyncio.sleep(0.05)
        return first, middleware._record("b")

    first, second = asyncio.run(two())
    elapsed = (second.created - first.created) * 1000
    assert second.relativeCreated - first.relativeCreated == pytest.approx(elapsed, abs=1)
    assert elapsed >= 40


def test_a_formatter_writing_milliseconds_otherwise_gets_the_access_log_through_logging(tollgate_logging):
    # The direct way writes the time stamp as LOG_FORMAT's own "%s,%03d" does.
    handler, _ = tollgate_logging
    served_logging_only()
    handler.formatter.default_msec_format = "%s.%03d"
    assert observe.sole_handler() is None


def test_a_second_handler_after_the_served_one_gets_the_access_log_too(tollgate_logging):
    handler, _ = tollgate_logging
    served_logging_only()
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(other)  # after the served one: the fixture puts the handlers back
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    middleware._log("/x", "GET", 200, 0.001, {})
    assert [r.getMessage() for r in seen] == ["route=/x method=GET status=200 latency_ms=1.0"]


class RawWrites(io.RawIOBase):
    """What reaches the file descriptor: each write's size in bytes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.sizes.append(len(data))
        return len(data)


def test_held_lines_of_many_byte_characters_reach_the_descriptor_in_writes_a_pipe_keeps_whole(tollgate_logging):
    # A text stream buffers: what a pipe keeps whole is counted in bytes at the descriptor.
    handler, _ = tollgate_logging
    served_logging_only()
    raw = RawWrites()
    handler.setStream(io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8"))

    async def run() -> None:
        for _ in range(3):
            logging.getLogger("tollgate").warning("é" * 1000)  # 2 bytes a character
        await asyncio.sleep(0)

    asyncio.run(run())
    assert sum(raw.sizes) > observe.ATOMIC_WRITE
    assert all(size <= observe.ATOMIC_WRITE for size in raw.sizes)


def test_lines_a_loop_held_and_never_sent_go_with_the_next_loops_line(tollgate_logging):
    handler, stream = tollgate_logging
    served_logging_only()
    abandoned = asyncio.new_event_loop()

    def held() -> None:
        logging.getLogger("tollgate").warning("first")  # its flush is left to the next turn,
        abandoned.stop()  # which never comes

    abandoned.call_soon(held)
    abandoned.run_forever()
    abandoned.close()
    assert stream.writes == []

    async def then() -> None:
        logging.getLogger("tollgate").warning("second")
        await asyncio.sleep(0)

    asyncio.run(then())
    assert [line.rsplit(": ", 1)[1] for line in "".join(stream.writes).splitlines()] == ["first", "second"]


def test_a_record_factory_put_back_leaves_no_field_of_its_records_in_the_access_records():
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]
    previous = logging.getLogRecordFactory()

    class Tagged(logging.LogRecord):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.tenant = "acme"

    async def make() -> logging.LogRecord:
        logging.setLogRecordFactory(Tagged)
        try:
            middleware._record("a")
        finally:
            logging.setLogRecordFactory(previous)
        return middleware._record("b")

    record = asyncio.run(make())
    assert type(record) is logging.LogRecord and not hasattr(record, "tenant")
