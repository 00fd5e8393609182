"""Operations: /metrics (parsed, scraped by a real Prometheus), health endpoints, access logs."""

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx
import pytest
import uvicorn
import uvicorn.supervisors.multiprocess
import yaml
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from proxy import health
from proxy import server as server_module
from proxy.admin import AdminService
from proxy.app import create_app, create_served_app
from proxy.config import Config, DatabaseConfig, Secret, load_config
from proxy.demo import stop_process, wait_until_up
from proxy.health import Health
from proxy.errors import ApiError
from proxy.metrics import Metrics, MetricsUnavailable
from proxy.occasional import Occasional
from proxy.store import StoreUnavailable
from proxy.store.sqlite import SQLiteStore
from proxy.upstream import ConnectError, UpstreamStatusError
from tests.support import (
    REPO, PYTHON, Admin, Tollgate, free_port, sse_data, start_process, tag, tollgate_config, wait_for,
)

REQUIRED = {
    "tollgate_requests": {"route", "method", "status"},
    "tollgate_request_duration_seconds": {"route"},
    "tollgate_llm_calls": {"team", "model_group", "model", "status", "stream"},
    "tollgate_tokens": {"team", "model_group", "type"},
    "tollgate_cost_usd": {"team", "model_group"},
    "tollgate_upstream_latency_seconds": {"model_group"},
    "tollgate_time_to_first_token_seconds": {"model_group"},
    "tollgate_rate_limited": {"team", "limit"},
    "tollgate_active_streams": set(),
    "tollgate_fallbacks": {"model_group"},
    "tollgate_jobs": {"team", "status"},
    "tollgate_credits_remaining": {"team"},
}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")
SECRET_PROMPT = "the-secret-prompt-words-7f3a"


def families(server) -> dict:
    text = httpx.get(f"{server.url}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, suffix: str = "_total", **labels) -> float:
    return sum(
        s.value
        for s in fams[family].samples
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def write_json(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    """A stand-in LiteLLM's answer."""
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def exercise(server, team, fallback_team=None, limited_team=None) -> str:
    """A known set of calls: plain, streamed, failing, fallback, rate limited."""
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "ops"}).json()["job_id"]
    client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": f"{SECRET_PROMPT} [chunks=3]"}]})
    client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": [{"role": "user", "content": "a b [chunks=4]"}]}).read()
    client.get("/api/no/such/route")
    client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"})
    if fallback_team:
        c = server.client(fallback_team.key)
        j = c.post("/api/jobs/create", json={"job_type": "ops"}).json()["job_id"]
        c.post(f"/api/jobs/{j}/llm-call", json={"messages": [{"role": "user", "content": "hi"}]})
    if limited_team:
        c = server.client(limited_team.key)
        j = c.post("/api/jobs/create", json={"job_type": "ops"}).json()["job_id"]
        for _ in range(2):
            c.post(f"/api/jobs/{j}/llm-call", json={"messages": [{"role": "user", "content": "hi"}]})
    return job_id


def test_metrics_parse_and_have_every_required_family_and_label(tollgate, admin):
    team, fallback, limited = admin.team(), admin.team(groups=("Fallback500",)), admin.team(rpm_limit=1)
    exercise(tollgate, team, fallback, limited)
    fams = families(tollgate)
    for name, labels in REQUIRED.items():
        assert name in fams, name
        sample_labels = {k for s in fams[name].samples for k in s.labels if k not in ("le",)}
        assert labels <= sample_labels, (name, sample_labels)


def test_route_label_is_the_template_and_no_label_holds_an_id_or_key(tollgate, team):
    exercise(tollgate, team)
    fams = families(tollgate)
    routes = {s.labels["route"] for s in fams["tollgate_requests"].samples}
    assert "/api/jobs/{job_id}/llm-call" in routes and "unmatched" in routes
    assert "/api/no/such/route" not in routes
    for family in fams.values():
        for sample in family.samples:
            for label in sample.labels.values():
                assert not UUID.search(label) and not label.startswith("sk-"), (sample.name, label)


def test_token_and_cost_counters_rise_by_exactly_the_recorded_usage(tollgate, team):
    job_id = exercise(tollgate, team)
    costs = tollgate.client(team.key).get(f"/api/jobs/{job_id}").json()["costs"]
    fams = families(tollgate)
    assert value(fams, "tollgate_tokens", team=team.team_id, type="prompt") == costs["prompt_tokens"]
    assert value(fams, "tollgate_tokens", team=team.team_id, type="completion") == costs["completion_tokens"]
    assert value(fams, "tollgate_cost_usd", team=team.team_id) == pytest.approx(costs["total_cost_usd"], rel=1e-9)
    assert value(fams, "tollgate_llm_calls", team=team.team_id, stream="true", status="success") == 1
    assert value(fams, "tollgate_jobs", team=team.team_id, status="completed") == 1
    # Balances come from the store at scrape time, cached for a few seconds.
    assert wait_for(lambda: value(families(tollgate), "tollgate_credits_remaining", "", team=team.team_id) == 9, 8)


def test_a_created_job_is_counted_in_jobs_total(tollgate, team):
    tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "ops"}).raise_for_status()
    assert value(families(tollgate), "tollgate_jobs", team=team.team_id, status="created") == 1


def test_a_job_completed_again_and_again_is_counted_once_in_jobs_total(tollgate, team):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "ops"}).json()["job_id"]
    for _ in range(3):
        client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status()
    assert value(families(tollgate), "tollgate_jobs", team=team.team_id, status="completed") == 1


def test_a_job_its_completion_fails_as_expired_is_counted_among_failed_jobs(make_tollgate):
    server = make_tollgate(jobs={"expire_after": "1s", "sweep_interval": "1h"})  # no sweep comes first
    team = server.admin().team(credits=1)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "ops"}).json()["job_id"]
    time.sleep(1.2)
    assert client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).status_code == 409
    fams = families(server)
    assert value(fams, "tollgate_jobs", team=team.team_id, status="failed") == 1
    assert value(fams, "tollgate_jobs", team=team.team_id, status="completed") == 0


def test_expired_jobs_failed_to_make_room_for_new_jobs_are_counted_once_among_failed_jobs(make_tollgate):
    # The sweep, finding them failed, counts none of them again.
    server = make_tollgate(jobs={"expire_after": "1s", "sweep_interval": "1h"})  # no sweep comes first
    team = server.admin().team(credits=1)
    client = server.client(team.key)
    client.post("/api/jobs/create", json={"job_type": "ops"}).raise_for_status()
    time.sleep(1.2)
    client.post("/api/jobs/create", json={"job_type": "ops"}).raise_for_status()  # fails the first
    time.sleep(1.2)
    v1 = client.post("/v1/chat/completions", json={"model": "Main", "messages": [{"role": "user", "content": "hi"}]})
    assert v1.status_code == 200, v1.text  # its own job failed the second
    fams = families(server)
    assert value(fams, "tollgate_jobs", team=team.team_id, status="created") == 3
    assert value(fams, "tollgate_jobs", team=team.team_id, status="failed") == 2
    assert value(fams, "tollgate_jobs", team=team.team_id, status="completed") == 1


def test_team_label_can_be_switched_off(make_tollgate):
    server = make_tollgate(metrics={"team_label": False})
    exercise(server, server.admin().team())
    fams = families(server)
    assert all("team" not in s.labels for f in fams.values() for s in f.samples)
    assert fams["tollgate_tokens"].samples


def test_counters_of_two_workers_add_up_and_live_streams_are_not_double_counted(make_tollgate):
    server = make_tollgate(workers=2)
    team = server.admin().team(credits=100)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "w"}).json()["job_id"]

    def one_call(_):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {team.key}"}, timeout=30) as c:
            return c.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "x [chunks=2]"}]}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one_call, range(40))) == {200}
    fams = families(server)
    assert value(fams, "tollgate_requests", route="/api/jobs/{job_id}/llm-call", status="200") == 40
    assert value(fams, "tollgate_tokens", team=team.team_id, type="completion") == 80

    url = f"{server.url}/api/jobs/{job_id}/llm-call-stream"
    slow = {"messages": [{"role": "user", "content": "slow [chunks=30] [delay_ms=100]"}]}
    headers = {"Authorization": f"Bearer {team.key}"}
    streams = [httpx.stream("POST", url, json=slow, headers=headers, timeout=30) for _ in range(3)]
    opened = [s.__enter__() for s in streams]
    try:
        assert wait_for(lambda: value(families(server), "tollgate_active_streams", "") == 3, timeout=5)
    finally:
        for stream in opened:
            stream.close()
    assert wait_for(lambda: value(families(server), "tollgate_active_streams", "") == 0, timeout=5)


