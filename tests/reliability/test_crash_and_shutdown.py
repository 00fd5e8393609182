"""A gateway killed mid-stream leaves exact books once restarted; SIGTERM is graceful."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import yaml
from starlette.applications import Starlette
from uvicorn.main import STARTUP_FAILURE

from proxy.app import create_app
from proxy.config import load_config
from proxy.metrics import MULTIPROC_ENV
from proxy.store.schema import MIGRATIONS
from proxy.store.sqlite import SQLiteStore
from proxy.store.writer import Writer
from tests.reliability.test_pipelining import answers
from tests.support import PYTHON, REPO, Tollgate, fake_log, tag, tollgate_config, wait_for

SLOW = {"messages": [{"role": "user", "content": "a long answer [chunks=100] [delay_ms=100]"}]}


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def books(database) -> dict:
    db = sqlite3.connect(database)
    allocated, used, held = db.execute("SELECT credits_allocated, credits_used, credits_held FROM teams").fetchone()
    return {
        "allocated": allocated,
        "used": used,
        "held": held,
        "holds": db.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_holds").fetchone()[0],
        "ledger": db.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_ledger").fetchone()[0],
        "calls": db.execute("SELECT call_id, status, error FROM llm_calls").fetchall(),
        "jobs": dict(db.execute("SELECT job_id, status FROM jobs").fetchall()),
    }


def stream_in_background(server: Tollgate, key: str, job_id: str) -> threading.Event:
    started = threading.Event()

    def run() -> None:
        try:
            url = f"{server.url}/api/jobs/{job_id}/llm-call-stream"
            with httpx.stream("POST", url, json=SLOW, headers={"Authorization": f"Bearer {key}"}, timeout=30) as r:
                for _ in r.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass  # the gateway went away under it

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(10)
    return started


def test_sigkill_mid_stream_then_restart_leaves_no_hold_and_balanced_books(tmp_path, litellm):
    server = Tollgate(
        tmp_path, litellm.url, litellm.master_key,
        # Short, so that the restarted gateway settles soon; long enough that on a loaded machine
        # the idle job is still open when the gateway is killed.
        jobs={"expire_after": "10s", "sweep_interval": "0.3s", "stale_call_margin": "1s"},
        # Short, so that the restarted gateway finds the call stale soon; long enough that it is
        # still streaming when the gateway is killed.
        upstream={"timeouts": {"total": "6s"}},
    ).start()
    team = server.admin().team(credits=5)
    client = server.client(team.key)
    done = client.post("/api/jobs/create", json={"job_type": "done"}).json()["job_id"]
    client.post(f"/api/jobs/{done}/complete", json={"status": "completed"}).raise_for_status()
    streaming = client.post("/api/jobs/create", json={"job_type": "streaming"}).json()["job_id"]
    idle = client.post("/api/jobs/create", json={"job_type": "idle"}).json()["job_id"]
    stream_in_background(server, team.key, streaming)

    server.stop(signal.SIGKILL)
    killed = books(server.database)
    assert killed["held"] == 2 and [c[1] for c in killed["calls"]] == ["running"]

    server.start()
    try:
        settled = wait_for(lambda: (b := books(server.database))["held"] == 0 and b, timeout=30)
        assert settled, books(server.database)
        assert settled["jobs"] == {done: "completed", streaming: "failed", idle: "failed"}
        ((call_id, status, error),) = settled["calls"]  # one record, never duplicated
        assert status == "cancelled" and error.startswith("interrupted")
        assert settled["holds"] == 0 and settled["used"] == 1
        assert settled["allocated"] - settled["used"] - settled["held"] == 4
        assert settled["ledger"] == settled["allocated"] - settled["used"]
    finally:
        server.stop()


def test_sigterm_lets_an_open_stream_finish_refuses_new_connections_and_exits_0(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "20s"}).start()
    team = server.admin().team()
    with _stream_begun(server, team.key, "graceful") as lines:
        server.process.send_signal(signal.SIGTERM)
        # Polled rather than looked at once after a pause: a slow machine's server closes its
        # socket later; the stream (3 s) is still open when it must have.
        assert wait_for(lambda: not _accepts(server.port), timeout=2), "still accepting connections"
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert server.process.wait(15) == 0
    ((_, status, _),) = books(server.database)["calls"]
    assert status == "success"


def test_a_call_answered_during_the_drain_says_its_connection_closes(tmp_path: Path, fake_url: str) -> None:
    # Kept alive, the connection would take the client's next request to a gateway stopping, and
    # hold the stop up until uvicorn's keep-alive timeout closed it.
    server = Tollgate(tmp_path, fake_url, "sk-upstream", server={"shutdown_grace": "20s"}).start()
    name = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"one two [first_byte_ms=1000] [tag={name}]"}]}
    client = server.client(server.admin().team().key)
    answer = answer_to_a_call_stopped_while_it_runs(
        server, client, "/v1/chat/completions", body, running=lambda: fake_log(fake_url, name)
    )
    assert answer.status_code == 200 and answer.headers["connection"] == "close"


def answer_to_a_call_stopped_while_it_runs(
    server: Tollgate, client: httpx.Client, path: str, body: dict[str, Any], running: Callable[[], Any]
) -> httpx.Response:
    """The answer to a call POSTed to `path`, SIGTERM sent once `running()` says the call is
    under way: once the server has exited 0."""
    replies: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: replies.append(client.post(path, json=body, timeout=30)))
    try:
        caller.start()
        assert wait_for(running, timeout=10)
        server.process.send_signal(signal.SIGTERM)
        caller.join(20)
        assert server.process.wait(15) == 0
    finally:
        server.stop()
    (answer,) = replies
    return answer


def test_sigterm_cuts_streams_after_the_grace_period_and_records_them(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    team = server.admin().team()
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "cut"}).json()["job_id"]
    stream_in_background(server, team.key, job_id)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0
    ((_, status, error),) = books(server.database)["calls"]
    assert status == "cancelled" and "shut down" in error


def stream_until_shutdown(server: Tollgate, key: str, path: str, body: dict) -> list[str]:
    """The lines a client reads from a stream while the gateway gets SIGTERM mid-way (its grace
    period short); the gateway has exited 0 when this returns."""
    lines: list[str] = []
    started = threading.Event()

    def run() -> None:
        with httpx.stream("POST", server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30) as r:
            for line in r.iter_lines():  # a cut connection would raise here
                lines.append(line)
                started.set()

    reader = threading.Thread(target=run)
    try:
        reader.start()
        assert started.wait(10)
        server.process.send_signal(signal.SIGTERM)
        reader.join(15)
        assert server.process.wait(15) == 0
    finally:
        server.stop()
    return lines


def test_a_stream_cut_by_the_shutdown_ends_with_one_error_event(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    team = server.admin().team()
    job_id = server.client(team.key).post("/api/jobs/create", json={"job_type": "cut"}).json()["job_id"]
    lines = stream_until_shutdown(server, team.key, f"/api/jobs/{job_id}/llm-call-stream", SLOW)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "shutting_down"
    assert sum("error" in json.loads(e) for e in events) == 1
    assert "Exception in ASGI application" not in server.log()


def test_a_call_awaiting_its_answer_when_the_grace_period_ends_gets_a_503_and_is_recorded_with_its_prompt(
    tmp_path, litellm
):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    team = server.admin().team()
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "cut"}).json()["job_id"]
    body = {"messages": [{"role": "user", "content": "one two three [first_byte_ms=10000]"}]}
    answer = answer_to_a_call_stopped_while_it_runs(
        server, client, f"/api/jobs/{job_id}/llm-call", body,
        running=lambda: [c for c in books(server.database)["calls"] if c[1] == "running"],
    )
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert answer.json() == {"detail": "The gateway is shutting down: the call was cut short before its answer"}
    db = sqlite3.connect(server.database)
    ((status, error, prompt_tokens),) = db.execute("SELECT status, error, prompt_tokens FROM llm_calls").fetchall()
    assert status == "cancelled" and "shut down" in error and prompt_tokens > 0
    assert "Exception in ASGI application" not in server.log()


def test_the_own_job_of_a_v1_stream_cut_by_the_shutdown_is_failed_not_charged(tmp_path, litellm):
    # The client did not hang up: the gateway failed the call, as its deadline would have.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    team = server.admin().team()
    stream_until_shutdown(server, team.key, "/v1/chat/completions", {"model": "Main", "stream": True, **SLOW})
    settled = books(server.database)
    assert list(settled["jobs"].values()) == ["failed"]
    assert (settled["used"], settled["held"]) == (0, 0)


def test_sigterm_with_several_workers_refuses_new_connections_while_an_open_stream_finishes(tmp_path, litellm):
    # With --workers the listening socket is the supervisor's too: were it kept open, a new
    # connection would be taken by the kernel and left unanswered until the workers had drained.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, workers=2, server={"shutdown_grace": "20s"}).start()
    team = server.admin().team()
    try:
        with _stream_begun(server, team.key, "graceful") as lines:
            server.process.send_signal(signal.SIGTERM)
            assert wait_for(lambda: not _accepts(server.port), timeout=2), "still accepting connections"
            rest = list(lines)
        assert "data: [DONE]" in rest
        assert server.process.wait(15) == 0
    finally:
        server.stop()
    ((_, status, _),) = books(server.database)["calls"]
    assert status == "success"


def test_the_workers_stop_gracefully_when_their_supervisor_is_killed_and_the_gateway_starts_again(tmp_path, litellm):
    # A kill -9 of `serve --workers N` alone (a process manager signalling only the process it
    # started) left the workers serving on, orphaned: the restart could not bind the port.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, workers=2, server={"shutdown_grace": "20s"}).start()
    team = server.admin().team()
    try:
        with _stream_begun(server, team.key, "orphaned") as lines:
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
            rest = list(lines)
        assert "data: [DONE]" in rest  # the open stream finishes, as on SIGTERM
        assert wait_for(lambda: not _accepts(server.port), timeout=15), "the workers still serve"
    except BaseException:
        server.stop(signal.SIGKILL)  # the whole group, orphans included
        raise
    server.process = None
    ((_, status, _),) = books(server.database)["calls"]
    assert status == "success"
    server.start()  # on the same port
    try:
        assert server.admin().get_team(team.team_id)["credits_held"] == 1
    finally:
        server.stop()


SUPERVISOR_GONE_FIRST = """
import multiprocessing, os, signal, sys, time
from pathlib import Path

