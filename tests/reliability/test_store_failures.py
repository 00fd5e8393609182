"""A database that cannot be written (a full disk, I/O errors, a failed fsync) is an outage,
not a loss: requests get 503 with Retry-After, readiness names the store, and the outcome of a
call that could not be recorded is kept and written once the database takes writes again.

Tollgate runs in-process here (create_app under Starlette's TestClient, against the fake
upstream), so that the store can be made to fail from inside."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.calls import CallPipeline
from proxy.config import DatabaseConfig, load_config
from proxy.records import CallOutcome, NewCall
from proxy.store import StoreBusy, StoreUnavailable, WrittenThenCancelled
from proxy.store import sqlite as sqlite_store
from proxy.store.sqlite import SQLiteStore
from proxy.store.writer import Writer
from proxy.sweeper import sweep_once
from tests.support import sse_data, tollgate_config, wait_for
from tests.test_store_concurrency import make_team

MASTER = "sk-master-test"
CALL = {"messages": [{"role": "user", "content": "hi [chunks=3]"}]}
FULL = StoreUnavailable("The database cannot be written now: database or disk is full (SQLITE_FULL)")


class Gateway:
    """An in-process Tollgate with a team, its key and an open job."""

    def __init__(self, client: TestClient, database: Path) -> None:
        self.http = client
        self.database = database
        org, team = "org-" + uuid.uuid4().hex[:8], "team-" + uuid.uuid4().hex[:8]
        self.team_id = team
        self.admin("/admin/organizations", {"organization_id": org, "name": org})
        self.admin("/admin/teams", {"team_id": team, "organization_id": org, "model_groups": ["Main"],
                                    "credits_allocated": 10})
        self.key = self.admin(f"/admin/teams/{team}/keys", {"name": "test"})["key"]
        self.job_id = self.post("/api/jobs/create", {"job_type": "disk"}).json()["job_id"]

    def admin(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(path, json=body, headers={"Authorization": f"Bearer {MASTER}"})
        assert response.status_code in (200, 201), response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.http.post(path, json=body, headers={"Authorization": f"Bearer {self.key}"})

    def job(self, job_id: str) -> Any:
        return self.http.get(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {self.key}"}).json()

    def v1_call_while_refused(self, refusing: dict[str, Exception | None], **body: Any) -> tuple[Any, Any]:
        """A /v1 call made while the store refuses its record, then the store taking writes
        again: the call's response, and its own job once no longer in progress."""
        refusing["error"] = FULL
        response = self.post("/v1/chat/completions", {"model": "Main", **CALL, **body})
        job_id = response.headers["x-job-id"]
        refusing["error"] = None
        assert wait_for(lambda: self.job(job_id)["status"] != "in_progress", timeout=5)
        return response, self.job(job_id)

    def calls(self) -> list[tuple[str, int, int]]:
        """The job's calls as the database holds them: status, prompt and completion tokens."""
        with sqlite3.connect(self.database) as db:
            return db.execute("SELECT status, prompt_tokens, completion_tokens FROM llm_calls WHERE job_id = ?",
                              (self.job_id,)).fetchall()


@pytest.fixture
def gateway(tmp_path: Path, fake_url: str) -> Iterator[Any]:
    started: list[TestClient] = []

    def start(**sections: Any) -> Gateway:
        database = tmp_path / "t.db"
        config_path = tmp_path / "config.yaml"
        upstream = {"url": fake_url, **sections.pop("upstream", {})}
        config_path.write_text(yaml.safe_dump(tollgate_config(database, upstream=upstream, **sections)))
        config = load_config(str(config_path), env={"TOLLGATE_MASTER_KEY": MASTER, "TOLLGATE_UPSTREAM_KEY": "sk-up"})
        client = TestClient(create_app(config), raise_server_exceptions=False)
        client.__enter__()
        started.append(client)
        return Gateway(client, database)

    yield start
    for client in started:
        client.__exit__(None, None, None)


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> dict[str, Exception | None]:
    """While `refusing["error"]` is set, the store refuses every call record with it (a /v1
    call's own job is ended in the same write as its record)."""
    return refused(monkeypatch, "finish_call", "finish_call_and_job")


