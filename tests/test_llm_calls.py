"""LLM calls through a real LiteLLM: answers, streams relayed unbuffered, fallbacks, accounting."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from proxy import app
from proxy.demo import stop_process, wait_until_up
from tests.support import PRICES, PYTHON, REPO, Tollgate, fake_log, free_port, sse_data, start_process, tag, wait_for


def new_job(client) -> str:
    return client.post("/api/jobs/create", json={"job_type": "test"}).json()["job_id"]


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def calls_of(client, job_id: str) -> list[dict]:
    return client.get(f"/api/jobs/{job_id}").json()["calls"]


def price(model: str, prompt: int, completion: int) -> float:
    return round(prompt * PRICES[model][0] + completion * PRICES[model][1], 12)


def test_non_streaming_call_returns_content_and_metadata(tollgate, team):
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("one two three [chunks=4]")})
    assert response.status_code == 200
    body = response.json()
    assert body["response"] == {"content": "word1 word2 word3 word4 ", "role": "assistant", "finish_reason": "stop"}
    meta = body["metadata"]
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["tokens_used"]) == (4, 4, 8)
    assert (meta["model_group"], meta["model"]) == ("Main", "primary")
    assert meta["cost_usd"] == price("primary", 4, 4)
    assert isinstance(meta["latency_ms"], int)
    assert response.headers["x-job-id"] == job_id and response.headers["x-call-id"] == body["call_id"]


def test_model_is_accepted_as_a_synonym_of_model_group(tollgate, admin):
    team = admin.team(groups=("Main", "Backup"))
    client = tollgate.client(team.key)
    body = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"model": "Backup", "messages": say("hi")}).json()
    assert body["metadata"]["model"] == "backup"


def test_team_default_group_is_used_when_none_is_named(tollgate, admin):
    team = admin.team(groups=("Main", "Backup"), default_model_group="Backup")
    client = tollgate.client(team.key)
    body = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say("hi")}).json()
    assert body["metadata"]["model_group"] == "Backup"


def test_tool_calls_come_back_with_empty_content(tollgate, team):
    client = tollgate.client(team.key)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = client.post(
        f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say("weather?"), "tools": tools}
    ).json()
    assert body["response"]["content"] == ""
    assert body["response"]["finish_reason"] == "tool_calls"
    assert body["response"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_upstream_request_names_team_job_and_call_and_presents_the_upstream_key(make_tollgate, fake_url):
    # Pointed straight at the fake upstream, to see exactly what Tollgate sends.
    server = make_tollgate(upstream_url=fake_url, upstream_key="sk-upstream-presented")
    team = server.admin().team()
    client = server.client(team.key)
    job_id = new_job(client)
    label = tag()
    body = {"messages": say(f"hi [tag={label}]"), "purpose": "p", "logit_bias": {"50256": -100}, "custom_knob": 3}
    call_id = client.post(f"/api/jobs/{job_id}/llm-call", json=body).json()["call_id"]
    (sent,) = fake_log(fake_url, label)
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-presented"
    request = sent["body"]
    assert request["model"] == "primary" and request["user"] == team.team_id and request["temperature"] == 0.7
    assert request["logit_bias"] == {"50256": -100} and request["custom_knob"] == 3
    assert "model_group" not in request and "purpose" not in request
    tags = request["metadata"]["tags"]
    assert {f"tollgate-team:{team.team_id}", f"tollgate-job:{job_id}", f"tollgate-call:{call_id}"} <= set(tags)
    assert request["metadata"]["tollgate_call_id"] == call_id


def test_a_clients_tags_are_passed_on_but_never_one_that_passes_for_tollgates(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    client = server.client(team.key)
    label = tag()
    forged = ["tollgate-team:someone-else", "tollgate-job:00000000-0000-0000-0000-000000000000", "mine"]
    body = {"messages": say(f"hi [tag={label}]"), "metadata": {"tags": forged}}
    assert client.post(f"/api/jobs/{new_job(client)}/llm-call", json=body).status_code == 200
    (sent,) = fake_log(fake_url, label)
    tags = sent["body"]["metadata"]["tags"]
    assert "mine" in tags and not set(forged[:2]) & set(tags)
    assert [t for t in tags if t.startswith("tollgate-team:")] == [f"tollgate-team:{team.team_id}"]


def test_a_clients_top_level_tags_never_pass_for_tollgates_either(make_tollgate, fake_url):
    # LiteLLM adds a body's top-level `tags` to its metadata's, where its spend logs read them.
    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    client = server.client(team.key)
    label = tag()
    body = {"messages": say(f"hi [tag={label}]"), "tags": ["tollgate-team:someone-else", "mine"]}
    assert client.post(f"/api/jobs/{new_job(client)}/llm-call", json=body).status_code == 200
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["tags"] == ["mine"]


@pytest.mark.parametrize("field, value", [
    ("fallbacks", ["backup"]), ("context_window_fallbacks", [{"primary": ["backup"]}]), ("num_retries", 50),
    ("mock_response", "free"), ("input_cost_per_token", 0), ("timeout", 0.2),
])
def test_litellms_own_routing_and_pricing_parameters_are_refused_naming_them(tollgate, team, field, value):
    # LiteLLM honours them from any caller: a team would reach models its groups do not grant.
    client = tollgate.client(team.key)
    on_api = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say("hi"), field: value})
    assert on_api.status_code == 422 and field in on_api.json()["detail"]
    on_v1 = client.post("/v1/chat/completions", json={"model": "Main", "messages": say("hi"), field: value})
    assert on_v1.status_code == 422 and on_v1.json()["error"]["param"] == field


def test_unknown_fields_reach_the_upstream_exactly_even_beyond_64_bits(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    label = tag()
    knobs = {"big": 2**70, "negative": -(2**63) - 1, "ratio": 0.1 + 0.2, "text": "café ✓ 😀"}
    body = {"messages": say(f"hi [tag={label}]"), "custom_knobs": knobs}
    assert client.post(f"/api/jobs/{new_job(client)}/llm-call", json=body).status_code == 200
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["custom_knobs"] == knobs


def test_client_user_is_kept_and_stream_always_asks_for_usage(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    client = server.client(team.key)
    label = tag()
    client.post(
        f"/api/jobs/{new_job(client)}/llm-call-stream",
        json={"messages": say(f"hi [tag={label}]"), "user": "end-user-7", "stream_options": {"include_usage": False}},
    ).read()
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["user"] == "end-user-7"
    assert sent["body"]["stream"] is True and sent["body"]["stream_options"] == {"include_usage": True}


def test_stream_is_sse_with_the_documented_headers_ending_with_usage_and_done(tollgate, team):
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("one two [chunks=3]")})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-job-id"] == job_id and response.headers["x-call-id"]
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == "word1 word2 word3 "
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "refusal, status",
    [
        ({"model_group": "NoSuchGroup"}, 404),
        ({"model_group": "Backup"}, 403),  # not granted
        ({"temperature": 9}, 422),
        ("suspended", 403),
        ("rate limited", 429),
    ],
)
def test_a_stream_refused_before_its_first_byte_answers_a_plain_json_error(tollgate, admin, refusal, status):
    # API.md: a stream's checks happen before its first byte, and fail with a normal status and
    # a JSON body, not as an event stream.
    team = admin.team(rpm_limit=1)
    client = tollgate.client(team.key)
    job_id = new_job(client)
    body = {"messages": say("hi [chunks=2]")}
    if refusal == "suspended":
        admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"status": "suspended"})
    elif refusal == "rate limited":
        assert client.post(f"/api/jobs/{job_id}/llm-call-stream", json=body).status_code == 200
    else:
        body.update(refusal)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["detail"] and response.json()["detail"]
    assert [c["status"] for c in calls_of(client, job_id)] == (["success"] if refusal == "rate limited" else [])


def test_a_stream_to_an_http_1_0_client_is_not_chunked_and_ends_with_the_connection(tollgate, team):
    # An HTTP/1.0 client does not know the chunked coding (RFC 9112, 6.1): it read the chunk
    # sizes as bytes of the stream, in and between its events.
    client = tollgate.client(team.key)
    body = json.dumps({"messages": say("one two [chunks=3]")}).encode()
    request = (
        f"POST /api/jobs/{new_job(client)}/llm-call-stream HTTP/1.0\r\nHost: x\r\n"
        f"Authorization: Bearer {team.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", tollgate.port), timeout=30) as sock:
        sock.sendall(request)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, stream = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower(), head
    assert b"connection: close" in head.lower()
    data = sse_data(stream.decode())
    assert data[-1] == "[DONE]" and all(d == "[DONE]" or json.loads(d) for d in data)
    assert stream.startswith(b"data: ") and stream.endswith(b"\n\n")


def test_stream_bytes_are_litellms_bytes_unchanged(tollgate, team, litellm):
    client = tollgate.client(team.key)
    body = {"messages": say("same [chunks=3]")}
    ours = client.post(f"/api/jobs/{new_job(client)}/llm-call-stream", json=body).content
    theirs = httpx.post(
        f"{litellm.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {litellm.master_key}"},
        json={**body, "model": "primary", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7},
    ).content

    def normalise(raw: bytes) -> bytes:  # ids and timestamps differ per request, nothing else may
        import re

        return re.sub(rb'"(id|created)":\s*("[^"]*"|\d+)', b"", raw)

    assert normalise(ours) == normalise(theirs)


def test_stream_is_not_buffered(tollgate, team):
    client = tollgate.client(team.key)
    url = f"/api/jobs/{new_job(client)}/llm-call-stream"
    arrivals = []
    with client.stream("POST", url, json={"messages": say("slow [chunks=8] [delay_ms=150]")}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 8
    assert arrivals[-1] - arrivals[0] > 0.8  # the upstream needs 7 × 150 ms
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gap > 0.08 for gap in gaps) >= 6, gaps


def test_streamed_call_is_recorded_with_usage_and_time_to_first_token(tollgate, team):
    client = tollgate.client(team.key)
    job_id = new_job(client)
    client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("a b c [chunks=6]")}).read()
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["streamed"], call["usage_estimated"]) == ("success", True, False)
    assert (call["prompt_tokens"], call["completion_tokens"]) == (4, 6)
    assert call["time_to_first_token_ms"] is not None and call["time_to_first_token_ms"] <= call["latency_ms"]


def test_a_streams_time_to_first_token_counts_the_wait_for_its_first_event(tollgate, team):
    # Measured from the call's start on the same clock as its latency: the upstream's 300 ms before
    # its first event are in it, and the rest of the stream is not.
    client = tollgate.client(team.key)
    job_id = new_job(client)
    body = {"messages": say("a b c [chunks=4] [first_byte_ms=300] [delay_ms=200]")}
    client.post(f"/api/jobs/{job_id}/llm-call-stream", json=body).read()
    (call,) = calls_of(client, job_id)
    assert 300 <= call["time_to_first_token_ms"] <= call["latency_ms"] - 600


def test_costs_hold_exact_token_sums_of_streamed_and_plain_calls(tollgate, team):
    client = tollgate.client(team.key)
    job_id = new_job(client)
    plan = [("llm-call", "a b [chunks=2]", 3, 2), ("llm-call-stream", "a b c d [chunks=7]", 5, 7), ("llm-call", "x [chunks=1]", 2, 1)]
    for route, text, _, _ in plan:
        client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say(text)}).read()
    costs = client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).json()["costs"]
    assert costs["prompt_tokens"] == sum(p for *_, p, _ in plan)
    assert costs["completion_tokens"] == sum(c for *_, c in plan)
    assert costs["total_tokens"] == costs["prompt_tokens"] + costs["completion_tokens"]
    assert costs["total_cost_usd"] == pytest.approx(sum(price("primary", p, c) for *_, p, c in plan), rel=1e-9)


def test_equal_usage_costs_the_same_streamed_or_not_and_more_than_zero(tollgate, team):
    client = tollgate.client(team.key)
    job_id = new_job(client)
    for route in ("llm-call", "llm-call-stream"):
        client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("equal usage here [chunks=9]")}).read()
    plain, streamed = calls_of(client, job_id)
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (streamed["prompt_tokens"], streamed["completion_tokens"])
    assert plain["cost_usd"] == streamed["cost_usd"] == price("primary", 4, 9) > 0


def test_a_call_a_fallback_model_answered_is_priced_at_that_models_rates(make_tollgate, fake_url):
    # Not at the rates of the group's first model, which failed and generated nothing. Straight to
    # the fake upstream, which gives no cost of its own: the call is priced by config.yaml's prices.
    prices = {"backup": {"input_cost_per_token": 0.5, "output_cost_per_token": 0.25}}
    server = make_tollgate(upstream_url=fake_url, pricing=prices)
    team = server.admin().team(groups=("Fallback500",))
    client = server.client(team.key)
    job_id = new_job(client)
    assert client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("a b [chunks=2]")}).status_code == 200
    (call,) = calls_of(client, job_id)
    assert call["model"] == "backup"
    assert call["cost_usd"] == call["prompt_tokens"] * 0.5 + call["completion_tokens"] * 0.25 > 0


def test_a_stream_whose_first_event_through_litellm_is_an_error_falls_back(tollgate, admin):
    # The contract's promise, end to end: the headers wait for the upstream's first event, so an
    # error as that event is a failure before any byte reached the client, and the next model answers.
    team = admin.team(groups=("FallbackErrorFirst",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("one two [chunks=2]")})
    assert response.status_code == 200
    data = sse_data(response.text)
    assert data[-1] == "[DONE]" and not any("error" in json.loads(d) for d in data[:-1]), data
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2), call


def test_upstream_4xx_comes_back_as_400_with_its_message_without_fallback(tollgate, admin):
    team = admin.team(groups=("Rejects",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 400
    assert "fake upstream failure 400" in response.json()["detail"]
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("error", "fail-400", 1)


TOO_LONG = "one two three four five six seven eight nine ten"  # for small-context's 8 words


def too_long_a_call(tollgate, admin, group: str) -> tuple[httpx.Response, list[dict]]:
    """A call to `group` of a prompt too long for small-context: the answer, and its job's calls."""
    client = tollgate.client(admin.team(groups=(group,)).key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"model_group": group, "messages": say(TOO_LONG)})
    return response, calls_of(client, job_id)