from proxy.app import _stop_with_supervisor


def worker(marks: str, supervisor: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: (Path(marks, "stopped").touch(), os._exit(0)))
    while os.getppid() == supervisor:
        time.sleep(0.01)
    _stop_with_supervisor()
    time.sleep(30)
    Path(marks, "served on").touch()


if __name__ == "__main__":
    multiprocessing.Process(target=worker, args=(sys.argv[1], os.getpid())).start()
    os._exit(0)
"""


def test_a_worker_whose_supervisor_died_before_it_asked_to_be_stopped_with_it_stops(tmp_path: Path) -> None:
    # The kernel signals a death that comes after the request only: the worker of a supervisor
    # already gone would serve on, orphaned.
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR_GONE_FIRST)
    subprocess.run([PYTHON, str(script), str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert wait_for(lambda: {p.name for p in tmp_path.iterdir()} & {"stopped", "served on"}, timeout=60)
    assert (tmp_path / "stopped").exists()


@contextlib.contextmanager
def _stream_begun(server: Tollgate, key: str, job_type: str) -> Iterator[Iterator[str]]:
    """A stream of three seconds in a new job, its first line read: the rest is to come."""
    job_id = server.client(key).post("/api/jobs/create", json={"job_type": job_type}).json()["job_id"]
    body = {"messages": [{"role": "user", "content": "finish me [chunks=30] [delay_ms=100]"}]}
    url = f"{server.url}/api/jobs/{job_id}/llm-call-stream"
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30) as stream:
        lines = stream.iter_lines()
        next(lines)
        yield lines


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _workers(server: Tollgate) -> set[int]:
    """The live worker processes of `serve --workers N` (not multiprocessing's resource tracker)."""
    assert server.process is not None
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == server.process.pid and fields[0] != "Z" and b"spawn_main" in command:
            found.add(int(stat.parent.name))
    return found


def test_a_worker_started_again_after_a_crash_serves_the_configuration_serve_started_with(make_tollgate):
    # uvicorn starts a worker that died again; it read the file anew, so a file edited since into
    # a mistake made it die with a traceback, and be started again, twice a second, for good.
    server = make_tollgate(workers=2)
    first = wait_for(lambda: _workers(server) if len(_workers(server)) == 2 else None, timeout=10)
    assert first
    server.config_path.write_text(server.config_path.read_text() + "no_such_section: 1\n")
    crashed = min(first)
    os.kill(crashed, signal.SIGKILL)
    assert wait_for(lambda: len(_workers(server) - first) == 1, timeout=10)  # its replacement
    time.sleep(3)  # a replacement that cannot start would have died and been replaced meanwhile
    assert server.log().count("died") == 1 and "Traceback" not in server.log()
    assert all(httpx.get(f"{server.url}/health/ready").status_code == 200 for _ in range(6))


def test_workers_whose_metrics_directory_was_removed_serve_calls_and_answer_scrapes_with_why(make_tollgate):
    # A worker's first count of a kind made its file there: the call was a 500, its job made. Each
    # scrape was a 500 and a traceback.
    server = make_tollgate(workers=2)
    workers = wait_for(lambda: _workers(server) if len(_workers(server)) == 2 else None, timeout=10)
    assert workers and wait_for(lambda: server.log().count("Application startup complete") == 2, timeout=20)
    removed = _what_serve_made_for_its_workers_removed(MULTIPROC_ENV)(server, min(workers))
    team = server.admin().team(credits=100)
    with server.client(team.key) as client:
        for _ in range(8):  # both workers, almost surely, each counting a call's kinds for the first time
            answer = client.post("/v1/chat/completions", json={"model": "Main", "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
    scrape = httpx.get(f"{server.url}/metrics")
    assert scrape.status_code == 503
    assert scrape.json()["detail"].startswith(f"the workers' metrics directory {removed} is gone")
    assert "Traceback" not in server.log()


def _log_of_serve_stopped_by_a_worker_started_again(tmp_path: Path, spoil: Callable[[Tollgate, int], Any]) -> tuple[str, Any]:
    """`serve --workers 2`; `spoil(server, pid)` done to what the worker `pid` needs to start, then
    that worker crashed (SIGKILL): `serve` must stop as a start that failed (uvicorn's exit status
    for it), rather than start the worker again and again. Its log, and what `spoil` returned."""
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", workers=2).start()
    try:
        first = wait_for(lambda: _workers(server) if len(_workers(server)) == 2 else None, timeout=10)
        # Both started: spoilt under one still starting, that one failed its first start instead.
        assert first and wait_for(lambda: server.log().count("Application startup complete") == 2, timeout=20)
        crashed = min(first)
        spoilt = spoil(server, crashed)
        os.kill(crashed, signal.SIGKILL)
        assert server.process is not None
        assert server.process.wait(30) == STARTUP_FAILURE
        return server.log(), spoilt
    finally:
        server.stop()


def _migrated_by_a_newer_tollgate(server: Tollgate, crashed: int) -> Path:
    with sqlite3.connect(server.database) as db:
        db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    return server.database


def _removed(server: Tollgate, crashed: int) -> Path:
    for path in server.database.parent.glob(server.database.name + "*"):
        path.unlink()
    return server.database


def _what_serve_made_for_its_workers_removed(variable: str) -> Callable[[Tollgate, int], Path]:
    """The file or directory `serve` made for its workers in the temporary directory, named by the
    environment `variable` it gave them, removed (a cleaner of old files)."""

    def remove(server: Tollgate, crashed: int) -> Path:
        environment = Path(f"/proc/{crashed}/environ").read_bytes().split(b"\0")
        (value,) = [entry.split(b"=", 1)[1] for entry in environment if entry.startswith(variable.encode() + b"=")]
        spoilt = Path(value.decode())
        assert spoilt.name.startswith("tollgate-workers-") or spoilt.parent.name.startswith("tollgate-workers-")
        if spoilt.is_dir():
            shutil.rmtree(spoilt)
        else:
            spoilt.unlink()
        return spoilt

    return remove


def test_a_worker_started_again_on_a_database_a_newer_tollgate_migrated_stops_the_gateway_saying_why(
    tmp_path: Path,
) -> None:
    # Migrated meanwhile by a later release (rolled out beside this one), the database cannot be
    # opened by the worker uvicorn starts again after a crash: uvicorn logged its traceback, and
    # stopped the gateway with exit status 0, a stop a process manager neither restarts nor reports.
    log, database = _log_of_serve_stopped_by_a_worker_started_again(tmp_path, _migrated_by_a_newer_tollgate)
    assert f" ERROR uvicorn.error: tollgate: cannot open the database {database}: its schema is version" in log
    assert "Traceback" not in log


def test_a_worker_started_again_on_a_database_removed_meanwhile_stops_the_gateway_rather_than_make_an_empty_one(
    tmp_path: Path,
) -> None:
    # It made a new, empty database and served it: every key refused there, the admin API's
    # writes landing in it, while the other worker refused writes to the one removed.
    log, database = _log_of_serve_stopped_by_a_worker_started_again(tmp_path, _removed)
    assert f" ERROR uvicorn.error: tollgate: cannot open the database {database}: it is not there" in log
    assert "Traceback" not in log
    assert not database.exists()


def test_a_worker_that_cannot_read_its_copy_of_the_config_stops_the_gateway_saying_why(tmp_path: Path) -> None:
    # Each worker uvicorn started again died with a traceback, and was started again, every second
    # or two, for good.
    log, copy = _log_of_serve_stopped_by_a_worker_started_again(
        tmp_path, _what_serve_made_for_its_workers_removed("TOLLGATE_CONFIG")
    )
    assert log.count("died") == 1 and "Traceback" not in log
    assert f"tollgate: {copy}: file not found\n" in log


def test_a_worker_that_cannot_build_its_app_stops_the_gateway_rather_than_being_started_again(tmp_path: Path) -> None:
    # Its metrics' directory gone, a worker cannot make its metrics' files: uvicorn started it
    # again, to fail alike, every second or two, for good.
    log, removed = _log_of_serve_stopped_by_a_worker_started_again(
        tmp_path, _what_serve_made_for_its_workers_removed(MULTIPROC_ENV)
    )
    assert log.count("died") == 1 and "Traceback" not in log  # said in one line
    assert f"tollgate: the workers' metrics directory {removed} is gone" in log


HOLD_LOCK = (
    "import sqlite3, sys, time\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN IMMEDIATE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "db.execute('COMMIT')\n"
)
# HOLD_LOCK started ahead: it locks once told to (a line on its stdin), without an interpreter's
# start in the way, which on a loaded machine can take longer than a test's moment to lock.
HOLD_LOCK_ON_CUE = HOLD_LOCK.replace("db.execute('BEGIN IMMEDIATE')", "sys.stdin.readline()\ndb.execute('BEGIN IMMEDIATE')")


def v1_call_cut_by_the_shutdown_while_its_record_waits_on_a_lock(
    server: Tollgate, fake_url: str, key: str, lock_seconds: float, group: str = "Main"
) -> httpx.Response:
    """A non-streaming /v1 call whose answer comes while another process holds the database,
    SIGTERM sent meanwhile, the grace period (2 s) ending while its record waits: its answer
    (or the error the client got), once the gateway has stopped."""
    answers: list[httpx.Response] = []
    # Answered 0.8 s after it reaches the upstream: while the database is locked, before the
    # grace period (2 s) ends.
    name = tag()
    body = {"model": group, "messages": [{"role": "user", "content": f"one two [first_byte_ms=800] [tag={name}]"}]}
    caller = threading.Thread(
        target=lambda: answers.append(server.client(key).post("/v1/chat/completions", json=body, timeout=30))
    )
    locker = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_ON_CUE, str(server.database), str(lock_seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        caller.start()
        # Timed from the upstream's receipt: from the call's start, LiteLLM's own time (long on a
        # loaded machine) came out of the grace period's 2 s, and the answer came after it.
        assert wait_for(lambda: fake_log(fake_url, name), timeout=10)
        started = time.monotonic()
        locker.stdin.write("lock\n")
        locker.stdin.flush()
        assert locker.stdout.readline().strip() == "locked"
        assert time.monotonic() - started < 0.7, "locked too late: the answer may have been recorded before"
        server.process.send_signal(signal.SIGTERM)
        caller.join(20)
        assert server.process.wait(20) == 0
    finally:
        locker.stdin.close()  # one never told to lock locks now, and lets go in its time
        locker.wait(20)
        server.stop()
    (answer,) = answers
    return answer


def test_a_v1_answer_recorded_while_the_shutdown_cuts_its_call_still_reaches_the_client_it_was_charged_to(
    tmp_path, litellm, fake_url
):
    # The lock ends within the busy timeout: the record, under way when the grace period ended,
    # is written (the call's own job charged), and the client got uvicorn's bare 500 instead of
    # the answer it paid for (and would pay again, retrying).
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "2s"}).start()
    team = server.admin().team()
    answer = v1_call_cut_by_the_shutdown_while_its_record_waits_on_a_lock(server, fake_url, team.key, lock_seconds=3.5)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "word1 word2 word3 word4 word5 "
    settled = books(server.database)
    assert [c[1] for c in settled["calls"]] == ["success"]
    assert list(settled["jobs"].values()) == ["completed"] and settled["used"] == 1
    assert "Exception in ASGI application" not in server.log()


def test_a_v1_call_cut_by_the_shutdown_while_its_record_waits_out_a_lock_gets_a_503_and_is_not_charged(
    tmp_path, litellm, fake_url
):
    # The lock outlasts the record's tries: the outcome is kept, its own job to be failed as
    # unanswered; the client got uvicorn's bare 500, not the JSON 503 of a call the shutdown cuts.
    server = Tollgate(
        tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "2s"}, database={"busy_timeout": "1s"}
    ).start()
    team = server.admin().team()
    answer = v1_call_cut_by_the_shutdown_while_its_record_waits_on_a_lock(server, fake_url, team.key, lock_seconds=8)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    assert answer.json()["error"]["code"] == "shutting_down"
    assert answer.headers["x-job-id"] and answer.headers["x-call-id"]
    assert books(server.database)["used"] == 0
    assert "Exception in ASGI application" not in server.log()


def test_a_failed_call_cut_by_the_shutdown_while_its_record_waits_out_a_lock_gets_a_503_naming_its_call(
    tmp_path, litellm, fake_url
):
    # As an answered call's: the upstream's refusal came, and its record waited on the lock until
    # the grace period ended. The client gets the 503 of a call the shutdown cut, naming the call
    # and its job (whose outcome is kept, for the drain to write), not an anonymous one.
    server = Tollgate(
        tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "2s"}, database={"busy_timeout": "1s"}
    ).start()
    team = server.admin().team(groups=("Rejects",))
    answer = v1_call_cut_by_the_shutdown_while_its_record_waits_on_a_lock(
        server, fake_url, team.key, lock_seconds=8, group="Rejects"
    )
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down", answer.text
    assert answer.headers["x-job-id"] and answer.headers["x-call-id"]
    assert "Exception in ASGI application" not in server.log()


