"""The application factory: every part of Tollgate is built and wired here,
and opened and closed by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sqlite3
import sys
import threading
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import Message, Receive, Scope, Send
from uvicorn.main import STARTUP_FAILURE

from .admin import AdminService
from .admin_api import AdminApi
from .auth import KeyAuthenticator, MasterKeyGuard
from .call_routes import CallRoutes
from .calls import CallPipeline
from .changes import ChangeSignal
from .config import Config, ConfigError, load_config
from .declared import apply_declared
from .errors import exception_handlers, unwritable_database_log
from .groups import GroupCatalog
from .health import Health
from .jobs_api import JobsApi
from .limiter import RateLimiter
from .metrics import MULTIPROC_ENV, Metrics, MetricsUnavailable, check_directory, forget_namesake, multiprocess_enabled
from .observe import LogHandler, ObserveMiddleware, RunningRequests, write_log_lines_at_once
from .openai_api import OpenAIApi
from .pricing import Pricing
from .server_wide import ServerWide, served_methods
from .store import StoreError, cannot_open, open_store
from .sweeper import sweep_forever
from .upstream import Upstream

log = logging.getLogger("tollgate")
# How long a stop waits, after `server.shutdown_grace`, for the calls it cut to be recorded.
DRAIN_TIMEOUT = 10.0


def create_app(config: Config, existing_database: bool = False) -> Starlette:
    """`existing_database`: the app of `tollgate serve`, which made the database before: one
    removed since (before a worker uvicorn starts again after a crash) is not made anew."""
    store = open_store(config.database, config.jobs.expire_after, existing_database)
    upstream = Upstream(config.upstream, config.upstream_key)
    pricing = Pricing(config.pricing)
    changes = ChangeSignal.beside(config.database)
    # The same bound as keys: README's auth.cache_ttl covers a changed group too.
    groups = GroupCatalog(store, changes, config.auth.cache_ttl)
    auth = KeyAuthenticator(store, config.auth.cache_ttl, changes)
    limiter = RateLimiter(config.rate_limits, config.redis)
    metrics = Metrics(config.metrics.team_label, config.metrics.credits_cache, config.upstream.timeouts.total)
    running = RunningRequests()
    unwritable = unwritable_database_log()  # one fault, one line a minute, whichever request finds it
    calls = CallPipeline(
        store, upstream, pricing, groups, limiter, config.rate_limits, metrics, config.upstream.timeouts.total,
        config.server.read_timeout,  # a stream's client that takes nothing for this long is cut off
        config.jobs.stale_call_margin, unwritable,
    )

    admin = AdminService(store, config, on_change=changes.bump)
    jobs_api = JobsApi(store, auth, calls, metrics, config)
    openai_api = OpenAIApi(auth, calls, groups, config)
    # The router tries routes in order: the calls' routes first. CallRoutes takes their POSTs
    # before the router; the router still answers their other methods (405).
    call_routes = [*jobs_api.call_routes(), *openai_api.call_routes()]
    routes = [
        *jobs_api.routes(),
        *openai_api.routes(),
        *Health(store, upstream, limiter, metrics).routes(),
        *AdminApi(admin, MasterKeyGuard(config.master_key), config).routes(),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await store.open()
        except (OSError, sqlite3.Error, StoreError) as exc:
            # `serve` opened it a moment ago, but a worker uvicorn starts again after a crash may
            # find it spoilt since (migrated by a later release, replaced): one line, as `serve` says.
            raise StartRefused(cannot_open(config.database, exc)) from None
        changes.open()
        try:
            # `tollgate serve` made the file's declarations hold before starting this worker, and
            # a worker uvicorn starts again after a crash must not undo the admin API's changes.
            try:
                waiting = await apply_declared(store, config, follow_file=False)
            except StoreError as exc:  # what it lacks cannot be written now (locked, a full disk)
                raise StartRefused(f"the database {config.database.sqlite_path}: {exc}") from None
            for problem in waiting:
                log.warning("%s (not created yet)", problem)
            changes.bump()  # the file may have changed a team or a group other processes cached
            if config.master_key is None:
                log.warning("TOLLGATE_MASTER_KEY is not set: the admin API refuses every request")
            # LiteLLM's prices before the first call: one priced from them (a stream, whose usage
            # carries no cost; an estimate) recorded before they came would cost nothing. Waited
            # for a bounded time; prices LiteLLM cannot give yet are asked for again soon.
            fresh = await _prices_at_start(pricing, upstream)
            stop_sweeping = asyncio.Event()
            sweeper = asyncio.create_task(
                sweep_forever(
                    store,
                    config.jobs.expire_after,
                    # A call runs no longer than the total timeout; one 'running' well after was
                    # left behind by a process that died. Each call carries the bound its own
                    # process set (`stale_at`); this one is for calls recorded without it.
                    config.upstream.timeouts.total + config.jobs.stale_call_margin,
                    config.jobs.sweep_interval,
                    metrics,
                    record_kept=calls.record_kept,
                    stop=stop_sweeping,
                )
            )
            background = [
                asyncio.create_task(pricing.keep_fresh(upstream, config.upstream.model_info_refresh, fresh)),
                sweeper,
            ]
            try:
                yield
            finally:
                # The process may end by a signal before its loop's next turn (a worker's): the
                # lines of its stop are not held for that turn.
                write_log_lines_at_once()
                # uvicorn has cancelled what outlived the grace period: let those requests end (one
                # whose write went through as it was cut still reads its answer from the store) and
                # those calls be recorded, within the one DRAIN_TIMEOUT.
                loop = asyncio.get_running_loop()
                drained_by = loop.time() + DRAIN_TIMEOUT
                await running.drain(DRAIN_TIMEOUT)
                unrecorded, kept = await calls.drain(timeout=max(0.0, drained_by - loop.time()))
                if calls.cut_by_shutdown:
                    log.warning(
                        "%d calls were cut short by the shutdown, server.shutdown_grace (%g s) being over: their "
                        "clients were told so (503 shutting_down, or a stream's error event) and the calls recorded "
                        "as cancelled; a longer grace lets them finish",
                        calls.cut_by_shutdown, config.server.shutdown_grace,
                    )
                if unrecorded:
                    log.error(
                        "%d calls were not recorded before shutdown (%d of them because the store refused their "
                        "records: their figures are in the log); the sweeper will close them as interrupted",
                        unrecorded, kept,
                    )
                # A sweep under way (its writes waiting on another process's lock, say) ends first,
                # within the same DRAIN_TIMEOUT: cancelled half-way, the jobs it had failed and the
                # calls it had closed were never counted in the metrics.
                stop_sweeping.set()
                await asyncio.wait((sweeper,), timeout=max(0.0, drained_by - loop.time()))
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await upstream.aclose()
                await limiter.close()
        finally:
            changes.close()
            await store.close()

    handlers = exception_handlers(unwritable)
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(ObserveMiddleware, metrics=metrics, log_format=config.logging.access_log, running=running),
            Middleware(CallRoutes, routes=call_routes, handlers=handlers),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    # Off the requests' path: the router's lifespan alone, which only the server calls.
    app.router.lifespan = _refusals_in_one_line(app.router.lifespan)  # type: ignore[method-assign, assignment]
    # A path with a trailing slash is a 404 like any other unknown path, not a redirect to an
    # address built from the client's own Host header.
    app.router.redirect_slashes = False
    # `OPTIONS *`, which no route can match (a route's path begins with /), is answered where the
    # requests no route matched go: the requests routed do nothing more for it.
    app.router.default = ServerWide(served_methods(app.router.routes), app.router.default)
    return app


class StartRefused(Exception):
    """The app cannot start, for a reason its message says whole (a database that cannot be
    opened): the server logs that line, not a traceback."""


def _refusals_in_one_line(
    lifespan: Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]],
) -> Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]:
    """The router's lifespan, telling the server of a `StartRefused` in its one line: Starlette
    tells it of any failed start with the exception's traceback, which uvicorn logs whole."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_refusal_in_one_line(message: Message) -> None:
            # Starlette sends the failure from the block handling the exception.
            refused = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(refused, StartRefused):
                message = {**message, "message": f"tollgate: {refused}"}
            await send(message)

        await lifespan(scope, receive, send_refusal_in_one_line)

    return run


