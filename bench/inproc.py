"""Tollgate's own Python per call, without the network: the ASGI app called directly.

    .venv/bin/python bench/inproc.py                 # CPU per call, 20,000 calls
    .venv/bin/python bench/inproc.py --profile       # and where it goes (cProfile)

The store's call writes, the upstream and Redis are replaced (as `bench/ablate.py --off
store,upstream,redis` does) and uvicorn is left out, so what is measured is Starlette, the
middleware, auth, validation, the call's bookkeeping, metrics, the access log and JSON:
the part of a call that is Tollgate's own code. No other process runs, so the figure is
steadier than bench/run.py's and fit to compare small changes back to back. `--real
store,redis,upstream` keeps those parts (the machine's Redis, a fake upstream process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MASTER = "sk-master-inproc"
PARTS = {"store", "upstream", "redis"}
REDIS_URL = "redis://127.0.0.1:6379/0"


async def request(app: Any, method: str, path: str, body: bytes = b"", key: str = MASTER) -> tuple[int, bytes]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {key}".encode()),
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Future()  # no disconnect: wait for ever, like a client that stays
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def measure(
    calls: int, concurrency: int, profile: bool, sort: str, real: set[str], stream: bool, off: set[str]
) -> None:
    from ablate import switch_off

    switch_off(({"store", "upstream"} - real) | off)
    from proxy.app import configure_logging, create_app
    from proxy.config import load_config
    from tests.support import fake_upstream

    with tempfile.TemporaryDirectory(prefix="tollgate-inproc-") as tmp, contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream(Path(tmp))) if "upstream" in real else "http://127.0.0.1:9"
        settings: dict[str, Any] = {
            "database": {"url": f"sqlite:///{tmp}/t.db"},
            "model_groups": {"Main": {"models": ["primary"]}},
            "rate_limits": {"rpm": 10**9, "tpm": 10**12},
            # Generous: under callgrind everything runs fifty times slower.
            "upstream": {"timeouts": {"connect": 60, "first_byte": 600, "total": 600}},
        }
        if "redis" in real:
            settings["redis"] = {"url": REDIS_URL, "key_prefix": f"tollgate-inproc-{os.getpid()}:", "timeout": 60}
        config_path = Path(tmp) / "tollgate.yaml"
        config_path.write_text(json.dumps(settings))
        config = load_config(str(config_path), {"TOLLGATE_MASTER_KEY": MASTER, "TOLLGATE_UPSTREAM_URL": upstream})
        app = create_app(config)
        # Logging as `tollgate serve` sets it up, into /dev/null rather than the terminal.
        configure_logging(config.logging.level)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(open(os.devnull, "w"))
        async with app.router.lifespan_context(app):
            await request(app, "POST", "/admin/organizations", b'{"organization_id": "bench"}')
            await request(app, "POST", "/admin/teams", json.dumps({
                "team_id": "bench", "organization_id": "bench", "credits_allocated": 10, "model_groups": ["Main"],
            }).encode())
            team_id = "bench"
            _, key = await request(app, "POST", f"/admin/teams/{team_id}/keys", b"{}")
            secret = json.loads(key)["key"]
            _, job = await request(app, "POST", "/api/jobs/create", b'{"job_type": "bench"}', secret)
            job_id = json.loads(job)["job_id"]
            path = f"/api/jobs/{job_id}/llm-call" + ("-stream" if stream else "")
            # bench/run.py's calls: twenty chunks when streamed
            content = "hello there [chunks=20]" if stream else "hello there"
            body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 32 if stream else 16}).encode()
            status, answer = await request(app, "POST", path, body, secret)
            assert status == 200, answer
            for _ in range(300):  # warm up
                await request(app, "POST", path, body, secret)
            profiler = cProfile.Profile() if profile else None
            started = time.process_time()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            if profiler:
                profiler.enable()
            async def client(count: int) -> None:
                for _ in range(count):
                    await request(app, "POST", path, body, secret)

            await asyncio.gather(*(client(calls // concurrency) for _ in range(concurrency)))
            if profiler:
                profiler.disable()
            cpu = time.process_time() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
    replaced = ", ".join(sorted((PARTS - real) | off)) or "nothing"
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    kind = "streamed call" if stream else "call"
    print(f"{cpu / calls * 1e6:.1f} µs of CPU per {kind} ({user / calls * 1e6:.0f} user, {system / calls * 1e6:.0f} system;"
          f" {calls} calls, {concurrency} at a time; replaced: {replaced})")
    if profiler:
        stats = pstats.Stats(profiler)
        if os.environ.get("TOLLGATE_PROFILE_FILE"):
            stats.dump_stats(os.environ["TOLLGATE_PROFILE_FILE"])
        stats.sort_stats(sort).print_stats(int(os.environ.get("PROFILE_ROWS", "40")))


def main() -> None:
    parser = argparse.ArgumentParser(description="Tollgate's own CPU per call, in-process.")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight at once")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime or cumulative")
    parser.add_argument("--stream", action="store_true", help="streamed calls (needs --real upstream)")
    parser.add_argument("--real", default="", help=f"parts to keep real, comma-separated: {', '.join(sorted(PARTS))}"
                        f" (Redis at {REDIS_URL}, a fake upstream process)")
    parser.add_argument("--off", default="", help="more of Tollgate to switch off, as bench/ablate.py --off (log,metrics)")
    args = parser.parse_args()
    off = set(filter(None, args.off.split(",")))
    real = set(filter(None, args.real.split(",")))
    if real - PARTS:
        parser.error(f"unknown parts: {', '.join(sorted(real - PARTS))}")
    if args.stream and "upstream" not in real:
        parser.error("--stream needs --real upstream: the canned upstream answers only plain calls")
    os.environ.setdefault("TOLLGATE_LOG_LEVEL", "warning")
    import uvloop

    uvloop.run(measure(args.calls, args.concurrency, args.profile, args.sort, real, args.stream, off))


if __name__ == "__main__":
    main()
