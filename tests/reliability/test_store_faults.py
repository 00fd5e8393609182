"""The store under contention: locked by another process, and shared by two gateways."""

import sqlite3
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support import PYTHON

HOLD_LOCK = textwrap.dedent(
    """
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
    """
)


def test_requests_wait_out_a_two_second_lock_by_another_process_and_none_is_lost(make_tollgate):
    server = make_tollgate()
    team = server.admin().team(credits=20)
    client = server.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "locked"}).json()["job_id"]

    locker = subprocess.Popen([PYTHON, "-c", HOLD_LOCK, str(server.database), "2"], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    started = time.monotonic()

    def work(i: int) -> int:
        with server.client(team.key) as c:
            if i % 2:
                return c.post("/api/jobs/create", json={"job_type": f"during-lock-{i}"}).status_code
            return c.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "x"}]}).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(work, range(10)))
    assert locker.wait(10) == 0
    assert statuses == [200] * 10
    assert time.monotonic() - started >= 1.5  # they really waited for the lock
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["costs"]["total_calls"] == 5 and job["costs"]["successful_calls"] == 5
    jobs = client.get(f"/api/teams/{team.team_id}/jobs", params={"limit": 100}).json()
    assert jobs["total"] == 6
    assert server.admin().get_team(team.team_id)["credits_held"] == 6


def test_1000_concurrent_completions_across_two_processes_charge_exactly(make_tollgate):
    first = make_tollgate()
    second = make_tollgate(database_file=first.database)
    team = first.admin().team(credits=1200)
    with first.client(team.key) as client:
        jobs = [client.post("/api/jobs/create", json={"job_type": "bulk"}).json()["job_id"] for _ in range(500)]

    def complete(i: int) -> int:
        # Each job is completed twice, once through each process: one charge per job.
        server = (first, second)[i % 2]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {team.key}"}, timeout=60) as c:
            return c.post(f"/api/jobs/{jobs[i // 2]}/complete", json={"status": "completed"}).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(complete, range(1000)))
    assert statuses == [200] * 1000
    body = first.admin().get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"], body["credits_remaining"]) == (500, 0, 700)
    ledger = first.admin().ok("GET", f"/admin/teams/{team.team_id}/ledger", params={"limit": 1000})
    charges = [e for e in ledger if e["job_id"]]
    assert len(charges) == 500 and len({e["job_id"] for e in charges}) == 500
    assert sum(e["amount"] for e in ledger) == body["credits_remaining"]
    db = sqlite3.connect(first.database)
    assert db.execute("SELECT COUNT(*) FROM credit_holds").fetchone()[0] == 0