def refused(monkeypatch: pytest.MonkeyPatch, *methods: str) -> dict[str, Exception | None]:
    """The store's `methods` made to raise `state["error"]` while it is set."""
    state: dict[str, Exception | None] = {"error": None}
    for method in methods:
        original = getattr(SQLiteStore, method)

        async def refuse_or_run(self: SQLiteStore, *args: Any, original: Any = original, **kwargs: Any) -> Any:
            if state["error"] is not None:
                raise state["error"]
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(SQLiteStore, method, refuse_or_run)
    return state


@pytest.mark.parametrize("error", [FULL, StoreBusy("The database is busy; try again shortly")], ids=["full", "busy"])
def test_a_call_whose_record_cannot_be_written_answers_503_and_is_recorded_once_the_store_takes_writes(
    gateway, refusing, error
):
    server = gateway(jobs={"sweep_interval": "0.2s"})
    refusing["error"] = error
    response = server.post(f"/api/jobs/{server.job_id}/llm-call", CALL)
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert "will be recorded once the database takes writes again" in response.json()["detail"]
    assert server.calls() == [("running", 0, 0)]
    refusing["error"] = None
    # The sweeper's next run writes it, with the tokens the call used.
    assert wait_for(lambda: server.calls()[0][0] != "running", timeout=5)
    assert server.calls() == [("success", server.calls()[0][1], 3)]
    assert server.post(f"/api/jobs/{server.job_id}/complete", {"status": "completed"}).status_code == 200


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_a_failed_call_whose_record_cannot_be_written_answers_503_naming_its_job_and_call(gateway, refusing, route):
    # README: the 503 of a call whose record could not be written carries the call's X-Job-Id
    # and X-Call-Id (and, as every call's answer, its rate-limit headers), for a call the
    # upstream failed as for one it answered: a /v1 client has no other way to its own job.
    server = gateway(jobs={"sweep_interval": "1h"})
    granted = server.http.patch(f"/admin/teams/{server.team_id}", json={"model_groups": ["Main", "AllFail"]},
                                headers={"Authorization": f"Bearer {MASTER}"})
    assert granted.status_code == 200, granted.text
    refusing["error"] = FULL
    response = server.post(f"/api/jobs/{server.job_id}/{route}", {**CALL, "model_group": "AllFail"})
    assert response.status_code == 503 and response.json()["detail"].endswith(
        "it will be recorded once the database takes writes again")
    assert response.headers.get("x-job-id") == server.job_id
    assert response.headers.get("x-call-id") and "x-ratelimit-remaining-requests" in response.headers
    assert server.calls() == [("running", 0, 0)]


def test_a_stream_whose_record_cannot_be_written_ends_with_one_error_event_and_is_recorded_later(gateway, refusing):
    server = gateway(jobs={"sweep_interval": "0.2s"})
    refusing["error"] = FULL
    response = server.post(f"/api/jobs/{server.job_id}/llm-call-stream", CALL)
    assert response.status_code == 200
    events = sse_data(response.text)
    assert "[DONE]" not in events
    errors = [json.loads(e)["error"] for e in events if "error" in json.loads(e)]
    assert len(errors) == 1 and errors[0]["code"] == "store_unavailable"
    assert "will be recorded once the database takes writes again" in errors[0]["message"]
    refusing["error"] = None
    assert wait_for(lambda: server.calls()[0][0] == "success", timeout=5)


def test_shutdown_writes_the_outcomes_kept_once_more(gateway, refusing):
    server = gateway(jobs={"sweep_interval": "1h"})
    refusing["error"] = FULL
    assert server.post(f"/api/jobs/{server.job_id}/llm-call", CALL).status_code == 503
    refusing["error"] = None
    server.http.__exit__(None, None, None)  # the lifespan's shutdown: no sweep ran meanwhile
    assert server.calls()[0][0] == "success"


def test_a_shutdown_while_the_store_still_refuses_a_kept_outcome_logs_it_among_the_calls_not_recorded(
    gateway, refusing, caplog
):
    # Its figures are in the log: the operator is told a call went unrecorded, and why.
    server = gateway(jobs={"sweep_interval": "1h"})
    refusing["error"] = FULL
    assert server.post(f"/api/jobs/{server.job_id}/llm-call", CALL).status_code == 503
    with caplog.at_level(logging.ERROR):
        server.http.__exit__(None, None, None)  # the lifespan's shutdown, the store refusing still
    assert "1 calls were not recorded before shutdown (1 of them because the store refused" in caplog.text
    assert server.calls()[0][0] == "running"


