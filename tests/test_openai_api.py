"""The OpenAI-compatible API, driven by the official openai SDK (sync and async)."""

import asyncio
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from proxy.errors import ApiError, error_body
from tests.support import fake_log, tag, wait_for


HELLO = [{"role": "user", "content": "hello there [chunks=3]"}]


@pytest.fixture
def sdk(tollgate, team) -> OpenAI:
    return OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)


def test_create_returns_content_usage_and_finish_reason(sdk):
    reply = sdk.chat.completions.create(model="Main", messages=HELLO)
    assert reply.choices[0].message.content == "word1 word2 word3 "
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 3)


def test_async_client_works_the_same(tollgate, team):
    async def run():
        client = AsyncOpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
        reply = await client.chat.completions.create(model="Main", messages=HELLO)
        chunks = [c async for c in await client.chat.completions.create(model="Main", messages=HELLO, stream=True)]
        await client.close()
        return reply, chunks

    reply, chunks = asyncio.run(run())
    assert reply.choices[0].message.content == "word1 word2 word3 "
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "word1 word2 word3 "


def test_stream_without_include_usage_has_no_usage_only_chunk(sdk, tollgate, team):
    chunks = list(sdk.chat.completions.create(model="Main", messages=HELLO, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "word1 word2 word3 "
    jobs = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()["jobs"]
    assert jobs[0]["costs"]["prompt_tokens"] == 3 and jobs[0]["costs"]["completion_tokens"] == 3


def test_stream_with_include_usage_ends_with_the_upstream_usage(sdk):
    chunks = list(
        sdk.chat.completions.create(model="Main", messages=HELLO, stream=True, stream_options={"include_usage": True})
    )
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (3, 3)


def test_a_streams_own_stream_options_reach_the_upstream_beside_the_usage_the_gateway_asks_for(sdk, fake_url):
    # As LiteLLM passes them on: a client turning off OpenAI's stream obfuscation keeps it off.
    label = tag()
    messages = [{"role": "user", "content": f"hi [chunks=2] [tag={label}]"}]
    options = {"include_usage": False, "include_obfuscation": False}
    chunks = list(sdk.chat.completions.create(model="Main", messages=messages, stream=True, stream_options=options))
    assert all(c.usage is None for c in chunks)
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["stream_options"] == {"include_usage": True, "include_obfuscation": False}


def test_a_stream_whose_client_turned_usage_off_still_asks_the_upstream_for_it_and_is_recorded_by_it(
    make_tollgate, fake_url
):
    # Pointed at the upstream itself (LiteLLM asks its providers for usage whatever it is sent):
    # the client's own include_usage false must not replace the gateway's, or the call has no
    # usage to record and is estimated.
    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=team.key, max_retries=0)
    label = tag()
    messages = [{"role": "user", "content": f"hi [chunks=2] [tag={label}]"}]
    raw = sdk.chat.completions.with_raw_response.create(
        model="Main", messages=messages, stream=True, stream_options={"include_usage": False}
    )
    assert all(c.usage is None for c in raw.parse())
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["stream_options"] == {"include_usage": True}
    (call,) = server.client(team.key).get(f"/api/jobs/{raw.headers['x-job-id']}").json()["calls"]
    assert (call["usage_estimated"], call["completion_tokens"]) == (False, 2)


def test_a_plain_calls_stream_options_are_not_sent_upstream(make_tollgate, fake_url):
    # For streams only: OpenAI refuses them on a plain request.
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    label = tag()
    messages = [{"role": "user", "content": f"hi [tag={label}]"}]
    body = {"model": "Main", "messages": messages, "stream_options": {"include_usage": True}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    (sent,) = fake_log(fake_url, label)
    assert "stream_options" not in sent["body"]


def test_tool_calls_round_trip(sdk):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = sdk.chat.completions.create(model="Main", messages=HELLO, tools=tools)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'
    assert reply.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "tool_choice",
    [
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}},
        {"type": "custom", "custom": {"name": "f"}},
    ],
)
def test_a_tool_choice_of_the_sdks_that_litellm_cannot_serve_is_refused_by_its_type_not_as_malformed(sdk, tool_choice):
    # The SDK's own types offer these (ChatCompletionAllowedToolChoiceParam, ...NamedToolChoiceCustomParam);
    # LiteLLM 1.102.4 fails on them with a 500 of its own. The 422 must say that form is not
    # served, and what is, not that the client's object is malformed.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.chat.completions.create(model="Main", messages=HELLO, tools=tools, tool_choice=tool_choice)
    assert refused.value.param == "tool_choice"
    assert f"'{tool_choice['type']}' is not served through the gateway" in refused.value.message