def worker_processes(server) -> dict[int, Path]:
    """The worker processes (pid: their metrics directory): the children `serve` started with one."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        directory = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")), None)
        if parent == server.process.pid and directory is not None and b"spawn_main" in command:
            workers[int(stat.parent.name)] = Path(os.fsdecode(directory))
    return workers


def workers_streaming(server) -> list[int]:
    """The worker processes with a stream open, as their files in the metrics directory say."""
    streaming = []
    for pid, directory in worker_processes(server).items():
        live = directory / f"gauge_livesum_{pid}.db"
        if live.exists() and any(
            "tollgate_active_streams" in key and count > 0
            for key, count, *_ in MmapedDict.read_all_values_from_file(str(live))
        ):
            streaming.append(pid)
    return streaming


def test_streams_of_a_worker_killed_mid_stream_leave_the_live_streams_gauge(make_tollgate):
    server = make_tollgate(workers=2)
    team = server.admin().team(credits=100)
    job_id = server.client(team.key).post("/api/jobs/create", json={"job_type": "w"}).json()["job_id"]
    url = f"{server.url}/api/jobs/{job_id}/llm-call-stream"
    slow = {"messages": [{"role": "user", "content": "slow [chunks=100] [delay_ms=100]"}]}
    with httpx.stream("POST", url, json=slow, headers={"Authorization": f"Bearer {team.key}"}, timeout=30) as stream:
        assert stream.status_code == 200
        assert wait_for(lambda: value(families(server), "tollgate_active_streams", "") == 1, timeout=5)
        (worker,) = wait_for(lambda: workers_streaming(server), timeout=5)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            stream.read()
    assert wait_for(lambda: value(families(server), "tollgate_active_streams", "") == 0, timeout=10)


def test_a_worker_that_dies_is_logged_as_a_warning_naming_how_it_ended(make_tollgate):
    # uvicorn said "Child process [pid] died" at info: neither how (the OOM killer's SIGKILL, a
    # crash's exit code) nor that anything was wrong, and a level of `warning` hid it altogether.
    server = make_tollgate(workers=2)
    worker = min(wait_for(lambda: worker_processes(server) if len(worker_processes(server)) == 2 else None))
    os.kill(worker, signal.SIGKILL)
    # One look at the processes: two (the killed one still there, as it dies) then one without it
    # passed for its replacement, and the server was stopped before it came.
    assert wait_for(lambda: replaced(worker_processes(server), worker), timeout=20)
    server.stop()
    lines = [line for line in server.log().splitlines() if f"worker {worker} " in line]
    assert len(lines) == 1, lines
    assert "WARNING tollgate:" in lines[0] and "SIGKILL" in lines[0] and "replaced" in lines[0]


def replaced(workers: dict[int, Path], killed: int) -> bool:
    """Whether `workers`, as one look found them, are two again, the killed one not among them."""
    return len(workers) == 2 and killed not in workers


def test_a_worker_killed_while_its_health_check_waits_is_said_killed_not_hung(monkeypatch, caplog):
    # The OOM killer's SIGKILL may land while the supervisor waits on the worker's answer: how it
    # ended was read before the check, and the worker said to have hung.
    class Dying:  # uvicorn's worker: alive when looked at, dead by the end of its health check
        pid = 4242

        def __init__(self) -> None:
            self.process = types.SimpleNamespace(exitcode=None)  # its multiprocessing process
            self.process.is_alive = lambda: self.process.exitcode is None

        @property
        def exitcode(self) -> int | None:
            return self.process.exitcode

        def is_alive(self, timeout: float) -> bool:  # uvicorn's own check: alive, and answering
            return self.process.is_alive() and self.ping(timeout)

        def ping(self, timeout: float) -> bool:
            self.process.exitcode = -signal.SIGKILL
            return False

        def kill(self) -> None:
            pass

        def join(self) -> None:
            pass

    class Replacement:
        pid = 4343

        def __init__(self, config: Any, sockets: Any) -> None:
            pass

        def start(self) -> None:
            pass

    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", Replacement)
    supervisor = server_module._Supervisor.__new__(server_module._Supervisor)
    supervisor.should_exit = threading.Event()
    supervisor.config = uvicorn.Config(app=None)
    supervisor.sockets = []
    supervisor.processes = [Dying()]
    with caplog.at_level(logging.WARNING, logger="tollgate"):
        supervisor.keep_subprocess_alive()
    assert caplog.messages == [
        "worker 4242 was killed by SIGKILL (the kernel's OOM killer, if no one sent it: see dmesg); replaced by worker 4343"
    ]


def test_a_supervisor_told_to_stop_stops_listening_at_once_not_at_its_next_look_at_its_signals():
    # uvicorn's supervisor reads its signals every half second. A SIGTERM sent to every process
    # (systemd's default, Ctrl-C's SIGINT to the terminal's process group) stopped the workers'
    # accepting at once and the supervisor's listening socket up to half a second later: the
    # connections the kernel took meanwhile were reset after their requests were sent (seen
    # with `serve --workers 2`, 3 to 7 of 80), where a refused connection tells its client that
    # nothing was sent.
    with supervisor_listening() as (supervisor, listening):
        signal.raise_signal(signal.SIGTERM)
        assert listening.fileno() == -1  # before its loop looks at its signals
        assert supervisor.signal_queue == [signal.SIGTERM]  # which then stop it, as uvicorn's do


class Replacement:
    """uvicorn's worker process, started by the supervisor to replace one that ended: whether
    the listening sockets it is handed were still open as it started, and a stop (SIGTERM) to
    come as it starts, if `stop_as_started`."""

    started: list["Replacement"] = []
    stop_as_started = False
    pid = 4343

    def __init__(self, config: Any, sockets: list[socket.socket]) -> None:
        self.sockets = sockets

    def start(self) -> None:
        if self.stop_as_started:
            signal.raise_signal(signal.SIGTERM)
        self.open_as_started = all(sock.fileno() != -1 for sock in self.sockets)
        self.started.append(self)

    def wait_until_ready(self, timeout: float, should_exit: threading.Event) -> bool:
        return True


class Ended:
    """uvicorn's worker process, ended (SIGKILL); a stop (SIGTERM) comes as it is reaped, if
    `stop_as_reaped`."""

    pid = 4242
    exitcode = -signal.SIGKILL
    process = types.SimpleNamespace(is_alive=lambda: False, exitcode=-signal.SIGKILL)

    def __init__(self, stop_as_reaped: bool = False) -> None:
        self.stop_as_reaped = stop_as_reaped

    def kill(self) -> None:
        pass

    def terminate(self) -> None:
        pass

    def join(self) -> None:
        if self.stop_as_reaped:
            signal.raise_signal(signal.SIGTERM)


def test_a_stop_that_comes_as_a_worker_is_started_again_leaves_it_the_listening_socket(monkeypatch):
    # The worker being started is handed the socket: closed under it, its start failed (a
    # traceback, and `serve` ended with the status of a failed start).
    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", Replacement)
    monkeypatch.setattr(Replacement, "started", [])
    monkeypatch.setattr(Replacement, "stop_as_started", True)
    with supervisor_listening() as (supervisor, listening):
        supervisor.processes = [Ended()]
        supervisor.keep_subprocess_alive()
        assert [replacement.open_as_started for replacement in Replacement.started] == [True]
        assert supervisor.signal_queue == [signal.SIGTERM]


def test_no_worker_is_started_again_once_a_stop_has_closed_the_listening_socket(monkeypatch):
    # A stop closes the socket as it comes: one that came as an ended worker was reaped had its
    # replacement started on the closed socket, which failed.
    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", Replacement)
    monkeypatch.setattr(Replacement, "started", [])
    with supervisor_listening() as (supervisor, listening):
        supervisor.processes = [Ended(stop_as_reaped=True)]
        supervisor.keep_subprocess_alive()
        assert all(replacement.open_as_started for replacement in Replacement.started)
        assert supervisor.signal_queue == [signal.SIGTERM]


@pytest.mark.parametrize("starting", [signal.SIGHUP, signal.SIGTTIN])
def test_a_signal_to_start_workers_before_a_stop_starts_none_on_the_closed_listening_socket(monkeypatch, starting):
    # uvicorn reads its signals in the order they came: a SIGHUP (its rolling restart of every
    # worker) or a SIGTTIN (one more worker) ahead of a stop that had closed the socket started
    # workers on it, which failed.
    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", Replacement)
    monkeypatch.setattr(Replacement, "started", [])
    with supervisor_listening() as (supervisor, listening):
        supervisor.processes = [Ended()]
        supervisor.signal_queue.append(starting)
        signal.raise_signal(signal.SIGTERM)
        supervisor.handle_signals()
        assert all(replacement.open_as_started for replacement in Replacement.started)
        assert supervisor.should_exit.is_set()


def test_a_stop_before_the_first_workers_start_starts_none_on_the_closed_listening_socket(monkeypatch):
    # The stop's handler is set as the supervisor is made, its workers started a moment later
    # (`run`, after its first line): one that came in between closed the socket, and each worker
    # was started on it, which failed with a traceback.
    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", Replacement)
    monkeypatch.setattr(Replacement, "started", [])
    with supervisor_listening() as (supervisor, listening):
        signal.raise_signal(signal.SIGTERM)
        supervisor.init_processes()
        assert Replacement.started == []
        assert supervisor.signal_queue == [signal.SIGTERM]


class StoppedAsReady(Replacement):
    """A worker of a rolling restart (SIGHUP), during whose wait for it a stop (SIGTERM) comes."""

    def wait_until_ready(self, timeout: float, should_exit: threading.Event) -> bool:
        signal.raise_signal(signal.SIGTERM)
        return True


def test_a_stop_during_a_rolling_restart_starts_no_further_worker(monkeypatch):
    # uvicorn's restart (SIGHUP) looks only at its own stop, which a signal no longer sets (the
    # supervisor's loop does): a stop that came while one worker was replaced went on to start
    # a replacement of every other, each waited for, before the supervisor stopped.
    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", StoppedAsReady)
    monkeypatch.setattr(Replacement, "started", [])
    with supervisor_listening() as (supervisor, listening):
        supervisor.processes = [Ended(), Ended(), Ended()]
        supervisor.signal_queue.append(signal.SIGHUP)
        supervisor.handle_signals()
        assert len(Replacement.started) == 1
        assert all(replacement.open_as_started for replacement in Replacement.started)


class StoppedAsStarting(Replacement):
    """A worker of a rolling restart, during whose wait for its start a stop comes: the wait
    gives up (uvicorn's, as its supervisor is told to end)."""

    killed = False

    def wait_until_ready(self, timeout: float, should_exit: threading.Event) -> bool:
        signal.raise_signal(signal.SIGTERM)
        return not should_exit.is_set()

    def kill(self) -> None:
        self.killed = True

    def join(self) -> None:
        pass


def test_a_worker_a_rolling_restart_was_starting_as_a_stop_came_is_stopped_with_the_others_not_killed(monkeypatch):
    # It may serve already, its health not yet asked: killed, the requests it took were reset.
    monkeypatch.setattr(uvicorn.supervisors.multiprocess, "Process", StoppedAsStarting)
    monkeypatch.setattr(Replacement, "started", [])
    with supervisor_listening() as (supervisor, listening):
        supervisor.processes = [Ended(), Ended()]
        supervisor.signal_queue.append(signal.SIGHUP)
        supervisor.handle_signals()
        (starting,) = Replacement.started
        assert not starting.killed and starting in supervisor.processes


@contextlib.contextmanager
def supervisor_listening() -> Iterator[tuple[Any, socket.socket]]:
    """`serve --workers`'s supervisor, made (its signal handlers set) but not run, with a listening socket."""
    listening = socket.create_server(("127.0.0.1", 0))
    handlers = {sig: signal.getsignal(sig) for sig in uvicorn.supervisors.multiprocess.SIGNALS}
    try:
        yield server_module._Supervisor(uvicorn.Config(app=None, workers=2), sockets=[listening]), listening
    finally:
        listening.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_worker_given_a_dead_workers_pid_starts_with_no_live_streams(tmp_path):
    # Pids are used again: the dead worker's live-gauge file under the new worker's pid was
    # carried on from, a stream counted as open for good (the scrape's sweep of dead pids
    # cannot tell, the pid being alive). The worker below plays both: the dead one's file first.
    (tmp_path / "tollgate.yaml").write_text(f"database: {{url: 'sqlite:///{tmp_path / 'db.sqlite3'}'}}\n")
    worker = """
import os, sys
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
dead = MmapedDict(os.path.join(directory, f"gauge_livesum_{os.getpid()}.db"))
name = "tollgate_active_streams"
dead.write_value(mmap_key(name, name, (), (), "Streams being relayed now"), 2.0, 0.0)
dead.close()
from proxy.app import app_from_environment
app_from_environment()
registry = CollectorRegistry()
MultiProcessCollector(registry, directory)
print(registry.get_sample_value(name))
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "TOLLGATE_CONFIG": str(tmp_path / "tollgate.yaml"),
           "TOLLGATE_MASTER_KEY": "sk-master-test-key-0123456789"}
    done = subprocess.run([PYTHON, "-c", worker], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.0"


# A supervisor of workers, as `serve --workers` is: a worker killed (not yet reaped, a zombie),
# a live one, and a worker that scrapes. The scrape's sweep of the live gauges' files is given
# one for each, and one for `stranger`, a pid alive but no worker of this server's.
SUPERVISOR = """
import subprocess, sys, time
killed = subprocess.Popen(["sleep", "60"])
killed.kill()
time.sleep(0.3)  # dead; this supervisor has not reaped it yet
live = subprocess.Popen(["sleep", "60"])
scraping = subprocess.run([sys.executable, "-c", sys.argv[1], str(killed.pid), str(live.pid), sys.argv[2]],
                          capture_output=True, text=True)
live.kill()
killed.wait()
live.wait()
sys.stdout.write(scraping.stdout)
sys.stderr.write(scraping.stderr)
"""
SCRAPING_WORKER = """
import json, os, sys
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from proxy.metrics import forget_dead_processes
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
pids = {"killed": int(sys.argv[1]), "live": int(sys.argv[2]), "stranger": int(sys.argv[3]), "scraping": os.getpid()}
name = "tollgate_active_streams"
for pid in pids.values():
    streams = MmapedDict(os.path.join(directory, f"gauge_livesum_{pid}.db"))
    streams.write_value(mmap_key(name, name, (), (), "Streams being relayed now"), 1.0, 0.0)
    streams.close()
forget_dead_processes(directory)
print(json.dumps({who: os.path.exists(os.path.join(directory, f"gauge_livesum_{pid}.db")) for who, pid in pids.items()}))
"""


def live_gauge_files_kept_by_a_scrape(tmp_path: Path) -> dict[str, bool]:
    """Which workers' live-stream counts a scrape's sweep kept (see SUPERVISOR)."""
    stranger = subprocess.Popen(["sleep", "60"])  # the test's own child: no worker's sibling
    try:
        done = subprocess.run(
            [PYTHON, "-c", SUPERVISOR, SCRAPING_WORKER, str(stranger.pid)],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, cwd=REPO,
            capture_output=True, text=True, timeout=60,
        )
    finally:
        stranger.kill()
        stranger.wait()
    assert done.returncode == 0 and done.stdout, done.stderr
    return json.loads(done.stdout)


def test_live_streams_of_a_killed_worker_not_yet_reaped_are_not_counted(tmp_path):
    # A killed worker stays a zombie until its supervisor reaps it (uvicorn looks every half
    # second): its pid answers a signal all the same, and a scrape meanwhile counted its streams.
    kept = live_gauge_files_kept_by_a_scrape(tmp_path)
    assert kept["killed"] is False
    assert kept["live"] is True and kept["scraping"] is True


def test_live_streams_under_a_dead_workers_pid_now_another_processs_are_not_counted(tmp_path):
    # Pids are used again: a process that is no worker of this server (whoever's it is) holding
    # a dead worker's pid kept that worker's streams counted as open for as long as it lived.
    kept = live_gauge_files_kept_by_a_scrape(tmp_path)
    assert kept["stranger"] is False
    assert kept["live"] is True and kept["scraping"] is True


def test_live_streams_of_a_worker_gone_and_reaped_are_not_counted(tmp_path):
    # Its pid names no process at all once its supervisor has reaped it.
    from proxy.metrics import forget_dead_processes

    gone = subprocess.Popen(["true"])
    gone.wait()
    name = "tollgate_active_streams"
    streams = MmapedDict(str(tmp_path / f"gauge_livesum_{gone.pid}.db"))
    streams.write_value(mmap_key(name, name, (), (), "Streams being relayed now"), 1.0, 0.0)
    streams.close()
    forget_dead_processes(str(tmp_path))
    assert not (tmp_path / f"gauge_livesum_{gone.pid}.db").exists()


def test_counters_keep_what_a_killed_worker_counted_once_it_is_started_again(make_tollgate):
    server = make_tollgate(workers=2)
    team = server.admin().team(credits=100)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "w"}).json()["job_id"]

    def calls(count: int) -> None:
        for _ in range(count):
            response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 200

    def counted() -> float:
        return value(families(server), "tollgate_llm_calls", team=team.team_id)

    calls(10)
    assert counted() == 10
    workers = wait_for(lambda: len(worker_processes(server)) == 2 and worker_processes(server), timeout=5)
    counting = [pid for pid, directory in workers.items() if (directory / f"counter_{pid}.db").exists()]
    os.kill(counting[0], signal.SIGKILL)
    assert wait_for(lambda: len(set(worker_processes(server)) - set(workers)) == 1, timeout=10)
    # Whichever worker answers: neither a reset (the dead one's file dropped) nor a double count.
    assert [counted() for _ in range(6)] == [10] * 6
    calls(10)
    assert [counted() for _ in range(6)] == [20] * 6


def prometheus_binary() -> str:
    """Debian's prometheus; .ci/run installs it, and so does this on a fresh machine of that kind."""
    found = shutil.which("prometheus")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)  # a clean image has no lists
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "prometheus"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, timeout=600,
        )
        found = shutil.which("prometheus")
    assert found, "this test needs Prometheus: apt-get install prometheus"
    return found