def test_a_prompt_too_long_for_a_model_is_answered_by_the_groups_next(tollgate, admin):
    response, (call,) = too_long_a_call(tollgate, admin, "SmallContextThenBackup")
    assert response.status_code == 200
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


def test_a_prompt_too_long_for_every_model_is_400_naming_the_models_and_recorded(tollgate, admin):
    response, (call,) = too_long_a_call(tollgate, admin, "SmallContext")
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "longer than any model of group 'SmallContext'" in detail and "maximum context length is 8 tokens" in detail
    assert "context_window_fallback" not in detail  # LiteLLM's advice to its own operator
    assert (call["status"], call["model"], call["attempts"]) == ("error", "small-context", 1)


def test_a_prompt_too_long_for_one_model_and_the_next_rate_limited_is_429(tollgate, admin):
    # The model the prompt is too long for never answers it: the other's limit says when to ask
    # again, not a 503's second.
    response, _ = too_long_a_call(tollgate, admin, "SmallContextThenLimited")
    assert response.status_code == 429 and "rate limited upstream" in response.json()["detail"]


def test_client_disconnect_closes_the_upstream_and_records_the_call(tollgate, team, fake_url):
    client = tollgate.client(team.key)
    job_id = new_job(client)
    label = tag()
    body = {"messages": say(f"long story [chunks=200] [delay_ms=50] [tag={label}]")}
    with client.stream("POST", f"/api/jobs/{job_id}/llm-call-stream", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    hung_up = time.time()
    entries = wait_for(lambda: [e for e in fake_log(fake_url, label) if e["disconnected"]], timeout=5)
    assert entries, "the fake upstream never saw its connection closed"
    assert entries[0]["disconnected"] - hung_up < 1.0
    call = wait_for(lambda: [c for c in calls_of(client, job_id) if c["status"] != "running"], timeout=5)[0]
    assert call["status"] == "cancelled"
    assert call["usage_estimated"] is True and call["completion_tokens"] > 0 and call["prompt_tokens"] > 0


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_a_client_that_hangs_up_before_the_answer_cancels_the_upstream_request_at_once(make_tollgate, fake_url, route):
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    job_id = new_job(client)
    label = tag()
    body = {"messages": say(f"slow to start [first_byte_ms=8000] [tag={label}]")}
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"/api/jobs/{job_id}/{route}", json=body, timeout=0.5)
    hung_up = time.time()
    entries = wait_for(lambda: [e for e in fake_log(fake_url, label) if e["disconnected"]], timeout=5)
    assert entries, "the upstream request ran on after the client had gone"
    assert entries[0]["disconnected"] - hung_up < 1.0
    (call,) = wait_for(lambda: [c for c in calls_of(client, job_id) if c["status"] != "running"], timeout=5)
    assert call["status"] == "cancelled" and call["completion_tokens"] == 0
    assert client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed"}).status_code == 200


