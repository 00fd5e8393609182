"""Where Tollgate's CPU goes: measure (b) Tollgate -> fake upstream with parts switched off.

    .venv/bin/python bench/ablate.py                          # everything on
    .venv/bin/python bench/ablate.py --off store,redis        # without those parts
    .venv/bin/python bench/ablate.py --each --rounds 2        # one part off at a time, twice

Parts: store (no call records), upstream (a canned answer, no HTTP), redis (the in-process
limiter), log (no access log), metrics (no call/request metrics), keycache (every request
looks its key up), uvloop (asyncio's loop and h11 instead of uvloop and httptools).
One more switch is not a part: trace times every await on the store, Redis and the
upstream, and the call's stages, and writes them to /tmp/tollgate-trace.txt at exit.
A part switched off is replaced in the serving process before it starts; the numbers are
that process's CPU per call (all threads, from /proc) under bench/run.py's load generator.
This is a profiling tool: what it switches off, a real gateway needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PARTS = ("store", "upstream", "redis", "log", "metrics", "keycache", "uvloop", "trace")


def switch_off(parts: set[str]) -> None:
    """Replace the named parts of Tollgate in this process (the serving one)."""
    import proxy.auth as auth
    import proxy.calls as calls
    import proxy.forwarding as forwarding
    import proxy.limiter as limiter
    import proxy.metrics as metrics
    import proxy.observe as observe
    import proxy.store.sqlite as sqlite

    async def nothing(*args: object, **kwargs: object) -> None:
        return None

    async def recorded(*args: object, **kwargs: object) -> bool:
        return True

    if "store" in parts:
        sqlite.SQLiteStore.start_call = nothing  # type: ignore[method-assign]
        sqlite.SQLiteStore.finish_call = recorded  # type: ignore[method-assign]
    if "log" in parts:
        observe.ObserveMiddleware._log = lambda *a, **k: None  # type: ignore[method-assign]
    if "metrics" in parts:
        metrics.Metrics.observe_call = lambda *a, **k: None  # type: ignore[method-assign]
        metrics.Metrics.observe_request = lambda *a, **k: None  # type: ignore[method-assign]
    if "redis" in parts:
        async def admit(self, limits, call_id, estimate):  # type: ignore[no-untyped-def]
            return self.local.admit(limits, call_id, estimate)

        async def settle(self, decision, tokens, release=False):  # type: ignore[no-untyped-def]
            self.local.settle(decision, tokens, release)

        limiter.RateLimiter.admit = admit  # type: ignore[method-assign]
        def settle_soon(self, decision, tokens):  # type: ignore[no-untyped-def]
            self.local.settle(decision, tokens)

        limiter.RateLimiter.settle = settle  # type: ignore[method-assign]
        limiter.RateLimiter.settle_soon = settle_soon  # type: ignore[method-assign]
    if "upstream" in parts:
        body = json.dumps({
            "id": "canned", "object": "chat.completion", "model": "primary",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }).encode()

        from proxy.json_codec import dumps, loads

        async def forward(upstream, models, payload, stream, deadline, asked=None, failed=None):  # type: ignore[no-untyped-def]
            if asked is not None:
                asked.append("primary")
            dumps(payload)  # the JSON work stays, as the real forward does it: only the HTTP goes
            return forwarding.Answer("primary", 1, body, loads(body), {})

        calls.forward = forward  # type: ignore[assignment]
    if "keycache" in parts:
        original = auth.KeyAuthenticator.__init__

        def no_cache(self, store, cache_ttl, *args, **kwargs):  # type: ignore[no-untyped-def]
            original(self, store, 0.0, *args, **kwargs)

        auth.KeyAuthenticator.__init__ = no_cache  # type: ignore[method-assign]
    if "trace" in parts:
        trace_waits()
    if "uvloop" in parts:
        # `serve` builds uvicorn's Config from these options (it no longer calls uvicorn.run,
        # which this switch replaced until session 46, when it switched nothing off).
        import proxy.server as server

        options = server.uvicorn_options

        def plain_asyncio(*args, **kwargs):  # type: ignore[no-untyped-def]
            return {**options(*args, **kwargs), "loop": "asyncio", "http": "h11"}

        server.uvicorn_options = plain_asyncio  # type: ignore[assignment]


def trace_waits() -> None:
    """Not a part: time every await on the store, Redis and the upstream, printed at exit."""
    import atexit
    import time
    import proxy.resp as resp
    import proxy.store.sqlite as sqlite
    import proxy.upstream as upstream

    waits: dict[str, list[float]] = {}

    def timed(name, original):  # type: ignore[no-untyped-def]
        async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                waits.setdefault(name, []).append(time.perf_counter() - started)
        return wrapper

    sqlite.SQLiteStore.start_call = timed("store: call start", sqlite.SQLiteStore.start_call)  # type: ignore[method-assign]
    sqlite.SQLiteStore.finish_call = timed("store: call end", sqlite.SQLiteStore.finish_call)  # type: ignore[method-assign]
    import proxy.limiter as limiter

    limiter.RedisLimiter.admit = timed("redis: admit", limiter.RedisLimiter.admit)  # type: ignore[method-assign]
    resp.Redis.call = timed("redis call", resp.Redis.call)  # type: ignore[method-assign]
    upstream.Upstream.open_chat = timed("upstream open", upstream.Upstream.open_chat)  # type: ignore[method-assign]
    import proxy.calls as calls
    import proxy.jobs_api as jobs_api

    calls.CallPipeline.admit = timed("admit", calls.CallPipeline.admit)  # type: ignore[method-assign]
    calls.CallPipeline.complete = timed("complete", calls.CallPipeline.complete)  # type: ignore[method-assign]
    calls.CallPipeline._record = timed("record", calls.CallPipeline._record)  # type: ignore[method-assign]
    jobs_api.JobsApi.llm_call = timed("handler", jobs_api.JobsApi.llm_call)  # type: ignore[method-assign]

    import proxy.store.aio_fsync as aio_fsync

    start_sync = aio_fsync.AioFsync.start

    def timed_sync(self, fd, done):  # type: ignore[no-untyped-def]
        started = time.perf_counter()

        def timed_done(error):  # type: ignore[no-untyped-def]
            waits.setdefault("store: WAL fsync (Linux AIO)", []).append(time.perf_counter() - started)
            done(error)

        start_sync(self, fd, timed_done)

    aio_fsync.AioFsync.start = timed_sync  # type: ignore[method-assign]

    import gc

    collecting: list[float] = []

    def on_gc(phase: str, info: dict) -> None:  # type: ignore[type-arg]
        if phase == "start":
            collecting.append(time.perf_counter())
        elif collecting:
            waits.setdefault(f"gc generation {info['generation']}", []).append(time.perf_counter() - collecting.pop())

    gc.callbacks.append(on_gc)

    def report() -> None:
        with open(os.environ.get("TOLLGATE_TRACE_FILE", "/tmp/tollgate-trace.txt"), "w") as out:
            for name, values in waits.items():
                values.sort()
                n = len(values)
                out.write(f"{name}: n={n} p50={values[n // 2] * 1000:.3f} ms p90={values[n * 9 // 10] * 1000:.3f} "
                          f"p99={values[n * 99 // 100] * 1000:.3f} ms mean={sum(values) / n * 1000:.3f} ms\n")

    atexit.register(report)


def serve(parts: set[str], args: list[str]) -> None:
    switch_off(parts)
    from proxy.cli import main

    sys.argv = ["tollgate", *args]
    main()


def task_cpu(pid: int) -> dict[str, int]:
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


def measure(parts: set[str], concurrencies: list[int], seconds: float) -> list[str]:
    import run as bench
    from proxy.demo import stop_process, wait_until_up
    from tests.support import PYTHON, RedisServer, Tollgate, free_port, start_process

    lines = []
    with tempfile.TemporaryDirectory(prefix="tollgate-ablate-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        fake = start_process([PYTHON, *bench.UPSTREAMS["lean"], "--port", str(port)], workdir / "fake.log")
        redis = RedisServer(workdir).start()
        url = f"http://127.0.0.1:{port}"
        server = Tollgate(workdir, url, "sk-fake", name="ablate", redis={"url": redis.url},
                          upstream={"max_connections": 2000})
        try:
            wait_until_up(f"{url}/v1/models", 30, fake)
            server.start()
            server.stop()  # configured and migrated; now serve the same config with parts off
            server.process = start_process(
                [PYTHON, str(Path(__file__).resolve()), "--serve", ",".join(sorted(parts)), "--",
                 "serve", "--config", str(server.config_path), "--port", str(server.port)],
                workdir / "ablate.log", server.env,
            )
            wait_until_up(f"{server.url}/health/live", 30, server.process)
            target = bench.tollgate_target("(b)", server)
            pid = server.process.pid
            for concurrency in concurrencies:
                uvloop.run(bench.load(target, False, concurrency, 1.0, 20))  # warm up
                before = task_cpu(pid)
                m = uvloop.run(bench.load(target, False, concurrency, seconds, 20))
                after = task_cpu(pid)
                ticks = sum(after.values()) - sum(before.get(t, 0) for t in after)
                cpu_ms = ticks / os.sysconf("SC_CLK_TCK") / m["n"] * 1000
                off = ",".join(sorted(parts)) or "nothing"
                lines.append(f"| {off} | {concurrency} | {m['rps']:.0f} | {m['p50'] * 1000:.2f} | {m['p99'] * 1000:.2f} | {cpu_ms:.3f} |")
                print(lines[-1], file=sys.stderr)
        finally:
            server.stop()
            stop_process(fake)
            redis.stop()
    return lines


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        parts = set(filter(None, sys.argv[2].split(",")))
        serve(parts, sys.argv[4:])
        return
    # SIGTERM (`timeout`, `kill`) ends it as Ctrl-C does, through the blocks that stop its servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description="Tollgate's CPU per call with parts switched off.")
    parser.add_argument("--off", default="", help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--each", action="store_true", help="all on, then each part off in turn")
    parser.add_argument("--concurrency", default="1,10")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    chosen = set(filter(None, args.off.split(",")))
    unknown = chosen - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    runs = [set()] + [{p} for p in PARTS if p != "trace"] if args.each else [chosen]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    lines = ["| switched off | conc. | req/s | p50 ms | p99 ms | CPU ms/call |", "|---|---|---|---|---|---|"]
    for _ in range(args.rounds):
        for parts in runs:
            lines += measure(parts, concurrencies, args.seconds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