def test_a_kept_outcome_replaces_the_interrupted_close_another_process_swept_meanwhile(gateway, refusing):
    # With several workers, another one's sweeper knows nothing of this process's kept outcome:
    # once the store takes writes again it may close the call first, without its figures.
    server = gateway(jobs={"sweep_interval": "1h"})
    refusing["error"] = FULL
    assert server.post(f"/api/jobs/{server.job_id}/llm-call", CALL).status_code == 503
    refusing["error"] = None

    async def sweep_in_another_process() -> int:
        other = SQLiteStore(DatabaseConfig(url=f"sqlite:///{server.database}"))
        await other.open()
        try:
            return len(await other.cancel_stale_calls(time.time() + 1, math.inf))  # past every call's own bound
        finally:
            await other.close()

    assert asyncio.run(sweep_in_another_process()) == 1
    assert server.calls() == [("cancelled", 0, 0)]
    server.http.__exit__(None, None, None)  # the shutdown writes what it kept
    assert server.calls() == [("success", server.calls()[0][1], 3)] and server.calls()[0][1] > 0


def test_an_outcome_replaces_the_interrupted_close_another_process_swept_while_the_call_ran(gateway):
    # Another worker's sweeper closes a call it finds running past its cutoff (a record slowed
    # by a locked database can get there). The outcome arriving then was dropped without a word,
    # and the own job stayed failed, uncharged, though its client had the answer.
    server = gateway(jobs={"sweep_interval": "1h"})
    swept: list[int] = []

    def sweep_in_another_process() -> None:
        async def sweep() -> int:
            other = SQLiteStore(DatabaseConfig(url=f"sqlite:///{server.database}"))
            await other.open()
            try:
                return (len(await other.cancel_stale_calls(time.time() + 1, math.inf))  # past every call's own bound
                        + len(await other.fail_interrupted_implicit_jobs(10)))
            finally:
                await other.close()

        assert wait_for(lambda: own_job_ids(server.database), timeout=5)
        swept.append(asyncio.run(sweep()))

    sweeper = threading.Thread(target=sweep_in_another_process)
    sweeper.start()
    response = server.post("/v1/chat/completions", {"model": "Main", **CALL,
                                                     "messages": [{"role": "user", "content": "hi [first_byte_ms=800]"}]})
    sweeper.join()
    assert swept == [2] and response.status_code == 200
    with sqlite3.connect(server.database) as db:
        job = db.execute("SELECT status, credits_charged FROM jobs WHERE job_id = ?",
                         (response.headers["x-job-id"],)).fetchone()
        call = db.execute("SELECT status, completion_tokens > 0 FROM llm_calls WHERE call_id = ?",
                          (response.headers["x-call-id"],)).fetchone()
    assert (job, call) == (("completed", 1), ("success", 1))


def test_a_kept_outcome_never_overwrites_a_call_finished_otherwise(tmp_path):
    async def check() -> tuple[bool, bool, str]:
        store = await make_team(str(tmp_path / "kept.db"))
        job = (await store.create_job("team", "t", None, {}, 1)).job_id
        await store.start_call(NewCall("c", job, "team", "key", "ChatAgent", None, False, 100.0))
        cancelled = CallOutcome("c", "cancelled", None, 1, 0, True, 0.0, 5, None, 1, "client closed", 101.0)
        assert await store.finish_call(cancelled)
        late = CallOutcome("c", "success", "m", 10, 5, False, 0.0, 100, None, 1, None, 102.0)
        again = await store.finish_call(late, over_interrupted=True)
        (call,) = (await store.job_view(job))[1]
        await store.close()
        return again, call.status == "cancelled", call.error

    assert asyncio.run(check()) == (False, True, "client closed")


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """While `disk_full["now"]`, every write the store makes fails as SQLite fails on a full
    disk: even a write that changes nothing can succeed there, so none is let through. With
    `disk_full["after"]` a query, the disk fills once a write leaves the database where it
    finds a row: that write still commits, none after it does."""
    state: dict[str, Any] = {"now": False, "after": None}
    submit = Writer.submit

    def submit_or_fail(self: Writer, work: Any, atomic: bool = True, durable: bool = True) -> Any:
        def run(db: sqlite3.Connection) -> Any:
            if state["now"]:
                error = sqlite3.OperationalError("database or disk is full")
                error.sqlite_errorname = "SQLITE_FULL"
                raise error
            result = work(db)
            if state["after"] is not None and db.execute(state["after"]).fetchone() is not None:
                state["now"] = True
            return result

        return submit(self, run, atomic, durable)

    monkeypatch.setattr(Writer, "submit", submit_or_fail)
    return state