def test_a_real_prometheus_scrapes_the_token_counters(tollgate, team, tmp_path):
    binary = prometheus_binary()
    exercise(tollgate, team)
    expected = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()["jobs"][0]["costs"]["total_tokens"]
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "tollgate", "static_configs": [{"targets": [tollgate.url.removeprefix("http://")]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = start_process(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "prometheus.log",
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/-/ready", 60, process)
        query = f'sum(tollgate_tokens_total{{team="{team.team_id}"}})'

        def scraped():
            result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}).json()["data"]["result"]
            return result and float(result[0]["value"][1]) == expected

        assert wait_for(scraped, timeout=30, interval=0.5)
    finally:
        stop_process(process)


def test_every_metric_the_dashboard_queries_exists(tollgate, admin):
    exercise(tollgate, admin.team(), admin.team(groups=("Fallback500",)), admin.team(rpm_limit=1))
    dashboard = (REPO / "deploy" / "grafana" / "tollgate.json").read_text()
    json.loads(dashboard)
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"tollgate_[a-z_]+", dashboard)}
    text = httpx.get(f"{tollgate.url}/metrics").text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    exported |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    assert queried and queried <= exported, queried - exported


def test_health_live_answers(tollgate):
    assert httpx.get(f"{tollgate.url}/health/live").json() == {"status": "ok"}


def test_answers_name_no_server_software(tollgate: Tollgate) -> None:
    # uvicorn's `server: uvicorn` would tell a prober which server to try its known flaws on.
    assert "server" not in httpx.get(f"{tollgate.url}/health/live").headers