async def _prices_at_start(pricing: Pricing, upstream: Upstream) -> bool:
    """Whether LiteLLM's prices came, waited for as long as a read of them may take
    (pricing.MODEL_INFO_TIMEOUT; one that fails is logged). A stop asked for meanwhile (SIGTERM,
    SIGINT) ends the wait: uvicorn only notes the signal during the start, and would stop the
    process once the wait ran out, up to 10 s later (all of `docker stop`'s 10 s before its SIGKILL)."""
    refresh = asyncio.ensure_future(pricing.refresh(upstream))
    try:
        with _cancelled_on_stop(refresh):
            return await refresh
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the start itself was cancelled
        return False  # a stop was asked for: uvicorn stops once the start is over


@contextlib.contextmanager
def _cancelled_on_stop(future: asyncio.Future[Any]) -> Iterator[None]:
    """`future` cancelled on SIGTERM or SIGINT while in the block; the handlers in place
    (uvicorn's) still hear of the signal. Only where signals are handled: the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if None in previous.values():  # a handler not set from Python: not one to chain to
        yield
        return

    def stop(sig: int, frame: Any) -> None:
        loop.call_soon_threadsafe(future.cancel)
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def app_from_environment() -> Starlette:
    """The factory uvicorn's worker processes call: configuration from TOLLGATE_CONFIG. A worker
    that cannot build its app fails its start, which stops the supervisor and `serve`: uvicorn
    started a worker failing otherwise again, to fail alike, every second or two (each start a
    core busy with the imports), for good."""
    _stop_with_supervisor()
    try:
        if multiprocess_enabled():
            forget_namesake(os.environ[MULTIPROC_ENV])
        config = load_config()
        configure_logging(config.logging.level)
        try:
            return create_served_app(config)
        except OSError:
            if multiprocess_enabled():  # its metrics' files could not be made: the directory gone?
                check_directory(os.environ[MULTIPROC_ENV])
            raise
    # What `serve` made for its workers (the config's copy, the metrics directory), removed since
    # (a cleaner of old files).
    except (ConfigError, MetricsUnavailable) as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
    except Exception:
        log.exception("the worker cannot build its app")
    sys.exit(STARTUP_FAILURE)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _stop_with_supervisor() -> None:
    """In a worker of `serve --workers N`: SIGTERM (a graceful stop) once the supervisor dies.
    Killed alone (kill -9 of the process a process manager started), it left its workers
    serving on, orphaned, holding the port: the restart could not bind it, and nothing would
    ever stop them. Linux only (prctl); uvicorn starts workers from its main thread, whose end
    is what the kernel watches."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the supervisor (errno %d)", ctypes.get_errno())
        return
    if os.getppid() != parent.pid:  # it died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def create_served_app(config: Config) -> Starlette:
    """The app for a process that does nothing but serve it (`tollgate serve`, one worker or
    each of several). What start-up made lives as long as the process: frozen, the collector
    no longer walks it in every full collection, a pause of tens of milliseconds under load."""
    # An empty database made anew would be served: every key refused there, the admin API's
    # writes landing in it while the other workers refuse writes to the one removed.
    app = create_app(config, existing_database=True)
    gc.freeze()
    return app


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), handlers=[LogHandler()])
