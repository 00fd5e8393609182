"""Jobs: creation holds credits, completion charges exactly once, failure releases the hold."""

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import requests

from proxy import jobs_api
from proxy.records import iso
from proxy.store import CallInProgress
from tests.support import tag, wait_for

ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
HELLO = [{"role": "user", "content": "hello there"}]


def create(client, **body):
    response = client.post("/api/jobs/create", json={"job_type": "test", **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_create_job_returns_id_status_and_timestamp(tollgate, team):
    job = create(tollgate.client(team.key), team_id=team.team_id, user_id="u1", metadata={"a": 1})
    assert set(job) == {"job_id", "status", "created_at"}
    assert job["status"] == "pending"
    assert re.match(ISO, job["created_at"])


def test_a_job_is_read_with_the_user_id_it_was_created_with(tollgate, team):
    client = tollgate.client(team.key)
    job_id = create(client, user_id="u1")["job_id"]
    assert client.get(f"/api/jobs/{job_id}").json()["user_id"] == "u1"


def test_create_job_for_another_team_is_403(tollgate, team):
    response = tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "t", "team_id": "someone-else"})
    assert response.status_code == 403


def test_create_job_holds_credits_per_job(tollgate, admin, team):
    create(tollgate.client(team.key))
    body = admin.get_team(team.team_id)
    assert (body["credits_held"], body["credits_available"], body["credits_remaining"]) == (1, 9, 10)


def test_a_teams_own_credits_per_job_is_held_at_creation_and_charged_once_at_completion(tollgate, admin):
    team = admin.team(credits=10, credits_per_job=3)
    client = tollgate.client(team.key)
    job = create(client)
    assert admin.get_team(team.team_id)["credits_held"] == 3
    costs = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()["costs"]
    assert (costs["credits_charged"], costs["credits_remaining"]) == (3, 7)
    after = admin.get_team(team.team_id)
    assert (after["credits_used"], after["credits_held"], after["credits_available"]) == (3, 0, 7)


def test_a_team_without_its_own_credits_per_job_holds_the_configured_default(make_tollgate):
    server = make_tollgate(jobs={"credits_per_job": 3})
    admin = server.admin()
    team = admin.team(credits=10)
    client = server.client(team.key)
    job = create(client)
    assert admin.get_team(team.team_id)["credits_held"] == 3
    done = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()
    assert (done["costs"]["credits_charged"], done["costs"]["credits_remaining"]) == (3, 7)


def test_job_goes_in_progress_with_its_first_call(tollgate, team):
    client = tollgate.client(team.key)
    job = create(client)
    client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": HELLO}).raise_for_status()
    assert client.get(f"/api/jobs/{job['job_id']}").json()["status"] == "in_progress"


def test_get_job_shows_running_totals_and_calls(tollgate, team):
    client = tollgate.client(team.key)
    job = create(client, metadata={"doc": 7})
    client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": HELLO, "purpose": "p1"}).raise_for_status()
    body = client.get(f"/api/jobs/{job['job_id']}").json()
    assert body["team_id"] == team.team_id and body["job_type"] == "test" and body["metadata"] == {"doc": 7}
    assert body["completed_at"] is None
    assert body["costs"]["total_calls"] == 1 and body["costs"]["total_tokens"] == 7
    assert body["costs"]["credits_remaining"] == 10 and body["costs"]["credit_applied"] is False
    assert [(c["purpose"], c["status"], c["model"]) for c in body["calls"]] == [("p1", "success", "primary")]


def test_a_jobs_average_latency_is_its_calls_latency(tollgate, team):
    client = tollgate.client(team.key)
    job = create(client)
    slow = [{"role": "user", "content": "slow to start [first_byte_ms=200]"}]
    client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": slow}).raise_for_status()
    body = client.get(f"/api/jobs/{job['job_id']}").json()
    (call,) = body["calls"]
    assert call["latency_ms"] >= 200 and body["costs"]["avg_latency_ms"] == call["latency_ms"]