def test_ready_fails_naming_the_store_while_a_full_disk_refuses_writes_and_recovers_once_it_takes_them(
    gateway, disk_full
):
    server = gateway()
    assert server.http.get("/health/ready").status_code == 200
    disk_full["now"] = True
    assert server.post("/api/jobs/create", {"job_type": "full"}).status_code == 503
    ready = server.http.get("/health/ready")
    assert ready.status_code == 503 and "store" in ready.json()["failing"]
    assert "SQLITE_FULL" in ready.json()["components"]["store"]
    disk_full["now"] = False
    # No request needs to write first: readiness tries a write of its own.
    assert server.http.get("/health/ready").status_code == 200
    assert server.post("/api/jobs/create", {"job_type": "room again"}).status_code == 200


def test_a_database_that_cannot_be_written_is_logged_once_a_minute_not_once_a_request(gateway, disk_full, caplog):
    # A full disk fails every write alike while it lasts: a line each, at a few hundred calls a
    # second, buried the log and whatever else it said.
    server = gateway()
    disk_full["now"] = True
    with caplog.at_level("WARNING", logger="tollgate.errors"):
        for _ in range(20):
            assert server.post("/api/jobs/create", {"job_type": "full"}).status_code == 503
    lines = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(lines) == 1 and "SQLITE_FULL" in lines[0] and "once a minute" in lines[0], lines


def test_calls_a_database_that_cannot_be_written_refuses_share_the_other_writes_line_once_a_minute(
    gateway, disk_full, caplog
):
    # A call's start refused is answered apart from the store's error handler: it logged a line
    # per call (thousands a second under load, as a database restored under a running gateway),
    # and then a line a minute beside the other requests' line for the same fault.
    server = gateway()
    disk_full["now"] = True
    requests = [
        (f"/api/jobs/{server.job_id}/llm-call", CALL),
        ("/v1/chat/completions", {"model": "Main", **CALL}),
        ("/api/jobs/create", {"job_type": "full"}),
    ]
    with caplog.at_level("WARNING"):
        for path, body in requests * 7:
            assert server.post(path, body).status_code == 503
    lines = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(lines) == 1 and "SQLITE_FULL" in lines[0] and "once a minute" in lines[0], lines


def test_the_readiness_probe_leaves_nothing_behind(gateway, disk_full):
    server = gateway()
    disk_full["now"] = True
    assert server.post("/api/jobs/create", {"job_type": "full"}).status_code == 503
    disk_full["now"] = False
    assert server.http.get("/health/ready").status_code == 200
    with sqlite3.connect(server.database) as db:
        assert db.execute("SELECT COUNT(*) FROM organizations WHERE name = '' OR organization_id LIKE '% %'"
                          ).fetchone() == (0,)


