"""Chaos reconciliation: a few hundred concurrent operations of one team (jobs created, called,
completed, failed and abandoned; /v1 calls with and without a job; streams and plain calls;
clients that hang up before the answer or mid-stream; models that fail first, fail mid-stream,
break or are slow; calls refused for their rate limits or the team's credits), then the books
are reconciled from the outside: the API, the database read directly, /metrics, and what the
fake upstream says it served.

The randomness is seeded; outcomes depend on timing, but every assertion is an invariant that
holds whatever the timing: no assertion on durations."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.calls import SHUT_DOWN
from proxy.store.sqlite import INTERRUPTED
from tests.support import PRICES as LITELLM_PRICES
from tests.support import LiteLLM, Tollgate, fake_log, fake_upstream, wait_for
from tests.test_operations import families, value

PRICES = {
    "primary": (1e-06, 2e-06),
    "backup": (3e-06, 4e-06),
    "error-later": (5e-06, 6e-06),
    "abort": (7e-06, 8e-06),
    "error-first": (9e-06, 1e-05),
    "fail-500": (1e-06, 1e-06),
    "fail-503": (1e-06, 1e-06),
    "fail-429": (1e-06, 1e-06),
}
# Groups straight on the fake upstream (no LiteLLM in between: its answers reach Tollgate as
# the fake sent them, so the fake's log is the exact account of what was served).
GROUPS = {
    "Main": ["primary", "backup"],
    "Fallback500": ["fail-500", "backup"],
    "Fallback429": ["fail-429", "backup"],
    "ErrorFirst": ["error-first", "backup"],
    "ErrorLater": ["error-later", "backup"],
    "Abort": ["abort", "backup"],
    "AllFail": ["fail-500", "fail-503"],
}
# Through a real LiteLLM (the deployment's topology): the models it serves (tests/support.py),
# priced by LiteLLM itself.
LITELLM_GROUPS = {
    "Main": ["primary", "backup"],
    "Fallback500": ["fail-500", "backup"],
    "Fallback429": ["fail-429", "backup"],
    "Fallback503": ["fail-503", "backup"],
    "Garbage": ["garbage"],
    "Abort": ["abort"],
    "AllFail": ["fail-500", "fail-503"],
}
WEIGHTS = [8, 2, 2, 2, 2, 2, 1]
CREDITS = 140
CREDITS_PER_JOB = 2  # the team's own: the gateway's default is 1
NEW_CREDITS_PER_JOB = 3  # set by the admin while the operations run: jobs open then keep their price
TOPUPS = (30, 40)  # added by the admin while the operations run
RPM = 330
TPM = 24_000
OPERATIONS = 200
CONCURRENCY = 40


def estimate(chars: int) -> int:
    return math.ceil(chars / 4)


def gave_up(record: dict[str, Any]) -> bool:
    """Whether the call's deadline ran out (a loaded machine): the gateway stopped waiting."""
    error = record["error"] or ""
    return "timed out" in error or "longer than the gateway allows" in error


def content_chars(data: str) -> int:
    try:
        chunk = json.loads(data)
    except ValueError:
        return 0
    if not isinstance(chunk, dict):
        return 0
    return sum(len((c.get("delta") or {}).get("content") or "") for c in chunk.get("choices") or [])