def test_a_running_call_counts_among_a_jobs_calls_but_neither_as_succeeded_nor_failed(tollgate, team):
    client = tollgate.client(team.key)
    job = create(client)
    body = {"messages": [{"role": "user", "content": "a [chunks=5] [delay_ms=200]"}]}
    with client.stream("POST", f"/api/jobs/{job['job_id']}/llm-call-stream", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        costs = client.get(f"/api/jobs/{job['job_id']}").json()["costs"]
        for _ in lines:
            pass
    assert (costs["total_calls"], costs["successful_calls"], costs["failed_calls"]) == (1, 0, 0)


def test_times_are_written_in_utc_to_the_millisecond_zeros_included():
    assert iso(86_400.007_9) == "1970-01-02T00:00:00.007Z"


def test_complete_charges_once_and_reports_costs(tollgate, admin, team):
    client = tollgate.client(team.key)
    job = create(client)
    client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": HELLO}).raise_for_status()
    body = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()
    assert body["status"] == "completed" and re.match(ISO, body["completed_at"])
    costs = body["costs"]
    assert costs["credit_applied"] is True and costs["credits_charged"] == 1 and costs["credits_remaining"] == 9
    assert (costs["total_calls"], costs["successful_calls"], costs["failed_calls"]) == (1, 1, 0)
    assert costs["total_cost_usd"] > 0 and isinstance(costs["avg_latency_ms"], int)
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"]) == (1, 0)
    ledger = admin.ok("GET", f"/admin/teams/{team.team_id}/ledger")
    assert [(e["amount"], e["job_id"], e["balance_after"]) for e in ledger][0] == (-1, job["job_id"], 9)


def test_a_jobs_costs_show_its_hold_while_it_is_open_and_none_once_finished(tollgate, team):
    client = tollgate.client(team.key)
    job_id = create(client)["job_id"]
    assert client.get(f"/api/jobs/{job_id}").json()["costs"]["credits_held"] == 1
    finished = client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).json()
    assert finished["costs"]["credits_held"] == 0


def test_a_jobs_costs_show_its_hold_while_it_is_in_progress(tollgate, team):
    # A call made in it moves it on from pending: it is open all the same, its credit still held.
    client = tollgate.client(team.key)
    job_id = create(client)["job_id"]
    call = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "hi"}]})
    assert call.status_code == 200, call.text
    job = client.get(f"/api/jobs/{job_id}").json()
    assert (job["status"], job["costs"]["credits_held"]) == ("in_progress", 1)


def test_the_completion_answers_the_documented_job_costs_and_calls(tollgate, team):
    # API.md's complete response: the job, its costs and its calls, every figure a number.
    client = tollgate.client(team.key)
    job = create(client)
    call = client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": HELLO, "purpose": "p1"}).json()
    body = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()
    assert set(body) >= {"job_id", "status", "created_at", "completed_at", "costs", "calls"}
    costs = body["costs"]
    assert set(costs) >= {
        "total_calls", "successful_calls", "failed_calls", "prompt_tokens", "completion_tokens", "total_tokens",
        "total_cost_usd", "avg_latency_ms", "credit_applied", "credits_charged", "credits_remaining",
    }
    assert all(value is not None for value in costs.values())
    assert costs["total_tokens"] == costs["prompt_tokens"] + costs["completion_tokens"] == call["metadata"]["tokens_used"]
    (listed,) = body["calls"]
    assert set(listed) >= {
        "call_id", "purpose", "model_group", "model", "total_tokens", "cost_usd", "latency_ms", "status", "error",
    }
    assert (listed["call_id"], listed["purpose"], listed["model_group"], listed["model"]) == (
        call["call_id"], "p1", "Main", "primary",
    )
    assert (listed["status"], listed["error"], listed["cost_usd"]) == ("success", None, call["metadata"]["cost_usd"])