def test_a_v1_call_is_sent_without_a_temperature_of_the_gateways(make_tollgate, fake_url):
    # API.md: the job API's default temperature (0.7) is the job API's; on /v1 nothing is added.
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    label = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"hi [tag={label}]"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    (sent,) = fake_log(fake_url, label)
    assert "temperature" not in sent["body"]


def test_a_v1_request_names_team_job_and_call_to_litellm_and_the_team_as_user(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    client = server.client(team.key)
    label = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"hi [tag={label}]"}]}
    response = client.post("/v1/chat/completions", json=body)
    job_id, call_id = response.headers["x-job-id"], response.headers["x-call-id"]
    (sent,) = fake_log(fake_url, label)
    assert sent["body"]["user"] == team.team_id
    metadata = sent["body"]["metadata"]
    assert {f"tollgate-team:{team.team_id}", f"tollgate-job:{job_id}", f"tollgate-call:{call_id}"} <= set(metadata["tags"])
    assert (metadata["tollgate_team_id"], metadata["tollgate_job_id"], metadata["tollgate_call_id"]) == (
        team.team_id, job_id, call_id,
    )


def test_models_list_shows_the_teams_groups(tollgate, admin):
    team = admin.team(groups=("Main", "Backup"))
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key)
    assert [m.id for m in client.models.list()] == ["Main", "Backup"]


def test_a_model_is_described_as_openai_describes_one(tollgate, team):
    client = tollgate.client(team.key)
    (listed,) = client.get("/v1/models").json()["data"]
    model = client.get("/v1/models/Main").json()
    assert model == listed
    assert (model["id"], model["object"], model["owned_by"]) == ("Main", "model", "tollgate")
    assert type(model["created"]) is int and model["created"] > 0  # Unix seconds, as OpenAI's


def test_call_without_job_header_is_its_own_job_completed_and_charged(sdk, tollgate, admin, team):
    raw = sdk.chat.completions.with_raw_response.create(model="Main", messages=HELLO)
    job_id = raw.headers["x-job-id"]
    assert raw.headers["x-call-id"]
    job = tollgate.client(team.key).get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["costs"]["credits_charged"] == 1
    assert admin.get_team(team.team_id)["credits_used"] == 1


def test_the_sdks_request_id_is_the_call_id(sdk):
    raw = sdk.chat.completions.with_raw_response.create(model="Main", messages=HELLO)
    assert raw.request_id == raw.headers["x-call-id"]
    assert raw.parse()._request_id == raw.headers["x-call-id"]


def test_a_failed_calls_error_names_the_call_as_its_request_id(tollgate, admin):
    team = admin.team(groups=("AllFail",))
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="AllFail", messages=HELLO)
    call_id = info.value.response.headers["x-call-id"]
    assert info.value.request_id == call_id
    job = tollgate.client(team.key).get(f"/api/jobs/{info.value.response.headers['x-job-id']}").json()
    assert [call["call_id"] for call in job["calls"]] == [call_id]


def test_failed_implicit_job_is_failed_and_not_charged(tollgate, admin):
    team = admin.team(groups=("AllFail",))
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="AllFail", messages=HELLO)
    assert info.value.status_code == 503
    body = admin.get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"]) == (0, 0)


def test_a_failed_implicit_jobs_error_message_is_its_calls_error(tollgate, admin):
    team = admin.team(groups=("AllFail",))
    client = tollgate.client(team.key)
    failed = client.post("/v1/chat/completions", json={"model": "AllFail", "messages": HELLO})
    job = client.get(f"/api/jobs/{failed.headers['x-job-id']}").json()
    assert job["status"] == "failed" and job["error_message"] and job["error_message"] == job["calls"][0]["error"]