@pytest.fixture
def failing_fsync(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """While `failing_fsync["now"]` is set, the store's fsyncs of the WAL fail with EIO (on its
    thread: start the gateway with `database={"aio_fsync": False}`)."""
    failing = {"now": False}

    def fsync(fd: int) -> None:
        if failing["now"]:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(sqlite_store, "Writer", functools.partial(Writer, fsync=fsync))
    return failing


def test_a_v1_call_whose_records_fsync_fails_is_answered_and_its_own_job_charged_once(gateway, failing_fsync):
    # The record and the own job's charge were committed before the fsync failed: a 503 would
    # drop the answer the job was charged for, and the client's retry would pay again.
    server = gateway(database={"aio_fsync": False})
    failing_fsync["now"] = True
    response = server.post("/v1/chat/completions", {"model": "Main", **CALL})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    with sqlite3.connect(server.database) as db:
        job = db.execute("SELECT status, credits_charged FROM jobs WHERE job_id = ?",
                         (response.headers["x-job-id"],)).fetchone()
        call = db.execute("SELECT status FROM llm_calls WHERE call_id = ?",
                          (response.headers["x-call-id"],)).fetchone()
    assert (job, call) == (("completed", 1), ("success",))


def test_a_stream_whose_records_fsync_fails_ends_as_any_other(gateway, failing_fsync):
    # Its record was committed: an error event saying it would be recorded later was untrue.
    server = gateway(database={"aio_fsync": False})
    failing_fsync["now"] = True
    response = server.post("/v1/chat/completions", {"model": "Main", **CALL, "stream": True})
    assert response.status_code == 200
    assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text


def test_credits_added_as_the_fsync_fails_are_answered_as_added(gateway, failing_fsync):
    # Committed: a 503 would have the administrator add them again.
    server = gateway(database={"aio_fsync": False})
    failing_fsync["now"] = True
    response = server.http.post(f"/admin/teams/{server.team_id}/credits", json={"amount": 5, "reason": "top-up"},
                                headers={"Authorization": f"Bearer {MASTER}"})
    assert response.status_code == 200, response.text
    assert response.json()["credits_allocated"] == 15


def test_after_a_failed_fsync_writes_answer_503_and_ready_names_the_store_and_why(gateway, failing_fsync):
    server = gateway(database={"aio_fsync": False})
    failing_fsync["now"] = True
    response = server.post(f"/api/jobs/{server.job_id}/llm-call", CALL)
    assert response.status_code == 200  # committed before its fsync failed (see above)
    failing_fsync["now"] = False  # too late: what the failed fsync was for may be lost
    response = server.post("/api/jobs/create", {"job_type": "after"})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "no more writes" in response.json()["detail"]
    ready = server.http.get("/health/ready")
    assert ready.status_code == 503
    assert "store" in ready.json()["failing"]
    assert "saving to disk failed" in ready.json()["components"]["store"]


class SweptStore:
    """What the sweeper asks of a store, noted."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def cancel_stale_calls(self, started_before: float, now: float | None = None, steps: Any = ()) -> list[Any]:
        self.asked.append("cancel_stale_calls")
        return []

    async def expire_jobs(self, created_before: float, limit: int) -> list[Any]:
        return []

    async def fail_interrupted_implicit_jobs(self, limit: int) -> list[Any]:
        return []


def test_the_sweeper_closes_no_call_as_interrupted_while_kept_outcomes_still_wait_to_be_written():
    store = SweptStore()
    left = {"count": 1}

    async def record_kept() -> int:
        store.asked.append("record_kept")
        return left["count"]

    asyncio.run(sweep_once(store, 60, 60, 1000.0, record_kept=record_kept))  # type: ignore[arg-type]
    assert store.asked == ["record_kept"]
    left["count"] = 0
    asyncio.run(sweep_once(store, 60, 60, 1000.0, record_kept=record_kept))  # type: ignore[arg-type]
    assert store.asked == ["record_kept", "record_kept", "cancel_stale_calls"]


def test_the_own_job_of_a_v1_call_whose_record_was_kept_is_finished_once_the_record_is_written(gateway, refusing):
    # Left open, it would hold its credit until it expired (a day by default), then fail
    # uncharged though its call succeeded and the client had the whole answer.
    server = gateway(jobs={"sweep_interval": "0.2s"})
    response, job = server.v1_call_while_refused(refusing, stream=True)
    assert response.status_code == 200 and "store_unavailable" in response.text
    assert (job["status"], job["costs"]["credits_charged"], job["calls"][0]["status"]) == ("completed", 1, "success")


def test_the_own_job_of_a_v1_call_answered_503_for_its_refused_record_is_failed_uncharged(gateway, refusing):
    # The client never had the answer, only a 503: its job must not be charged once the record
    # is written, though the call itself succeeded upstream and is recorded so.
    server = gateway(jobs={"sweep_interval": "0.2s"})
    response, job = server.v1_call_while_refused(refusing)
    assert response.status_code == 503
    assert (job["status"], job["costs"]["credits_charged"], job["calls"][0]["status"]) == ("failed", 0, "success")
    assert "never reached the client" in job["error_message"]


@pytest.fixture
def refusing_job_finish(monkeypatch: pytest.MonkeyPatch) -> dict[str, Exception | None]:
    """While `refusing_job_finish["error"]` is set, the store refuses to finish any job with it
    (the call records themselves are written)."""
    return refused(monkeypatch, "finish_job")


def test_the_own_job_of_a_v1_call_is_ended_in_the_write_of_its_record_not_by_a_finish_of_its_own(
    gateway, refusing_job_finish
):
    # A finish of its own, after the record, could be refused (the lock or the full disk coming
    # a moment later) and leave the job open, to expire uncharged though the client had the
    # whole answer.
    server = gateway(jobs={"sweep_interval": "0.2s"})
    refusing_job_finish["error"] = FULL
    response = server.post("/v1/chat/completions", {"model": "Main", **CALL, "stream": True})
    assert response.status_code == 200 and "[DONE]" in response.text
    job_id = response.headers["x-job-id"]
    assert wait_for(lambda: server.job(job_id)["status"] != "in_progress", timeout=5)  # still refusing
    job = server.job(job_id)
    assert (job["status"], job["costs"]["credits_charged"], job["calls"][0]["status"]) == ("completed", 1, "success")


# Sweeps often, and takes a call still running a second past its total timeout for one left by
# a process that died.
SWEEPING = {"jobs": {"sweep_interval": "0.2s", "stale_call_margin": "0.1s"}, "upstream": {"timeouts": {"total": "1s"}}}


def test_the_own_job_of_a_v1_call_is_charged_even_if_the_gateway_stops_while_the_store_refuses_writes_after_its_record(
    gateway, disk_full
):
    # The client had the whole answer and the call is recorded as a success: the job must be
    # charged, not left open, holding its credit, to expire uncharged a day later.
    server = gateway(**SWEEPING)
    disk_full["after"] = "SELECT 1 FROM llm_calls WHERE status = 'success'"
    response = server.post("/v1/chat/completions", {"model": "Main", **CALL, "stream": True})
    assert response.status_code == 200 and "[DONE]" in response.text
    job_id = response.headers["x-job-id"]
    assert restarted_with_room_again(gateway, server, disk_full, job_id) == ("completed", 1, 0, "success")


def test_the_own_job_of_a_v1_call_holds_no_credit_after_the_gateway_stops_while_the_store_refuses_its_start(
    gateway, disk_full
):
    # Whatever the store refused once the job was made, a restarted gateway must not leave the
    # job holding a credit (its client knows nothing of jobs) until it expires a day later.
    server = gateway(**SWEEPING)
    disk_full["after"] = "SELECT 1 FROM jobs WHERE job_type = 'chat.completions'"
    assert server.post("/v1/chat/completions", {"model": "Main", **CALL}).status_code == 503
    job_id = own_job_ids(server.database)[0]
    status, charged, held, _ = restarted_with_room_again(gateway, server, disk_full, job_id)
    assert (status, charged, held) == ("failed", 0, 0)


def own_job_ids(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT job_id FROM jobs WHERE job_type = 'chat.completions'")]


def restarted_with_room_again(
    gateway: Any, server: Gateway, disk: dict[str, Any], job_id: str
) -> tuple[str, int, int, str | None]:
    """Stop the gateway while the store still refuses writes, start it again on the same
    database once it takes them, let its sweeper run; the job's status, credits charged and
    held, and its call's status."""
    server.http.__exit__(None, None, None)
    disk.update(now=False, after=None)
    gateway(**SWEEPING)

    def books() -> tuple[str, int, int, str | None]:
        with sqlite3.connect(server.database) as db:
            status, charged = db.execute("SELECT status, credits_charged FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            (held,) = db.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_holds WHERE job_id = ?", (job_id,)).fetchone()
            call = db.execute("SELECT status FROM llm_calls WHERE job_id = ?", (job_id,)).fetchone()
        return status, charged, held, call[0] if call else None

    # The sweeps that settle it come only past the stale-call cutoff (1.1 s), however slow the
    # machine: a fixed pause read a slow one's books before its first sweep.
    wait_for(lambda: (b := books())[0] not in ("pending", "in_progress") and b[2] == 0 and b[3] != "running", timeout=20)
    return books()


class LockedStore:
    """A store whose database another process keeps locked until `locked` is cleared."""

    def __init__(self) -> None:
        self.locked = True
        self.recorded: list[str] = []

    async def finish_call(self, outcome: CallOutcome, *, over_interrupted: bool = False) -> bool:
        if self.locked:
            raise StoreBusy("The database is busy; try again shortly")
        self.recorded.append(outcome.call_id)
        return True


def test_an_outcome_waiting_on_a_locked_database_when_the_shutdown_cuts_its_call_is_kept_and_written_by_the_drain():
    # uvicorn cancels what outlives server.shutdown_grace: a non-streaming call whose record was
    # waiting to try the locked database again lost its outcome, neither kept nor logged, and
    # stayed running until a sweeper closed it as interrupted without its figures.
    store = LockedStore()
    pipeline = CallPipeline(store, *[None] * 6, 60.0)  # type: ignore[arg-type]
    call = SimpleNamespace(call_id="c", job_id="j", own_job=None, stream=False,
                           principal=SimpleNamespace(team=SimpleNamespace(team_id="team")))
    outcome = CallOutcome("c", "success", "m", 10, 5, False, 0.0, 100, None, 1, None, 1_000.0)

    async def run() -> tuple[int, int]:
        recording = asyncio.create_task(pipeline._store_outcome(call, outcome))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # refused once: waiting to try again
        recording.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recording
        store.locked = False
        return await pipeline.drain(timeout=0)

    assert asyncio.run(run()) == (0, 0)
    assert store.recorded == ["c"]


def counted(server: Gateway) -> Counter[str]:
    """The calls and jobs /metrics counts, by status."""
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(server.http.get("/metrics").text):
        if family.name in ("tollgate_llm_calls", "tollgate_jobs"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[f"{family.name}:{sample.labels['status']}"] += int(sample.value)
    return found


def v1_call_whose_start_the_shutdown_cut(
    server: Gateway, monkeypatch: pytest.MonkeyPatch, written: bool
) -> tuple[Any, Counter[str]]:
    """A /v1 call whose start the gateway's shutdown cut (uvicorn's cancellation, once
    server.shutdown_grace is over, of a start waiting on a database another process locked), as
    the store reports it: once the call was started (`written`), or before any of it was. Its
    503, and what /metrics counted for it."""
    original = SQLiteStore.start_call

    async def cut(self: SQLiteStore, *args: Any, **kwargs: Any) -> None:
        if not written:
            raise asyncio.CancelledError()
        await original(self, *args, **kwargs)
        raise WrittenThenCancelled(False)

    monkeypatch.setattr(SQLiteStore, "start_call", cut)
    before = counted(server)
    response = server.post("/v1/chat/completions", {"model": "Main", **CALL})
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    return response, counted(server) - before


def test_a_call_whose_start_the_shutdown_cut_once_written_answers_503_naming_its_job_and_call(gateway, monkeypatch):
    # Recorded as cancelled, it is the client's to ask about, by the ids every answer to a
    # recorded call carries; its own job was made with its start, and counted so.
    server = gateway()
    response, count = v1_call_whose_start_the_shutdown_cut(server, monkeypatch, written=True)
    job = server.job(response.headers["x-job-id"])
    assert [c["call_id"] for c in job["calls"]] == [response.headers["x-call-id"]]
    assert (job["status"], job["calls"][0]["status"], job["costs"]["credits_charged"]) == ("failed", "cancelled", 0)
    assert count == {"tollgate_llm_calls:cancelled": 1, "tollgate_jobs:created": 1, "tollgate_jobs:failed": 1}


def test_a_call_whose_start_the_shutdown_cut_before_any_write_is_counted_nowhere(gateway, monkeypatch):
    # No call and no job exist: counted as a cancelled call, with ids that name nothing.
    response, count = v1_call_whose_start_the_shutdown_cut(gateway(), monkeypatch, written=False)
    assert "x-call-id" not in response.headers and "x-job-id" not in response.headers
    assert count == {}


def test_an_unexpected_failure_is_a_500_in_json_on_every_api(gateway, monkeypatch):
    # API.md: every error is JSON, unexpected failures (500) included: `{"detail": ...}` on /api
    # and /admin, OpenAI's shape on /v1.
    server = gateway()

    async def blow_up(self: SQLiteStore, *args: Any) -> Any:
        raise RuntimeError("not a store error: a fault of the gateway's own")

    for method in ("get_team", "list_organizations", "start_call"):
        monkeypatch.setattr(SQLiteStore, method, blow_up)
    key = {"Authorization": f"Bearer {server.key}"}
    for path, headers in ((f"/api/teams/{server.team_id}", key), ("/admin/organizations", {"Authorization": f"Bearer {MASTER}"})):
        response = server.http.get(path, headers=headers)
        assert (response.status_code, response.json()) == (500, {"detail": "Internal server error"}), path
    response = server.http.post("/v1/chat/completions", json={"model": "Main", **CALL}, headers=key)
    assert response.status_code == 500
    assert response.json() == {
        "error": {"message": "Internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    }