def test_a_call_cut_before_its_answer_names_the_model_asked_and_prices_its_prompt(make_tollgate):
    server = make_tollgate(pricing={"unpriced": {"input_cost_per_token": 0.5, "output_cost_per_token": 0.25}})
    client = server.client(server.admin().team(groups=("Unpriced",)).key)
    job_id = new_job(client)
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("slow [first_byte_ms=8000]")}, timeout=0.5)
    (call,) = wait_for(lambda: [c for c in calls_of(client, job_id) if c["status"] != "running"], timeout=5)
    assert (call["status"], call["model"]) == ("cancelled", "unpriced")
    assert call["prompt_tokens"] > 0 and call["cost_usd"] == call["prompt_tokens"] * 0.5


def test_models_litellm_does_not_price_use_the_prices_in_config_yaml(make_tollgate):
    server = make_tollgate(pricing={"unpriced": {"input_cost_per_token": 0.5, "output_cost_per_token": 0.25}})
    team = server.admin().team(groups=("Unpriced",))
    client = server.client(team.key)
    job_id = new_job(client)
    for route in ("llm-call", "llm-call-stream"):
        client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("two words [chunks=4]")}).read()
    assert [c["cost_usd"] for c in calls_of(client, job_id)] == [3 * 0.5 + 4 * 0.25] * 2


