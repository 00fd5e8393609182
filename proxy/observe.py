"""Every request is measured and logged here, once, when its response has ended.

A pure ASGI middleware (streams pass through untouched): it counts the request
under its route template, times it, and writes one access-log line with what
the handlers noted about it (team, job, call, model group, model, tokens).
Handlers note those through `notes(request)`; keys and prompts are never noted.
Requests the HTTP protocol refuses before the app sees them are observed here too,
through the lifespan state (`REFUSALS`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator, Literal

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response, shutting_down
from .metrics import Metrics

access_log = logging.getLogger("tollgate.access")
NOTES = "tollgate.notes"
UNMATCHED = "unmatched"
# The status the HTTP protocol answered a request with while the app ran it (a 408 for a body that
# never arrived whole): what the request is counted and logged with, whatever the app made of it.
REFUSED = "tollgate.refused"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The fields every access-log line starts with; a handler's note of the same name takes its place.
_OWN_FIELDS = frozenset(["route", "method", "status", "latency_ms"])


# Where the middleware publishes, in the lifespan's state, how a request refused before the app
# saw it is observed: uvicorn hands that state to every connection's protocol (`server.py`).
REFUSALS = "tollgate.observe_refusal"
# What one write to a pipe is kept whole up to (Linux's PIPE_BUF): workers writing their held
# lines to one pipe (a log collector's) must not interleave within a line.
ATOMIC_WRITE = 4096
RefusalObserver = Callable[[str, int, float], None]  # method, status, seconds


SHUTTING_DOWN = shutting_down("the request was cut short")


def notes(request: Request) -> dict[str, Any]:
    """The access-log fields of this request, for handlers to fill in."""
    return request.scope.setdefault(NOTES, {})


class RunningRequests:
    """How many requests the app is running. A request the shutdown cut may still use the store
    (one whose write went through as it was cut reads the answer it is then given), so the
    lifespan waits for them before it closes the store (`drain`)."""

    def __init__(self) -> None:
        self.count = 0

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the requests still running to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.count and loop.time() < deadline:
            await asyncio.sleep(0.02)


class ObserveMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        log_format: Literal["plain", "json", "off"],
        running: RunningRequests | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.log_format = log_format
        self.running = running if running is not None else RunningRequests()
        self._template: dict[str, Any] | None = None  # the access log's record, but for line and time

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and "state" in scope:
                scope["state"][REFUSALS] = self.observe_refusal
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0  # none sent yet
        scope[NOTES] = {}
        self.running.count += 1

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            # Only a shutdown cancels a request (uvicorn's, once server.shutdown_grace is over): one
            # not answered yet gets a 503 to retry elsewhere, not uvicorn's bare 500 (which a client
            # could not tell from a fault, nor from an answer that failed after its write was done).
            if status:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await error_response(Request(scope), SHUTTING_DOWN)(scope, receive, send_and_watch)
        finally:
            self.running.count -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            seconds = time.perf_counter() - started
            self.observe(template, scope["method"], scope.get(REFUSED, status or 500), seconds, scope[NOTES])

    def observe_refusal(self, method: str, status: int, seconds: float) -> None:
        """A request the HTTP protocol refused before the app saw it (a head over its bound or
        unparsable, or one that never arrived whole): counted and logged as the app's are,
        under the route of every unmatched path."""
        self.observe(UNMATCHED, method, status, seconds, {})

    def observe(self, route: str, method: str, status: int, seconds: float, fields: dict[str, Any]) -> None:
        self.metrics.observe_request(route, method, status, seconds)
        if self.log_format != "off":
            self._log(route, method, status, seconds, fields)

    def _log(self, route: str, method: str, status: int, seconds: float, fields: dict[str, Any]) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        latency_ms = round(seconds * 1000, 1)
        if self.log_format == "plain" and _OWN_FIELDS.isdisjoint(fields):
            # The line the entry below would give, written without making the entry first.
            line = f"route={route} method={method} status={status} latency_ms={latency_ms}"
            if fields:
                line += "".join([f" {k}={v}" for k, v in fields.items() if v is not None])
        else:
            entry = {"route": route, "method": method, "status": status, "latency_ms": latency_ms, **fields}
            if self.log_format == "json":
                line = json.dumps(entry, separators=(",", ":"))
            else:
                line = " ".join(f"{k}={v}" for k, v in entry.items() if v is not None)
        handler = sole_handler()
        if handler is not None:
            handler.write_access_line(line)
        else:
            access_log.handle(self._record(line))

    def _record(self, line: str) -> logging.LogRecord:
        """The line's log record, as `access_log.info(line)` would make it. Everything in it
        but the line and the time is the same for every request on the loop's thread (where it
        was logged, the thread, the process), so it is made once and copied: `access_log.info()`
        would walk the stack for the caller, and `LogRecord()` look up the thread and process,
        every time. A record factory of someone else's (`logging.setLogRecordFactory`) may add
        fields of its own to each record: then every record is made by it."""
        template = self._template
        if (
            template is None
            or logging.getLogRecordFactory() is not logging.LogRecord
            or template["thread"] != threading.get_ident()
        ):
            record = access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line, (), None)
            if type(record) is logging.LogRecord:
                self._template = dict(record.__dict__)
            return record
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__.update(template)
        now = time.time()
        record.msg = line
        record.created = now
        record.msecs = int((now - int(now)) * 1000) + 0.0
        record.relativeCreated = template["relativeCreated"] + (now - template["created"]) * 1000
        if "taskName" in template:  # Python 3.12 and later name the asyncio task that logs
            task = asyncio.current_task() if getattr(logging, "logAsyncioTasks", True) else None
            record.taskName = None if task is None else task.get_name()
        return record


class LogFormatter(logging.Formatter):
    """logging's own formatter, with the date and time of its time stamps made once a second:
    the access log writes a line for every request, and `time.strftime` was a third of
    formatting one."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._cached: tuple[int, str] = (-1, "")  # one tuple, so threads never see half of it

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        return self.default_msec_format % (self._second(record.created), record.msecs)

    def _second(self, created: float) -> str:
        second, text = self._cached
        if int(created) != second:
            text = time.strftime(self.default_time_format, self.converter(created))
            self._cached = (int(created), text)
        return text

    @property
    def formats_as_set_up(self) -> bool:
        """Whether this formats as `configure_logging` set it up, which `access_line` assumes."""
        return type(self) is LogFormatter and self._fmt == LOG_FORMAT and self.default_msec_format == "%s,%03d"

    def access_line(self, line: str, created: float) -> str:
        """What `format()` makes of the access log's record of `line` made at `created`."""
        level = logging.getLevelName(logging.INFO)
        return f"{self._second(created)},{int((created - int(created)) * 1000):03d} {level} {access_log.name}: {line}"


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `tollgate serve` logs through: logging's StreamHandler in LOG_FORMAT, but
    the lines written during one turn of the event loop reach the stream in one write, at
    its end (every request logs a line; a write each was a system call each). Lines from
    other threads go at once, after those of the loop still held; `flush()`, which logging
    calls at exit, sends what is held."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.setFormatter(LogFormatter(LOG_FORMAT))
        self._held: list[str] = []
        self._held_by: asyncio.AbstractEventLoop | None = None  # the loop whose turn will send them
        # The loop whose lines go as they come (`write_at_once`): the one of a stop, not the next
        # app's in the same process.
        self._at_once_in: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_access_line(self, line: str) -> None:
        """The access log's line, as `emit` would write its record (see `sole_handler`)."""
        assert isinstance(self.formatter, LogFormatter)
        text = self.formatter.access_line(line, time.time())
        with self.lock:  # type: ignore[union-attr]
            self._write(text)

    def _write(self, text: str) -> None:
        loop = asyncio._get_running_loop()
        self._held.append(text)
        if loop is None or loop is self._at_once_in or (self._held_by is not loop and len(self._held) > 1):
            self.flush()  # off the loop, or after lines another loop held and never sent
        elif len(self._held) == 1:
            self._held_by = loop
            loop.call_soon(self.flush)

    def write_at_once(self) -> None:
        """From now on each line of the running loop as it comes, those held first (another
        loop's, a next app's in the process, are held as before; off a loop each goes at once).
        For a stop: a worker of `serve --workers` ends by the SIGTERM uvicorn raises again once
        its graceful stop is over, with no handler of its own to make that an exit, so neither
        its loop's next turn nor logging's flush at exit came, and the lines of its last turns
        (uvicorn's last ones) were lost."""
        self._at_once_in = asyncio._get_running_loop()
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            held, self._held = self._held, []
            if self.stream is None:
                return
            try:
                if held:
                    text = self.terminator.join(held) + self.terminator
                    if len(text) <= ATOMIC_WRITE // 4:  # at most 4 bytes a character
                        self.stream.write(text)
                    else:
                        for part in _whole_lines_within(held, self.terminator, ATOMIC_WRITE):
                            self.stream.write(part)
                            self.stream.flush()
                if hasattr(self.stream, "flush"):
                    self.stream.flush()
            except Exception:
                # The lines are lost, as logging's own StreamHandler loses one it cannot write
                # (a pipe whose reader is gone). Raised from the loop's callback, the error would
                # be logged by asyncio through this handler, whose line would schedule another
                # flush to fail in turn: the loop would never go idle again.
                self.handleError(logging.makeLogRecord({"msg": f"{len(held)} log lines could not be written"}))