def test_a_call_whose_start_waits_on_a_locked_database_when_the_shutdown_cuts_it_gets_a_503(tmp_path, litellm):
    # Its start, under way when the grace period ended, is written once the lock ends and the
    # call closed at once (its own job failed, uncharged); the client got uvicorn's bare 500.
    # No sweep under way, as between a process's sweeps: a sweep's write queued behind the start
    # kept the store open for the call's record, which otherwise found it closed.
    server = Tollgate(
        tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}, jobs={"sweep_interval": "60s"}
    ).start()
    team = server.admin().team()
    body = {"model": "Main", "messages": [{"role": "user", "content": "one two"}]}
    answer = request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
        server, lambda http: http.post("/v1/chat/completions", json=body, headers=bearer(team.key))
    )
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    assert answer.json()["error"]["code"] == "shutting_down"
    settled = books(server.database)
    assert [c[1] for c in settled["calls"]] in ([], ["cancelled"])
    assert set(settled["jobs"].values()) <= {"failed"} and (settled["used"], settled["held"]) == (0, 0)
    assert "Exception in ASGI application" not in server.log()


def stop_as_a_hung_up_streams_record_waits_on_a_lock(server: Tollgate, lock_seconds: float) -> None:
    """A stream's client hangs up while another process holds the database's write lock for
    `lock_seconds`; the gateway is sent SIGTERM as the call's record waits on it, and exits 0."""
    team = server.admin().team()
    locker = None
    try:
        with _stream_begun(server, team.key, "hung-up") as lines:
            locker = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(server.database), str(lock_seconds)],
                                      stdout=subprocess.PIPE, text=True)
            assert locker.stdout.readline().strip() == "locked"
            del lines  # the client hangs up: its call's record waits on the lock
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
    finally:
        if locker is not None:
            locker.wait(20)
        server.stop()


