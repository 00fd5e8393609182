"""LiteLLM's own response cache, which an operator may switch on, kept per team: a call is
answered from it only with an answer its own team's calls stored there.

LiteLLM keys that cache by the call's OpenAI parameters and `user`, which a client chooses, and
not by who calls (every call comes with Tollgate's key). Its fields that change the answer but
not the key (`litellm_system_prompt` here) would otherwise let one team store answers of its
making for another team's questions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import PRICES, LiteLLM, TeamKey, Tollgate, fake_log, litellm_proxy, sse_data, sse_json, tag


@pytest.fixture(scope="module")
def cached_litellm(tmp_path_factory: pytest.TempPathFactory, fake_url: str) -> Iterator[LiteLLM]:
    workdir = tmp_path_factory.mktemp("litellm-cache")
    settings = {"cache": True, "cache_params": {"type": "local"}}
    with litellm_proxy(workdir, fake_url, name="litellm-cached", settings=settings) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cached_litellm: LiteLLM) -> Iterator[Tollgate]:
    server = Tollgate(tmp_path_factory.mktemp("tollgate-cache"), cached_litellm.url, cached_litellm.master_key)
    yield server.start()
    server.stop()


def _ask(gateway: Tollgate, team: TeamKey, text: str, **fields: object) -> str:
    with gateway.client(team.key) as client:
        body = {"model": "Main", "messages": [{"role": "user", "content": text}], **fields}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_a_teams_repeated_call_is_answered_from_litellms_cache(gateway, fake_url):
    team = gateway.admin().team()
    label = tag()
    first = _ask(gateway, team, f"hi [tag={label}]")
    assert _ask(gateway, team, f"hi [tag={label}]") == first
    assert len(fake_log(fake_url, label)) == 1


def test_a_team_sending_another_teams_id_as_user_is_not_served_its_cached_answer(gateway, fake_url):
    admin = gateway.admin()
    owner, other = admin.team(), admin.team()
    label = tag()
    _ask(gateway, owner, f"hi [tag={label}]")  # `user` is the owner's team id: Tollgate sets it
    _ask(gateway, other, f"hi [tag={label}]", user=owner.team_id)
    assert len(fake_log(fake_url, label)) == 2


def test_an_answer_one_team_stored_is_not_served_to_another_for_its_question(gateway, fake_url):
    admin = gateway.admin()
    victim, poisoner = admin.team(), admin.team()
    label = tag()
    # LiteLLM rewrites the messages after it has keyed the call: the answer is to another question.
    poisoned = _ask(gateway, poisoner, f"hi [tag={label}]", user=victim.team_id, litellm_system_prompt="[chunks=7]")
    assert _ask(gateway, victim, f"hi [tag={label}]") != poisoned
    assert len(fake_log(fake_url, label)) == 2


# A call LiteLLM answers from its cache is a call as any other for Tollgate: recorded with the
# usage LiteLLM reports, priced, charged, limited and counted; only the model is not asked again.


def _job_call(gateway: Tollgate, team: TeamKey, job_id: str, text: str, route: str = "llm-call") -> httpx.Response:
    with gateway.client(team.key) as client:
        body = {"model_group": "Main", "messages": [{"role": "user", "content": text}]}
        response = client.post(f"/api/jobs/{job_id}/{route}", json=body)
    assert response.status_code == 200, response.text
    return response


def _new_job(gateway: Tollgate, team: TeamKey) -> str:
    with gateway.client(team.key) as client:
        return client.post("/api/jobs/create", json={"job_type": "cached"}).json()["job_id"]


def _calls(gateway: Tollgate, team: TeamKey, job_id: str) -> list[dict[str, Any]]:
    with gateway.client(team.key) as client:
        return client.get(f"/api/jobs/{job_id}").json()["calls"]


def _metric(gateway: Tollgate, family: str, suffix: str = "_total", **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text) if f.name == family
        for s in f.samples
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_call_answered_from_litellms_cache_is_recorded_with_its_usage_and_priced_per_token(gateway, fake_url):
    team = gateway.admin().team()
    job_id, label = _new_job(gateway, team), tag()
    _job_call(gateway, team, job_id, f"hi there [tag={label}]")
    cached = _job_call(gateway, team, job_id, f"hi there [tag={label}]").json()["metadata"]
    assert len(fake_log(fake_url, label)) == 1
    # The fake's usage: a prompt token per word (the tag is one), a completion token per chunk (5).
    (prompt, completion), (input_price, output_price) = (3, 5), PRICES["primary"]
    assert (cached["prompt_tokens"], cached["completion_tokens"]) == (prompt, completion)
    assert cached["usage_estimated"] is False
    assert cached["model"] == "primary"
    assert cached["cost_usd"] == pytest.approx(prompt * input_price + completion * output_price)
    recorded = _calls(gateway, team, job_id)[1]
    assert (recorded["status"], recorded["total_tokens"], recorded["cost_usd"]) == ("success", 8, cached["cost_usd"])


def test_a_stream_answered_from_litellms_cache_reaches_the_client_whole_with_its_usage_chunk(gateway, fake_url):
    team = gateway.admin().team()
    label = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"hi there [tag={label}]"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with gateway.client(team.key) as client:
        client.post("/v1/chat/completions", json=body)
        cached = client.post("/v1/chat/completions", json=body)
        assert len(fake_log(fake_url, label)) == 1
        assert cached.headers["content-type"].startswith("text/event-stream")
        assert sse_data(cached.text)[-1] == "[DONE]"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_json(cached.text) if c["choices"])
        assert text == "word1 word2 word3 word4 word5 "
        assert sse_json(cached.text)[-1]["usage"]["total_tokens"] == 8
        (call,) = client.get(f"/api/jobs/{cached.headers['x-job-id']}").json()["calls"]
    assert (call["streamed"], call["total_tokens"], call["usage_estimated"]) == (True, 8, False)
    assert call["time_to_first_token_ms"] is not None


def test_a_job_whose_calls_litellms_cache_answered_is_charged_its_credits(gateway, fake_url):
    team = gateway.admin().team(credits=3)
    label = tag()
    text = f"hi there [tag={label}]"
    storing = _new_job(gateway, team)  # each route's call here stores the answer the next job is served
    _job_call(gateway, team, storing, text)
    _job_call(gateway, team, storing, text, route="llm-call-stream")
    answered_from_cache = _new_job(gateway, team)
    _job_call(gateway, team, answered_from_cache, text)
    _job_call(gateway, team, answered_from_cache, text, route="llm-call-stream")
    assert len(fake_log(fake_url, label)) == 2
    with gateway.client(team.key) as client:
        costs = client.post(f"/api/jobs/{answered_from_cache}/complete", json={"status": "completed"}).json()["costs"]
    assert (costs["credit_applied"], costs["credits_charged"], costs["successful_calls"]) == (True, 1, 2)
    assert gateway.admin().get_team(team.team_id)["credits_used"] == 1


def test_calls_answered_from_litellms_cache_are_counted_in_the_metrics(gateway, fake_url):
    team = gateway.admin().team()
    label = tag()
    text = f"hi there [tag={label}]"
    job_id = _new_job(gateway, team)
    _job_call(gateway, team, job_id, text)
    _job_call(gateway, team, job_id, text, route="llm-call-stream")
    streams_before = _metric(gateway, "tollgate_time_to_first_token_seconds", "_count", model_group="Main")
    cost_before = _metric(gateway, "tollgate_cost_usd", team=team.team_id)
    _job_call(gateway, team, job_id, text)
    _job_call(gateway, team, job_id, text, route="llm-call-stream")
    assert len(fake_log(fake_url, label)) == 2
    labels = {"team": team.team_id, "model_group": "Main"}
    assert _metric(gateway, "tollgate_llm_calls", **labels, model="primary", status="success") == 4
    assert _metric(gateway, "tollgate_tokens", **labels, type="prompt") == 4 * 3
    assert _metric(gateway, "tollgate_tokens", **labels, type="completion") == 4 * 5
    assert _metric(gateway, "tollgate_cost_usd", team=team.team_id) == pytest.approx(2 * cost_before)
    assert _metric(gateway, "tollgate_time_to_first_token_seconds", "_count", model_group="Main") == streams_before + 1


def test_the_usage_of_a_call_litellms_cache_answered_replaces_its_estimate_in_the_token_limit(gateway, fake_url):
    # Each call is estimated at over half the limit: the third is admitted only if the second,
    # answered from the cache, gave its estimate up for its few real tokens.
    team = gateway.admin().team(tpm_limit=3000)
    label = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"hi there [tag={label}]"}], "max_tokens": 1600}
    with gateway.client(team.key) as client:
        statuses = [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert len(fake_log(fake_url, label)) == 1


def test_a_teams_call_sent_with_no_cache_is_answered_by_its_model(gateway, fake_url):
    team = gateway.admin().team()
    label = tag()
    _ask(gateway, team, f"hi [tag={label}]")
    _ask(gateway, team, f"hi [tag={label}]", cache={"no-cache": True})
    assert len(fake_log(fake_url, label)) == 2


def test_a_teams_call_sent_with_no_store_leaves_no_answer_in_litellms_cache(gateway, fake_url):
    team = gateway.admin().team()
    label = tag()
    _ask(gateway, team, f"hi [tag={label}]", cache={"no-store": True})
    _ask(gateway, team, f"hi [tag={label}]")
    assert len(fake_log(fake_url, label)) == 2