def _whole_lines_within(lines: list[str], terminator: str, limit: int) -> Iterator[str]:
    """`lines` in pieces of whole lines, each at most `limit` bytes in UTF-8 where a line
    alone is not longer."""
    part: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode("utf-8", "surrogateescape")) + len(terminator)
        if part and size + length > limit:
            yield terminator.join(part) + terminator
            part, size = [], 0
        part.append(line)
        size += length
    if part:
        yield terminator.join(part) + terminator


def write_log_lines_at_once() -> None:
    """Every LogHandler of the root logger (`tollgate serve`'s) writes each line as it comes."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogHandler):
            handler.write_at_once()


def sole_handler() -> LogHandler | None:
    """The LogHandler that the access log's records reach, and nothing else does, formatting
    as `configure_logging` set it up, with no filter on the way and logging's own records:
    then writing its line there directly (`write_access_line`) is what `access_log.handle()`
    would come to, for a fraction of the work. Else None."""
    if access_log.filters or access_log.disabled or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found: list[logging.Handler] = []
    logger: logging.Logger | None = access_log
    while logger is not None:
        found += logger.handlers
        if not logger.propagate:
            break
        logger = logger.parent
    if len(found) != 1:
        return None
    handler = found[0]
    if type(handler) is not LogHandler or handler.filters or handler.level > logging.INFO:
        return None
    formatter = handler.formatter
    if not isinstance(formatter, LogFormatter) or not formatter.formats_as_set_up:
        return None
    return handler