class Chaos:
    def __init__(self, server: Tollgate, key: str, team_id: str, label: str, seed: int, restart: str | None = None,
                 groups: dict[str, list[str]] = GROUPS) -> None:
        self.server = server
        self.groups = groups
        self.restart = restart  # None, "term" (SIGTERM) or "kill" (SIGKILL) mid-run, then start again
        self.key = key
        self.team_id = team_id
        self.label = label
        self.seed = seed
        self.rng = random.Random(seed)  # the run's own draws; each operation has its own
        self.http: httpx.AsyncClient
        # What the clients saw.
        self.calls: list[dict[str, Any]] = []  # one per call request sent
        self.jobs: dict[str, dict[str, Any]] = {}  # job API jobs created
        self.refused_jobs = 0
        self.lost_creates = 0  # created perhaps, the answer lost to a restart
        self.topped_up = 0

    # --- one call ----------------------------------------------------------------------------

    def call_plan(self, rng: random.Random) -> dict[str, Any]:
        group = rng.choices(list(self.groups), weights=WEIGHTS)[0]
        stream = rng.random() < 0.6
        behaviour = rng.choices(["read", "hangup_before", "hangup_mid", "slow"], weights=[6, 2, 3 if stream else 0, 2])[0]
        chunks = rng.randint(1, 12)
        words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(1, 20)))
        nonce = f"n{len(self.calls)}x{rng.randint(0, 10**9)}"  # finds the call in the upstream's log
        text = f"{nonce} {words} [chunks={chunks}] [tag={self.label}]"
        if behaviour == "slow" or behaviour == "hangup_mid":
            text += f" [delay_ms={rng.choice([20, 40, 80])}]"
        if behaviour == "hangup_before":
            text += " [first_byte_ms=4000]"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
        roll = rng.random()
        if roll < 0.03:
            body["max_tokens"] = 10**6  # can never fit the team's TPM
        elif roll < 0.6:
            body["max_tokens"] = rng.randint(4, 400)
        return {
            "group": group, "stream": stream, "behaviour": behaviour, "body": body,
            "hangup_after_s": rng.uniform(0.02, 0.6), "hangup_after_lines": rng.randint(1, 8),
            "prompt_chars": len(text), "nonce": nonce,
        }

    async def call(self, rng: random.Random, route: str, job_id: str | None = None) -> dict[str, Any]:
        """`route`: 'api' (the job's llm-call endpoints) or 'v1' (with X-Job-Id if job_id)."""
        plan = self.call_plan(rng)
        body = dict(plan["body"])
        headers: dict[str, str] = {}
        if route == "api":
            body["model_group"] = plan["group"]
            path = f"/api/jobs/{job_id}/llm-call-stream" if plan["stream"] else f"/api/jobs/{job_id}/llm-call"
        else:
            body["model"] = plan["group"]
            path = "/v1/chat/completions"
            if plan["stream"]:
                body["stream"] = True
                if rng.random() < 0.5:
                    body["stream_options"] = {"include_usage": True}
            if job_id is not None:
                headers["X-Job-Id"] = job_id
        seen: dict[str, Any] = {
            "route": route, "job_id": job_id, "plan": plan, "status": None, "call_id": None,
            "own_job": route == "v1" and job_id is None, "complete": False, "hung_up": False,
            "detail": None,
        }
        self.calls.append(seen)

        async def run() -> None:
            async with self.http.stream("POST", path, json=body, headers=headers) as response:
                seen["status"] = response.status_code
                seen["call_id"] = response.headers.get("x-call-id")
                seen["response_job_id"] = response.headers.get("x-job-id")
                if response.status_code != 200 or not plan["stream"]:
                    raw = await response.aread()
                    seen["complete"] = True
                    try:
                        seen["detail"] = json.loads(raw)
                    except ValueError:
                        seen["detail"] = raw.decode(errors="replace")
                    return
                if plan["behaviour"] == "hangup_mid":
                    lines = 0
                    seen["received_chars"] = 0  # generated text the client had when it hung up
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            lines += 1
                            seen["received_chars"] += content_chars(line[len("data: "):])
                            if lines >= plan["hangup_after_lines"]:
                                seen["hung_up"] = True
                                return  # leaving the block closes the connection
                    seen["complete"] = True
                    return
                seen["text"] = (await response.aread()).decode()
                seen["complete"] = True

        try:
            if plan["behaviour"] == "hangup_before":
                try:
                    await asyncio.wait_for(run(), plan["hangup_after_s"])
                except TimeoutError:
                    seen["hung_up"] = True
            else:
                await run()
        except httpx.TransportError as exc:
            # The gateway went away under it (a restart): as a hang-up, from the client's side.
            assert self.restart, repr(exc)
            seen["transport_error"] = repr(exc)
            seen["hung_up"] = not isinstance(exc, httpx.ConnectError)  # a refused connection sent nothing
        return seen

    async def request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response | None:
        """A request that is not a call, through a restart: one never sent (connection refused) is
        sent again; one whose answer was lost is sent again if that is safe, else None."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                assert self.restart, f"{method} {path}: {exc!r}"
                if not isinstance(exc, httpx.ConnectError) and not idempotent:
                    return None
                assert time.monotonic() < deadline, f"{method} {path}: {exc!r}"
                await asyncio.sleep(0.1)

    # --- operations --------------------------------------------------------------------------

    async def job_flow(self, name: str) -> None:
        # Each operation, and each of its calls, draws from a generator of its own: what it
        # does does not depend on how the operations interleave.
        rng = random.Random(name)
        numbered = iter(range(100))

        def call(route: str) -> Any:
            return self.call(random.Random(f"{name}/{next(numbered)}"), route, job_id)

        response = await self.request("POST", "/api/jobs/create", idempotent=False,
                                      json={"job_type": "chaos", "metadata": {"seed": 1}})
        if response is None:
            self.lost_creates += 1
            return
        if response.status_code == 403:
            self.refused_jobs += 1
            return
        assert response.status_code == 200, response.text
        job_id = response.json()["job_id"]
        job = self.jobs[job_id] = {"ending": None, "result": None, "calls": []}
        routes = ["api", "api", "v1"]
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
            if rng.random() < 0.25:
                # Two calls of the job at once.
                results = await asyncio.gather(call(rng.choice(routes)), call(rng.choice(routes)))
                job["calls"] += results
            else:
                job["calls"].append(await call(rng.choice(routes)))
        ending = rng.choices(["completed", "failed", "abandon", "race"], weights=[6, 2, 1, 2])[0]
        job["ending"] = ending
        if ending == "abandon":
            return
        if ending == "race":
            # Completing while a call may still run: a 409 for the completion, or for the call.
            ending = "completed"
            racing = asyncio.ensure_future(call("api"))
            await asyncio.sleep(rng.uniform(0, 0.05))
            first = await self.request("POST", f"/api/jobs/{job_id}/complete", idempotent=True, json={"status": ending})
            job["calls"].append(await racing)
            assert first is not None and first.status_code in (200, 409), first.text
        job["status_asked"] = ending
        result = await self.finish(job_id, ending)
        job["result"] = result
        if result.get("expired"):
            job["ending"] = "expired"  # the sweeper failed it first: its hold released, no charge
            return
        # The same status again: the same body, no new charge; the other one is a 409.
        again = await self.request("POST", f"/api/jobs/{job_id}/complete", idempotent=True, json={"status": ending})
        assert again is not None and again.status_code == 200 and again.json() == result, (again, result)
        other = "failed" if ending == "completed" else "completed"
        refused = await self.request("POST", f"/api/jobs/{job_id}/complete", idempotent=True, json={"status": other})
        assert refused is not None and refused.status_code == 409, refused.text
        late = await call("api")
        assert late["status"] in (409, 429) or (late["status"] is None and (late["hung_up"] or self.restart)), late

    async def finish(self, job_id: str, status: str) -> dict[str, Any]:
        """Complete the job, waiting out calls still being recorded (a hang-up's)."""
        deadline = time.monotonic() + 30
        while True:
            response = await self.request("POST", f"/api/jobs/{job_id}/complete", idempotent=True, json={"status": status})
            assert response is not None
            if response.status_code == 200:
                return response.json()
            assert response.status_code == 409, response.text
            if "still running" not in response.text:
                stored = await self.request("GET", f"/api/jobs/{job_id}", idempotent=True)
                assert stored is not None
                job = stored.json()
                assert job["status"] == "failed" and job["error_message"].startswith("expired"), (response.text, job)
                return {"expired": True, "job": job}
            assert time.monotonic() < deadline, f"job {job_id} kept a call running"
            await asyncio.sleep(0.05)

    async def v1_call(self, name: str) -> None:
        await self.call(random.Random(name), "v1")

    async def topup(self, amount: int) -> None:
        admin = httpx.AsyncClient(base_url=self.server.url, headers={"Authorization": f"Bearer {self.server.master_key}"})
        async with admin:
            response = await admin.post(f"/admin/teams/{self.team_id}/credits", json={"amount": amount, "reason": "top-up"})
            assert response.status_code == 200, response.text
        self.topped_up += amount

    async def reprice(self, credits_per_job: int) -> None:
        admin = httpx.AsyncClient(base_url=self.server.url, headers={"Authorization": f"Bearer {self.server.master_key}"})
        async with admin:
            response = await admin.patch(f"/admin/teams/{self.team_id}", json={"credits_per_job": credits_per_job})
            assert response.status_code == 200, response.text

    async def run(self) -> None:
        operations = [
            (self.job_flow if self.rng.random() < 0.55 else self.v1_call, f"{self.seed}/{number}")
            for number in range(OPERATIONS)
        ]
        semaphore = asyncio.Semaphore(CONCURRENCY)

        started = 0

        async def limited(operation: Any, name: str) -> None:
            nonlocal started
            async with semaphore:
                started += 1
                await operation(name)

        limits = httpx.Limits(max_connections=CONCURRENCY * 3, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=self.server.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60, limits=limits
        ) as self.http:
            tasks = [asyncio.ensure_future(limited(op, name)) for op, name in operations]
            for amount in TOPUPS:
                await asyncio.sleep(0.5)
                await self.topup(amount)
            await self.reprice(NEW_CREDITS_PER_JOB)
            if self.restart:
                # Mid-run: once half the operations have started, with plenty running.
                while started < OPERATIONS // 2:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(self.rng.uniform(0, 0.5))
                sig = signal.SIGKILL if self.restart == "kill" else signal.SIGTERM
                await asyncio.to_thread(self.server.stop, sig)
                await asyncio.to_thread(self.server.start)
            await asyncio.gather(*tasks)


def read_db(path: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {
            "team": dict(db.execute("SELECT * FROM teams").fetchone()),
            "jobs": {r["job_id"]: dict(r) for r in db.execute("SELECT * FROM jobs")},
            "calls": {r["call_id"]: dict(r) for r in db.execute("SELECT * FROM llm_calls")},
            "ledger": [dict(r) for r in db.execute("SELECT * FROM credit_ledger ORDER BY entry_id")],
            "holds": {r["job_id"]: dict(r) for r in db.execute("SELECT * FROM credit_holds")},
        }
    finally:
        db.close()


def check_books(state: dict[str, Any], initial: int, topped_up: int) -> None:
    """The credits, from the database alone."""
    team, jobs, ledger, holds = state["team"], state["jobs"], state["ledger"], state["holds"]
    completed = [j for j in jobs.values() if j["status"] == "completed"]
    open_jobs = [j for j in jobs.values() if j["status"] in ("pending", "in_progress")]
    assert team["credits_allocated"] == initial + topped_up
    # Every completed job charged exactly its price (the team's when it was created), once;
    # nothing else charged.
    for job in jobs.values():
        assert job["credits_held"] in (CREDITS_PER_JOB, NEW_CREDITS_PER_JOB), job
        expected = job["credits_held"] if job["status"] == "completed" else 0
        assert job["credits_charged"] == expected, job
    charges = [e for e in ledger if e["job_id"] is not None]
    assert Counter(e["job_id"] for e in charges) == Counter(j["job_id"] for j in completed)
    assert all(e["amount"] == -jobs[e["job_id"]]["credits_charged"] for e in charges)
    assert team["credits_used"] == sum(j["credits_charged"] for j in completed) == -sum(e["amount"] for e in charges)
    # Holds: exactly the open jobs', each its price.
    assert set(holds) == {j["job_id"] for j in open_jobs}
    assert all(h["amount"] == jobs[h["job_id"]]["credits_held"] for h in holds.values())
    assert team["credits_held"] == sum(j["credits_held"] for j in open_jobs)
    # The ledger sums to the balance, and each entry's balance_after follows from the ones before.
    assert sum(e["amount"] for e in ledger) == team["credits_allocated"] - team["credits_used"]
    running = 0
    for entry in ledger:
        running += entry["amount"]
        assert entry["balance_after"] == running, entry
    # Calls: none left running, each in a job of the team.
    for call in state["calls"].values():
        assert call["status"] in ("success", "error", "cancelled"), call
        assert call["job_id"] in jobs


def reconcile(chaos: Chaos, server: Tollgate, fake_url: str, team_id: str, key: str,
              prices: dict[str, tuple[float, float]]) -> dict[str, Any]:
    state = read_db(server.database)
    check_books(state, CREDITS, chaos.topped_up)
    jobs, calls = state["jobs"], state["calls"]
    client = server.client(key)

    # --- what the clients saw agrees with the records --------------------------------------
    by_call: dict[str, dict[str, Any]] = {}
    for seen in chaos.calls:
        status, call_id = seen["status"], seen["call_id"]
        if status in (429, 403) and call_id is None:
            # Refused before it started: no call, and no own job for a /v1 call.
            continue
        if status is None:
            continue  # hung up before the head: perhaps never admitted
        assert call_id is not None or status in (404, 409), seen
        if call_id is None:
            continue
        assert call_id not in by_call, f"call id {call_id} given twice"
        by_call[call_id] = seen
        record = calls.get(call_id)
        assert record is not None, f"the client got call {call_id} (HTTP {status}) that has no record"
        expected_job = seen["job_id"] or seen["response_job_id"]
        assert record["job_id"] == expected_job
        if status == 200 and seen["complete"] and not seen["plan"]["stream"]:
            assert record["status"] == "success", (seen, record)
        if status == 200 and seen["plan"]["stream"] and seen["complete"] and "[DONE]" in seen.get("text", ""):
            assert record["status"] == "success", (seen, record)
        if seen.get("received_chars") and record["error"] != INTERRUPTED:
            # It hung up with text in hand: at least that much was generated, and counted.
            assert record["status"] in ("cancelled", "success", "error"), record
            if record["usage_estimated"]:
                assert record["completion_tokens"] >= estimate(seen["received_chars"]), (seen, record)
            assert record["completion_tokens"] > 0, (seen, record)
        if seen["own_job"]:
            job = jobs[record["job_id"]]
            answered = status == 200 and seen["complete"] and (
                not seen["plan"]["stream"] or "[DONE]" in seen.get("text", "")
            )
            if answered or (
                seen.get("received_chars") and record["status"] == "cancelled" and record["error"] not in (SHUT_DOWN, INTERRUPTED)
            ):
                # The client had the answer, or hung up holding generated text: its job is charged.
                assert job["status"] == "completed" and job["credits_charged"] == job["credits_held"], (seen, record, job)
            if status in (503, 400):
                assert job["status"] == "failed" and job["credits_charged"] == 0, (seen, record, job)
        if status == 503:
            # A SIGTERM's grace ran out (`shutting_down` on /v1, the message on /api).
            cut = any(word in json.dumps(seen["detail"]) for word in ("shutting_down", "shutting down"))
            assert record["status"] == ("cancelled" if cut else "error"), (seen, record)
    # Refused calls of the client made no record; every record is a call some client got the id of,
    # or a call whose client hung up before it had the head.
    unknown = set(calls) - set(by_call)
    hung = sum(1 for s in chaos.calls if s["call_id"] is None and s["hung_up"])
    assert len(unknown) <= hung, unknown
    for call_id in unknown:
        # A restart may also lose an answer on its way, after the call's record.
        assert calls[call_id]["status"] == "cancelled" or chaos.restart, calls[call_id]

    # Jobs of the job API: what the client was told is what is stored.
    for job_id, seen_job in chaos.jobs.items():
        stored = jobs[job_id]
        if seen_job["ending"] in ("abandon", "expired") or seen_job["ending"] is None:
            # Left open (or its flow cut short by a call refused), perhaps expired since.
            expired = stored["status"] == "failed" and stored["error_message"].startswith("expired")
            assert stored["status"] in ("pending", "in_progress") or expired, stored
            if seen_job["ending"] == "expired":
                assert expired, stored
        else:
            assert stored["status"] == seen_job["status_asked"]
            result = seen_job["result"]
            assert result["costs"]["credits_charged"] == stored["credits_charged"]
            assert result["costs"]["credit_applied"] == (stored["status"] == "completed")
    # Own jobs of /v1 calls: one call each, charged exactly when the call succeeded or the
    # client hung up after tokens were generated.
    for job in jobs.values():
        if job["job_type"] != "chat.completions":
            continue
        (own,) = [c for c in calls.values() if c["job_id"] == job["job_id"]]
        spent = own["status"] == "success" or (
            own["status"] == "cancelled" and own["completion_tokens"] > 0 and own["error"] != SHUT_DOWN
        )
        assert job["status"] == ("completed" if spent else "failed"), (job, own)
    for seen in chaos.calls:
        if seen["own_job"] and seen["status"] in (403, 429):
            assert seen["response_job_id"] is None or seen["response_job_id"] not in jobs, seen

    # --- every call the upstream served has exactly one record with the right tokens -------
    served = fake_log(fake_url, chaos.label)
    attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_nonce = {s["plan"]["nonce"]: s for s in chaos.calls}
    unmapped = 0
    for entry in served:
        # Straight from Tollgate the request names its call; through LiteLLM, which does not
        # pass the metadata on, the client's nonce does, if the client learnt the call's id.
        call_id = (entry["body"].get("metadata") or {}).get("tollgate_call_id")
        if call_id is None:
            call_id = by_nonce[entry["body"]["messages"][0]["content"].split()[0]]["call_id"]
        if call_id is None:
            unmapped += 1
            continue
        attempts[call_id].append(entry)
    assert set(attempts) <= set(calls), "the upstream served calls that have no record"
    assert unmapped <= 2 * len(unknown), "requests the upstream served for calls nobody knows of"
    for call_id, record in calls.items():
        tried = attempts.get(call_id, [])
        group_models = chaos.groups[record["model_group"]]
        assert [e["model"] for e in tried] == group_models[: len(tried)], (record, tried)
        assert len(tried) <= record["attempts"] or record["error"] == INTERRUPTED, (record, tried)
        prompt_chars = len(tried[0]["body"]["messages"][0]["content"]) if tried else None
        answered = tried[-1] if tried else None
        if record["error"] == INTERRUPTED:
            # Closed by the sweeper after a crash: what the dead process knew is gone.
            assert chaos.restart == "kill" and record["status"] == "cancelled", record
        elif gave_up(record) and record["status"] == "error" and not record["usage_estimated"]:
            # The deadline ran out before any answer: nothing counted, whatever came after.
            assert record["prompt_tokens"] + record["completion_tokens"] == 0, record
        elif record["usage_estimated"]:
            assert record["status"] in ("cancelled", "error"), record
            if prompt_chars is not None:
                assert record["prompt_tokens"] == estimate(prompt_chars), (record, tried)
                assert record["completion_tokens"] <= estimate(answered["chars_sent"]), (record, answered)
            if record["status"] == "cancelled" and record["completion_tokens"] == 0:
                pass  # hung up before any text
        elif record["status"] == "error" and record["prompt_tokens"] + record["completion_tokens"] == 0:
            # Failed before any answer (every model failed): nothing was served.
            # Unless the gateway gave up waiting (its deadline): the upstream may have answered
            # after, and the call is recorded as failed with nothing counted (see the report).
            # Through LiteLLM, the provider's failure after some text reaches the gateway as
            # LiteLLM's error before any byte: LiteLLM, not the fake, is the gateway's upstream.
            assert gave_up(record) or chaos.groups is LITELLM_GROUPS or all(e["usage"] is None and not e["chars_sent"] for e in tried), (
                record, [{k: e[k] for k in ("model", "stream", "usage", "chars_sent", "finished", "disconnected")} for e in tried]
            )
        else:
            # Usage the upstream sent: exactly what it counted, from the model that answered.
            assert answered is not None and answered["usage"] is not None, (record, tried)
            assert record["model"] == answered["model"]
            assert record["prompt_tokens"] == answered["usage"]["prompt_tokens"], (record, answered)
            assert record["completion_tokens"] == answered["usage"]["completion_tokens"], (record, answered)
        if record["status"] == "success":
            assert not record["usage_estimated"], record
            assert answered is not None and answered["finished"] is not None
        # Its cost is its tokens at its model's price.
        if record["model"] in prices and record["prompt_tokens"] + record["completion_tokens"]:
            price_in, price_out = prices[record["model"]]
            cost = record["prompt_tokens"] * price_in + record["completion_tokens"] * price_out
            assert record["cost_usd"] == pytest.approx(cost, rel=1e-9, abs=1e-12), record
    # Every upstream answer with usage that reached a client whole is in a success record.
    for call_id, tried in attempts.items():
        for entry in tried[:-1]:
            assert entry["usage"] is None, ("a fallback after an answer", tried)

    # --- the API tells the same --------------------------------------------------------------
    team = client.get(f"/api/teams/{team_id}").json()
    db_team = state["team"]
    assert team["credits_allocated"] == db_team["credits_allocated"]
    assert team["credits_used"] == db_team["credits_used"]
    assert team["credits_held"] == db_team["credits_held"]
    assert team["credits_remaining"] == db_team["credits_allocated"] - db_team["credits_used"]
    assert team["credits_available"] == team["credits_remaining"] - team["credits_held"]
    listed: dict[str, Any] = {}
    offset = 0
    while True:
        page = client.get(f"/api/teams/{team_id}/jobs", params={"limit": 100, "offset": offset})
        assert page.status_code == 200, page.text
        items = page.json()["jobs"]
        for item in items:
            assert item["job_id"] not in listed
            listed[item["job_id"]] = item
        if len(items) < 100:
            break
        offset += 100
    assert set(listed) == set(jobs)
    for job_id, item in listed.items():
        own = [c for c in calls.values() if c["job_id"] == job_id]
        costs = item["costs"]
        assert item["status"] == jobs[job_id]["status"]
        assert costs["credits_charged"] == jobs[job_id]["credits_charged"]
        assert costs["total_calls"] == len(own)
        assert costs["prompt_tokens"] == sum(c["prompt_tokens"] for c in own)
        assert costs["completion_tokens"] == sum(c["completion_tokens"] for c in own)
        assert costs["successful_calls"] == sum(c["status"] == "success" for c in own)
    for job_id in list(jobs)[:: max(1, len(jobs) // 40)]:
        page = client.get(f"/api/jobs/{job_id}").json()
        assert sorted(c["call_id"] for c in page["calls"]) == sorted(c["call_id"] for c in calls.values() if c["job_id"] == job_id)
        for summary in page["calls"]:
            record = calls[summary["call_id"]]
            assert summary["total_tokens"] == record["prompt_tokens"] + record["completion_tokens"]
            assert summary["status"] == record["status"]

    outcome = Counter(s["status"] for s in chaos.calls)
    summary = {"calls": len(calls), "jobs": len(jobs), "statuses": dict(outcome), "refused_jobs": chaos.refused_jobs,
               "record_statuses": dict(Counter(c["status"] for c in calls.values())),
               "transport_errors": sum("transport_error" in s for s in chaos.calls), "lost_creates": chaos.lost_creates}
    if chaos.restart:
        return summary  # the counters started again with the process
    # --- /metrics agrees with the records ------------------------------------------------------
    fams = families(server)
    assert value(fams, "tollgate_tokens", type="prompt", team=team_id) == sum(c["prompt_tokens"] for c in calls.values())
    assert value(fams, "tollgate_tokens", type="completion", team=team_id) == sum(c["completion_tokens"] for c in calls.values())
    for status in ("success", "error", "cancelled"):
        assert value(fams, "tollgate_llm_calls", team=team_id, status=status) == sum(
            c["status"] == status for c in calls.values()
        ), status
    assert value(fams, "tollgate_cost_usd", team=team_id) == pytest.approx(sum(c["cost_usd"] for c in calls.values()), rel=1e-9)
    assert value(fams, "tollgate_jobs", team=team_id, status="created") == len(jobs)
    for status in ("completed", "failed"):
        assert value(fams, "tollgate_jobs", team=team_id, status=status) == sum(j["status"] == status for j in jobs.values())
    limited = sum(
        1 for s in chaos.calls
        if s["status"] == 429 and isinstance(s["detail"], dict) and "upstream" not in json.dumps(s["detail"])
    )
    # A client that hung up before its answer may have been refused without hearing of it.
    unheard = sum(1 for s in chaos.calls if s["status"] is None)
    assert limited <= value(fams, "tollgate_rate_limited", team=team_id) <= limited + unheard
    remaining = db_team["credits_allocated"] - db_team["credits_used"]
    assert wait_for(
        lambda: value(families(server), "tollgate_credits_remaining", suffix="", team=team_id) == remaining, timeout=15
    ), "tollgate_credits_remaining never showed the balance"
    return summary


def chaos_run(tmp_path: Path, fake_url: str, seed: int, *, workers: int = 1, restart: str | None = None,
              litellm: LiteLLM | None = None) -> None:
    seed += 1000 * int(os.environ.get("TOLLGATE_CHAOS_ROUND", "0"))  # other seeds, for a longer hunt
    groups = GROUPS if litellm is None else LITELLM_GROUPS
    prices = PRICES if litellm is None else LITELLM_PRICES
    sections: dict[str, Any] = {
        "model_groups": {name: {"models": models} for name, models in groups.items()},
        "upstream": {"timeouts": {"total": "10s" if litellm is None else "15s"}},
        # A call a killed process left running is closed 11 s after its start; jobs left open
        # expire after 5 s; a SIGTERM lets open calls run on for a second.
        "jobs": {"stale_call_margin": "1s", "expire_after": "5s"},
        "server": {"shutdown_grace": "1s"},
    }
    if litellm is None:
        sections["pricing"] = {m: {"input_cost_per_token": p[0], "output_cost_per_token": p[1]} for m, p in PRICES.items()}
        server = Tollgate(tmp_path, fake_url, "sk-upstream-chaos", workers=workers, **sections)
    else:
        server = Tollgate(tmp_path, litellm.url, litellm.master_key, workers=workers, **sections)
    server.start()
    try:
        team = server.admin().team(
            credits=CREDITS, groups=tuple(groups), rpm_limit=RPM, tpm_limit=TPM, credits_per_job=CREDITS_PER_JOB
        )
        chaos = Chaos(server, team.key, team.team_id, f"chaos{seed}x{uuid.uuid4().hex[:8]}", seed, restart, groups)
        asyncio.run(chaos.run())

        # The calls whose clients hung up are recorded a moment later, and the jobs left open
        # expire (their holds released) soon after.
        def settled() -> bool:
            state = read_db(server.database)
            return all(c["status"] != "running" for c in state["calls"].values()) and all(
                j["status"] in ("completed", "failed") for j in state["jobs"].values()
            )

        assert wait_for(settled, timeout=40, interval=0.2), "calls left running or jobs left open"
        summary = reconcile(chaos, server, fake_url, team.team_id, team.key, prices)
        print(f"seed {seed}: {summary}")
        # A restart changes nothing in the books.
        server.stop()
        server.start()
        check_books(read_db(server.database), CREDITS, chaos.topped_up)
        books = server.client(team.key).get(f"/api/teams/{team.team_id}").json()
        assert books["credits_remaining"] - books["credits_held"] == books["credits_available"]
    finally:
        server.stop()


@pytest.mark.parametrize("seed, workers, restart", [(1, 2, None), (2, 1, "kill")])
def test_chaos_straight_to_the_upstream_reconciles(tmp_path, seed, workers, restart):
    with fake_upstream(tmp_path) as fake_url:
        chaos_run(tmp_path, fake_url, seed, workers=workers, restart=restart)


def test_chaos_through_litellm_reconciles(tmp_path, litellm, fake_url):
    chaos_run(tmp_path, fake_url, 3, litellm=litellm, restart="term")