def test_litellms_own_cost_figure_is_the_calls_cost_streamed_or_not(make_tollgate, fake_url):
    # README, "Cost": the x-litellm-response-cost header of an answer, `usage.cost` in a stream's
    # usage chunk. The model has no per-token price here: without LiteLLM's figure it cost 0.
    server = make_tollgate(upstream_url=fake_url)
    admin = server.admin()
    admin.ok("POST", "/admin/model-groups", json={"name": "Reported", "models": ["reported-cost"]})
    client = server.client(admin.team(groups=("Reported",)).key)
    job_id = new_job(client)
    for route in ("llm-call", "llm-call-stream"):
        assert client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi [chunks=2]")}).status_code == 200
    assert [(c["cost_usd"], c["usage_estimated"]) for c in calls_of(client, job_id)] == [(0.125, False)] * 2


def test_an_answer_without_usage_is_estimated_from_the_text_of_every_choice(make_tollgate, fake_url):
    # README, "Estimates": completion tokens are the forwarded text's characters / 4, and an
    # answer estimates as its stream would, which counts every choice's text. With n=2 only the
    # first choice's was counted: the call recorded, priced and rate-limited at half its text.
    server = make_tollgate(upstream_url=fake_url)
    admin = server.admin()
    admin.ok("POST", "/admin/model-groups", json={"name": "NoUsage", "models": ["no-usage"]})
    client = server.client(admin.team(groups=("NoUsage",)).key)
    job_id = new_job(client)
    for n in (1, 2):
        body = {"messages": say("hi [chunks=4]"), "n": n}
        assert client.post(f"/api/jobs/{job_id}/llm-call", json=body).status_code == 200
    text = len("word1 word2 word3 word4 ")  # each choice's content
    calls = calls_of(client, job_id)
    assert [(c["usage_estimated"], c["completion_tokens"]) for c in calls] == [(True, text // 4), (True, 2 * text // 4)]


def test_a_call_cut_before_its_answer_counts_the_attempts_it_made(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    job_id = new_job(client)
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("slow [first_byte_ms=8000]")}, timeout=0.5)
    (call,) = wait_for(lambda: [c for c in calls_of(client, job_id) if c["status"] != "running"], timeout=5)
    # The model it names was asked: one attempt, not none.
    assert (call["status"], call["model"], call["attempts"]) == ("cancelled", "primary", 1)


def test_a_call_cut_while_a_model_listed_twice_is_asked_again_counts_every_attempt(make_tollgate):
    # README: "a model may be listed more than once, which retries it". The attempts of a call cut
    # short were counted up to the first place the model asked holds in its group: a hang-up during
    # the retry was recorded as one attempt, not two.
    server = make_tollgate(upstream={"timeouts": {"answer": "2s"}})
    admin = server.admin()
    admin.ok("POST", "/admin/model-groups", json={"name": "HangTwice", "models": ["hang", "hang"]})
    client = server.client(admin.team(groups=("HangTwice",)).key)
    job_id = new_job(client)
    with pytest.raises(httpx.ReadTimeout):  # the first attempt timed out at 2 s, the second is under way
        client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hi")}, timeout=3)
    (call,) = wait_for(lambda: [c for c in calls_of(client, job_id) if c["status"] != "running"], timeout=5)
    assert (call["status"], call["model"], call["attempts"]) == ("cancelled", "hang", 2)


def test_null_top_level_tags_are_passed_on(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    label = tag()
    body = {"messages": say(f"hi [tag={label}]"), "tags": None}
    assert client.post(f"/api/jobs/{new_job(client)}/llm-call", json=body).status_code == 200
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["tags"] is None


def test_a_call_right_after_start_is_priced_though_litellm_is_slow_to_give_its_prices(tmp_path):
    # LiteLLM answers /model/info slowly (it is a heavy request, and a restarted gateway asks it
    # under load); a stream's usage carries no cost, so the call is priced per token from those
    # prices. The first calls after a start were recorded at cost 0 while they were still coming.
    port = free_port()
    args = [PYTHON, str(REPO / "tests" / "fake_upstream.py"), "--port", str(port), "--model-info-delay", "4"]
    upstream = start_process(args, tmp_path / "upstream.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", 30, upstream)
        server = Tollgate(tmp_path, f"http://127.0.0.1:{port}", "sk-upstream").start()
        try:
            client = server.client(server.admin().team().key)
            job_id = new_job(client)
            response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("three words here")})
            assert response.status_code == 200
            (call,) = calls_of(client, job_id)
            assert (call["model"], call["prompt_tokens"], call["completion_tokens"]) == ("primary", 3, 5)
            assert not call["usage_estimated"]
            assert call["cost_usd"] == price("primary", 3, 5)
        finally:
            server.stop()
    finally:
        stop_process(upstream)