def test_job_header_attaches_the_call_to_an_open_job(sdk, tollgate, team):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "mixed"}).json()["job_id"]
    sdk.chat.completions.create(model="Main", messages=HELLO, extra_headers={"X-Job-Id": job_id})
    list(sdk.chat.completions.create(model="Main", messages=HELLO, stream=True, extra_headers={"X-Job-Id": job_id}))
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "in_progress" and job["costs"]["total_calls"] == 2


def test_a_job_header_may_name_the_job_in_any_form_of_its_uuid(tollgate, team):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "forms"}).json()["job_id"]
    body = {"model": "Main", "messages": HELLO}
    for form in (job_id.upper(), "{" + job_id.replace("-", "") + "}"):
        response = client.post("/v1/chat/completions", json=body, headers={"X-Job-Id": form})
        assert (response.status_code, response.headers["x-job-id"]) == (200, job_id), form
    assert client.get(f"/api/jobs/{job_id}").json()["costs"]["total_calls"] == 2


def test_job_header_naming_an_unknown_or_finished_job(sdk, tollgate, team):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="Main", messages=HELLO, extra_headers={"X-Job-Id": "not-a-job"})
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "done"}).json()["job_id"]
    client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed"}).raise_for_status()
    with pytest.raises(openai.ConflictError):
        sdk.chat.completions.create(model="Main", messages=HELLO, extra_headers={"X-Job-Id": job_id})


def test_two_job_headers_are_refused_rather_than_the_first_taken(tollgate, team):
    # An intermediary may have added one: whichever came first could charge the wrong job.
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "twice"}).json()["job_id"]
    other = client.post("/api/jobs/create", json={"job_type": "twice"}).json()["job_id"]
    response = client.post(
        "/v1/chat/completions",
        json={"model": "Main", "messages": HELLO},
        headers=[("X-Job-Id", job_id), ("X-Job-Id", other)],
    )
    assert response.status_code == 400
    assert "more than one X-Job-Id" in response.json()["error"]["message"]
    assert [client.get(f"/api/jobs/{j}").json()["calls"] for j in (job_id, other)] == [[], []]


def test_the_own_job_of_a_call_without_job_header_takes_no_other_call_and_is_charged_once_it_ends(sdk, tollgate, team):
    # Attached calls would keep it from being finished when its own call ends: it would stay open,
    # holding its credit uncharged, until it expired.
    stream = sdk.chat.completions.with_streaming_response.create(
        model="Main", messages=[{"role": "user", "content": "a [chunks=5] [delay_ms=100]"}], stream=True
    )
    client = tollgate.client(team.key)
    with stream as response:
        job_id = response.headers["x-job-id"]
        on_v1 = client.post("/v1/chat/completions", json={"model": "Main", "messages": HELLO}, headers={"X-Job-Id": job_id})
        assert on_v1.status_code == 409 and "takes no other call" in on_v1.json()["error"]["message"]
        on_api = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": HELLO})
        assert on_api.status_code == 409 and "takes no other call" in on_api.json()["detail"]
        list(response.iter_lines())
    job = client.get(f"/api/jobs/{job_id}").json()
    assert (job["status"], job["costs"]["credits_charged"], job["costs"]["total_calls"]) == ("completed", 1, 1)


def test_errors_raise_the_right_sdk_classes(tollgate, admin, team):
    bad_key = OpenAI(base_url=f"{tollgate.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="Main", messages=HELLO)
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="Backup", messages=HELLO)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="NoSuchGroup", messages=HELLO)
    assert missing.value.body["message"] == "Model group 'NoSuchGroup' not found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="Main", messages=[])
    rejecting = admin.team(groups=("Rejects",))
    with pytest.raises(openai.BadRequestError):  # the upstream refuses the request itself
        OpenAI(base_url=f"{tollgate.url}/v1", api_key=rejecting.key, max_retries=0).chat.completions.create(
            model="Rejects", messages=HELLO
        )
    limited = admin.team(groups=("AllLimited",))
    with pytest.raises(openai.RateLimitError):
        OpenAI(base_url=f"{tollgate.url}/v1", api_key=limited.key, max_retries=0).chat.completions.create(
            model="AllLimited", messages=HELLO
        )


