"""Upstream faults: failing, slow, rate-limited and broken upstreams behind a real LiteLLM.
The fallback answers whenever it can; otherwise the client gets a clear status, and every
call is recorded either way."""

import json
import time

import orjson
import pytest

from tests.fake_upstream import DEEP_TOOL_CALL
from tests.support import sse_data, sse_json
from tests.test_llm_calls import calls_of, new_job, say


# FallbackUnknownModel's first model is one LiteLLM does not serve: the group's mistake, which
# LiteLLM answers with a 400, is not the caller's.
@pytest.mark.parametrize("group", ["Fallback500", "Fallback503", "Fallback429", "FallbackUnknownModel"])
@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_failing_primary_falls_back_to_the_next_model(tollgate, admin, group, route):
    team = admin.team(groups=(group,))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hello [chunks=2]")})
    assert response.status_code == 200
    assert "word1" in response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)
def test_an_answer_not_streamed_past_the_answer_timeout_falls_back(make_tollgate):
    server = make_tollgate(upstream={"timeouts": {"answer": "1s"}})
    team = server.admin().team(groups=("FallbackHang",))
    client = server.client(team.key)
    job_id = new_job(client)
    started = time.monotonic()
    body = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hi")}).json()
    assert body["metadata"]["model"] == "backup" and time.monotonic() - started < 10
    assert calls_of(client, job_id)[0]["attempts"] == 2


