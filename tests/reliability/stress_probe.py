"""A randomized stress probe of the books: money and usage records under concurrency,
hang-ups, upstream failures, database locks and restarts. Not a test (pytest does not collect
it, and it runs for minutes); it found the shutdown faults of c47f7f4.

Teams with two keys each (one revoked mid-run) make jobs, /api and /v1 calls (streams or not,
own jobs or X-Job-Id), hang up at random moments, complete jobs (completed/failed racing each
other and a call), add and remove credits; the fake upstream fails, aborts, hangs, drips and
(not with --litellm) gives usages with one count missing.
Tollgate is stopped with SIGTERM (three times) and SIGKILL (once) and started again; other
processes lock the database now and then, and right before each stop. After the sweeper has
settled everything, the books, the jobs, the calls (against the fake upstream's log), the API's
views and (without restarts) tollgate_jobs_total are checked; every 500 is reported.

Run: .venv/bin/python tests/reliability/stress_probe.py [--seconds 60] [--seed N] [--litellm]
     [--tg-workers 2] [--no-restarts]
(ports TOLLGATE_STRESS_PORT, default 18201, and the two above it; Redis at 127.0.0.1:6379 under
a key prefix of its own; its files in a new temporary directory, which it prints)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.support
from tests.support import PYTHON, REPO, Tollgate, start_process, stop_process  # noqa: E402
from proxy.demo import wait_until_up  # noqa: E402

FAKE_PORT = int(os.environ.get("TOLLGATE_STRESS_PORT", "18201"))
TG_PORT = FAKE_PORT + 1
LITELLM_PORT = FAKE_PORT + 2
WORK = Path(tempfile.mkdtemp(prefix="tollgate-stress-"))
MASTER = "sk-master-test"

GROUPS = {
    "Main": ["primary", "backup"],
    "Fallback500": ["fail-500", "backup"],
    "AllFail": ["fail-500", "fail-503"],
    "Abort": ["abort"],
    "Garbage": ["garbage"],
    "FallbackHang": ["hang", "backup"],
    # A usage with one count null: the count given is kept, the other estimated (dc8b941).
    # Not with --litellm, whose model list (tests.support.FAKE_MODELS) has no half-usage.
    "HalfUsage": ["half-usage"],
}
GROUP_WEIGHTS = [("Main", 10), ("Fallback500", 3), ("AllFail", 2), ("Abort", 2), ("Garbage", 1), ("FallbackHang", 1),
                 ("HalfUsage", 1)]

STATUS_LOG: Counter[tuple[str, int]] = Counter()
FIVE_HUNDREDS: list[str] = []
EVENTS: list[dict[str, Any]] = []
LOCKS = True


def note(kind: str, status: int, detail: str = "") -> None:
    STATUS_LOG[(kind, status)] += 1
    if status >= 500 and status not in (503,):
        FIVE_HUNDREDS.append(f"{kind} {status} {detail[:300]}")


def pick_group(rng: random.Random) -> str:
    names, weights = zip(*GROUP_WEIGHTS)
    return rng.choices(names, weights)[0]


async def raw(method: str, path: str, key: str, body: dict[str, Any] | None, hang: tuple[str, float] | None,
              extra: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes] | None:
    """A raw HTTP/1.1 request with Connection: close; `hang` hangs up at a chosen moment.
    Returns None when we hung up (or the connection failed)."""
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    for k, v in (extra or {}).items():
        head += f"{k}: {v}\r\n"
    head += "\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", TG_PORT)
    except OSError:
        return None
    try:
        if hang and hang[0] == "partial_request":
            writer.write(head.encode() + data[: len(data) // 2])
            await writer.drain()
            await asyncio.sleep(hang[1])
            return None
        writer.write(head.encode() + data)
        await writer.drain()
        if hang and hang[0] == "after_send":
            await asyncio.sleep(hang[1])
            return None
        async with asyncio.timeout(timeout):
            raw_head = await reader.readuntil(b"\r\n\r\n")
            if hang and hang[0] == "after_headers":
                return None
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if hang and hang[0] == "mid_body":
                got = 0
                while got < hang[1]:
                    chunk = await reader.read(64)
                    if not chunk:
                        break
                    got += len(chunk)
                return None
            rest = await reader.read()
            if headers.get("transfer-encoding") == "chunked":
                rest = dechunk(rest)
            return status, headers, rest
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
        return None
    finally:
        writer.close()


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        line, _, data = data.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


class Team:
    def __init__(self, team_id: str, key: str, key_b: str, key_b_id: str) -> None:
        self.team_id = team_id
        self.key = key
        self.key_b = key_b
        self.key_b_id = key_b_id
        self.jobs: list[str] = []  # jobs created (maybe open)
        self.revoked = False


def messages(rng: random.Random, tag: str, stream: bool) -> list[dict[str, str]]:
    words = " ".join(f"w{i}" for i in range(rng.randint(1, 12)))
    directives = f"[tag={tag}] [chunks={rng.randint(1, 8)}]"
    r = rng.random()
    if r < 0.3:
        directives += f" [delay_ms={rng.choice([20, 50, 150, 400])}]"
    elif r < 0.45:
        directives += f" [first_byte_ms={rng.choice([100, 300, 800])}]"
    return [{"role": "user", "content": f"{words} {directives}"}]


def pick_hang(rng: random.Random, stream: bool) -> tuple[str, float] | None:
    r = rng.random()
    if r < 0.6:
        return None
    choice = rng.choice(["partial_request", "after_send", "after_send", "after_headers", "mid_body"])
    if choice == "after_send":
        return (choice, rng.choice([0.0, 0.02, 0.1, 0.3, 0.6]))
    if choice == "mid_body":
        return (choice, rng.choice([10, 200, 600]))
    if choice == "partial_request":
        return (choice, 0.05)
    return (choice, 0)


async def worker(team: Team, rng: random.Random, admin: httpx.AsyncClient, deadline: float) -> None:
    while time.monotonic() < deadline:
        op = rng.choices(["create", "api", "v1", "complete", "race_complete", "credits", "read"],
                         [2, 6, 6, 1.5, 0.7, 1, 0.5])[0]
        key = team.key_b if (rng.random() < 0.2) else team.key
        tag = "p" + uuid.uuid4().hex[:10]
        try:
            if op == "create":
                r = await raw("POST", "/api/jobs/create", key, {"job_type": "probe"}, None)
                if r:
                    note("create", r[0], r[2].decode(errors="replace"))
                    if r[0] == 200:
                        team.jobs.append(json.loads(r[2])["job_id"])
            elif op in ("api", "v1"):
                stream = rng.random() < 0.5
                hang = pick_hang(rng, stream)
                group = pick_group(rng)
                msgs = messages(rng, tag, stream)
                if op == "api":
                    if not team.jobs:
                        continue
                    job = rng.choice(team.jobs[-10:])
                    path = f"/api/jobs/{job}/llm-call" + ("-stream" if stream else "")
                    r = await raw("POST", path, key, {"model_group": group, "messages": msgs}, hang)
                    kind = "api-stream" if stream else "api"
                else:
                    extra = {}
                    if team.jobs and rng.random() < 0.4:
                        extra["X-Job-Id"] = rng.choice(team.jobs[-10:])
                    body: dict[str, Any] = {"model": group, "messages": msgs, "stream": stream}
                    if stream and rng.random() < 0.5:
                        body["stream_options"] = {"include_usage": True}
                    r = await raw("POST", "/v1/chat/completions", key, body, hang, extra)
                    kind = ("v1-stream" if stream else "v1") + ("-job" if extra else "")
                if r:
                    note(kind, r[0], r[2].decode(errors="replace"))
                    EVENTS.append({"kind": kind, "status": r[0], "job": r[1].get("x-job-id"), "call": r[1].get("x-call-id"),
                                   "done": b"[DONE]" in r[2], "body": r[2][-400:].decode(errors="replace"), "tag": tag})
                else:
                    EVENTS.append({"kind": kind, "status": None, "hang": hang, "tag": tag})
            elif op == "complete":
                if not team.jobs:
                    continue
                job = rng.choice(team.jobs[-10:])
                status = rng.choice(["completed", "completed", "failed"])
                r = await raw("POST", f"/api/jobs/{job}/complete", key, {"status": status},
                              ("after_send", 0.01) if rng.random() < 0.1 else None)
                if r:
                    note("complete", r[0], r[2].decode(errors="replace"))
                    if r[0] in (200, 409) and job in team.jobs and rng.random() < 0.8:
                        team.jobs.remove(job)
                    if r[0] == 200:
                        EVENTS.append({"kind": "complete", "job": job, "status": status, "resp": json.loads(r[2])})
            elif op == "race_complete":
                if not team.jobs:
                    continue
                job = rng.choice(team.jobs[-10:])
                # a call and two opposite completes at once
                msgs = messages(rng, tag, False)
                rs = await asyncio.gather(
                    raw("POST", f"/api/jobs/{job}/llm-call", key, {"model_group": "Main", "messages": msgs}, None),
                    raw("POST", f"/api/jobs/{job}/complete", key, {"status": "completed"}, None),
                    raw("POST", f"/api/jobs/{job}/complete", key, {"status": "failed"}, None),
                )
                if job in team.jobs:
                    team.jobs.remove(job)
                for name, r in zip(["api", "complete", "complete"], rs):
                    if r:
                        note(name + "-race", r[0], r[2].decode(errors="replace"))
            elif op == "credits":
                amount = rng.choice([-5, -3, -1, 1, 2, 5, 10, 20])
                resp = await admin.post(f"/admin/teams/{team.team_id}/credits", json={"amount": amount, "reason": "probe"})
                note("credits", resp.status_code, resp.text)
            elif op == "read":
                resp = await admin.get(f"/admin/teams/{team.team_id}")
                note("read-team", resp.status_code, resp.text)
        except (httpx.HTTPError, OSError):
            pass


def start_fake() -> subprocess.Popen[bytes]:
    proc = start_process([PYTHON, str(REPO / "tests" / "fake_upstream.py"), "--port", str(FAKE_PORT),
                          "--model-info-delay", "0"], WORK / "fake.log")
    wait_until_up(f"http://127.0.0.1:{FAKE_PORT}/v1/models", 30, proc)
    return proc


def make_tollgate(upstream: str, key: str, workers: int = 1) -> Tollgate:
    tg = Tollgate(
        WORK, upstream, key, name="probe", workers=workers,
        model_groups={n: {"models": m} for n, m in GROUPS.items()},
        redis={"url": "redis://127.0.0.1:6379/0", "key_prefix": f"tollgate-stress-{uuid.uuid4().hex[:6]}:"},
        jobs={"sweep_interval": "1s", "expire_after": "45s", "stale_call_margin": "2s"},
        upstream={"timeouts": {"first_byte": "2s", "answer": "2s", "total": "20s"}},
        server={"shutdown_grace": "1s"},
        rate_limits={"rpm": 1000000, "tpm": 1000000000},
    )
    tg.port = TG_PORT
    tg.url = f"http://127.0.0.1:{TG_PORT}"
    return tg


async def controller(tg: Tollgate, rng: random.Random, teams: list[Team], admin: httpx.AsyncClient, seconds: float,
                     restarts: bool) -> None:
    start = time.monotonic()
    # revoke key B of each team at a random moment
    revoke_at = {t.team_id: rng.uniform(0.1, 0.6) * seconds for t in teams}
    plan = [(seconds * 0.2, signal.SIGTERM), (seconds * 0.4, signal.SIGTERM), (seconds * 0.6, signal.SIGKILL),
            (seconds * 0.8, signal.SIGTERM)] if restarts else []
    next_lock = rng.uniform(1, 5)
    while time.monotonic() - start < seconds:
        elapsed = time.monotonic() - start
        for t in teams:
            if not t.revoked and elapsed > revoke_at[t.team_id]:
                try:
                    resp = await admin.delete(f"/admin/keys/{t.key_b_id}")
                    note("revoke", resp.status_code, resp.text)
                    t.revoked = resp.status_code == 200
                except httpx.HTTPError:
                    pass
        if LOCKS and elapsed > next_lock:
            next_lock = elapsed + rng.uniform(2, 6)
            hold = rng.uniform(0.3, 2.5)
            subprocess.Popen([sys.executable, "-c",
                              "import sqlite3,sys,time\n"
                              "db=sqlite3.connect(sys.argv[1],isolation_level=None)\n"
                              "db.execute('BEGIN IMMEDIATE')\ntime.sleep(float(sys.argv[2]))\ndb.execute('COMMIT')",
                              str(tg.database), str(hold)])
        if plan and elapsed > plan[0][0]:
            if LOCKS and rng.random() < 0.7:
                # a lock right before the stop: writes under way when the grace period ends
                subprocess.Popen([sys.executable, "-c",
                                  "import sqlite3,sys,time\n"
                                  "db=sqlite3.connect(sys.argv[1],isolation_level=None)\n"
                                  "db.execute('BEGIN IMMEDIATE')\ntime.sleep(float(sys.argv[2]))\ndb.execute('COMMIT')",
                                  str(tg.database), "2.5"])
                await asyncio.sleep(0.2)
            _, sig = plan.pop(0)
            print(f"[{elapsed:.1f}s] stopping tollgate with {sig!r}", flush=True)
            code = await asyncio.to_thread(tg.stop, sig)
            print(f"  exit code {code}", flush=True)
            tg.log_path.rename(tg.log_path.with_suffix(f".log.{sig.name}.{len(plan)}"))
            await asyncio.to_thread(tg.start)
            print(f"  restarted", flush=True)
        await asyncio.sleep(0.1)


def db_rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def check(db: Path, teams: list[Team], fake_log: list[dict[str, Any]], tg_url: str) -> list[str]:
    problems: list[str] = []
    q = lambda sql, *p: db_rows(db, sql, p)  # noqa: E731
    for t in teams:
        tid = t.team_id
        (alloc, used, held, cpj), = q("SELECT credits_allocated, credits_used, credits_held, credits_per_job FROM teams WHERE team_id=?", tid)
        charges = q("SELECT COALESCE(-SUM(amount),0) FROM credit_ledger WHERE team_id=? AND job_id IS NOT NULL", tid)[0][0]
        adds = q("SELECT COALESCE(SUM(amount),0) FROM credit_ledger WHERE team_id=? AND job_id IS NULL", tid)[0][0]
        holds = q("SELECT COALESCE(SUM(amount),0) FROM credit_holds WHERE team_id=?", tid)[0][0]
        open_held = q("SELECT COALESCE(SUM(credits_held),0) FROM jobs WHERE team_id=? AND status IN ('pending','in_progress')", tid)[0][0]
        if used != charges:
            problems.append(f"{tid}: credits_used {used} != ledger charges {charges}")
        if alloc != adds:
            problems.append(f"{tid}: credits_allocated {alloc} != ledger additions {adds}")
        if held != holds or held != open_held:
            problems.append(f"{tid}: credits_held {held}, holds {holds}, open jobs' holds {open_held}")
        running = 0
        balance = 0
        for entry_id, amount, after in q("SELECT entry_id, amount, balance_after FROM credit_ledger WHERE team_id=? ORDER BY entry_id", tid):
            balance += amount
            if balance != after:
                problems.append(f"{tid}: ledger entry {entry_id} balance_after {after} != running sum {balance}")
                balance = after
        for job_id, status, jheld, charged, meta, jtype, err in q(
                "SELECT job_id, status, credits_held, credits_charged, metadata, job_type, error_message FROM jobs WHERE team_id=?", tid):
            ledger = q("SELECT amount FROM credit_ledger WHERE job_id=?", job_id)
            hold = q("SELECT amount FROM credit_holds WHERE job_id=?", job_id)
            calls = q("SELECT status, prompt_tokens, completion_tokens, error FROM llm_calls WHERE job_id=?", job_id)
            run = [c for c in calls if c[0] == "running"]
            if status == "completed":
                if charged != jheld or ledger != [(-jheld,)]:
                    problems.append(f"{tid}: completed job {job_id} charged {charged} held {jheld} ledger {ledger}")
            elif status == "failed":
                if charged != 0 or ledger:
                    problems.append(f"{tid}: failed job {job_id} charged {charged} ledger {ledger}")
            if status in ("completed", "failed"):
                if hold:
                    problems.append(f"{tid}: finished job {job_id} still has hold {hold}")
                if run:
                    problems.append(f"{tid}: finished job {job_id} ({status}) has running calls")
            else:
                if hold != [(jheld,)]:
                    problems.append(f"{tid}: open job {job_id} hold {hold} vs held {jheld}")
                if status == "in_progress" and not run:
                    problems.append(f"{tid}: job {job_id} in_progress with no running call ({jtype} {err})")
                if status == "pending" and calls:
                    problems.append(f"{tid}: job {job_id} pending with calls")
            if run:
                problems.append(f"{tid}: job {job_id} ({status}) has {len(run)} running calls after settle")
            if json.loads(meta).get("implicit") is True and jtype == "chat.completions":
                if len(calls) != 1:
                    problems.append(f"{tid}: own job {job_id} has {len(calls)} calls")
                elif status in ("completed", "failed"):
                    cs, pt, ct, cerr = calls[0]
                    spent = cs == "cancelled" and ct > 0 and cerr != "cut short: the gateway shut down"
                    expect = "completed" if cs == "success" or spent else "failed"
                    if expect != status and not (cerr or "").startswith("interrupted"):
                        problems.append(f"{tid}: own job {job_id} {status} but call {cs} ct={ct} err={cerr!r} (expected {expect})")
    # fake upstream answers vs records
    by_call: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in fake_log:
        md = (e.get("body") or {}).get("metadata") or {}
        cid = md.get("tollgate_call_id")
        if cid:
            by_call[cid].append(e)
    rows = {r[0]: r for r in q("SELECT call_id, status, model, prompt_tokens, completion_tokens, usage_estimated, job_id, error, streamed FROM llm_calls")}
    for cid, entries in by_call.items():
        row = rows.get(cid)
        if row is None:
            problems.append(f"call {cid}: upstream saw it ({[e['model'] for e in entries]}) but no llm_calls row")
            continue
        _, status, model, pt, ct, est, job, err, streamed = row
        answered = [e for e in entries if e.get("usage") and e.get("finished") and not e.get("disconnected")]
        if status == "success":
            match = [e for e in answered if e["model"] == model]
            if not match:
                problems.append(f"call {cid}: success on {model} but upstream has no full answer from it")
            elif not est and (pt, ct) != (match[-1]["usage"]["prompt_tokens"], match[-1]["usage"]["completion_tokens"]):
                problems.append(f"call {cid}: tokens {pt}/{ct} != upstream usage {match[-1]['usage']}")
            elif est and None not in match[-1]["usage"].values():
                problems.append(f"call {cid}: success but usage estimated")
            elif est and any(given is not None and given != recorded for given, recorded in zip(
                    (match[-1]["usage"]["prompt_tokens"], match[-1]["usage"]["completion_tokens"]), (pt, ct))):
                problems.append(f"call {cid}: tokens {pt}/{ct} lost a count of upstream usage {match[-1]['usage']}")
        for e in answered:
            if e["model"].startswith("hang") or (err or "").startswith("interrupted"):
                continue
            # the upstream answered in full; was it recorded with that usage?
            if status != "success" and not est and (pt, ct) != (e["usage"]["prompt_tokens"], e["usage"]["completion_tokens"]):
                problems.append(f"call {cid}: {status} tokens {pt}/{ct} vs upstream's full answer {e['usage']}")
    # client-side expectations
    for ev in EVENTS:
        if ev.get("status") == 200 and ev["kind"] in ("v1", "v1-stream") and ev.get("job"):
            st = q("SELECT status, credits_charged FROM jobs WHERE job_id=?", ev["job"])
            if ev["kind"] == "v1" or ev.get("done"):
                if not st or st[0][0] != "completed":
                    problems.append(f"own job {ev['job']} answered in full ({ev['kind']}) but is {st}")
        if ev.get("kind") == "complete":
            st = q("SELECT status FROM jobs WHERE job_id=?", ev["job"])
            if st[0][0] != ev["status"]:
                problems.append(f"job {ev['job']} completed as {ev['status']} (200) but is {st[0][0]}")
    # API views
    with httpx.Client(base_url=tg_url, timeout=30) as http:
        for t in teams:
            r = http.get(f"/api/teams/{t.team_id}", headers={"Authorization": f"Bearer {t.key}"})
            if r.status_code != 200:
                problems.append(f"GET team {t.team_id}: {r.status_code}")
                continue
            team = r.json()
            (alloc, used, held), = q("SELECT credits_allocated, credits_used, credits_held FROM teams WHERE team_id=?", t.team_id)
            if (team["credits_allocated"], team["credits_used"], team["credits_held"]) != (alloc, used, held):
                problems.append(f"API team {t.team_id} {team} vs db {(alloc, used, held)}")
            if team["credits_available"] != alloc - used - held or team["credits_remaining"] != alloc - used:
                problems.append(f"API team {t.team_id} remaining/available wrong {team}")
            # The job lists' totals, counted on the team's row as jobs are made and end (schema 7).
            for status in (None, "pending", "in_progress", "completed", "failed"):
                r = http.get(f"/api/teams/{t.team_id}/jobs", params={"limit": 1, **({"status": status} if status else {})},
                             headers={"Authorization": f"Bearer {t.key}"})
                where = "team_id=?" + (" AND status=?" if status else "")
                counted = q(f"SELECT COUNT(*) FROM jobs WHERE {where}", t.team_id, *([status] if status else []))[0][0]
                if r.status_code != 200 or r.json()["total"] != counted:
                    problems.append(f"API team {t.team_id} jobs total ({status}): {r.status_code} {r.text[:200]} vs db {counted}")
            for (job_id,) in q("SELECT job_id FROM jobs WHERE team_id=?", t.team_id):
                r = http.get(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {t.key}"})
                if r.status_code != 200:
                    problems.append(f"GET job {job_id}: {r.status_code} {r.text[:200]}")
                    continue
                j = r.json()
                c, calls = j["costs"], j["calls"]
                if c["total_calls"] != len(calls) or c["total_tokens"] != sum(x["total_tokens"] for x in calls) \
                        or abs(c["total_cost_usd"] - sum(x["cost_usd"] for x in calls)) > 1e-9 \
                        or c["successful_calls"] != sum(x["status"] == "success" for x in calls) \
                        or c["failed_calls"] != sum(x["status"] in ("error", "cancelled") for x in calls):
                    problems.append(f"job {job_id}: costs {c} disagree with calls")
                if j["status"] == "completed" and (not c["credit_applied"] or c["credits_charged"] <= 0):
                    problems.append(f"job {job_id}: completed but costs {c}")
                if j["status"] == "failed" and (c["credit_applied"] or c["credits_charged"]):
                    problems.append(f"job {job_id}: failed but costs {c}")
    return problems


def check_metrics(db: Path, teams: list[Team], tg_url: str) -> list[str]:
    problems = []
    text = httpx.get(f"{tg_url}/metrics").text
    counts: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        if line.startswith("tollgate_jobs_total{"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            counts[(labels["team"].strip('"'), labels["status"].strip('"'))] = int(float(line.rsplit(" ", 1)[1]))
    for t in teams:
        db_counts = dict(db_rows(db, "SELECT status, COUNT(*) FROM jobs WHERE team_id=? GROUP BY status", (t.team_id,)))
        total = sum(db_counts.values())
        for status in ("completed", "failed"):
            if counts[(t.team_id, status)] != db_counts.get(status, 0):
                problems.append(f"metrics {t.team_id} {status}: {counts[(t.team_id, status)]} vs db {db_counts.get(status, 0)}")
        if counts[(t.team_id, "created")] != total:
            problems.append(f"metrics {t.team_id} created: {counts[(t.team_id, 'created')]} vs db {total}")
    return problems


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--teams", type=int, default=3)
    parser.add_argument("--no-restarts", action="store_true")
    parser.add_argument("--litellm", action="store_true")
    parser.add_argument("--tg-workers", type=int, default=1)
    args = parser.parse_args()
    print("seed", args.seed, flush=True)
    rng = random.Random(args.seed)
    print(f"files in {WORK}", flush=True)
    fake = start_fake()
    litellm_proc = None
    upstream, upkey = f"http://127.0.0.1:{FAKE_PORT}", "sk-fake"
    if args.litellm:
        del GROUPS["HalfUsage"]
        GROUP_WEIGHTS.remove(("HalfUsage", 1))
        from tests.support import litellm_config
        import yaml
        from proxy.demo import start_litellm
        cfg = litellm_config(upstream)
        (WORK / "litellm.yaml").write_text(yaml.safe_dump(cfg))
        upkey = "sk-litellm-probe"
        litellm_proc = start_litellm(WORK / "litellm.yaml", LITELLM_PORT, upkey, open(WORK / "litellm.log", "wb"))
        wait_until_up(f"http://127.0.0.1:{LITELLM_PORT}/health/liveliness", 180, litellm_proc)
        upstream = f"http://127.0.0.1:{LITELLM_PORT}"
    tg = make_tollgate(upstream, upkey, args.tg_workers)
    tg.start()
    try:
        admin = httpx.AsyncClient(base_url=tg.url, headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)
        teams = []
        for i in range(args.teams):
            org = f"org-{uuid.uuid4().hex[:6]}"
            tid = f"team-{i}-{uuid.uuid4().hex[:6]}"
            (await admin.post("/admin/organizations", json={"organization_id": org, "name": org})).raise_for_status()
            (await admin.post("/admin/teams", json={"team_id": tid, "organization_id": org, "model_groups": list(GROUPS),
                                                    "credits_allocated": rng.choice([30, 60, 100]),
                                                    "credits_per_job": rng.choice([1, 2, 3])})).raise_for_status()
            ka = (await admin.post(f"/admin/teams/{tid}/keys", json={"name": "a"})).json()
            kb = (await admin.post(f"/admin/teams/{tid}/keys", json={"name": "b"})).json()
            teams.append(Team(tid, ka["key"], kb["key"], kb["key_id"]))
        deadline = time.monotonic() + args.seconds
        tasks = [worker(t, random.Random(rng.random()), admin, deadline) for t in teams for _ in range(args.workers)]
        tasks.append(controller(tg, rng, teams, admin, args.seconds, not args.no_restarts))
        await asyncio.gather(*tasks)
        print("load over; settling", flush=True)
        # settle: wait for running calls to end; then for expiry (45 s) and the sweeper
        await asyncio.sleep(2)
        for _ in range(120):
            open_jobs = db_rows(tg.database, "SELECT COUNT(*) FROM jobs WHERE status IN ('pending','in_progress')")[0][0]
            running = db_rows(tg.database, "SELECT COUNT(*) FROM llm_calls WHERE status='running'")[0][0]
            if not open_jobs and not running:
                break
            await asyncio.sleep(1)
        print("open jobs", open_jobs, "running", running, flush=True)
        fake_log = httpx.get(f"http://127.0.0.1:{FAKE_PORT}/_log").json()
        problems = check(tg.database, teams, fake_log, tg.url)
        if args.no_restarts:
            problems += check_metrics(tg.database, teams, tg.url)
        print("statuses:")
        for (k, s), n in sorted(STATUS_LOG.items()):
            print(f"  {k:16} {s}: {n}")
        print("5xx:", len(FIVE_HUNDREDS))
        for line in FIVE_HUNDREDS[:20]:
            print("  ", line)
        print("problems:", len(problems))
        for p in problems[:60]:
            print("  ", p)
        logs = "".join(p.read_text(errors="replace") for p in WORK.glob("probe.log*"))
        for line in logs.splitlines():
            if " status=500" in line or "Traceback" in line or "ERROR" in line:
                print("LOG:", line[:300])
        if "Traceback" in tg.log():
            print("tracebacks in tollgate log: yes")
    finally:
        tg.stop()
        if litellm_proc:
            stop_process(litellm_proc)
        stop_process(fake)


if __name__ == "__main__":
    asyncio.run(main())