def test_the_sdk_retries_a_503_after_its_retry_after_and_never_a_409_or_a_429_that_can_never_fit(tollgate, admin):
    # API.md: what must not be retried carries x-should-retry: false, "which the OpenAI SDKs
    # honour"; a 503 carries Retry-After. The SDK with its own retries (2) is the judge.
    team = admin.team(groups=("Main", "AllFail"), tpm_limit=100)
    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, http_client=http)
    jobs = tollgate.client(team.key)
    job_id = jobs.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    jobs.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"})
    with pytest.raises(openai.ConflictError):  # the SDK retries a 409 unless told not to
        client.chat.completions.create(model="Main", messages=HELLO, max_tokens=10, extra_headers={"X-Job-Id": job_id})
    with pytest.raises(openai.RateLimitError):  # 1,024 tokens by default, over the limit of 100
        client.chat.completions.create(model="Main", messages=HELLO)
    assert len(sent) == 2
    sent.clear()
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="AllFail", messages=HELLO, max_tokens=10)
    assert len(sent) == 3 and time.monotonic() - started >= 2  # twice its Retry-After of 1 s


@pytest.mark.parametrize(
    "limit, advice",
    [
        ({"max_completion_tokens": 5000}, "lower max_completion_tokens or the prompt"),
        ({"max_tokens": 5000, "max_completion_tokens": 10}, "lower max_tokens or the prompt"),
        ({}, "set max_tokens (a call without it is counted at 1024) or shorten the prompt"),
    ],
)
def test_a_call_that_can_never_fit_is_told_which_of_its_fields_to_lower(tollgate, admin, limit, advice):
    # Not to be retried, the message is all the client has to go on. The SDKs' completion limit
    # is max_completion_tokens now (max_tokens is deprecated): a client that sent only that, or
    # neither, was told to lower a max_tokens it never set.
    team = admin.team(tpm_limit=1000)
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="Main", messages=HELLO, **limit)
    assert refused.value.message.endswith(f"so it can never fit; {advice}")


def test_the_sdks_stream_helpers_assemble_the_answer(sdk, tollgate, team):
    with sdk.chat.completions.stream(model="Main", messages=HELLO) as stream:
        text = "".join(event.delta for event in stream if event.type == "content.delta")
        final = stream.get_final_completion()
    assert text == final.choices[0].message.content == "word1 word2 word3 "
    assert final.choices[0].finish_reason == "stop"

    async def run():
        client = AsyncOpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
        async with client.chat.completions.stream(model="Main", messages=HELLO) as stream:
            final = await stream.get_final_completion()
        await client.close()
        return final

    assert asyncio.run(run()).choices[0].message.content == "word1 word2 word3 "


def test_an_upstream_refusal_keeps_the_parameter_it_names(tollgate, admin):
    # LiteLLM passes on the provider's `param` (the SDK's error.param): which field to fix.
    team = admin.team(groups=("Rejects",))
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="Rejects", messages=HELLO, stream=stream)
        assert (refused.value.param, refused.value.code) == ("messages", "upstream_rejected")


def test_no_credits_is_permission_denied(tollgate, admin):
    team = admin.team(credits=0)
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="Main", messages=HELLO)
    assert "Insufficient credits" in info.value.message


def test_error_shape_is_openais(tollgate, team):
    response = tollgate.client(team.key).post("/v1/chat/completions", json={"model": "NoSuchGroup", "messages": HELLO})
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "status, error_type",
    [
        (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
        (404, "not_found_error"), (405, "invalid_request_error"), (409, "conflict_error"),
        (413, "invalid_request_error"), (415, "invalid_request_error"), (422, "invalid_request_error"),
        (429, "rate_limit_error"), (500, "server_error"), (503, "service_unavailable"),
        (418, "invalid_request_error"),
    ],
)
def test_an_errors_type_names_its_kind_of_failure(status, error_type):
    # A client may branch on error.type where it has no SDK class to catch.
    assert error_body("/v1/chat/completions", ApiError(status, "no"))["error"]["type"] == error_type


@pytest.mark.parametrize(
    "path", ["/v1beta/chat/completions", "/v10/models", "/api/v1/x", "/chat/completions/x", "/models/a/b"]
)
def test_paths_beside_v1s_answer_their_errors_in_the_detail_shape(path):
    assert error_body(path, ApiError(404, "Not found")) == {"detail": "Not found"}