@pytest.mark.parametrize("route", ["/api/jobs/{job_id}/llm-call", "/v1/chat/completions"])
def test_an_answer_not_streamed_is_waited_for_past_the_first_byte_timeout(make_tollgate, route):
    # LiteLLM sends a call's headers with its whole answer: a reasoning model's long one took
    # longer than first_byte (120 s by default), was cut, tried again on every fallback, and
    # billed by its provider each time for nothing.
    server = make_tollgate(upstream={"timeouts": {"first_byte": "1s"}})
    team = server.admin().team()
    client = server.client(team.key)
    job_id = new_job(client)
    body = {"model": "Main", "messages": say("thinks long [first_byte_ms=2500]")}
    response = client.post(route.format(job_id=job_id), json=body, headers={"X-Job-Id": job_id})
    assert response.status_code == 200, response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "primary", 1)


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_a_timeout_litellm_reports_falls_back_to_the_next_model(tollgate, admin, route):
    # The deployment's own `timeout` runs out in LiteLLM, which answers 408.
    team = admin.team(groups=("FallbackTimeout",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi [chunks=2]")})
    assert response.status_code == 200 and "word1" in response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


def test_every_model_timing_out_in_litellm_is_503_with_retry_after(tollgate, admin):
    team = admin.team(groups=("TimesOut",))
    client = tollgate.client(team.key)
    response = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "hang-timeout: 408" in response.json()["detail"]


# Groups whose first model its provider refuses, as LiteLLM passes the refusal on: not the
# gateway's key, nor the caller's mistake, so the group's next model answers.
REFUSED_BY_THE_PROVIDER = {
    # The key LiteLLM holds for the model (a 401 typed authentication_error).
    "FallbackRefusedKey": "its key",
    # The call (OpenAI's 403 for a region it does not serve), a 403 typed invalid_request_error
    # whose message names LiteLLM's exception: it was a 503 blaming the gateway's key.
    "Fallback403": "the call",
    # The model (a 404: one retired, a deployment that is not there), as when LiteLLM itself does
    # not serve it: it came back as a 400 upstream_rejected, which clients do not retry.
    "Fallback404": "the model",
}


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
@pytest.mark.parametrize("group", list(REFUSED_BY_THE_PROVIDER))
def test_a_model_its_provider_refuses_falls_back_to_the_next_model(tollgate, admin, group, route):
    team = admin.team(groups=(group,))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi [chunks=2]")})
    assert response.status_code == 200 and "word1" in response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


def test_every_provider_refusing_its_key_is_503_with_the_upstreams_message(make_tollgate):
    server = make_tollgate()  # a log of its own, to show what it says
    team = server.admin().team(groups=("RefusedKey",))
    client = server.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "refused-key: 401: litellm.AuthenticationError" in response.json()["detail"]
    assert "Incorrect API key provided" in response.json()["detail"]
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"]) == ("error", "refused-key")
    assert "TOLLGATE_UPSTREAM_KEY" not in server.log()


def test_every_provider_answering_403_is_503_with_the_upstreams_message_not_a_misconfigured_gateway(make_tollgate):
    server = make_tollgate()  # a log of its own, to show what it says
    client = server.client(server.admin().team(groups=("Forbidden",)).key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "fake upstream failure 403" in response.json()["detail"]
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"]) == ("error", "fail-403")
    assert "fake upstream failure 403" in call["error"]
    assert "TOLLGATE_UPSTREAM_KEY" not in server.log()


def test_an_answer_litellm_reports_zero_usage_for_is_estimated_from_its_text(tollgate, admin):
    # A provider's answer without usage comes from LiteLLM with a usage of zeros, not none
    # (README, "Estimates"): taken as the count, the call was recorded, priced and rate-limited
    # as having used no tokens at all, and said its usage was not estimated.
    team = admin.team(groups=("Usageless",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    body = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hello there [chunks=4]")}).json()
    text = len("word1 word2 word3 word4 ")
    prompt = len("hello there [chunks=4]")
    (call,) = calls_of(client, job_id)
    figures = (call["usage_estimated"], call["prompt_tokens"], call["completion_tokens"])
    assert figures == (True, -(-prompt // 4), text // 4)
    assert body["metadata"]["tokens_used"] == call["prompt_tokens"] + call["completion_tokens"]


def test_every_model_failing_is_503_with_retry_after_and_the_job_stays_completable(tollgate, admin):
    team = admin.team(groups=("AllFail",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    for route in ("llm-call", "llm-call-stream"):
        response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi")})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "unavailable" in response.json()["detail"]
    assert [(c["status"], c["attempts"]) for c in calls_of(client, job_id)] == [("error", 2), ("error", 2)]
    assert client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).status_code == 200


def test_a_call_every_model_failed_is_recorded_with_the_last_model_it_asked(tollgate, admin):
    # The model a failed call names is the one it ended at, as a call cut short names the model
    # it was cut at: its error is that model's.
    team = admin.team(groups=("AllFail",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    for route in ("llm-call", "llm-call-stream"):
        assert client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi")}).status_code == 503
    assert [(c["status"], c["model"]) for c in calls_of(client, job_id)] == [("error", "fail-503")] * 2


def test_every_model_rate_limited_is_429_with_retry_after(tollgate, admin):
    team = admin.team(groups=("AllLimited",))
    client = tollgate.client(team.key)
    response = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize("group", ["Abort", "Garbage"])
def test_stream_failing_midway_ends_with_one_error_event_and_is_recorded(tollgate, admin, group):
    team = admin.team(groups=(group,))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=6]")})
    assert response.status_code == 200
    events = sse_json(response.text)
    assert [e for e in events if "error" in e] == [events[-1]]
    assert set(events[-1]["error"]) >= {"message", "type", "code"}
    (call,) = calls_of(client, job_id)
    assert call["status"] == "error" and call["error"]
    assert call["completion_tokens"] > 0 and call["usage_estimated"] is True


def straight_to_the_fake(make_tollgate, fake_url, **groups: list[str]):
    """A Tollgate asking the fake upstream itself, for answers LiteLLM would not pass on as
    the fake sends them, and a client of a team granted `groups`."""
    server = make_tollgate(upstream_url=fake_url)
    admin = server.admin()
    for name, models in groups.items():
        admin.ok("POST", "/admin/model-groups", json={"name": name, "models": models})
    return server.client(admin.team(groups=tuple(groups)).key)


def test_an_error_as_a_streams_first_event_falls_back_to_the_next_model(make_tollgate, fake_url):
    client = straight_to_the_fake(make_tollgate, fake_url, ErrorFirst=["error-first", "backup"])
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=2]")})
    assert response.status_code == 200
    assert "error" not in response.text and "word1" in response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


def test_a_later_error_event_is_forwarded_unchanged_and_the_call_recorded_as_failed(make_tollgate, fake_url):
    client = straight_to_the_fake(make_tollgate, fake_url, ErrorLater=["error-later", "backup"])
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=4]")})
    assert response.status_code == 200
    events = sse_data(response.text)
    sent = {"error": {"message": "fake upstream error event from error-later", "type": "fake_error", "code": "fake_event"}}
    assert events[-1] == json.dumps(sent)  # the upstream's own bytes, and nothing after them
    assert sum("error" in json.loads(event) for event in events) == 1
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("error", "error-later", 1)
    assert call["error"] == "fake upstream error event from error-later"


def test_a_broken_upstream_connection_ends_the_stream_with_one_error_event_of_the_gateways(make_tollgate, fake_url):
    client = straight_to_the_fake(make_tollgate, fake_url, Breaks=["abort", "backup"])
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=6]")})
    assert response.status_code == 200 and "word2" in response.text  # no fallback once bytes went out
    events = sse_json(response.text)
    assert [e for e in events if "error" in e] == [events[-1]]
    assert events[-1]["error"]["code"] == "upstream_connection_lost"
    assert set(events[-1]["error"]) == {"message", "type", "code"}
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"]) == ("error", "abort")


def test_every_model_rate_limited_passes_on_the_upstreams_retry_after(make_tollgate, fake_url):
    client = straight_to_the_fake(make_tollgate, fake_url, Limited=["fail-429", "fail-429-b"])
    response = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"  # the fake's


def test_streamed_timeout_before_the_first_event_falls_back(make_tollgate):
    server = make_tollgate(upstream={"timeouts": {"first_byte": "1s"}})
    team = server.admin().team(groups=("FallbackHang",))
    client = server.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=2]")})
    assert response.status_code == 200 and "word1" in response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


def test_a_whole_call_past_the_total_timeout_is_cut_with_one_error_event(make_tollgate):
    server = make_tollgate(upstream={"timeouts": {"total": "1s"}})
    team = server.admin().team()
    client = server.client(team.key)
    job_id = new_job(client)
    started = time.monotonic()
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("long [chunks=50] [delay_ms=100]")})
    assert time.monotonic() - started < 5
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert '"upstream_timeout"' in events[-1] and sum('"error"' in e for e in events) == 1
    (call,) = calls_of(client, job_id)
    assert call["status"] == "error" and call["usage_estimated"] and call["completion_tokens"] > 0


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_a_call_whose_total_time_runs_out_before_any_answer_is_503_and_tries_no_more_models(make_tollgate, route):
    server = make_tollgate(upstream={"timeouts": {"total": "1s", "first_byte": "30s"}})
    team = server.admin().team(groups=("FallbackHang",))
    client = server.client(team.key)
    job_id = new_job(client)
    started = time.monotonic()
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi")})
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert "hang: timed out" in response.json()["detail"] and "1 more not tried" in response.json()["detail"]
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["attempts"]) == ("error", 1)


def test_malformed_json_answer_is_a_failure_that_falls_back_or_503s(tollgate, admin):
    team = admin.team(groups=("Garbage",))
    client = tollgate.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hi")})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert calls_of(client, job_id)[0]["status"] == "error"
    assert client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed"}).status_code == 200


def test_upstream_down_entirely_is_503_quickly_and_recorded(make_tollgate):
    server = make_tollgate(upstream_url="http://127.0.0.1:9", upstream={"timeouts": {"connect": "1s"}})
    team = server.admin().team()
    client = server.client(team.key)
    job_id = new_job(client)
    for route in ("llm-call", "llm-call-stream"):
        response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi")})
        assert response.status_code == 503 and "connection failed" in response.json()["detail"]
    assert [c["status"] for c in calls_of(client, job_id)] == ["error", "error"]


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_usage_too_large_to_be_real_is_estimated_instead_and_the_call_recorded(make_tollgate, fake_url, route):
    # 10^20 tokens: no call uses them, SQLite cannot store them, and the limits must not count them.
    server = make_tollgate(upstream_url=fake_url)
    admin = server.admin()
    admin.ok("POST", "/admin/model-groups", json={"name": "Absurd", "models": ["absurd-usage"]})
    team = admin.team(groups=("Absurd",))
    client = server.client(team.key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi [chunks=2]")})
    assert response.status_code == 200 and "error" not in response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["usage_estimated"]) == ("success", True)
    assert 0 < call["prompt_tokens"] < 100
    again = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say("hi [chunks=2]")})
    assert again.status_code == 200


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
def test_a_usage_missing_one_count_keeps_the_count_it_gives_and_estimates_the_other(make_tollgate, fake_url, route):
    # The prompt's count the provider gave was thrown away with the missing one: both estimated.
    client = straight_to_the_fake(make_tollgate, fake_url, Half=["half-usage"])
    job_id = new_job(client)
    prompt = "one two three four five six seven eight nine ten eleven twelve [chunks=2]"
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say(prompt)})
    assert response.status_code == 200
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["usage_estimated"]) == ("success", True)
    assert call["prompt_tokens"] == 13  # the fake's count: its words; an estimate would be 19
    assert call["completion_tokens"] >= 1