def test_every_line_serve_writes_has_the_time_level_and_logger(make_tollgate) -> None:
    # uvicorn's own lines (its start, its stop, a worker's end, a shutdown cutting requests)
    # came in its format, "INFO:     ...", with no time: nothing to match them against the rest.
    server = make_tollgate(workers=2)
    assert httpx.get(f"{server.url}/health/live").status_code == 200
    server.stop()
    lines = server.log().splitlines()
    assert any("Started server process" in line for line in lines)
    untimed = [line for line in lines if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ", line)]
    assert untimed == []


def test_a_request_has_tollgates_access_line_alone_not_uvicorns_too(tollgate: Tollgate) -> None:
    # uvicorn's own line (client address, path with its query) would log each request twice.
    probe = tag()
    before = len(tollgate.log())
    httpx.get(f"{tollgate.url}/health/live", params={"probe": probe}).raise_for_status()
    # uvicorn writes its line as the answer starts, before the request ends and Tollgate's is written.
    assert wait_for(lambda: "route=/health/live" in tollgate.log()[before:], timeout=5)
    assert probe not in tollgate.log()[before:]


def test_ready_is_503_naming_the_upstream_while_it_is_down_and_200_once_back(tmp_path, make_tollgate):
    port = free_port()
    args = [PYTHON, str(REPO / "tests" / "fake_upstream.py"), "--port", str(port)]
    upstream = start_process(args, tmp_path / "upstream.log")
    wait_until_up(f"http://127.0.0.1:{port}/v1/models", 30, upstream)
    server = make_tollgate(upstream_url=f"http://127.0.0.1:{port}")
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["components"] == {
        "store": "ok", "upstream": "ok", "redis": "not configured",
    }
    stop_process(upstream)
    down = httpx.get(f"{server.url}/health/ready")
    assert down.status_code == 503 and down.json()["failing"] == ["upstream"]
    upstream = start_process(args, tmp_path / "upstream-again.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", 30, upstream)
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
    finally:
        stop_process(upstream)


def test_litellm_refusing_the_upstream_key_is_503_fails_readiness_and_leaks_no_key(make_tollgate):
    server = make_tollgate(upstream_key="sk-not-litellms-key-0123456789")
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 503
    assert "refuses" in ready.json()["components"]["upstream"]
    team = server.admin().team()
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "k"}).json()["job_id"]
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    (call,) = client.get(f"/api/jobs/{job_id}").json()["calls"]
    assert call["status"] == "error" and "sk-" not in call["error"]
    assert "sk-" not in response.text
    server.stop()
    assert "0123456789" not in server.log() and "not-litellms" not in server.log()


def test_a_call_litellm_refuses_the_upstream_key_for_is_503_retried_after_30_seconds(make_tollgate):
    # The operator must fix the key: an SDK retrying after a second would ask LiteLLM again and
    # again with a key it refuses, for nothing.
    server = make_tollgate(upstream_key="sk-not-litellms-key-0123456789")
    team = server.admin().team()
    with server.client(team.key) as client:
        body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_misconfigured"
    assert response.headers["retry-after"] == "30"


def test_litellm_refusing_the_upstream_key_is_logged_once_a_minute_not_once_a_call(make_tollgate):
    # Every call of every client fails so while the key is wrong: at a few hundred calls a
    # second, a line each buried the log (and whatever else it said) under thousands of them.
    server = make_tollgate(upstream_key="sk-not-litellms-key-0123456789")
    team = server.admin().team()
    client = server.client(team.key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body).status_code, range(40)))
    assert statuses == [503] * 40
    server.stop()
    lines = [line for line in server.log().splitlines() if "refused Tollgate's upstream key" in line]
    assert len(lines) == 1, lines
    assert "TOLLGATE_UPSTREAM_KEY" in lines[0] and "once a minute" in lines[0]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "tollgate.test"]


def test_a_faults_first_line_is_said_at_once_whenever_the_clock_started(caplog):
    # time.monotonic() counts from the machine's boot, and may be near 0 when Tollgate starts:
    # the first line is said all the same.
    line = Occasional(logging.getLogger("tollgate.test"), logging.WARNING, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="tollgate.test"):
        line("refused: %s", "why")
    assert said(caplog) == ["refused: why (times since last logged: 1; logged at most once a minute)"]