@pytest.mark.parametrize("path", ["/chat/completions/", "/models/"])
def test_a_client_asking_for_a_root_route_with_a_trailing_slash_is_told_where_the_routes_are(tollgate, team, path):
    response = tollgate.client(team.key).get(path)
    assert response.status_code == 404
    assert f"set the client's base URL to {tollgate.url}/v1" in response.json()["error"]["message"]


def test_unknown_paths_under_v1_and_v1_itself_are_404_in_openais_shape(tollgate, team):
    for path in ("/v1", "/v1/embeddings"):
        response = tollgate.client(team.key).get(path)
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, path


def test_a_call_to_the_responses_api_is_told_to_use_chat_completions(tollgate, team):
    # The Vercel AI SDK's default model (`createOpenAI({baseURL, apiKey})("Main")`, AI SDK 5 on)
    # calls the Responses API, and its user was told only "Not found: POST /v1/responses". The
    # request as @ai-sdk/openai 3 sends it:
    body = {"model": "Main", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]}
    response = tollgate.client(team.key).post("/v1/responses", json=body)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "POST /v1/chat/completions" in message
    assert ".chat(" in message  # the AI SDK's chat model, which the gateway serves


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/completions"])
def test_an_openai_endpoint_the_gateway_does_not_serve_names_those_it_does(tollgate, team, path):
    response = tollgate.client(team.key).post(path, json={"model": "Main", "input": ["x"], "encoding_format": "float"})
    assert response.status_code == 404
    assert "POST /v1/chat/completions" in response.json()["error"]["message"]


@pytest.mark.parametrize("call", ["chat", "models", "model"])
def test_a_client_pointed_at_the_root_rather_than_v1_is_told_where_the_routes_are(tollgate, team, call):
    # LiteLLM's proxy answers at its root too, and its documentation points SDKs there: a
    # client moved over unchanged got only "Not found: POST /chat/completions". Each call of the
    # drop-in (README) is told so, models.retrieve's GET /models/{model} included.
    client = OpenAI(base_url=tollgate.url, api_key=team.key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        if call == "chat":
            client.chat.completions.create(model="Main", messages=[{"role": "user", "content": "hi"}])
        elif call == "models":
            client.models.list()
        else:
            client.models.retrieve("Main")
    assert f"set the client's base URL to {tollgate.url}/v1" in str(caught.value)
    assert caught.value.body["type"] == "not_found_error"  # OpenAI's shape, which the SDK reads


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_for_every_model_is_openais_context_length_exceeded(tollgate, admin, stream):
    # The code clients read to shorten the prompt and ask again.
    team = admin.team(groups=("SmallContext",))
    sdk = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    words = "one two three four five six seven eight nine ten"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="SmallContext", messages=[{"role": "user", "content": words}], stream=stream)
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "messages")
    assert "maximum context length is 8 tokens" in refused.value.message


def test_malformed_json_on_v1_is_400_in_openais_shape(tollgate, team):
    response = tollgate.client(team.key).post(
        "/v1/chat/completions", content=b'{"model": "Main", "temperature": NaN}', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "NaN" in response.json()["error"]["message"]


def test_an_empty_job_header_means_a_job_of_its_own(sdk, tollgate, team):
    raw = sdk.chat.completions.with_raw_response.create(model="Main", messages=HELLO, extra_headers={"X-Job-Id": ""})
    job = tollgate.client(team.key).get(f"/api/jobs/{raw.headers['x-job-id']}").json()
    assert job["status"] == "completed" and job["job_type"] == "chat.completions"


def test_a_call_refused_before_it_starts_opens_no_job(sdk, tollgate, admin, team):
    with pytest.raises(openai.PermissionDeniedError):
        sdk.chat.completions.create(model="Backup", messages=HELLO)
    assert tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()["total"] == 0
    assert admin.get_team(team.team_id)["credits_held"] == 0


def test_a_rate_limited_call_opens_no_job_and_holds_no_credit(tollgate, admin):
    team = admin.team(credits=1, rpm_limit=1)
    client = OpenAI(base_url=f"{tollgate.url}/v1", api_key=team.key, max_retries=0)
    client.chat.completions.create(model="Main", messages=HELLO)
    admin.ok("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": 1, "reason": "one more job"})
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="Main", messages=HELLO)
    assert tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()["total"] == 1
    body = admin.get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"], body["credits_available"]) == (1, 0, 1)