def stopped_while_the_start_waits_for_prices(tmp_path: Path) -> str:
    """The log of a gateway sent SIGTERM while its start waited for LiteLLM's prices, once it
    has exited 0."""
    port = free_port()
    args = [PYTHON, str(REPO / "tests" / "fake_upstream.py"), "--port", str(port), "--model-info-delay", "600"]
    upstream_log = tmp_path / "upstream.log"
    upstream = start_process(args, upstream_log)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", 30, upstream)
        server = Tollgate(tmp_path, f"http://127.0.0.1:{port}", "sk-upstream")
        command = [PYTHON, "-m", "proxy", "serve", "--config", str(server.config_path), "--port", str(server.port)]
        process = start_process(command, server.log_path, server.env)
        try:
            assert wait_for(lambda: "GET /model/info" in upstream_log.read_text(), 30)  # the start is waiting
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
        finally:
            stop_process(process)
        return server.log()
    finally:
        stop_process(upstream)


def test_a_sigterm_while_the_start_waits_for_prices_stops_it_without_waiting_them_out(tmp_path):
    # LiteLLM takes its time over /model/info; a stop asked for meanwhile (a deploy rolled back,
    # `docker stop`, whose SIGKILL follows in 10 s) was only heard once the wait ran out.
    log = stopped_while_the_start_waits_for_prices(tmp_path)
    assert "Application shutdown complete" in log
    # It stopped waiting when told to stop, not when the wait for the prices gave up.
    assert "could not read model prices" not in log and "did not come within" not in log