def test_a_faults_line_is_said_again_once_its_interval_is_over_with_how_often_it_was_due(caplog):
    clock = Clock()
    line = Occasional(logging.getLogger("tollgate.test"), logging.WARNING, every=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tollgate.test"):
        for now in (0.0, 1.0, 4.9, 5.0, 6.0, 10.0):
            clock.now = now
            line("refused")
    assert said(caplog) == [
        "refused (times since last logged: 1; logged at most once every 5 s)",
        "refused (times since last logged: 3; logged at most once every 5 s)",
        "refused (times since last logged: 2; logged at most once every 5 s)",
    ]


def test_litellm_unreachable_is_logged_once_a_minute_naming_it(make_tollgate):
    # The access log said 503 for each call, and nothing said why: the cause was only in the
    # answers' bodies and the call records.
    server = make_tollgate(upstream_url=f"http://127.0.0.1:{free_port()}")
    team = server.admin().team()
    client = server.client(team.key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    statuses = [client.post("/v1/chat/completions", json=body).status_code for _ in range(10)]
    assert statuses == [503] * 10
    server.stop()
    lines = [line for line in server.log().splitlines() if "LiteLLM cannot be reached" in line]
    assert len(lines) == 1 and "once a minute" in lines[0], lines


def test_litellm_unreachable_is_logged_with_its_address_and_why(make_tollgate):
    # The line said "(connection failed: ConnectError)": neither the address Tollgate tried,
    # TOLLGATE_UPSTREAM_URL's (the first thing to check), nor that the connection was refused.
    url = f"http://127.0.0.1:{free_port()}"
    server = make_tollgate(upstream_url=url)
    client = server.client(server.admin().team().key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 503
    server.stop()
    (line,) = [line for line in server.log().splitlines() if "cannot be reached" in line]
    assert f"LiteLLM cannot be reached at {url}," in line and "Connection refused" in line, line


def out_of_files_lines(caplog, then_answered: bool = False) -> list[tuple[int, str]]:
    """What a call that could not open a connection to LiteLLM for want of a file descriptor
    logs (and, if `then_answered`, a next call LiteLLM answers)."""
    from proxy import calls
    from proxy.forwarding import Attempt, UpstreamFailed

    pipeline = calls.CallPipeline(*[None] * 7, 60.0)  # type: ignore[arg-type]

    async def finish(*args: Any) -> None:
        pass

    pipeline._finish = finish  # type: ignore[method-assign]
    call = types.SimpleNamespace(group=types.SimpleNamespace(name="Main"), headers=lambda: {})
    cause = "cannot connect to the upstream: [Errno 24] Too many open files"
    failed = UpstreamFailed([Attempt("primary", "connection failed: OSError", unreachable=True, cause=cause)])
    with caplog.at_level(logging.INFO, logger="tollgate.calls"):
        answer = asyncio.run(pipeline._record_failure(call, failed))  # type: ignore[arg-type]
        if then_answered:
            pipeline._heard_from_litellm()
    assert isinstance(answer, ApiError) and answer.status == 503
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tollgate.calls"]


def test_a_process_out_of_file_descriptors_is_logged_as_such_not_as_litellm_unreachable(caplog):
    # Under a low `ulimit -n` a call that could not open a connection to LiteLLM was logged as
    # "LiteLLM cannot be reached": the operator looked at LiteLLM, which was fine.
    ((level, line),) = out_of_files_lines(caplog)
    assert level == logging.ERROR and line.startswith("this process is out of file descriptors ("), line
    assert "LimitNOFILE" in line and "LiteLLM cannot be reached" not in line


def test_a_process_opening_connections_again_after_running_out_of_descriptors_says_so_once(caplog):
    lines = out_of_files_lines(caplog, then_answered=True)
    assert lines[1] == (logging.WARNING, "this process opens connections to LiteLLM again"), lines


def test_litellm_back_after_being_unreachable_is_said_once(tmp_path, make_tollgate):
    # The line said calls fail "until it is back", and nothing ever said it was: an operator
    # reading the log could not tell a LiteLLM still down from one back for an hour.
    port = free_port()
    args = [PYTHON, str(REPO / "tests" / "fake_upstream.py"), "--port", str(port)]
    server = make_tollgate(upstream_url=f"http://127.0.0.1:{port}")
    client = server.client(server.admin().team().key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    assert [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [503] * 3
    upstream = start_process(args, tmp_path / "upstream.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", 30, upstream)
        assert [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [200] * 3
    finally:
        stop_process(upstream)
    server.stop()
    lines = [line for line in server.log().splitlines() if "LiteLLM" in line and "tollgate.calls" in line]
    assert len(lines) == 2, lines
    assert "cannot be reached" in lines[0] and "LiteLLM answers again" in lines[1]


ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "primary",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()


@contextlib.contextmanager
def stand_in_litellm(respond: Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]) -> Iterator[str]:
    """A stand-in LiteLLM answering each chat call (its body read) as `respond` does; its URL."""

    class LiteLLM(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            respond(self, json.loads(self.rfile.read(int(self.headers["content-length"]))))

        def log_message(self, *args):
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), LiteLLM)  # the kernel's free port: no race for it
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{upstream.server_port}"
    finally:
        upstream.shutdown()


def test_litellm_accepting_the_upstream_key_again_is_said_once(make_tollgate):
    refusing = threading.Event()
    refusing.set()
    refusal = json.dumps({"error": {"message": "Authentication Error", "type": "auth_error", "code": "401"}}).encode()

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:  # its key rotated, then put back
        write_json(handler, *((401, refusal) if refusing.is_set() else (200, ANSWER)))

    with stand_in_litellm(respond) as url:
        server = make_tollgate(upstream_url=url)
        client = server.client(server.admin().team().key)
        assert three_calls(client, "Main") == [503] * 3
        refusing.clear()
        assert three_calls(client, "Main") == [200] * 3
    server.stop()
    lines = [line for line in server.log().splitlines() if "upstream key" in line]
    assert len(lines) == 2, lines
    assert "refused Tollgate's upstream key" in lines[0] and "accepts Tollgate's upstream key again" in lines[1]


def test_a_faults_end_is_said_once_and_only_after_the_fault_was(caplog):
    line = Occasional(logging.getLogger("tollgate.test"), logging.WARNING, clock=Clock())
    with caplog.at_level(logging.INFO, logger="tollgate.test"):
        line.over("back")  # never failed: nothing to say
        line("refused")
        line.over("back")
        line.over("back")
    assert said(caplog) == ["refused (times since last logged: 1; logged at most once a minute)", "back"]


def test_a_faults_end_is_said_at_the_faults_own_level_and_at_warning_at_most(caplog):
    # At INFO, an operator at logging.level: warning saw LiteLLM fail and never saw it answer
    # again; at ERROR, an end would trip the alerts its fault did.
    for level, end in ((logging.WARNING, logging.WARNING), (logging.ERROR, logging.WARNING)):
        line = Occasional(logging.getLogger("tollgate.test"), level, clock=Clock())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tollgate.test"):
            line("refused")
            line.over("back")
        assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tollgate.test"] == [
            (level, "refused (times since last logged: 1; logged at most once a minute)"), (end, "back"),
        ]


def test_a_fault_that_comes_and_goes_with_every_request_says_two_lines_a_minute_at_most(caplog):
    # A LiteLLM behind a balancer with one replica down fails every other call: each change said
    # at once would be a line a request.
    clock = Clock()
    line = Occasional(logging.getLogger("tollgate.test"), logging.WARNING, clock=clock)
    with caplog.at_level(logging.INFO, logger="tollgate.test"):
        for now in range(240):
            clock.now = now / 2
            line("refused") if now % 2 else line.over("back")
    assert said(caplog) == [
        "refused (times since last logged: 1; logged at most once a minute)", "back",
        "refused (times since last logged: 60; logged at most once a minute)", "back",
    ]


def fault_lines_played(play: Callable[[Occasional], Awaitable[None]], caplog) -> list[str]:
    """What a fault's line (its interval 0.2 s) says while `play` plays the fault out on a loop."""
    line = Occasional(logging.getLogger("tollgate.test"), logging.WARNING, every=0.2)
    with caplog.at_level(logging.INFO, logger="tollgate.test"):
        asyncio.run(play(line))
    return said(caplog)


def test_a_fault_begun_again_within_the_interval_after_its_end_is_said_with_its_end_once_the_interval_is_up(caplog):
    # LiteLLM unreachable twice, 20 s apart: the second outage (its 503s) was never said, as it
    # began within the minute after the first one's line and ended before a call past the minute.
    async def play(line: Occasional) -> None:
        line("refused")
        line.over("back")
        line("refused")
        line("refused")
        line.over("back")
        await asyncio.sleep(0.4)  # the interval is up, and no request has failed since

    lines = fault_lines_played(play, caplog)
    assert lines[:2] == ["refused (times since last logged: 1; logged at most once every 0.2 s)", "back"], lines
    assert len(lines) == 4, lines
    assert re.fullmatch(r"refused \(times since last logged: 2; logged at most once every 0.2 s: said late, first due [01] s ago\)", lines[2]), lines
    assert re.fullmatch(r"back \([01] s ago\)", lines[3]), lines


def test_a_fault_begun_again_within_the_interval_and_still_on_is_said_as_the_interval_ends_and_its_end_as_it_comes(caplog):
    async def play(line: Occasional) -> None:
        line("refused")
        line.over("back")
        line("refused")
        await asyncio.sleep(0.4)
        line.over("back")

    lines = fault_lines_played(play, caplog)
    assert len(lines) == 4, lines
    assert "said late" in lines[2] and lines[3] == "back", lines


def test_a_fault_to_be_said_late_asks_for_its_end(caplog):
    # The call path calls `over` only when `said` says it has something to say: a fault to be said
    # late would have been said without its end, which then never came.
    async def play(line: Occasional) -> None:
        line("refused")
        line.over("back")
        line("refused")
        assert line.said
        line.over("back")
        assert not line.said
        await asyncio.sleep(0.4)

    assert re.fullmatch(r"back \([01] s ago\)", fault_lines_played(play, caplog)[3])


def test_a_fault_said_by_a_request_past_the_interval_is_not_said_late_too(caplog):
    async def play(line: Occasional) -> None:
        line("refused")
        line.over("back")
        line("refused")
        await asyncio.sleep(0.2)
        line("refused")  # past the interval, or the late line just said: either way one line
        await asyncio.sleep(0.4)

    lines = fault_lines_played(play, caplog)
    assert len(lines) == 3 and lines[2].startswith("refused (times since last logged: "), lines


def test_a_closed_faults_line_says_nothing_late(caplog):
    # Its owner (the limiter, at shutdown) is done: a line said after it would outlive it.
    async def play(line: Occasional) -> None:
        line("refused")
        line.over("back")
        line("refused")
        line.close()
        await asyncio.sleep(0.4)

    assert fault_lines_played(play, caplog) == ["refused (times since last logged: 1; logged at most once every 0.2 s)", "back"]


def test_calls_refused_by_a_database_another_process_keeps_locked_are_logged_once(make_tollgate):
    server = make_tollgate(database={"busy_timeout": "100ms"})
    client = server.client(server.admin().team().key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    holder = sqlite3.connect(server.database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # a sqlite3 shell's transaction, left open
    try:
        answers = [client.post("/v1/chat/completions", json=body) for _ in range(5)]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [a.json()["error"]["code"] for a in answers] == ["store_busy"] * 5
    server.stop()
    lines = [line for line in server.log().splitlines() if "locked" in line]
    assert len(lines) == 1 and "database.busy_timeout" in lines[0] and "once a minute" in lines[0], lines


def three_calls(client: httpx.Client, group: str) -> list[int]:
    """The statuses of three calls to `group`, one after the other."""
    body = {"model": group, "messages": [{"role": "user", "content": "hi"}]}
    return [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)]


def said_after_three_answered_calls(make_tollgate, group: str, mark: str) -> list[str]:
    """The log lines holding `mark` of a Tollgate that answered three calls to `group`."""
    server = make_tollgate()
    assert three_calls(server.client(server.admin().team(groups=(group,)).key), group) == [200] * 3
    server.stop()
    return [line for line in server.log().splitlines() if mark in line]


def test_a_group_naming_a_model_litellm_does_not_serve_is_logged_once_naming_both(make_tollgate):
    # Its fallback answered every call: nothing but the call records said the group was wrong.
    lines = said_after_three_answered_calls(make_tollgate, "FallbackUnknownModel", "does not serve")
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "'FallbackUnknownModel'" in lines[0] and "'no-such-model-in-litellm'" in lines[0]


def test_a_group_whose_every_model_fails_is_logged_once_a_minute_and_its_answering_again_once(make_tollgate):
    # LiteLLM up, every model behind it failing (5xx, timeouts): the clients' 503s were all that said so.
    server = make_tollgate()
    admin = server.admin()
    admin.ok("POST", "/admin/model-groups", json={"name": "Flaky", "models": ["fail-500", "fail-503"]})
    client = server.client(admin.team(groups=("Flaky",)).key)
    body = {"model": "Flaky", "messages": [{"role": "user", "content": "hi"}]}
    assert [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [503] * 3
    admin.ok("PUT", "/admin/model-groups/Flaky", json={"models": ["primary"]})
    assert wait_for(lambda: client.post("/v1/chat/completions", json=body).status_code == 200, timeout=5)
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    server.stop()
    lines = [line for line in server.log().splitlines() if "'Flaky'" in line]
    assert len(lines) == 2, lines
    assert "WARNING" in lines[0] and "every model failed" in lines[0] and "fail-500" in lines[0]
    assert "once a minute" in lines[0] and "answers again" in lines[1]


def test_a_model_failing_calls_its_fallback_answers_is_logged_once_a_minute(make_tollgate):
    # Every call answered, by the group's second model: only the records and a metric said so.
    lines = said_after_three_answered_calls(make_tollgate, "Fallback500", "'fail-500'")
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "'Fallback500'" in lines[0] and "fake upstream failure 500" in lines[0]
    assert "'backup' this time" in lines[0] and "once a minute" in lines[0]


def test_a_model_that_failed_behind_a_fallback_answering_again_is_said_once(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)  # the fake itself: any model name is served
    admin = server.admin()
    model = "fails-first-" + uuid.uuid4().hex[:8]
    admin.ok("POST", "/admin/model-groups", json={"name": "Recovers", "models": [model, "backup"]})
    client = server.client(admin.team(groups=("Recovers",)).key)
    body = {"model": "Recovers", "messages": [{"role": "user", "content": "hi"}]}
    assert [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [200] * 3
    server.stop()
    lines = [line for line in server.log().splitlines() if f"'{model}'" in line]
    assert len(lines) == 2, lines
    assert "WARNING" in lines[0] and "fails calls" in lines[0]
    assert "WARNING" in lines[1] and "answers again" in lines[1]


def test_the_fault_lines_kept_for_groups_and_models_are_bounded(monkeypatch):
    # Groups come and go through the admin API: a long-lived process must not keep a line for
    # every group (and model of one) that ever failed.
    from proxy import calls
    from proxy.forwarding import Attempt, UpstreamFailed

    monkeypatch.setattr(calls, "MAX_FAULT_LINES", 3)
    pipeline = calls.CallPipeline(*[None] * 7, 60.0)  # type: ignore[arg-type]
    for n in range(10):
        group = f"group-{n}"
        pipeline._group_fails(group, UpstreamFailed([Attempt("m", "500")]))
        pipeline._models_fail(group, [Attempt("m", "500")], "backup")
        pipeline._say_not_served(group, [Attempt("unknown", "404", not_served=True)])
        calls._line_of(pipeline._breaking_models, (group, "m"))("streams of '%s' break", group)
        kept = (pipeline._failing_groups, pipeline._failing_models, pipeline._breaking_models, pipeline._said_not_served)
        assert [len(lines) <= 3 for lines in kept] == [True] * 4


def abort_streams(server: Tollgate, *contents: str) -> list[str]:
    """Stream a call to the group `Abort` (its model breaks a stream after two chunks) for each
    of `contents`; the last event of each."""
    client = server.client(server.admin().team(groups=("Abort",)).key)
    ends = []
    for content in contents:
        body = {"model": "Abort", "stream": True, "messages": [{"role": "user", "content": content}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        ends.append(sse_data(response.text)[-1])
    return ends


def test_a_model_breaking_every_stream_after_its_first_event_is_logged_once_a_minute(make_tollgate, fake_url):
    # Past its first event a stream has no fallback: every client got an error event, and only
    # the call records and an error counter said so.
    server = make_tollgate(upstream_url=fake_url)
    ends = abort_streams(server, "hi", "hi", "hi")
    assert all("upstream_connection_lost" in end for end in ends), ends
    server.stop()
    lines = [line for line in server.log().splitlines() if "'abort'" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "'Abort'" in lines[0] and "ReadError" in lines[0]
    assert "once a minute" in lines[0]


def test_a_model_that_broke_streams_finishing_one_again_is_said_once(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    ends = abort_streams(server, "hi", "hi", "[chunks=2] short enough to end before the break")
    assert ends[-1] == "[DONE]", ends
    server.stop()
    lines = [line for line in server.log().splitlines() if "'abort'" in line]
    assert len(lines) == 2, lines
    assert "WARNING" in lines[0] and "break after their first event" in lines[0]
    assert "WARNING" in lines[1] and "end whole again" in lines[1]


def test_a_connection_to_litellm_dropped_before_a_fallback_answers_blames_no_model(make_tollgate):
    # A LiteLLM behind a balancer with one replica going down: a call's connection to it drops,
    # the group's next model reaches another replica. LiteLLM failed, not the group's first model.
    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if body["model"] == "primary":
            handler.close_connection = True  # no answer at all
        else:
            write_json(handler, 200, ANSWER)

    with stand_in_litellm(respond) as url:
        server = make_tollgate(upstream_url=url)
        assert three_calls(server.client(server.admin().team().key), "Main") == [200] * 3
    server.stop()
    assert [line for line in server.log().splitlines() if "'primary'" in line] == []


def test_calls_waiting_past_the_connect_timeout_for_a_pooled_connection_are_logged_as_the_pools(make_tollgate):
    # Every connection to LiteLLM held by a stream: the next call's models were never asked, and
    # were each said to fail (and its group with them), with nothing naming upstream.max_connections.
    server = make_tollgate(upstream={"max_connections": 1, "timeouts": {"connect": "300ms"}})
    client = server.client(server.admin().team().key)
    stream = {"model": "Main", "stream": True, "messages": [{"role": "user", "content": "hi [chunks=20] [delay_ms=100]"}]}
    with client.stream("POST", "/v1/chat/completions", json=stream) as holding:
        assert holding.status_code == 200
        assert three_calls(client, "Main") == [503] * 3
        holding.read()
    server.stop()
    lines = [line for line in server.log().splitlines() if "WARNING" in line]
    assert len(lines) == 1, lines
    assert "every connection to LiteLLM was in use (upstream.max_connections: 1)" in lines[0]
    assert "once a minute" in lines[0]


def test_the_database_taking_writes_again_is_said_once(make_tollgate):
    server = make_tollgate(database={"busy_timeout": "100ms"})
    client = server.client(server.admin().team().key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    holder = sqlite3.connect(server.database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert client.post("/v1/chat/completions", json=body).status_code == 503
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [200] * 3
    server.stop()
    lines = [line for line in server.log().splitlines() if "tollgate" in line and "database" in line]
    assert len(lines) == 2, lines
    assert "locked" in lines[0] and "WARNING tollgate: the database takes writes again" in lines[1]


@contextlib.contextmanager
def served_here(config: Config):
    """The app of `config` served by uvicorn in this process, as `serve` runs it (its lines through
    logging, to caplog), for a test to break a part of it first; its URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(config), port=free_port(), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        assert wait_for(lambda: server.started, timeout=10)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info is not None]


def test_a_fault_of_tollgates_own_is_logged_with_its_traceback_once(tmp_path, monkeypatch, caplog):
    # Tollgate's handler logged it, then Starlette raised it on to uvicorn, which logged it again:
    # two tracebacks for one fault, the operator left to find out whether there were two.
    async def broken(self):
        raise RuntimeError("a bug of Tollgate's own")

    monkeypatch.setattr(AdminService, "list_organizations", broken)
    config = Config(database=DatabaseConfig(url=f"sqlite:///{tmp_path / 't.db'}"), master_key=Secret("sk-master-test"))
    with caplog.at_level(logging.INFO), served_here(config) as url:
        answer = httpx.get(f"{url}/admin/organizations", headers={"Authorization": "Bearer sk-master-test"})
    assert answer.status_code == 500
    assert len(tracebacks(caplog)) == 1, tracebacks(caplog)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("GET /admin/organizations" in line for line in said), said


def test_a_call_whose_record_fails_for_a_fault_of_tollgates_own_logs_one_traceback(
    tmp_path, monkeypatch, caplog, litellm
):
    async def broken(self, *args, **kwargs):
        raise RuntimeError("a bug of Tollgate's own")

    monkeypatch.setattr(SQLiteStore, "finish_call_and_job", broken)
    path = tmp_path / "tollgate.yaml"
    path.write_text(yaml.safe_dump(tollgate_config(tmp_path / "t.db")))
    config = load_config(str(path), env={
        "TOLLGATE_MASTER_KEY": "sk-master-test", "TOLLGATE_UPSTREAM_URL": litellm.url,
        "TOLLGATE_UPSTREAM_KEY": litellm.master_key,
    })
    with caplog.at_level(logging.INFO), served_here(config) as url:
        key = Admin(url, "sk-master-test").team(groups=("Main",)).key
        body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 500
    assert len(tracebacks(caplog)) == 1, tracebacks(caplog)
    assert any("could not record call" in r.getMessage() for r in caplog.records)


def stopped_during_a_stream(server: Tollgate) -> None:
    """SIGTERM sent to `server` while a stream longer than its 1 s shutdown grace runs: the stream
    is cut, its client told why."""
    team = server.admin().team()
    slow = {"model": "Main", "stream": True, "messages": [{"role": "user", "content": "slow [chunks=100] [delay_ms=100]"}]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=slow,
                      headers={"Authorization": f"Bearer {team.key}"}, timeout=30) as stream:
        assert stream.status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert b"shutting_down" in stream.read()


def test_streams_a_shutdown_cuts_are_logged_in_one_line_naming_the_grace_to_raise(make_tollgate):
    # uvicorn's "Cancel 1 running task(s), timeout graceful shutdown exceeded" said neither which
    # requests they were nor which setting lets them finish.
    server = make_tollgate(server={"shutdown_grace": "1s"})
    stopped_during_a_stream(server)
    server.stop()
    lines = [line for line in server.log().splitlines() if "cut short by the shutdown" in line]
    assert len(lines) == 1, lines
    assert "WARNING tollgate:" in lines[0] and "1 calls" in lines[0] and "server.shutdown_grace" in lines[0]


def test_a_worker_stopped_by_sigterm_writes_the_lines_it_logged_as_it_stopped(make_tollgate):
    # uvicorn raises the SIGTERM again once its graceful stop is over; in a worker, where nothing
    # handled it, that killed the process before its handler wrote the last turn's lines: the
    # warning naming server.shutdown_grace, and uvicorn's own last lines, were never seen.
    server = make_tollgate(workers=2, server={"shutdown_grace": "1s"})
    stopped_during_a_stream(server)
    assert server.process.wait(15) == 0
    log = server.log()
    assert [line for line in log.splitlines() if "cut short by the shutdown" in line], log
    assert log.count("Finished server process") == 2, log


def test_one_access_log_line_per_request_with_the_call_fields(make_tollgate):
    server = make_tollgate(logging={"access_log": "json"})
    team = server.admin().team()
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "log"}).json()["job_id"]
    call_id = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "x [chunks=2]"}]}).json()["call_id"]
    line = wait_for(lambda: [l for l in server.log().splitlines() if call_id in l], timeout=5)
    entry = json.loads(line[0].split("tollgate.access: ", 1)[1])
    assert entry["route"] == "/api/jobs/{job_id}/llm-call" and entry["status"] == 200
    assert (entry["team"], entry["job"], entry["call"], entry["model_group"], entry["model"]) == (
        team.team_id, job_id, call_id, "Main", "primary",
    )
    assert entry["completion_tokens"] == 2 and entry["latency_ms"] >= 0


def test_the_access_log_names_the_job_a_request_created_or_completed(make_tollgate):
    server = make_tollgate(logging={"access_log": "json"})
    team = server.admin().team()
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "log"}).json()["job_id"]
    client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status()
    routes = ("/api/jobs/create", "/api/jobs/{job_id}/complete")

    def job_entries() -> list[dict]:
        entries = [json.loads(line.split("tollgate.access: ", 1)[1]) for line in server.log().splitlines()
                   if "tollgate.access: " in line]
        return [entry for entry in entries if entry["route"] in routes]

    entries = wait_for(lambda: len(job_entries()) == 2 and job_entries(), timeout=5)
    assert [(entry["route"], entry.get("job")) for entry in entries] == [(route, job_id) for route in routes]


def test_a_refused_v1_call_names_no_job_or_call_in_the_access_log(make_tollgate):
    # The /v1 call's own job is made only once its limits admit it: the log must not name one.
    server = make_tollgate(logging={"access_log": "json"})
    team = server.admin().team(rpm_limit=1)
    client = server.client(team.key)
    body = {"model": "Main", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert client.post("/v1/chat/completions", json=body).status_code == 429
    refused = wait_for(lambda: [
        entry for line in server.log().splitlines() if "tollgate.access: " in line
        for entry in [json.loads(line.split("tollgate.access: ", 1)[1])] if entry["status"] == 429
    ], timeout=5)
    assert refused[0]["team"] == team.team_id
    assert refused[0].get("job") is None and refused[0].get("call") is None


def test_no_key_or_prompt_text_appears_in_the_logs(make_tollgate):
    server = make_tollgate()
    team = server.admin().team()
    exercise(server, team)
    server.client(team.key + "tampered").get(f"/api/teams/{team.team_id}")
    server.client(team.key).post("/api/jobs/create", content=b"{" + SECRET_PROMPT.encode(), headers={"Content-Type": "application/json"})
    server.stop()
    log = server.log()
    assert "tollgate.access" in log
    assert team.key not in log and team.key[3:15] not in log
    assert SECRET_PROMPT not in log


def test_an_idle_connection_is_kept_open_for_server_keep_alive_timeout(make_tollgate):
    # uvicorn's 5 s, fixed: a load balancer keeping its connections to Tollgate for longer
    # (nginx's and ALB's 60 s) reused one as Tollgate closed it, and its request failed (a 502).
    server = make_tollgate(server={"keep_alive_timeout": "8s"})
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(6)  # idle past uvicorn's 5 s
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def raw_refusal(port: int, request: bytes) -> bytes:
    """Send `request` on a connection of its own, send nothing more, and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        with contextlib.suppress(OSError):  # the server may close while this still sends
            sock.sendall(request)
        return b"".join(iter(lambda: sock.recv(65536), b""))


OVERSIZED_HEAD = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n"
REFUSED_BEFORE_THE_APP = {
    431: lambda server: OVERSIZED_HEAD,
    414: lambda server: b"GET /health/live?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    400: lambda server: b"GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    # The head arrives, the body never does: 408 once the read timeout is over.
    408: lambda server: (
        f"POST /admin/organizations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.master_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    ).encode(),
}


@pytest.mark.parametrize("status", sorted(REFUSED_BEFORE_THE_APP))
def test_requests_refused_before_the_app_are_counted_in_requests_total(make_tollgate, status):
    server = make_tollgate(server={"read_timeout": "1s"})
    reply = raw_refusal(server.port, REFUSED_BEFORE_THE_APP[status](server))
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    assert wait_for(lambda: value(families(server), "tollgate_requests", status=str(status)) == 1, timeout=5)


# Requests refused before their method was read whole: the parser's method is then its default
# (DELETE), which no client sent.
METHOD_NEVER_READ = {
    400: b"XYZZY /health/live HTTP/1.1\r\nHost: x\r\n\r\n",  # no such method
    408: b"GE",  # the method cut short, then nothing more
}


@pytest.mark.parametrize("status", sorted(METHOD_NEVER_READ))
def test_a_request_refused_before_its_method_was_read_is_counted_under_method_unknown(make_tollgate, status):
    server = make_tollgate(server={"read_timeout": "1s"})
    assert raw_refusal(server.port, METHOD_NEVER_READ[status]).startswith(f"HTTP/1.1 {status} ".encode())
    assert wait_for(lambda: value(families(server), "tollgate_requests", status=str(status)) == 1, timeout=5)
    methods = {s.labels["method"] for s in families(server)["tollgate_requests"].samples if s.labels["status"] == str(status)}
    assert methods == {"unknown"}


def test_a_request_refused_after_its_method_was_read_is_counted_under_it(make_tollgate):
    server = make_tollgate()
    assert raw_refusal(server.port, REFUSED_BEFORE_THE_APP[400](server)).startswith(b"HTTP/1.1 400 ")
    assert wait_for(lambda: value(families(server), "tollgate_requests", status="400", method="GET") == 1, timeout=5)


def test_a_request_refused_while_the_app_reads_its_body_is_counted_once_as_the_refusal(make_tollgate):
    # The app runs it, its head read: the app's own observation counts it, with the refusal's status.
    server = make_tollgate(server={"max_body_bytes": 65536})
    key = server.admin().team().key
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall((
            f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1;e="
        ).encode())
        time.sleep(0.2)  # the app runs it, its head read
        with contextlib.suppress(OSError):  # the server may close while this still sends
            sock.sendall(b"a" * 300_000)  # a chunk extension without end: 413 past twice the limit
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert wait_for(lambda: value(families(server), "tollgate_requests", status="413") == 1, timeout=5)
    time.sleep(0.5)  # a second count, if any, by now
    metrics = families(server)
    counted = {(s.labels["route"], s.labels["status"]): s.value for s in metrics["tollgate_requests"].samples
               if s.name == "tollgate_requests_total" and not s.labels["route"].startswith(("/admin", "/metrics", "/health"))}
    assert counted == {("/api/jobs/create", "413"): 1}, counted


def test_a_request_refused_before_the_app_has_its_access_log_line(make_tollgate):
    server = make_tollgate(logging={"access_log": "json"})
    assert raw_refusal(server.port, OVERSIZED_HEAD).startswith(b"HTTP/1.1 431 ")

    def refused():
        return [
            entry for line in server.log().splitlines() if "tollgate.access: " in line
            for entry in [json.loads(line.split("tollgate.access: ", 1)[1])] if entry["status"] == 431
        ]

    (entry,) = wait_for(refused, timeout=5)
    assert entry["route"] == "unmatched" and entry["method"] == "GET" and entry["latency_ms"] >= 0


def test_a_client_hammering_with_unparsable_requests_writes_no_warning_a_request(make_tollgate):
    # The client's fault, told to it in the 400 and counted in the access log: a WARNING line
    # each (uvicorn's, without a time) let any client fill the operator's log.
    server = make_tollgate()
    for _ in range(5):
        assert raw_refusal(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert wait_for(lambda: server.log().count("status=400") == 5, timeout=5)
    server.stop()
    assert [line for line in server.log().splitlines() if "WARNING" in line or "Invalid HTTP" in line] == []


@pytest.mark.parametrize("request_bytes", [b"\x01GET / HTTP/1.1\r\n\r\n", OVERSIZED_HEAD], ids=["unparsable", "oversized"])
def test_a_refusal_on_a_kept_alive_connection_is_timed_from_its_own_request(make_tollgate, request_bytes):
    # Not from the start of the request answered before it on the connection, idle time included.
    server = make_tollgate(logging={"access_log": "json"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(1.5)
        with contextlib.suppress(OSError):  # the server may close while this still sends
            sock.sendall(request_bytes)
        assert b"".join(iter(lambda: sock.recv(65536), b"")).startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))

    def refused():
        return [
            entry for line in server.log().splitlines() if "tollgate.access: " in line
            for entry in [json.loads(line.split("tollgate.access: ", 1)[1])] if entry["status"] in (400, 431)
        ]

    (entry,) = wait_for(refused, timeout=5)
    assert entry["latency_ms"] < 1000, entry


def hang_up_after_a_fallback(make_tollgate):
    """A call whose first model fails at once and whose second never answers, the client hanging
    up meanwhile: (the server, the call's record)."""
    server = make_tollgate()
    admin = server.admin()
    admin.ok("POST", "/admin/model-groups", json={"name": "FailThenHang", "models": ["fail-500", "hang"]})
    team = admin.team(groups=("FailThenHang",))
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "f"}).json()["job_id"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"Authorization": f"Bearer {team.key}"}, timeout=2)
    (call,) = wait_for(lambda: [c for c in client.get(f"/api/jobs/{job_id}").json()["calls"] if c["status"] != "running"])
    assert (call["status"], call["model"]) == ("cancelled", "hang")
    return server, call


def test_a_fallback_tried_before_the_client_hung_up_counts_in_fallbacks_total(make_tollgate):
    server, _ = hang_up_after_a_fallback(make_tollgate)
    assert value(families(server), "tollgate_fallbacks", model_group="FailThenHang") == 1


def test_a_call_the_client_hung_up_on_records_the_models_it_tried(make_tollgate):
    _, call = hang_up_after_a_fallback(make_tollgate)
    assert call["attempts"] == 2


def test_concurrent_readiness_probes_share_one_upstream_check(make_tollgate):
    # /health/ready needs no key; each probe was a GET /v1/models to LiteLLM with Tollgate's
    # key, so anyone could load LiteLLM one-for-one with requests that cost them nothing.
    seen = []

    class Upstream(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            time.sleep(0.2)  # LiteLLM under load
            write_json(self, 200, b'{"object": "list", "data": []}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)  # the kernel's free port: no race for it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gateway = make_tollgate(upstream_url=f"http://127.0.0.1:{server.server_port}")
        seen.clear()

        async def probes() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                answers = await asyncio.gather(*[client.get(f"{gateway.url}/health/ready") for _ in range(50)])
            return [a.status_code for a in answers]

        assert asyncio.run(probes()) == [200] * 50
        assert 1 <= len(seen) <= 5, len(seen)
    finally:
        server.shutdown()


def _deployment_stop_budget() -> float:
    """The longest a graceful stop of the image's Tollgate may take: its config's grace for open
    streams, then the wait for the calls it cut to be recorded."""
    from proxy.app import DRAIN_TIMEOUT
    from proxy.config import load_config

    return load_config(str(REPO / "config.yaml"), env={}).server.shutdown_grace + DRAIN_TIMEOUT


def _image_health_check() -> str:
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (.*)$", dockerfile, re.M)
    assert match is not None
    return match.group(1)


def test_the_images_health_check_asks_the_port_its_configuration_names(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key)
    server.config_path.write_text(yaml.safe_dump(tollgate_config(server.database, server={"port": server.port})))
    server.start()
    try:
        # `python` as in the image: the one Tollgate is installed for.
        path = f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**server.env, "TOLLGATE_CONFIG": str(server.config_path), "PATH": path}
        check = subprocess.run(["sh", "-c", _image_health_check()], env=env, cwd=tmp_path, capture_output=True,
                               timeout=30)
        assert check.returncode == 0, check.stderr
    finally:
        server.stop()
    check = subprocess.run(["sh", "-c", _image_health_check()], env=env, cwd=tmp_path, capture_output=True, timeout=30)
    assert check.returncode != 0


def test_the_compose_stack_lets_tollgate_finish_a_graceful_stop_before_docker_kills_it():
    # Docker's default is 10 s between SIGTERM and SIGKILL: streams still within their grace
    # would be cut unrecorded, and left for the sweeper to close as interrupted.
    from proxy.config import parse_duration

    service = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["tollgate"]
    assert parse_duration(service.get("stop_grace_period", "10s")) > _deployment_stop_budget()


def test_the_readmes_docker_run_lets_tollgate_finish_a_graceful_stop_before_docker_kills_it():
    command = re.search(r"docker run .*?tollgate\n", (REPO / "README.md").read_text(), re.S)
    assert command is not None
    timeout = re.search(r"--stop-timeout[ =](\d+)", command.group())
    assert timeout is not None and int(timeout.group(1)) > _deployment_stop_budget()


class _Store:
    """A store for readiness alone: its ping does what the test says."""

    def __init__(self, ping: Callable[[], Awaitable[None]]) -> None:
        self.ping = ping


class _Upstream:
    """LiteLLM's /v1/models for readiness: `answer` raises or returns; counts the times asked."""

    def __init__(self, answer: Callable[[], Awaitable[object]]) -> None:
        self.answer = answer
        self.asked = 0

    async def get_json(self, path: str, timeout: float) -> object:
        self.asked += 1
        return await self.answer()


class _Limiter:
    def __init__(self, redis: str, policy: str) -> None:
        self.redis = redis
        self.policy = policy

    async def check(self) -> str:
        return self.redis


async def _fine() -> object:
    return {"data": []}


async def _hang() -> object:
    await asyncio.Event().wait()
    return None


def _raising(exc: Exception) -> Callable[[], Awaitable[object]]:
    async def fail() -> object:
        raise exc

    return fail


def _health(
    ping: Callable[[], Awaitable[object]] = _fine, upstream: _Upstream | None = None,
    redis: str = "not configured", policy: str = "local",
) -> Health:
    return Health(_Store(ping), upstream or _Upstream(_fine), _Limiter(redis, policy), Metrics())  # type: ignore[arg-type]


async def _ready(health: Health) -> tuple[int, dict[str, Any]]:
    response = await health.ready(None)  # type: ignore[arg-type]
    return response.status_code, json.loads(response.body)


def test_ready_is_503_naming_why_the_store_takes_no_writes() -> None:
    status, body = asyncio.run(_ready(_health(ping=_raising(StoreUnavailable("the disk is full")))))
    assert (status, body["failing"]) == (503, ["store"])
    assert body["components"]["store"] == "failing: the disk is full"


def test_ready_names_any_other_store_failure_by_its_class_alone() -> None:
    # Readiness needs no key: an error's text (a path, say) is for the log, not for anyone asking.
    status, body = asyncio.run(_ready(_health(ping=_raising(sqlite3.OperationalError("/srv/secret/path")))))
    assert (status, body["components"]["store"]) == (503, "failing: OperationalError")


@pytest.mark.parametrize(
    "redis, policy, status",
    [
        ("degraded: unreachable", "deny", 503),
        ("degraded: unreachable", "local", 200),
        ("degraded: unreachable", "allow", 200),
        ("not configured", "deny", 200),
        ("ok", "deny", 200),
    ],
)
def test_redis_fails_readiness_only_when_degraded_under_deny(redis: str, policy: str, status: int) -> None:
    answered, body = asyncio.run(_ready(_health(redis=redis, policy=policy)))
    assert (answered, body["status"]) == (status, "ok" if status == 200 else "unavailable")
    assert body["failing"] == (["redis"] if status == 503 else [])


@pytest.mark.parametrize(
    "code, upstream",
    [
        (400, "failing: LiteLLM refuses Tollgate's upstream key"),
        (401, "failing: LiteLLM refuses Tollgate's upstream key"),
        (403, "failing: LiteLLM refuses Tollgate's upstream key"),
        (404, "failing: HTTP 404"),
        (500, "failing: HTTP 500"),
    ],
)
def test_ready_says_when_litellm_refuses_the_upstream_key_and_else_its_status(code: int, upstream: str) -> None:
    status, body = asyncio.run(_ready(_health(upstream=_Upstream(_raising(UpstreamStatusError(code))))))
    assert (status, body["components"]["upstream"], body["failing"]) == (503, upstream, ["upstream"])


def test_ready_says_why_litellm_cannot_be_reached() -> None:
    # It said "failing: ConnectError": not that the connection was refused (LiteLLM down, or
    # upstream.url naming the wrong port), which the error's own text says.
    refused = ConnectError("cannot connect to the upstream: Connection refused")
    status, body = asyncio.run(_ready(_health(upstream=_Upstream(_raising(refused)))))
    assert (status, body["components"]["upstream"]) == (503, "failing: cannot connect to the upstream: Connection refused")


def test_a_check_that_never_answers_fails_readiness_instead_of_hanging_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A probe left hanging is one the orchestrator times out on, without the reason.
    monkeypatch.setattr(health, "CHECK_TIMEOUT", 0.05)
    status, body = asyncio.run(asyncio.wait_for(_ready(_health(ping=_hang, upstream=_Upstream(_hang))), 30))
    assert (status, body["failing"]) == (503, ["store", "upstream"])
    assert body["components"]["upstream"] == body["components"]["store"] == "failing: TimeoutError"


def test_a_readiness_probe_that_hangs_up_leaves_the_shared_upstream_check_to_the_others() -> None:
    async def run() -> tuple[int, dict[str, Any]]:
        answer = asyncio.Event()

        async def slow() -> object:
            await answer.wait()
            return {"data": []}

        probes = _health(upstream=_Upstream(slow))
        gone = asyncio.create_task(_ready(probes))
        staying = asyncio.create_task(_ready(probes))
        await asyncio.sleep(0.01)  # both wait on the one check
        gone.cancel()
        await asyncio.sleep(0.01)
        answer.set()
        return await asyncio.wait_for(staying, 30)

    assert asyncio.run(run())[0] == 200


def test_a_readiness_probe_after_the_last_check_ended_asks_litellm_again() -> None:
    upstream = _Upstream(_raising(UpstreamStatusError(503)))
    probes = _health(upstream=upstream)

    async def run() -> list[int]:
        first = await _ready(probes)
        upstream.answer = _fine  # LiteLLM back
        return [first[0], (await _ready(probes))[0]]

    assert asyncio.run(run()) == [503, 200]
    assert upstream.asked == 2


def test_what_a_served_app_was_built_of_is_frozen_out_of_the_collectors_walks(tmp_path: Path) -> None:
    gc.unfreeze()
    try:
        create_served_app(Config(database=DatabaseConfig(url=f"sqlite:///{tmp_path / 't.db'}")))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


class _GoneMetrics:
    """Metrics whose workers' directory was removed under them."""

    async def render(self, balances: Callable[[], Awaitable[list[tuple[str, int]]]]) -> bytes:
        raise MetricsUnavailable("the workers' metrics directory /tmp/x is gone")


def test_a_scrape_of_metrics_that_cannot_be_read_is_a_503_saying_why() -> None:
    # Not a 500 with a traceback: the scraper and the operator are told what is wrong.
    store = _Store(_fine)
    store.team_balances = _fine  # type: ignore[attr-defined]  # never read: the render fails first
    probes = Health(store, _Upstream(_fine), _Limiter("ok", "local"), _GoneMetrics())  # type: ignore[arg-type]
    with pytest.raises(ApiError) as refused:
        asyncio.run(probes.metrics(None))  # type: ignore[arg-type]
    assert (refused.value.status, refused.value.code) == (503, "metrics_unavailable")
    assert refused.value.message == "the workers' metrics directory /tmp/x is gone"