def test_a_client_that_hangs_up_before_the_first_byte_fails_its_implicit_job_uncharged(make_tollgate, fake_url):
    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    client = OpenAI(base_url=f"{server.url}/v1", api_key=team.key, max_retries=0, timeout=0.5)
    slow = [{"role": "user", "content": "slow to start [first_byte_ms=8000]"}]
    for stream in (False, True):
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="Main", messages=slow, stream=stream)
    def statuses() -> list[str]:
        jobs = server.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()["jobs"]
        return [j["status"] for j in jobs]

    assert wait_for(lambda: "in_progress" not in statuses(), timeout=3)
    assert statuses() == ["failed", "failed"]
    body = server.admin().get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"]) == (0, 0)


def test_a_client_that_hangs_up_mid_stream_has_its_implicit_job_completed_and_charged(tollgate, admin):
    # API.md: a /v1 call's own job is charged when its client hung up after tokens were spent.
    team = admin.team()
    client = tollgate.client(team.key)
    body = {"model": "Main", "stream": True, "messages": [{"role": "user", "content": "a [chunks=30] [delay_ms=100]"}]}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-job-id"]
        assert next(line for line in response.iter_lines() if line.startswith("data: "))
    assert wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["status"] != "in_progress", timeout=5)
    job = client.get(f"/api/jobs/{job_id}").json()
    assert [call["status"] for call in job["calls"]] == ["cancelled"]
    assert (job["status"], job["costs"]["credits_charged"]) == ("completed", 1)


def test_the_client_cannot_finish_the_own_job_of_a_v1_call_even_while_no_call_of_it_runs(make_tollgate, fake_url):
    # The job of a call made without X-Job-Id is the gateway's to end, in the write of the
    # call's record: the client completing it as failed first would get the answer uncharged.
    import sqlite3

    server = make_tollgate(upstream_url=fake_url)
    team = server.admin().team()
    client = server.client(team.key)
    body = {"model": "Main", "stream": True, "messages": [{"role": "user", "content": "a [chunks=5] [delay_ms=150]"}]}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-job-id"]
        lines = response.iter_lines()
        next(lines)
        # Its call no longer running: only the job's being the call's own refuses the client.
        with sqlite3.connect(server.database, timeout=10) as db:
            db.execute("UPDATE llm_calls SET status = 'success' WHERE job_id = ?", (job_id,))
        refused = client.post(f"/api/jobs/{job_id}/complete", json={"status": "failed"})
        assert refused.status_code == 409, refused.text
        for _ in lines:
            pass
    job = client.get(f"/api/jobs/{job_id}").json()
    assert (job["status"], job["costs"]["credits_charged"]) == ("completed", 1)


def test_the_own_job_of_a_v1_call_once_finished_answers_a_repeated_completion_without_charging_again(sdk, tollgate, admin, team):
    # Only while its call runs is it the gateway's alone to end: once ended, asking again for the
    # status it ended with is the same answer as for any finished job, with no new charge.
    job_id = sdk.chat.completions.with_raw_response.create(model="Main", messages=HELLO).headers["x-job-id"]
    client = tollgate.client(team.key)
    response = client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["costs"]["credits_charged"]) == ("completed", 1)
    assert admin.get_team(team.team_id)["credits_used"] == 1


def test_an_unknown_job_in_the_job_header_has_one_error_code_whatever_the_id_looks_like(tollgate, team):
    # "not-a-job" and a well-formed UUID no job has are the same mistake, reported the same
    # way ("Job '...' not found", 404): a client branching on error.code must not need both.
    import uuid

    client = tollgate.client(team.key)
    codes = set()
    for job_id in ("not-a-job", str(uuid.uuid4())):
        response = client.post(
            "/v1/chat/completions", json={"model": "Main", "messages": HELLO}, headers={"X-Job-Id": job_id}
        )
        assert response.status_code == 404
        codes.add(response.json()["error"]["code"])
    assert codes == {"not_found"}