def test_a_stream_whose_client_hung_up_cut_by_the_shutdown_while_its_record_waits_on_a_lock_ends_quietly(
    tmp_path, litellm
):
    # The client is gone and the record goes on, shielded, for the drain to wait for: the
    # shutdown's cancel reached uvicorn as "Exception in ASGI application" with a traceback.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    stop_as_a_hung_up_streams_record_waits_on_a_lock(server, lock_seconds=3)
    ((_, status, _),) = books(server.database)["calls"]
    assert status == "cancelled"
    assert "Exception in ASGI application" not in server.log() and "Traceback" not in server.log()


def test_a_stream_record_retried_past_a_lock_as_the_gateway_stops_is_written_before_the_store_closes(
    tmp_path, litellm
):
    # The lock outlasts one write's busy timeout: the record, shielded, tries again. The shutdown's
    # drain must wait for it, or the store closed under it and the call was left running.
    server = Tollgate(
        tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}, database={"busy_timeout": "1s"}
    ).start()
    stop_as_a_hung_up_streams_record_waits_on_a_lock(server, lock_seconds=2.5)  # the record tries again
    ((_, status, _),) = books(server.database)["calls"]
    assert status == "cancelled"


def request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
    server: Tollgate, send: Callable[[httpx.Client], httpx.Response], lock_seconds: float = 3
) -> httpx.Response:
    """`send(http)`'s answer when its write waits on a database another process holds (3 s,
    within the default busy timeout) and the shutdown's grace period (1 s) ends meanwhile.
    `http`: a client of the server, made beforehand."""
    answers: list[httpx.Response] = []
    sending = threading.Event()
    http = httpx.Client(base_url=server.url, timeout=30, event_hooks={"request": [lambda _: sending.set()]})
    caller = threading.Thread(target=lambda: answers.append(send(http)))
    locker = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(server.database), str(lock_seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        caller.start()
        # On a slow machine the client's thread may take longer than the pause below to send the
        # request: the SIGTERM came first, and it was refused rather than cut.
        assert sending.wait(10)
        time.sleep(0.3)  # its write waits for the lock
        server.process.send_signal(signal.SIGTERM)
        caller.join(20)
        assert server.process.wait(20) == 0
    finally:
        locker.wait(20)
        server.stop()
        http.close()
    (answer,) = answers
    return answer


def test_credits_added_as_the_shutdown_cuts_the_request_are_answered_as_added(tmp_path, litellm):
    # The ledger had the entry while the admin got a bare 500, and would add the credits again.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    admin = server.admin()
    team = admin.team(credits=10)
    answer = request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
        server,
        lambda http: http.post(f"/admin/teams/{team.team_id}/credits", json={"amount": 5, "reason": "invoice 7"},
                               headers=bearer(server.master_key)),
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["credits_allocated"] == 15
    assert books(server.database)["allocated"] == 15
    assert "Exception in ASGI application" not in server.log()


def test_a_key_created_as_the_shutdown_cuts_the_request_is_answered_with_its_secret(tmp_path, litellm):
    # The key was stored while the admin got a bare 500: its secret, shown only once, was lost.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    admin = server.admin()
    team = admin.team(credits=10)
    answer = request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
        server,
        lambda http: http.post(f"/admin/teams/{team.team_id}/keys", json={"name": "late"}, headers=bearer(server.master_key)),
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["key"].startswith("sk-")
    with sqlite3.connect(server.database) as db:
        assert db.execute("SELECT count(*) FROM virtual_keys WHERE name = 'late'").fetchone() == (1,)
    assert "Exception in ASGI application" not in server.log()


def test_a_job_created_as_the_shutdown_cuts_the_request_is_answered_as_created(tmp_path, litellm):
    # The job held its credit while the client got a bare 500, and would make another.
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    team = server.admin().team(credits=10)
    answer = request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
        server, lambda http: http.post("/api/jobs/create", json={"job_type": "late"}, headers=bearer(team.key))
    )
    assert answer.status_code == 200, answer.text
    settled = books(server.database)
    assert settled["jobs"] == {answer.json()["job_id"]: "pending"} and settled["held"] == 1
    assert "Exception in ASGI application" not in server.log()