def test_a_gateway_stopped_while_it_starts_never_says_it_listens(tmp_path: Path) -> None:
    # uvicorn goes on to bind and stop at once: "running on" would send someone to a gateway gone.
    assert "Uvicorn running on" not in stopped_while_the_start_waits_for_prices(tmp_path)


class NeverPriced:
    """Pricing whose prices never come; `on_ask` runs as they are asked for."""

    def __init__(self, on_ask: Callable[[], Any]) -> None:
        self.on_ask = on_ask

    async def refresh(self, upstream: Any) -> bool:
        self.on_ask()
        await asyncio.Event().wait()
        return True


def test_a_sigterm_ends_the_wait_for_prices_and_reaches_the_handler_in_place_which_stays() -> None:
    heard: list[int] = []

    def handler(sig: int, frame: Any) -> None:
        heard.append(sig)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        pricing = NeverPriced(lambda: os.kill(os.getpid(), signal.SIGTERM))
        # The deadline is a failure, not the wait for prices that gives up (its own is longer).
        assert asyncio.run(asyncio.wait_for(app._prices_at_start(pricing, None), 10)) is False  # type: ignore[arg-type]
        assert heard == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_start_cancelled_while_it_waits_for_prices_is_cancelled() -> None:
    async def cancelled() -> None:
        asked = asyncio.Event()
        start = asyncio.ensure_future(app._prices_at_start(NeverPriced(asked.set), None))  # type: ignore[arg-type]
        await asyncio.wait_for(asked.wait(), 10)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(start, 10)

    asyncio.run(cancelled())


def test_a_sigterm_while_the_start_waits_for_prices_with_no_handler_in_place_ends_the_process() -> None:
    # Served by something that set no handler of its own, the signal does what it does by default.
    script = (
        "import asyncio, os, signal\n"
        "from proxy import app\n"
        "from tests.test_llm_calls import NeverPriced\n"
        "pricing = NeverPriced(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "asyncio.run(app._prices_at_start(pricing, None))\n"
        "print('went on')\n"
    )
    ended = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stdout) == (-signal.SIGTERM, "")