def test_an_upstream_silent_mid_stream_past_the_first_byte_timeout_ends_with_one_timeout_event(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url, upstream={"timeouts": {"first_byte": "1s"}})
    client = server.client(server.admin().team().key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=4] [delay_ms=3000]")})
    events = sse_json(response.text)
    assert [e for e in events if "error" in e] == [events[-1]]
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert "silent" in events[-1]["error"]["message"]


def test_an_upstream_refusal_quoting_a_lone_surrogate_is_400_and_the_call_recorded(make_tollgate, fake_url):
    # JSON may escape half of a UTF-16 pair; the database cannot store it as text. The call must
    # still be recorded (not left running, its job uncompletable) and the client get the 400.
    client = straight_to_the_fake(make_tollgate, fake_url, Quotes=["surrogate-error"])
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"model_group": "Quotes", "messages": say("hi")})
    assert response.status_code == 400, response.text
    assert "prompt rejected near" in response.json()["detail"]
    (call,) = calls_of(client, job_id)
    assert call["status"] == "error" and "prompt rejected near" in call["error"]
    assert client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed"}).status_code == 200


def test_an_answer_holding_a_lone_surrogate_comes_back_200_not_500(make_tollgate, fake_url):
    client = straight_to_the_fake(make_tollgate, fake_url, Odd=["surrogate-answer"])
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"model_group": "Odd", "messages": say("hi")})
    assert response.status_code == 200, response.text
    assert response.json()["response"]["content"].startswith("smile ")