def test_a_job_completed_as_the_shutdown_cuts_the_request_is_answered_as_completed(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}).start()
    team = server.admin().team(credits=10)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "late"}).json()["job_id"]
    answer = request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
        server, lambda http: http.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}, headers=bearer(team.key))
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed" and answer.json()["costs"]["credits_charged"] == 1
    assert books(server.database)["used"] == 1
    assert "Exception in ASGI application" not in server.log()


class Lifespan:
    """An app's ASGI lifespan, driven as uvicorn drives it."""

    def __init__(self, app: Starlette) -> None:
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(app(scope, self._inbox.get, self._outbox.put))

    async def step(self, event: str) -> None:
        await self._inbox.put({"type": f"lifespan.{event}"})
        message = await self._outbox.get()
        assert message["type"] == f"lifespan.{event}.complete", message


def test_the_store_stays_open_until_a_request_the_shutdown_cut_has_read_its_answer(tmp_path, fake_url, monkeypatch):
    # The lifespan closed the store as soon as the cut request's write was done, under the read
    # of the job it answers with: on a loaded machine or Python 3.13 the read's thread came a
    # moment late (about one run in ten of the test above), and the client of a job that was
    # finished got a 500. Here the read comes late every time.
    database = tmp_path / "t.db"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tollgate_config(database, upstream={"url": fake_url})))
    config = load_config(str(config_path), env={"TOLLGATE_MASTER_KEY": "sk-master-test", "TOLLGATE_UPSTREAM_KEY": "sk-up"})
    waits_for_lock = asyncio.Event()
    to_thread, job_view = Writer._to_thread, SQLiteStore.job_view

    def noting_lock_waits(self: Writer, job, barrier: bool = False) -> None:
        if barrier:
            waits_for_lock.set()
        to_thread(self, job, barrier)

    async def late_job_view(self: SQLiteStore, job_id: str):
        await asyncio.sleep(0.3)
        return await job_view(self, job_id)

    monkeypatch.setattr(Writer, "_to_thread", noting_lock_waits)
    monkeypatch.setattr(SQLiteStore, "job_view", late_job_view)

    async def run() -> httpx.Response:
        app = create_app(config)
        lifespan = Lifespan(app)
        await lifespan.step("startup")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tollgate") as http:
            master = bearer("sk-master-test")
            await http.post("/admin/organizations", json={"organization_id": "org", "name": "org"}, headers=master)
            team = {"team_id": "team", "organization_id": "org", "model_groups": ["Main"], "credits_allocated": 10}
            await http.post("/admin/teams", json=team, headers=master)
            key = (await http.post("/admin/teams/team/keys", json={"name": "k"}, headers=master)).json()["key"]
            job_id = (await http.post("/api/jobs/create", json={"job_type": "late"}, headers=bearer(key))).json()["job_id"]
            locker = sqlite3.connect(database, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            complete = asyncio.create_task(
                http.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}, headers=bearer(key))
            )
            await asyncio.wait_for(waits_for_lock.wait(), 10)
            complete.cancel()  # uvicorn's, as server.shutdown_grace ends
            shutdown = asyncio.create_task(lifespan.step("shutdown"))
            await asyncio.sleep(0.1)
            locker.execute("COMMIT")
            locker.close()
            answer = await complete
            await shutdown
            return answer

    answer = asyncio.run(run())
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed" and answer.json()["costs"]["credits_charged"] == 1