def test_a_job_without_calls_reports_zeros_not_nulls(tollgate, team):
    # API.md: the numbers the client documentation formats or adds are never null.
    client = tollgate.client(team.key)
    job = create(client)
    for body in (client.get(f"/api/jobs/{job['job_id']}").json(),
                 client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()):
        costs = body["costs"]
        assert (costs["total_calls"], costs["total_tokens"], costs["total_cost_usd"], costs["avg_latency_ms"]) == (0, 0, 0, 0)
        assert body["calls"] == []


def test_a_job_belongs_to_its_team_not_to_the_key_that_created_it(tollgate, admin, team):
    # API.md: jobs belong to the team. Another key of the team reads, calls and completes it,
    # the key that created it revoked meanwhile.
    job = create(tollgate.client(team.key))
    other = admin.ok("POST", f"/admin/teams/{team.team_id}/keys", json={"name": "second"})["key"]
    admin.ok("DELETE", f"/admin/keys/{team.key_id}")
    client = tollgate.client(other)
    assert client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": HELLO}).status_code == 200
    assert client.get(f"/api/jobs/{job['job_id']}").json()["costs"]["total_calls"] == 1
    done = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})
    assert done.status_code == 200 and done.json()["costs"]["credits_charged"] == 1


def test_a_job_is_charged_the_credits_it_held_though_credits_per_job_changed_meanwhile(tollgate, admin):
    # The hold is what creating the job set aside for it (README's Decisions): the team's new
    # credits_per_job applies to the jobs created after the change.
    team = admin.team(credits=10)
    client = tollgate.client(team.key)
    before = create(client)
    admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"credits_per_job": 3})
    after = create(client)
    assert admin.get_team(team.team_id)["credits_held"] == 1 + 3
    charged = [
        client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()["costs"]["credits_charged"]
        for job in (before, after)
    ]
    assert charged == [1, 3]
    body = admin.get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"], body["credits_remaining"]) == (4, 0, 6)


def test_a_team_whose_credits_per_job_is_0_holds_and_pays_nothing(tollgate, admin):
    team = admin.team(credits=0, credits_per_job=0)
    client = tollgate.client(team.key)
    job = create(client)
    assert admin.get_team(team.team_id)["credits_held"] == 0
    costs = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()["costs"]
    assert (costs["credit_applied"], costs["credits_charged"], costs["credits_remaining"]) == (False, 0, 0)
    assert [e["amount"] for e in admin.ok("GET", f"/admin/teams/{team.team_id}/ledger")] == []


def test_repeating_the_same_completion_returns_the_same_body_without_charging(tollgate, admin, team):
    client = tollgate.client(team.key)
    job = create(client)
    first = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})
    other = create(tollgate.client(team.key))
    # The balance moves on meanwhile (a hold alone leaves credits_remaining as it was).
    client.post(f"/api/jobs/{other['job_id']}/complete", json={"status": "completed"}).raise_for_status()
    second = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})
    assert second.status_code == 200 and second.json() == first.json()
    assert first.json()["costs"]["credits_remaining"] == 9
    assert admin.get_team(team.team_id)["credits_used"] == 2


@pytest.mark.parametrize("first, then", [("completed", "failed"), ("failed", "completed")])
def test_the_other_terminal_status_afterwards_is_409(tollgate, admin, team, first, then):
    client = tollgate.client(team.key)
    job = create(client)
    client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": first}).raise_for_status()
    response = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": then})
    assert response.status_code == 409
    assert response.headers["x-should-retry"] == "false"
    assert f"already {first}" in response.json()["detail"]
    # A failed job is not charged by the completion refused afterwards.
    assert admin.get_team(team.team_id)["credits_used"] == (1 if first == "completed" else 0)


def test_repeating_a_failure_returns_the_same_body_and_charges_nothing(tollgate, admin, team):
    client = tollgate.client(team.key)
    job = create(client)
    first = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "failed", "error_message": "x"})
    second = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "failed", "error_message": "y"})
    assert (first.status_code, second.status_code) == (200, 200) and second.json() == first.json()
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"], team_now["credits_available"]) == (0, 0, 10)


