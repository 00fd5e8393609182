"""The access log's records and time stamps are what `logging` itself would make, only made
with less work (proxy/observe.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from proxy import observe
from proxy.observe import LogFormatter, ObserveMiddleware, access_log

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MADE_AT_EACH_CALL = {"msg", "created", "msecs", "relativeCreated", "taskName"}


def records(lines: list[str]) -> list[tuple[logging.LogRecord, logging.LogRecord]]:
    """For each line: (the middleware's record, the one `makeRecord` makes)."""
    middleware = ObserveMiddleware(app=None, metrics=None, log_format="plain")  # type: ignore[arg-type]

    async def pair(line: str) -> tuple[logging.LogRecord, logging.LogRecord]:
        ours = middleware._record(line)
        return ours, access_log.makeRecord(access_log.name, logging.INFO, observe.__file__, 0, line, None, None)

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
