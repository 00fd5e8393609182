"""A backup of a live gateway's database made as the README says (Operations, Backups), while
calls run: a consistent copy, holding everything answered before it began, that a gateway
serves once restored."""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.support import PYTHON, REPO, Tollgate, fake_upstream, wait_for

CALL = {"messages": [{"role": "user", "content": "back me up [chunks=3]"}]}


def readme_backup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"^- Backups:.*?```bash\n(.*?)```", text, re.S | re.M)
    assert block, "the README shows how to back up"
    return [line.strip() for line in block.group(1).strip().splitlines()]


def as_run_here(command: str, database: Path, copy: Path) -> str:
    """The README's command, on the test's database and copy."""
    if command.startswith("sqlite3 "):
        return re.sub(r"'/backups/[^']*'", f"'{copy}'", command.replace("tollgate.db", str(database), 1))
    assert command.startswith("python -c ")
    return PYTHON + command[len("python"):].replace("/data/tollgate.db", str(database)).replace("/data/backup.db", str(copy))


def calls_until(stop: threading.Event, url: str, key: str, answered: list[str]) -> None:
    """Jobs with a call each, streamed or not, and /v1 calls; the ids of the calls answered."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while not stop.is_set():
            if random.random() < 0.3:
                response = client.post("/v1/chat/completions", json={"model": "Main", **CALL})
            else:
                job_id = client.post("/api/jobs/create", json={"job_type": "backup"}).json()["job_id"]
                route = random.choice(["llm-call", "llm-call-stream"])
                response = client.post(f"/api/jobs/{job_id}/{route}", json=CALL)
                client.post(f"/api/jobs/{job_id}/complete", json={"status": random.choice(["completed", "failed"])})
            assert response.status_code == 200, response.text
            answered.append(response.headers["x-call-id"])


def books_that_do_not_balance(copy: Path) -> list[str]:
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        wrong = db.execute(
            """SELECT t.team_id FROM teams t WHERE
                   (SELECT COALESCE(SUM(amount), 0) FROM credit_ledger l WHERE l.team_id = t.team_id)
                       != t.credits_allocated - t.credits_used
                OR (SELECT COALESCE(SUM(amount), 0) FROM credit_holds h WHERE h.team_id = t.team_id) != t.credits_held
                OR (SELECT COALESCE(SUM(credits_held), 0) FROM jobs j
                    WHERE j.team_id = t.team_id AND j.status IN ('pending', 'in_progress')) != t.credits_held
                OR (SELECT COALESCE(SUM(credits_charged), 0) FROM jobs j WHERE j.team_id = t.team_id) != t.credits_used"""
        ).fetchall()
        half = db.execute(
            "SELECT c.call_id FROM llm_calls c JOIN jobs j USING (job_id) "
            "WHERE c.status = 'running' AND j.status IN ('completed', 'failed')"
        ).fetchall()
    return [team for (team,) in wrong] + [f"call {call} running in a finished job" for (call,) in half]


@pytest.mark.parametrize("command", readme_backup_commands(), ids=["sqlite3 shell", "python"])
def test_a_backup_made_as_the_readme_says_while_calls_run_is_consistent_and_serves_once_restored(tmp_path, command):
    if command.startswith("sqlite3 ") and shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 shell is not installed")
    copy = tmp_path / "backup.db"
    with fake_upstream(tmp_path) as fake_url:
        live = Tollgate(tmp_path, fake_url, "sk-upstream", name="live", database_file=tmp_path / "tollgate.db").start()
        try:
            team = live.admin().team(credits=100_000, rpm_limit=1_000_000, tpm_limit=10**10)
            stop, answered = threading.Event(), []
            callers = [threading.Thread(target=calls_until, args=(stop, live.url, team.key, answered)) for _ in range(4)]
            for caller in callers:
                caller.start()
            try:
                # A caller whose call failed has stopped: its assertion, not a wait without end.
                assert wait_for(lambda: len(answered) >= 200 or not all(c.is_alive() for c in callers), 120)
                assert all(caller.is_alive() for caller in callers), "a caller stopped"
                answered_before = list(answered)
                subprocess.run(["bash", "-c", as_run_here(command, live.database, copy)], check=True, timeout=60)
                assert wait_for(  # calls went on as it was made
                    lambda: len(answered) >= len(answered_before) + 50 or not all(c.is_alive() for c in callers), 120
                )
                assert all(caller.is_alive() for caller in callers), "a caller stopped"
            finally:
                stop.set()
                for caller in callers:
                    caller.join(30)
        finally:
            live.stop()
        assert books_that_do_not_balance(copy) == []
        with sqlite3.connect(copy) as db:
            kept = {call for (call,) in db.execute("SELECT call_id FROM llm_calls WHERE status != 'running'")}
            remaining = db.execute("SELECT credits_allocated - credits_used FROM teams WHERE team_id = ?",
                                   (team.team_id,)).fetchone()[0]
        assert set(answered_before) <= kept
        restored = Tollgate(tmp_path, fake_url, "sk-upstream", name="restored", database_file=copy).start()
        try:
            shown = restored.client(team.key).get(f"/api/teams/{team.team_id}")
            assert shown.status_code == 200 and shown.json()["credits_remaining"] == remaining
        finally:
            restored.stop()