def test_a_job_can_be_failed_with_an_empty_error_message(tollgate, team):
    client = tollgate.client(team.key)
    job_id = create(client)["job_id"]
    response = client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed", "error_message": ""})
    assert (response.status_code, response.json()["status"]) == (200, "failed")


def test_failed_job_releases_its_hold_and_charges_nothing(tollgate, admin, team):
    client = tollgate.client(team.key)
    job = create(client)
    body = client.post(
        f"/api/jobs/{job['job_id']}/complete", json={"status": "failed", "error_message": "gave up"}
    ).json()
    assert body["costs"]["credit_applied"] is False and body["costs"]["credits_charged"] == 0
    assert body["error_message"] == "gave up"
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"], team_now["credits_available"]) == (0, 0, 10)


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_calls_on_a_finished_job_are_409(tollgate, team, status):
    client = tollgate.client(team.key)
    job = create(client)
    client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": status}).raise_for_status()
    for route in ("llm-call", "llm-call-stream"):
        response = client.post(f"/api/jobs/{job['job_id']}/{route}", json={"messages": HELLO})
        assert response.status_code == 409, route
        assert response.headers["x-should-retry"] == "false"


def test_a_suspended_team_can_still_read_and_complete_its_jobs(tollgate, admin, team):
    # README's decision: a suspension stops new jobs and calls, not the books of open jobs.
    client = tollgate.client(team.key)
    job = create(client)
    admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"status": "suspended"})
    assert client.get(f"/api/jobs/{job['job_id']}").status_code == 200
    assert client.get(f"/api/teams/{team.team_id}").json()["status"] == "suspended"
    done = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})
    assert done.status_code == 200 and done.json()["costs"]["credits_charged"] == 1


def test_a_suspended_team_cannot_create_a_job(tollgate, admin, team):
    # README's decision: a suspension stops new jobs; no hold is taken for one refused.
    client = tollgate.client(team.key)
    admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"status": "suspended"})
    response = client.post("/api/jobs/create", json={"job_type": "test"})
    assert (response.status_code, response.json()["detail"]) == (403, f"Team '{team.team_id}' is suspended")
    assert admin.get_team(team.team_id)["credits_held"] == 0
    assert admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"] == []


def test_a_charge_while_other_jobs_hold_credits_leaves_credits_remaining_with_their_holds_not_taken_off(
    tollgate, admin, team
):
    # credits_remaining (and the ledger's balance_after) is allocated - used: holds are not spent.
    client = tollgate.client(team.key)
    job = create(client)
    create(client)
    costs = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).json()["costs"]
    assert (costs["credits_charged"], costs["credits_remaining"]) == (1, 9)
    (entry,) = admin.ok("GET", f"/admin/teams/{team.team_id}/ledger?limit=1")
    assert (entry["amount"], entry["job_id"], entry["balance_after"]) == (-1, job["job_id"], 9)


def test_team_with_two_credits_can_open_two_jobs_not_three(tollgate, admin):
    team = admin.team(credits=2)
    client = tollgate.client(team.key)
    first, _ = create(client), create(client)
    third = client.post("/api/jobs/create", json={"job_type": "t"})
    assert third.status_code == 403
    assert third.json()["detail"].startswith("Insufficient credits")
    client.post(f"/api/jobs/{first['job_id']}/complete", json={"status": "failed"}).raise_for_status()
    assert client.post("/api/jobs/create", json={"job_type": "t"}).status_code == 200


def test_a_team_that_cannot_pay_for_a_job_is_told_what_its_jobs_need(tollgate, admin):
    team = admin.team(credits=2, credits_per_job=3)
    response = tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "t"})
    assert response.status_code == 403
    assert response.json()["detail"] == (
        f"Insufficient credits: team '{team.team_id}' has 2 available (2 remaining, 0 held by open jobs); "
        "a job needs 3"
    )