def test_a_request_cut_by_the_shutdown_before_its_answer_gets_a_503_not_a_bare_500(tmp_path, litellm):
    # Its write waits out a lock longer than the busy timeout: the write fails after the grace
    # period ended, and nothing was done.
    server = Tollgate(
        tmp_path, litellm.url, litellm.master_key, server={"shutdown_grace": "1s"}, database={"busy_timeout": "3s"}
    ).start()
    admin = server.admin()
    team = admin.team(credits=10)
    answer = request_cut_by_the_shutdown_while_its_write_waits_on_a_lock(
        server, lambda http: http.post("/api/jobs/create", json={"job_type": "late"}, headers=bearer(team.key)),
        lock_seconds=6,
    )
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    assert answer.json() == {"detail": "The gateway is shutting down: the request was cut short"}
    assert books(server.database)["jobs"] == {}
    assert "Exception in ASGI application" not in server.log()


def v1_request(key: str, content: str) -> bytes:
    """A non-streaming /v1 call as raw HTTP/1.1, for pipelining."""
    body = json.dumps({"model": "Main", "messages": [{"role": "user", "content": content}]}).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def queued_call(key: str, name: str) -> bytes:
    """A /v1 call tagged `name`, slow to be answered were it ever run."""
    return v1_request(key, f"queued [first_byte_ms=12000] [tag={name}]")


