"""Separate `tollgate serve` processes sharing one database (API.md: "a second process on the
same database is safe"), each with a configuration of its own."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx

from tests.support import Tollgate, fake_upstream, wait_for

LONG_STREAM = {"messages": [{"role": "user", "content": "a long answer [chunks=14] [delay_ms=500]"}]}


def test_a_sweeper_with_a_shorter_total_timeout_leaves_another_processs_live_call_running(tmp_path):
    # A rolling change of upstream.timeouts.total (or of jobs.stale_call_margin): the process on
    # the new, shorter setting took the other's calls, still well within their own deadline, for
    # calls a dead process left behind, and closed them as interrupted. Their job could then be
    # completed while its call ran, and the call's late record rewrote a finished job.
    with fake_upstream(tmp_path) as fake_url:
        serving = Tollgate(tmp_path, fake_url, "sk-upstream", name="serving",
                           upstream={"timeouts": {"total": "60s"}}).start()
        sweeping = Tollgate(tmp_path, fake_url, "sk-upstream", name="sweeping", database_file=serving.database,
                            upstream={"timeouts": {"total": "1s"}},
                            jobs={"stale_call_margin": "1s", "sweep_interval": "0.2s"}).start()
        try:
            team = serving.admin().team()
            job_id = serving.client(team.key).post("/api/jobs/create", json={"job_type": "long"}).json()["job_id"]
            streamed: dict[str, object] = {}

            def stream() -> None:
                url = f"{serving.url}/api/jobs/{job_id}/llm-call-stream"
                with httpx.stream("POST", url, json=LONG_STREAM, headers={"Authorization": f"Bearer {team.key}"},
                                  timeout=30) as response:
                    streamed["body"] = response.read().decode()

            streaming = threading.Thread(target=stream)
            streaming.start()
            time.sleep(4)  # the call runs 7 s; the sweeping process's own calls end within 2 s
            completed = sweeping.client(team.key).post(f"/api/jobs/{job_id}/complete", json={"status": "completed"})
            streaming.join(30)
            assert completed.status_code == 409, completed.text
            assert "data: [DONE]" in str(streamed["body"])
            with sqlite3.connect(serving.database) as db:
                assert db.execute("SELECT status, error FROM llm_calls").fetchall() == [("success", None)]
            again = sweeping.client(team.key).post(f"/api/jobs/{job_id}/complete", json={"status": "completed"})
            assert again.status_code == 200 and again.json()["costs"]["successful_calls"] == 1
        finally:
            sweeping.stop()
            serving.stop()


def test_a_key_revoked_through_one_process_is_refused_at_once_by_another_that_cached_it(tmp_path):
    # At once, not once the other's cache (auth.cache_ttl, 1 s here) has run out: the change
    # signal beside the database tells every process sharing it.
    first = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", name="first", auth={"cache_ttl": "1s"}).start()
    second = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", name="second", database_file=first.database,
                      auth={"cache_ttl": "1s"}).start()
    try:
        team = first.admin().team()
        client = second.client(team.key)
        assert client.get(f"/api/teams/{team.team_id}").status_code == 200  # the key now cached in the second
        first.admin().ok("DELETE", f"/admin/keys/{team.key_id}")
        assert client.get(f"/api/teams/{team.team_id}").status_code == 401
    finally:
        second.stop()
        first.stop()