def test_30_concurrent_completions_of_one_job_charge_once(tollgate, admin, team):
    job = create(tollgate.client(team.key))

    def complete(_):
        with tollgate.client(team.key) as client:
            return client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})

    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(complete, range(30)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert admin.get_team(team.team_id)["credits_used"] == 1
    assert len(admin.ok("GET", f"/admin/teams/{team.team_id}/ledger")) == 2  # allocation + one charge


def test_30_jobs_completed_concurrently_cost_exactly_30_credits(tollgate, admin):
    team = admin.team(credits=40)
    client = tollgate.client(team.key)
    jobs = [create(client)["job_id"] for _ in range(30)]

    def complete(job_id):
        with tollgate.client(team.key) as c:
            return c.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).status_code

    with ThreadPoolExecutor(30) as pool:
        assert set(pool.map(complete, jobs)) == {200}
    body = admin.get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"], body["credits_remaining"]) == (30, 0, 10)


def test_completing_while_a_call_is_running_is_409(tollgate, team):
    client = tollgate.client(team.key)
    job = create(client)
    url = f"{tollgate.url}/api/jobs/{job['job_id']}/llm-call-stream"
    body = {"messages": [{"role": "user", "content": f"slow [chunks=20] [delay_ms=100] [tag={tag()}]"}]}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {team.key}"}, timeout=30) as stream:
        lines = stream.iter_lines()  # one iterator: dropping it would close the connection
        next(lines)
        response = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})
        assert response.status_code == 409
        assert "still running" in response.json()["detail"]
        for _ in lines:
            pass
    assert client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"}).status_code == 200


def test_team_jobs_are_listed_newest_first_with_costs_and_filters(tollgate, team):
    client = tollgate.client(team.key)
    ids = [create(client)["job_id"] for _ in range(3)]
    client.post(f"/api/jobs/{ids[0]}/complete", json={"status": "failed"}).raise_for_status()
    page = client.get(f"/api/teams/{team.team_id}/jobs").json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1]
    assert all("costs" in j for j in page["jobs"])
    failed = client.get(f"/api/teams/{team.team_id}/jobs", params={"status": "failed"}).json()
    assert [j["job_id"] for j in failed["jobs"]] == [ids[0]]
    second = client.get(f"/api/teams/{team.team_id}/jobs", params={"limit": 1, "offset": 1}).json()
    assert [j["job_id"] for j in second["jobs"]] == [ids[1]] and second["total"] == 3


def test_a_page_of_the_teams_jobs_names_the_limit_and_offset_it_was_read_with(tollgate, team):
    client = tollgate.client(team.key)
    for _ in range(3):
        create(client)
    page = client.get(f"/api/teams/{team.team_id}/jobs", params={"limit": 2, "offset": 1}).json()
    assert (page["limit"], page["offset"], len(page["jobs"]), page["total"]) == (2, 1, 2, 3)


def test_a_page_of_the_teams_jobs_holds_50_jobs_unless_told_otherwise(tollgate, admin):
    team = admin.team(credits=51)
    client = tollgate.client(team.key)
    for _ in range(51):
        create(client)
    page = client.get(f"/api/teams/{team.team_id}/jobs").json()
    assert (len(page["jobs"]), page["limit"], page["total"]) == (50, 50, 51)


def test_a_page_of_the_teams_jobs_takes_a_limit_of_up_to_500(tollgate, team):
    client = tollgate.client(team.key)
    assert client.get(f"/api/teams/{team.team_id}/jobs", params={"limit": 500}).json()["limit"] == 500
    assert client.get(f"/api/teams/{team.team_id}/jobs", params={"limit": 501}).status_code == 422


def test_a_page_far_past_the_teams_last_job_is_empty(tollgate, team):
    client = tollgate.client(team.key)
    create(client)
    page = client.get(f"/api/teams/{team.team_id}/jobs", params={"offset": 10**9}).json()
    assert (page["jobs"], page["offset"], page["total"]) == ([], 10**9, 1)