def test_a_tool_call_nested_as_deep_as_an_answer_can_be_read_comes_back_200_not_500(make_tollgate, fake_url):
    # Read by orjson (to 1,024 levels), written back in the jobs API's own answer: the json
    # module, which writes what orjson cannot (past 255 levels), stops at about 1,000 on 3.11.
    client = straight_to_the_fake(make_tollgate, fake_url, Deep=["deep-tool-call"])
    job_id = new_job(client)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"model_group": "Deep", "messages": say("weather?"), "tools": tools}
    response = client.post(f"/api/jobs/{job_id}/llm-call", json=body)
    assert response.status_code == 200, response.text[:300]
    # Read by orjson: json.loads, and even comparing the values, stop at the recursion limit.
    (tool_call,) = orjson.loads(response.content)["response"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert b'"deep":' + b"[" * DEEP_TOOL_CALL + b"]" * DEEP_TOOL_CALL in response.content


def test_a_models_answer_litellm_fails_to_relay_falls_back_to_the_next_model(tollgate, admin):
    # LiteLLM called the model, then failed writing its answer (a lone surrogate in it) with the
    # bare 500 it also gives a body it refuses. The model's answer was unusable: the next model
    # can answer, as for any other failing model. Today: 400 "LiteLLM refused the request before
    # trying any model", and the group's second model is never asked.
    admin.ok("POST", "/admin/model-groups", json={"name": "UnrelayableFirst", "models": ["surrogate-answer", "backup"]})
    client = tollgate.client(admin.team(groups=("UnrelayableFirst",)).key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": say("hello [chunks=2]")})
    assert response.status_code == 200, response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


@pytest.mark.parametrize("route", ["/api", "/v1"])
def test_a_models_answer_litellm_cannot_read_falls_back_to_the_next_model(tollgate, admin, route):
    # LiteLLM answers a choice whose message is null with a 400 "Invalid request format" holding its
    # own traceback. Taken for the caller's request refused, the client got that traceback in a 400
    # upstream_rejected (openai.BadRequestError, never retried) and the group's next model was never asked.
    admin.ok("PUT", "/admin/model-groups/UnreadableFirst", json={"models": ["null-message", "backup"]})
    client = tollgate.client(admin.team(groups=("UnreadableFirst",)).key)
    job_id = new_job(client)
    if route == "/api":
        response = client.post(f"/api/jobs/{job_id}/llm-call", json={"model_group": "UnreadableFirst", "messages": say("hi")})
    else:
        body = {"model": "UnreadableFirst", "messages": say("hi")}
        response = client.post("/v1/chat/completions", json=body, headers={"X-Job-Id": job_id})
    assert response.status_code == 200, response.text
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("success", "backup", 2)


def test_a_later_error_event_quoting_a_lone_surrogate_is_recorded_and_its_job_completable(tollgate, admin):
    # LiteLLM passes a provider's mid-stream error on with its message escaped as JSON escapes it,
    # half of a UTF-16 pair included, which the database cannot store as text.
    admin.ok("POST", "/admin/model-groups", json={"name": "SurrogateLater", "models": ["surrogate-later"]})
    client = tollgate.client(admin.team(groups=("SurrogateLater",)).key)
    job_id = new_job(client)
    response = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": say("hi [chunks=4]")})
    assert response.status_code == 200
    assert "error" in sse_json(response.text)[-1]
    (call,) = calls_of(client, job_id)
    assert call["status"] == "error" and "fake upstream error event" in call["error"]
    assert client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).status_code == 200