def pipelined_behind_a_call_the_shutdown_cuts(server: Tollgate, key: str, *queued: bytes) -> bytes:
    """What a connection reads that sent a /v1 call and the `queued` requests behind it at once,
    SIGTERM sent while the call awaits its answer: the replies, once the server exited 0."""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(v1_request(key, "cut [first_byte_ms=10000]") + b"".join(queued))
            assert wait_for(lambda: books(server.database)["calls"], timeout=10)
            server.process.send_signal(signal.SIGTERM)
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        assert server.process.wait(20) == 0
    finally:
        server.stop()
    return reply


def test_a_request_pipelined_behind_a_call_the_shutdown_cuts_is_answered_503_and_never_run(tmp_path, fake_url):
    # uvicorn's shutdown marked only the queued request to close the connection after its answer:
    # the cut call's answer started it, after the grace period, while the gateway stopped. Its call
    # outlived the drain and was left running, its own job holding its credit, after exit 0.
    server = Tollgate(tmp_path, fake_url, "sk-upstream", server={"shutdown_grace": "1s"}).start()
    key = server.admin().team().key
    queued = [tag(), tag()]  # not the next alone: every request queued
    reply = pipelined_behind_a_call_the_shutdown_cuts(server, key, *(queued_call(key, name) for name in queued))
    found, rest = answers(reply)
    assert [(status, json.loads(body)["error"]["code"]) for status, body in found] == [(503, "shutting_down")] * 3
    assert not any(fake_log(fake_url, name) for name in queued), "a queued request reached the upstream"
    settled = books(server.database)
    assert [c[1] for c in settled["calls"]] == ["cancelled"]
    assert list(settled["jobs"].values()) == ["failed"] and settled["held"] == 0


def test_a_request_pipelined_behind_a_call_the_shutdown_cuts_has_its_access_log_line(
    tmp_path: Path, fake_url: str
) -> None:
    # Answered by the protocol, not the app: counted and logged as the app's refusals are.
    server = Tollgate(tmp_path, fake_url, "sk-upstream", server={"shutdown_grace": "1s"},
                      logging={"access_log": "json"}).start()
    key = server.admin().team().key
    # A method past the usual ones is logged as any refused before the app is: as "unknown".
    propfind = b"PROPFIND / HTTP/1.1\r\nHost: x\r\n\r\n"
    pipelined_behind_a_call_the_shutdown_cuts(server, key, queued_call(key, tag()), propfind)
    entries = [json.loads(line.split("tollgate.access: ", 1)[1])
               for line in server.log().splitlines() if "tollgate.access: " in line]
    assert [(e["route"], e["method"], e["status"]) for e in entries if e["status"] == 503] == [
        ("/v1/chat/completions", "POST", 503), ("unmatched", "POST", 503), ("unmatched", "unknown", 503)
    ]