def test_team_jobs_can_be_listed_in_progress_only(tollgate, team):
    client = tollgate.client(team.key)
    started, _ = create(client)["job_id"], create(client)["job_id"]
    client.post(f"/api/jobs/{started}/llm-call", json={"messages": HELLO}).raise_for_status()
    page = client.get(f"/api/teams/{team.team_id}/jobs", params={"status": "in_progress"}).json()
    assert [j["job_id"] for j in page["jobs"]] == [started]


def read_while(work, read, readers: int = 3) -> list:
    """Run `work` while `readers` threads call `read` over and over; what they returned."""
    done, seen = threading.Event(), []

    def keep_reading() -> None:
        while not done.is_set():
            seen.append(read())

    threads = [threading.Thread(target=keep_reading) for _ in range(readers)]
    for thread in threads:
        thread.start()
    try:
        work()
    finally:
        done.set()
        for thread in threads:
            thread.join()
    return seen


def test_a_job_read_while_its_calls_run_shows_costs_that_add_up_to_its_calls(tollgate, admin):
    # The costs and the calls of one body are of one moment: a call ending between two reads
    # showed in the calls but not in the costs.
    team = admin.team(rpm_limit=100_000, tpm_limit=100_000_000)
    client = tollgate.client(team.key)  # one for every thread: a client each took more time than its call
    job_id = create(client)["job_id"]

    def calls() -> None:
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda _: client.post(
                f"/api/jobs/{job_id}/llm-call", json={"messages": HELLO}).raise_for_status(), range(120)))

    def read() -> tuple:
        body = client.get(f"/api/jobs/{job_id}").json()
        costs, listed = body["costs"], body["calls"]
        return (
            (costs["total_calls"], costs["successful_calls"], costs["total_tokens"]),
            (len(listed), sum(c["status"] == "success" for c in listed), sum(c["total_tokens"] for c in listed)),
        )

    seen = read_while(calls, read)
    assert seen and [pair for pair in seen if pair[0] != pair[1]] == []


def test_a_page_of_the_teams_jobs_shows_the_balance_of_the_moment_its_jobs_were_read(tollgate, admin):
    # An open job shows the team's credits_remaining now: read after the jobs, it already took
    # the charge of a job the same page still showed open.
    team = admin.team(credits=60)
    client = tollgate.client(team.key)
    jobs = [create(client)["job_id"] for _ in range(40)]

    def completions() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job_id: client.post(
                f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status(), jobs))

    def read() -> tuple[int, set[int]]:
        page = client.get(f"/api/teams/{team.team_id}/jobs", params={"limit": 100}).json()["jobs"]
        charged = sum(job["costs"]["credits_charged"] for job in page)
        return 60 - charged, {job["costs"]["credits_remaining"] for job in page if job["status"] == "pending"}

    seen = read_while(completions, read)
    assert seen and [(balance, open_jobs) for balance, open_jobs in seen if open_jobs - {balance}] == []


def test_own_team_is_readable_with_the_documented_fields(tollgate, team):
    body = tollgate.client(team.key).get(f"/api/teams/{team.team_id}").json()
    assert set(body) >= {
        "team_id", "organization_id", "status", "credits_allocated", "credits_used", "credits_remaining",
        "credits_held", "credits_available", "model_groups", "default_model_group", "rpm_limit", "tpm_limit",
    }


def test_open_jobs_expire_and_release_their_holds(make_tollgate):
    server = make_tollgate(jobs={"expire_after": "1s", "sweep_interval": "0.2s"})
    admin = server.admin()
    team = admin.team(credits=1)
    client = server.client(team.key)
    job = create(client)
    assert admin.get_team(team.team_id)["credits_available"] == 0
    assert wait_for(lambda: client.get(f"/api/jobs/{job['job_id']}").json()["status"] == "failed", timeout=5)
    body = client.get(f"/api/jobs/{job['job_id']}").json()
    assert body["error_message"].startswith("expired")
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_held"], team_now["credits_used"], team_now["credits_available"]) == (0, 0, 1)


def past_its_expiry(make_tollgate):
    """A team, its client and a job of it past jobs.expire_after, which no sweep has failed yet
    (the sweeper ran at the start, and next runs an hour later)."""
    server = make_tollgate(jobs={"expire_after": "1s", "sweep_interval": "1h"})
    admin = server.admin()
    team = admin.team(credits=1)
    client = server.client(team.key)
    job_id = create(client)["job_id"]
    time.sleep(1.2)
    return admin, team, client, job_id


def test_a_call_on_a_job_past_its_expiry_is_409_before_any_sweep(make_tollgate):
    # Whether it was refused, or ran on a job the next sweep would fail (uncharged), hung on
    # when the sweep came: the job's expiry is its age, not the sweeper's round.
    admin, team, client, job_id = past_its_expiry(make_tollgate)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": HELLO})
    assert response.status_code == 409, response.text
    assert "expired" in response.json()["detail"]
    body = client.get(f"/api/jobs/{job_id}").json()
    assert (body["status"], body["costs"]["total_calls"]) == ("failed", 0)
    assert body["error_message"].startswith("expired")
    assert admin.get_team(team.team_id)["credits_held"] == 0


def test_completing_a_job_past_its_expiry_is_409_and_charges_nothing_before_any_sweep(make_tollgate):
    admin, team, client, job_id = past_its_expiry(make_tollgate)
    response = client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"})
    assert response.status_code == 409, response.text
    assert "expired" in response.json()["detail"]
    assert client.get(f"/api/jobs/{job_id}").json()["error_message"].startswith("expired")
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"], team_now["credits_available"]) == (0, 0, 1)


def test_failing_a_job_past_its_expiry_before_any_sweep_fails_it_as_asked(make_tollgate):
    # Only a `completed` completion past the expiry is refused (it would charge what the sweep
    # would not): a failure is what the sweep would have done, with the client's own message.
    admin, team, client, job_id = past_its_expiry(make_tollgate)
    response = client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed", "error_message": "gave up"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["error_message"], body["costs"]["credits_charged"]) == ("failed", "gave up", 0)
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"], team_now["credits_available"]) == (0, 0, 1)


def test_a_team_whose_credit_an_expired_job_not_swept_yet_holds_creates_a_job_at_once(make_tollgate):
    # The expired job's hold was due back at its expiry: it is failed now, as the sweep would fail it.
    admin, team, client, job_id = past_its_expiry(make_tollgate)
    created = client.post("/api/jobs/create", json={"job_type": "t"})
    assert created.status_code == 200, created.text
    body = client.get(f"/api/jobs/{job_id}").json()
    assert (body["status"], body["costs"]["credits_charged"]) == ("failed", 0)
    assert body["error_message"].startswith("expired")
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"], team_now["credits_available"]) == (0, 1, 0)
    assert [e["amount"] for e in admin.ok("GET", f"/admin/teams/{team.team_id}/ledger")] == [1]  # its allocation alone


def test_a_v1_call_without_a_job_is_served_at_once_with_the_credit_an_expired_job_not_swept_yet_holds(make_tollgate):
    admin, team, client, job_id = past_its_expiry(make_tollgate)
    response = client.post("/v1/chat/completions", json={"model": "Main", "messages": HELLO})
    assert response.status_code == 200, response.text
    body = client.get(f"/api/jobs/{job_id}").json()
    assert (body["status"], body["costs"]["credits_charged"], body["error_message"][:7]) == ("failed", 0, "expired")
    own = client.get(f"/api/jobs/{response.headers['x-job-id']}").json()
    assert (own["status"], own["costs"]["credits_charged"]) == ("completed", 1)
    team_now = admin.get_team(team.team_id)
    assert (team_now["credits_used"], team_now["credits_held"], team_now["credits_available"]) == (1, 0, 0)


def test_metadata_given_at_completion_is_merged_into_the_jobs(tollgate, team):
    client = tollgate.client(team.key)
    job = create(client, metadata={"doc": 7, "stage": "draft"})
    done = client.post(
        f"/api/jobs/{job['job_id']}/complete", json={"status": "completed", "metadata": {"stage": "final", "pages": 3}}
    )
    assert done.status_code == 200, done.text
    merged = {"doc": 7, "stage": "final", "pages": 3}
    assert done.json()["metadata"] == merged
    assert client.get(f"/api/jobs/{job['job_id']}").json()["metadata"] == merged


def test_a_client_job_cannot_carry_the_mark_of_a_v1_calls_own_job(tollgate, team):
    # Such a job would take one call only and could never be completed by its client.
    client = tollgate.client(team.key)
    response = client.post("/api/jobs/create", json={"job_type": "chat.completions", "metadata": {"implicit": True}})
    assert response.status_code == 422
    assert "reserved" in response.text
    assert create(client, job_type="other", metadata={"implicit": True})["status"] == "pending"


def test_a_client_job_whose_metadata_says_implicit_1_takes_more_than_one_call(tollgate, team):
    # Only `"implicit": true` marks a /v1 call's own job (and is refused at creation); a 1 there
    # is the client's own metadata, and its job takes as many calls as any other.
    client = tollgate.client(team.key)
    job = create(client, job_type="chat.completions", metadata={"implicit": 1})
    for _ in range(2):
        response = client.post(f"/api/jobs/{job['job_id']}/llm-call", json={"messages": HELLO})
        assert response.status_code == 200, response.text
    done = client.post(f"/api/jobs/{job['job_id']}/complete", json={"status": "completed"})
    assert done.status_code == 200 and done.json()["costs"]["total_calls"] == 2


def test_a_job_failed_the_moment_its_client_timed_out_on_a_stream_is_failed_not_409(tollgate, admin):
    # The client documentation's error handling: a call that times out, then the job marked failed
    # at once, the answer unread. The hang-up's record is a moment behind the completion: a 409
    # there (not to be retried) left the job open, holding its credit until it expired.
    team = admin.team(credits=100)
    headers = {"Authorization": f"Bearer {team.key}"}
    api = f"{tollgate.url}/api"
    body = {"messages": [{"role": "user", "content": "slow [chunks=5] [delay_ms=1000]"}]}
    with requests.Session() as session:
        for _ in range(25):
            job_id = session.post(f"{api}/jobs/create", headers=headers, json={"job_type": "t"}).json()["job_id"]
            try:
                requests.post(f"{api}/jobs/{job_id}/llm-call-stream", headers=headers, json=body, timeout=0.3)
            except (requests.exceptions.Timeout, requests.exceptions.ConnectionError):
                pass
            failed = session.post(f"{api}/jobs/{job_id}/complete", headers=headers, json={"status": "failed"})
            assert failed.status_code == 200, failed.text
    assert admin.get_team(team.team_id)["credits_held"] == 0


def test_a_completion_waits_the_whole_grace_for_a_call_of_its_job_to_end():
    # The retries back off, but not past the grace: a call ending late in it is still waited for.
    class CallEndingLate:
        def __init__(self, ends_at: float) -> None:
            self.ends_at = ends_at

        async def finish_job(self, *args: object, **kwargs: object) -> tuple[str, bool]:
            if asyncio.get_running_loop().time() < self.ends_at:
                raise CallInProgress("a call of the job is running")
            return "finished", True

    async def complete() -> object:
        ends_at = asyncio.get_running_loop().time() + 0.8 * jobs_api.CALL_END_GRACE
        config = SimpleNamespace(server=SimpleNamespace(max_body_bytes=1))
        api = jobs_api.JobsApi(CallEndingLate(ends_at), None, None, None, config)  # type: ignore[arg-type]
        return await api._finish_job("job", "completed", None, None)

    assert asyncio.run(complete()) == ("finished", True)
