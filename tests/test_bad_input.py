"""Bad input gets a clear 4xx with a message: never a 500, a hang or lost data."""

import asyncio
import gzip
import json
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from starlette.requests import Request
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.bodies import parse_json_object, read_json_object
from proxy.config import Config, DatabaseConfig
from proxy.errors import ApiError, StoreErrorHandler, from_store_error, unwritable_database_log
from proxy.json_codec import dumps
from proxy.records import Team
from proxy.server_wide import served_methods
from proxy.store import (
    CallInProgress, Conflict, Forbidden, InsufficientCredits, JobClosed, NotFound, StoreBusy, StoreError,
    StoreUnavailable, TeamSuspended,
)
from proxy.validation import (
    MAX_MESSAGES, MAX_METADATA_BYTES, parse_call, parse_complete, parse_job_create, parse_paging,
)
from tests.support import Tollgate, fake_log, tag, wait_for
from tests.test_operations import families, value

HELLO = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def job_url(tollgate, team):
    job_id = tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    return f"/api/jobs/{job_id}/llm-call"


def post_raw(tollgate, key, path, content: bytes, content_type="application/json"):
    return httpx.post(
        f"{tollgate.url}{path}",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=30,
    )


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"{not json", "Malformed JSON"),
        (b'{"messages": [', "Malformed JSON"),
        (b"", "empty"),
        (b'{"messages": [{"role": "user", "content": NaN}]}', "NaN"),
        (b'{"temperature": Infinity, "messages": []}', "Infinity"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 100_000, "Malformed JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "out of range"),
    ],
)
def test_malformed_json_is_400_with_a_message(tollgate, team, job_url, raw, fragment):
    response = post_raw(tollgate, team.key, job_url, raw)
    assert response.status_code == 400
    assert fragment in response.json()["detail"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_utf16_or_utf32_body_is_400_saying_to_send_utf8(tollgate, team, job_url, encoding):
    # Without a byte order mark, UTF-16 of ASCII text is valid UTF-8 with NULs between the
    # characters: its refusal quoted json's "Expecting property name enclosed in double quotes".
    body = json.dumps(HELLO).encode(encoding)
    response = post_raw(tollgate, team.key, job_url, body, f"application/json; charset={encoding}")
    assert response.status_code == 400
    assert response.json()["detail"] == "Request body is UTF-16 or UTF-32; send JSON as UTF-8"


def test_paired_surrogates_are_fine(tollgate, team, job_url):
    response = post_raw(tollgate, team.key, job_url, b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body, detail",
    [
        ({}, "messages: is required"),
        ({"messages": []}, "messages: must not be empty"),
        ({"messages": "hi"}, "messages: must be a list of message objects"),
        ({"messages": ["hi"]}, "messages[0]: must be an object with 'role' and 'content'"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role: is required and must be a string"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role: must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be a string"),
        ({**HELLO, "temperature": 2.5}, "temperature: must be between 0 and 2"),
        ({**HELLO, "temperature": "warm"}, "temperature: must be a number"),
        ({**HELLO, "temperature": True}, "temperature: must be a number"),
        ({**HELLO, "top_p": 1.5}, "top_p: must be between 0 and 1"),
        ({**HELLO, "frequency_penalty": -3}, "frequency_penalty: must be between -2 and 2"),
        ({**HELLO, "presence_penalty": 9}, "presence_penalty: must be between -2 and 2"),
        ({**HELLO, "max_tokens": 0}, "max_tokens: must be at least 1"),
        ({**HELLO, "max_tokens": 1.5}, "max_tokens: must be an integer"),
        ({**HELLO, "max_tokens": 10**30}, "max_tokens: must be at most"),
        ({**HELLO, "temperature": 10**400}, "temperature: must be between 0 and 2"),
        ({**HELLO, "seed": 2**70}, "seed: must be at most"),
        ({**HELLO, "stop": 7}, "stop: must be a string or a list of strings"),
        ({**HELLO, "stop": ["x"] * 17}, "stop: must hold at most 16 sequences"),
        ({**HELLO, "stop": ["x" * 5000]}, "stop: sequences must be at most 1000 characters"),
        ({**HELLO, "model_group": 12}, "model_group: must be a string"),
        ({**HELLO, "purpose": ["a"]}, "purpose: must be a string"),
        ({**HELLO, "purpose": "p" * 257}, "purpose: must be at most 256 characters"),
        ({**HELLO, "user": "u" * 257}, "user: must be at most 256 characters"),
        ({**HELLO, "tools": "all"}, "tools: must be a list of objects"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]},
         "messages[0].content[0].text: is required in a 'text' part and must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text: is required in a 'text' part"),
        ({**HELLO, "response_format": "json"}, "response_format: must be an object"),
        ([1, 2], "Request body must be a JSON object"),
    ],
)
def test_invalid_call_bodies_are_422_naming_the_field(tollgate, team, job_url, body, detail):
    response = tollgate.client(team.key).post(job_url, json=body)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(detail)


# LiteLLM answers each of these with a 500 of its own, which the gateway took for the model
# failing: the call was tried on every model of its group and came back as a 503, which clients retry.
@pytest.mark.parametrize(
    "body, detail",
    [
        ({**HELLO, "tool_choice": {}}, "tool_choice: an object must have a 'type'"),
        ({**HELLO, "tool_choice": {"type": "function"}}, "tool_choice: an object must have a 'type'"),
        ({**HELLO, "tool_choice": {"type": "auto", "function": None}}, "tool_choice: an object must have a 'type'"),
        ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
         "messages[0].content[0].type: is required and must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "bogus", "text": "hi"}]}]},
         "messages[0].content[0].type: must be one of: text, image_url"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].image_url: is required"),
        ({"messages": [*HELLO["messages"], {"role": "assistant", "content": None, "tool_calls": True}]},
         "messages[1].tool_calls: must be a list of objects"),
        ({**HELLO, "web_search_options": "on"}, "web_search_options: must be an object"),
        # LiteLLM reads the options as a mapping whenever the key is sent, null included.
        ({**HELLO, "web_search_options": None}, "web_search_options: must be an object"),
    ],
)
def test_call_bodies_litellm_would_fail_with_a_500_are_422_naming_the_field(tollgate, team, job_url, body, detail):
    client = tollgate.client(team.key)
    response = client.post(job_url, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(detail)
    assert client.get(job_url.removesuffix("/llm-call")).json()["calls"] == []


def assert_422_naming_it_without_a_fallback_or_a_charge(tollgate, team, fake_url, path: str, field: str, bad,
                                                       stream: bool = False) -> None:
    """A call carrying `field: bad` is a 422 naming it; the upstream never asked, no call recorded,
    no job of its own made on /v1, nothing charged. `stream`: a streamed call (on /v1; the
    job API's route streams by its path)."""
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    label = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"hi [tag={label}]"}], field: bad}
    if stream and path.startswith("/v1"):
        body["stream"] = True
    response = client.post(path.format(job=job_id), json=body)
    assert response.status_code == 422, response.text
    if path.startswith("/v1"):
        assert response.json()["error"]["param"] == field
    else:
        assert response.json()["detail"].startswith(f"{field}: ")
    assert fake_log(fake_url, label) == []
    assert client.get(f"/api/teams/{team.team_id}/jobs").json()["total"] == 1
    assert client.get(f"/api/jobs/{job_id}").json()["calls"] == []
    assert client.get(f"/api/teams/{team.team_id}").json()["credits_used"] == 0


# LiteLLM reads its own parameters with a type in mind: another made it fail with a 500 of its own
# (prompt_id: 5 in its prompt registry, a number where it iterates a list of parameter names),
# which the gateway took for the model failing: every model of the group tried, then a 503.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/jobs/{job}/llm-call"])
@pytest.mark.parametrize("field, bad", [("prompt_id", 5), ("additional_drop_params", 5),
                                        ("allowed_openai_params", True)])
def test_a_litellm_parameter_of_the_wrong_type_is_422_naming_it_without_a_fallback_or_a_charge(tollgate, team, fake_url,
                                                                                            path, field, bad):
    assert_422_naming_it_without_a_fallback_or_a_charge(tollgate, team, fake_url, path, field, bad)


# LiteLLM fails a stream on these with a 500 of its own (a plain call not): the gateway took it for
# the model failing, asked every model of the group in vain and answered 503, which clients retry.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/jobs/{job}/llm-call-stream"])
@pytest.mark.parametrize("field, bad", [("merge_reasoning_content_in_choices", "sometimes"), ("complete_response", True)])
def test_a_parameter_litellm_fails_a_stream_on_is_422_naming_it_without_a_fallback_or_a_charge(tollgate, team, fake_url,
                                                                                              path, field, bad):
    assert_422_naming_it_without_a_fallback_or_a_charge(tollgate, team, fake_url, path, field, bad, stream=True)


def test_a_streams_own_litellm_option_of_its_type_is_passed_on():
    body = {**HELLO, "merge_reasoning_content_in_choices": True}
    assert parse_call(body, openai=False).params == body


def test_litellm_parameters_of_the_type_litellm_reads_are_passed_on():
    sent = {"prompt_id": "welcome", "prompt_label": "prod", "prompt_environment": "production",
            "prompt_variables": {"name": "Ada"}, "prompt_version": 2, "tags": ["checkout"],
            "additional_drop_params": ["seed"], "allowed_openai_params": ["reasoning_effort"]}
    assert parse_call({**HELLO, **sent}, openai=False).params == {**HELLO, **sent}
    assert parse_call({**HELLO, "prompt_version": "2"}, openai=False).params["prompt_version"] == "2"


def test_a_litellm_parameter_of_the_right_type_reaches_litellm(tollgate, team, fake_url):
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "Main", "messages": [{"role": "user", "content": f"hi [tag={label}]"}],
            "prompt_id": "no-such-prompt", "allowed_openai_params": []}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert [sent["model"] for sent in fake_log(fake_url, label)] == ["primary"]


def test_the_openai_shapes_of_tool_choice_content_parts_and_tool_calls_are_accepted():
    tool_call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "done", "tool_calls": None},
    ]
    for tool_choice in ("auto", {"type": "auto"}, {"type": "none"}, {"type": "required"},
                        {"type": "function", "function": {"name": "f"}}):
        call = parse_call({"messages": messages, "tool_choice": tool_choice, "web_search_options": {}}, openai=False)
        # The tool call's arguments ("{}") are prompt text too: the model reads them again.
        assert call.params["tool_choice"] == tool_choice
        assert call.prompt_chars == len("be brief" "what is this?" "{}" "42" "done")


def test_a_developer_message_needs_content_as_a_system_message_does():
    for role in ("system", "developer"):
        with pytest.raises(ApiError) as refused:
            parse_call({"messages": [{"role": role, "content": None}, *HELLO["messages"]]}, openai=False)
        assert (refused.value.status, refused.value.message) == (422, "messages[0].content: is required for this role")


def test_a_v1_body_with_null_stream_and_include_usage_is_a_plain_call_without_usage():
    body = {"model": "Main", **HELLO, "stream": None, "stream_options": {"include_usage": None}}
    call = parse_call(body, openai=True)
    assert (call.stream, call.client_wants_usage) == (False, False)


def test_job_create_without_job_type_is_422(tollgate, team):
    response = tollgate.client(team.key).post("/api/jobs/create", json={})
    assert (response.status_code, response.json()) == (422, {"detail": "job_type: is required"})


def test_an_empty_job_type_or_purpose_is_422_saying_it_must_not_be_empty():
    with pytest.raises(ApiError) as refused:
        parse_job_create({"job_type": ""})
    assert (refused.value.status, refused.value.message) == (422, "job_type: must not be empty")
    with pytest.raises(ApiError) as refused:
        parse_call({**HELLO, "purpose": ""}, openai=False)
    assert (refused.value.status, refused.value.message) == (422, "purpose: must not be empty")


def test_complete_with_an_unknown_status_is_422(tollgate, team, job_url):
    response = tollgate.client(team.key).post(job_url.replace("llm-call", "complete"), json={"status": "done"})
    assert response.status_code == 422


@pytest.mark.parametrize("job_id", ["not-a-uuid", "..%2F..%2Fadmin", "123", str(uuid.uuid4())])
def test_unknown_or_malformed_job_id_is_404(tollgate, team, job_id):
    client = tollgate.client(team.key)
    for method, suffix in (("GET", ""), ("POST", "/llm-call"), ("POST", "/llm-call-stream"), ("POST", "/complete")):
        response = client.request(method, f"/api/jobs/{job_id}{suffix}", json={**HELLO, "status": "completed"})
        assert response.status_code == 404, (method, suffix, response.text)
        assert response.json()["detail"]


def test_a_jobs_own_id_spelt_in_no_uuid_form_is_404(tollgate, team, job_url):
    client = tollgate.client(team.key)
    digits = job_url.split("/")[3].replace("-", "")
    for spelling in (" " + digits[1:], "\u0660" + digits[1:], "-" + digits + "-"):
        response = client.get(f"/api/jobs/{spelling}")
        assert response.status_code == 404, (spelling, response.text)
        assert response.json()["detail"] == f"Job '{spelling}' not found"


def test_another_teams_job_is_403(tollgate, admin, team, job_url):
    other = admin.team()
    client = tollgate.client(other.key)
    assert client.post(job_url, json=HELLO).status_code == 403
    assert client.get(job_url.removesuffix("/llm-call")).status_code == 403
    assert client.post(job_url.replace("llm-call", "complete"), json={"status": "completed"}).status_code == 403


def test_another_team_is_403(tollgate, admin, team):
    other = admin.team()
    client = tollgate.client(team.key)
    assert client.get(f"/api/teams/{other.team_id}").status_code == 403
    assert client.get(f"/api/teams/{other.team_id}/jobs").status_code == 403


def test_group_not_granted_is_403_with_the_documented_message(tollgate, team, job_url):
    response = tollgate.client(team.key).post(job_url, json={**HELLO, "model_group": "Backup"})
    assert response.status_code == 403
    assert response.json() == {"detail": f"Team '{team.team_id}' does not have access to model group 'Backup'"}


def test_unknown_group_is_404(tollgate, team, job_url):
    response = tollgate.client(team.key).post(job_url, json={**HELLO, "model_group": "NoSuchGroup"})
    assert (response.status_code, response.json()) == (404, {"detail": "Model group 'NoSuchGroup' not found"})


def test_suspended_team_is_403(tollgate, admin, team, job_url):
    admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"status": "suspended"})
    client = tollgate.client(team.key)
    for path, body in ((job_url, HELLO), ("/api/jobs/create", {"job_type": "t"})):
        response = client.post(path, json=body)
        assert response.status_code == 403
        assert "suspended" in response.json()["detail"]


def test_body_over_the_limit_is_413(tollgate, team, job_url):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}'
    response = post_raw(tollgate, team.key, job_url, big)
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]


def test_wrong_content_type_is_415(tollgate, team, job_url):
    response = post_raw(tollgate, team.key, job_url, b'{"messages": []}', "text/plain")
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_job_metadata_over_64_kib_is_422_at_create_and_complete(tollgate, team, job_url):
    client = tollgate.client(team.key)
    big = {"blob": "x" * (64 * 1024)}
    created = client.post("/api/jobs/create", json={"job_type": "big", "metadata": big})
    assert created.status_code == 422 and "64 KiB" in created.json()["detail"]
    completed = client.post(job_url.replace("llm-call", "complete"), json={"status": "completed", "metadata": big})
    assert completed.status_code == 422 and "64 KiB" in completed.json()["detail"]
    fits = client.post("/api/jobs/create", json={"job_type": "fits", "metadata": {"blob": "x" * 60_000}})
    assert fits.status_code == 200


def test_job_metadata_of_non_ascii_text_is_listed_within_its_64_kib_bound(tollgate, team):
    # The bound is measured as compact UTF-8 so that a page of jobs stays within it: stored (and
    # listed as stored) with json.dumps's escapes, twelve bytes for an emoji, it was three times that.
    client = tollgate.client(team.key)
    metadata = {"note": "\U0001F600\u00e9" * 10_000}  # 60,000 bytes as UTF-8
    assert client.post("/api/jobs/create", json={"job_type": "t", "metadata": metadata}).status_code == 200
    page = client.get(f"/api/teams/{team.team_id}/jobs")
    assert page.json()["jobs"][0]["metadata"] == metadata
    assert len(page.content) < 64 * 1024


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_a_compressed_body_is_415_naming_the_encoding(tollgate, team, job_url, encoding):
    body = gzip.compress(b'{"messages": [{"role": "user", "content": "hi"}]}') if encoding == "gzip" else b"{}"
    response = tollgate.client(team.key).post(
        job_url, content=body, headers={"Content-Type": "application/json", "Content-Encoding": encoding}
    )
    assert response.status_code == 415 and encoding in response.json()["detail"]


def test_a_compressed_body_whose_coding_comes_in_a_second_content_encoding_line_is_415_naming_it(
    tollgate, team, job_url
):
    # Content-Encoding is a list, which may come in several field lines (RFC 9110, 5.3): the
    # first alone was read, and a gzip body so labelled was read as it is, refused as UTF-16.
    body = gzip.compress(b'{"model_group": "Main", "messages": [{"role": "user", "content": "hi"}]}')
    headers = [
        ("Authorization", f"Bearer {team.key}"), ("Content-Type", "application/json"),
        ("Content-Encoding", "identity"), ("Content-Encoding", "gzip"),
    ]
    response = httpx.post(f"{tollgate.url}{job_url}", content=body, headers=headers, timeout=30)
    assert response.status_code == 415 and "gzip" in response.json()["detail"]


def test_a_body_with_a_transfer_coding_besides_chunked_is_415_naming_it(tollgate, team):
    # The parser undoes `chunked` alone: what it hands on is still gzip, here a plain body so
    # labelled, which was read and served as if it were not.
    body = b'{"job_type": "coded"}'
    request = (
        f"POST /api/jobs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {team.key}\r\n"
        f"Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
        f"{len(body):x}\r\n"
    ).encode() + body + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", tollgate.port), timeout=10) as sock:
        sock.sendall(request)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, answer = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 415 "), reply[:300]
    assert "gzip" in json.loads(answer)["detail"]


def test_unknown_route_and_wrong_method_answer_json(tollgate, team):
    client = tollgate.client(team.key)
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404 and missing.json()["detail"] == "Not found: GET /api/nothing-here"
    wrong = client.get("/api/jobs/create-not")  # GET on a job that is not a UUID
    assert wrong.status_code == 404
    method = client.delete("/api/jobs/create")
    assert method.status_code == 405 and method.json()["detail"] == "Method not allowed: DELETE /api/jobs/create"


def test_get_on_the_create_route_is_405_allowing_post(tollgate, team):
    # `/api/jobs/{job_id}` takes GET, but no job is called "create": the route meant is create's.
    answer = tollgate.client(team.key).get("/api/jobs/create")
    assert answer.status_code == 405, answer.text
    assert answer.headers["allow"] == "POST"
    assert "GET /api/jobs/create" in answer.json()["detail"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/jobs/create", "/v1/models"])
def test_a_browsers_cors_preflight_is_405_saying_browsers_are_not_served(tollgate, path):
    # README's Decisions: no CORS. A key in a web page is anyone's key to spend the team's credits;
    # the preflight's answer grants nothing, and says why rather than only "Method not allowed".
    answer = httpx.options(f"{tollgate.url}{path}", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert answer.status_code == 405 and answer.headers["allow"]
    assert not [name for name in answer.headers if name.lower().startswith("access-control-")]
    body = answer.json()
    message = body["error"]["message"] if path.startswith("/v1") else body["detail"]
    assert "CORS" in message and "server" in message, message


def test_an_options_request_that_is_no_cors_preflight_is_not_told_about_browsers(tollgate):
    answer = httpx.options(f"{tollgate.url}/api/jobs/create")
    assert answer.status_code == 405 and "CORS" not in answer.json()["detail"]


def test_a_wrong_method_that_is_no_options_is_not_told_about_browsers_though_it_names_a_preflights_method(tollgate):
    # Only an OPTIONS is a preflight: a GET carrying the header is a wrong method, and told only that.
    answer = httpx.get(f"{tollgate.url}/api/jobs/create", headers={"Access-Control-Request-Method": "POST"})
    assert answer.status_code == 405 and "CORS" not in answer.json()["detail"]


def exchange(port: int, request: bytes) -> bytes:
    """Send `request`, which asks to close the connection after its answer, and read that answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def half_closed_exchange(port: int, request: bytes, after: float = 0) -> bytes:
    """Send `request`, end the sending half of the connection (shutdown(SHUT_WR), as `nc -N`
    does once its input ends) `after` seconds later, and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        time.sleep(after)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def json_post(path: str, key: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def half_closed_post(port: int, path: str, key: str, body: bytes) -> tuple[bytes, bytes]:
    """POST `body` and half-close (`half_closed_exchange`): the answer's head and body."""
    head, _, answer = half_closed_exchange(port, json_post(path, key, body)).partition(b"\r\n\r\n")
    return head, answer


def test_a_client_that_half_closes_after_its_request_gets_the_answer(tollgate, team):
    # It sends nothing more, but still reads: the job it asked for was made, and holds a credit.
    head, answer = half_closed_post(tollgate.port, "/api/jobs/create", team.key, b'{"job_type": "t"}')
    assert head.startswith(b"HTTP/1.1 200 "), head
    job_id = json.loads(answer)["job_id"]
    assert tollgate.client(team.key).get(f"/api/jobs/{job_id}").json()["status"] == "pending"


def test_a_client_that_half_closes_after_a_large_body_gets_its_refusal(tollgate, team):
    # The half-close is read only once the body is (reading pauses past 64 KiB until the app
    # takes it), in the very turn of the loop that writes the refusal: it closed the connection
    # before that write left.
    body = json.dumps({"job_type": "t", "metadata": {"note": "x" * 500_000}}).encode()
    head, answer = half_closed_post(tollgate.port, "/api/jobs/create", team.key, body)
    assert head.startswith(b"HTTP/1.1 422 "), head
    assert "metadata" in json.loads(answer)["detail"]


def test_pipelined_requests_whose_client_half_closes_after_them_are_all_answered(tollgate, team):
    # `printf '...' | nc -N`: the half-close comes while the later requests wait behind the
    # first's answer. Each job asked for was made, and holds a credit: none may go untold.
    reply = half_closed_exchange(tollgate.port, json_post("/api/jobs/create", team.key, b'{"job_type": "t"}') * 3)
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert [answer[:4] for answer in answers] == [b"200 "] * 3, reply
    assert b"connection: close" in answers[-1].partition(b"\r\n\r\n")[0]
    page = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()
    assert page["total"] == 3


def test_a_call_running_ahead_of_queued_requests_is_cancelled_by_a_half_close_and_they_are_answered(
    tollgate, team, job_url
):
    # The half-close reaches the call running, not only the latest request: it frees the
    # upstream at once, as a hang-up would, and the request queued behind it is served next.
    call = json.dumps({"messages": [{"role": "user", "content": "hi [first_byte_ms=3000]"}]}).encode()
    reply = half_closed_exchange(
        tollgate.port,
        json_post(job_url, team.key, call) + json_post("/api/jobs/create", team.key, b'{"job_type": "t"}'),
        after=0.5,  # the call is upstream by then
    )
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert [answer[:4] for answer in answers] == [b"499 ", b"200 "], reply
    job = tollgate.client(team.key).get(job_url.removesuffix("/llm-call")).json()
    assert [call["status"] for call in job["calls"]] == ["cancelled"]


HELD_CREATE = b'{"job_type": "held"}'


def half_closed_behind_a_call(port: int, key: str, job_url: str, cut: int = 0) -> tuple[bytes, float]:
    """`cat requests | nc -N` with a larger input: a call and a job's creation sent at once, a
    second creation (less its last `cut` bytes) in a later read, while the first waits behind the
    call running and it is held unread until its turn; then the half-close. The reply, and the
    seconds from the half-close until the server closed."""
    call = json.dumps({"messages": [{"role": "user", "content": "hi [first_byte_ms=3000]"}]}).encode()
    create = json_post("/api/jobs/create", key, HELD_CREATE)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(json_post(job_url, key, call) + create)
        time.sleep(0.5)  # the call is upstream, the first creation queued behind it
        sock.sendall(create[: len(create) - cut])
        time.sleep(0.2)
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    return reply, time.monotonic() - started


def held_jobs(tollgate, team) -> int:
    page = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs").json()
    return sum(job["job_type"] == "held" for job in page["jobs"])


def test_requests_sent_while_others_wait_their_turn_are_answered_though_the_client_half_closes(
    tollgate, team, job_url
):
    # The half-close after them cut the connection at once, and the two jobs asked for were made
    # unanswered.
    reply, _ = half_closed_behind_a_call(tollgate.port, team.key, job_url)
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert [answer[:4] for answer in answers] == [b"499 ", b"200 ", b"200 "], reply
    assert b"connection: close" in answers[-1].partition(b"\r\n\r\n")[0]
    assert held_jobs(tollgate, team) == 2


def test_a_request_left_unfinished_behind_waiting_ones_when_the_client_half_closes_is_taken_as_hung_up(
    tollgate, team, job_url
):
    # Its body can never come whole: it is dropped as on a hang-up, once the whole requests
    # before it are answered (the job the first creation asked for was made), and not left to
    # the read timeout.
    reply, closed_after = half_closed_behind_a_call(tollgate.port, team.key, job_url, cut=5)
    assert closed_after < 5
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert [answer[:4] for answer in answers] == [b"499 ", b"200 "], reply
    assert held_jobs(tollgate, team) == 1


def test_a_call_whose_client_half_closes_is_cancelled_as_on_a_hang_up_and_answered_499(tollgate, team, job_url):
    # A half-close cannot be told from a hang-up, which frees the upstream at once: the call is
    # cancelled all the same, and the client, if it still reads, is told why.
    body = json.dumps({"messages": [{"role": "user", "content": "hi [first_byte_ms=2000]"}]}).encode()
    head, answer = half_closed_post(tollgate.port, job_url, team.key, body)
    assert head.startswith(b"HTTP/1.1 499 "), head
    assert "closed" in json.loads(answer)["detail"]
    job = tollgate.client(team.key).get(job_url.removesuffix("/llm-call")).json()
    assert [call["status"] for call in job["calls"]] == ["cancelled"]


def test_a_client_that_half_closes_half_way_through_its_body_is_taken_as_hung_up(tollgate, team):
    # Its request can never be whole: the connection closes at once, unanswered, not once the
    # read timeout is over.
    request = json_post("/api/jobs/create", team.key, b'{"job_type": "half"}')[:-5]
    started = time.monotonic()
    assert half_closed_exchange(tollgate.port, request) == b""
    assert time.monotonic() - started < 5


def test_options_asterisk_is_200_allowing_every_method_the_server_serves(tollgate):
    # RFC 9110, 9.3.7: `OPTIONS *` asks about the server as a whole (a liveness probe of some
    # proxies), and was a 404 for a path "/*" nobody asked for.
    reply = exchange(tollgate.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b"", reply
    assert fields[b"content-length"] == b"0"
    assert fields[b"allow"] == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


async def _endpoint(request: Request) -> None:
    pass  # never called: only the routes' methods are read


def test_options_asterisk_allows_methods_past_the_usual_ones_after_them_in_one_order() -> None:
    # Which order a set gives them in changes from one process to the next (hash randomization).
    methods = ["UNLOCK", "PROPFIND", "MOVE", "LOCK", "COPY", "MKCOL"]
    routes = [Route("/dav", _endpoint, methods=methods), Route("/jobs", _endpoint, methods=["POST", "GET"])]
    assert served_methods(routes) == "GET, HEAD, POST, OPTIONS, COPY, LOCK, MKCOL, MOVE, PROPFIND, UNLOCK"


def test_options_asterisk_allows_no_method_for_a_route_that_takes_none() -> None:
    # A mount or a WebSocket route has no methods of its own.
    assert served_methods([Mount("/static", routes=[]), WebSocketRoute("/ws", _endpoint)]) == "OPTIONS"


@pytest.mark.parametrize("method, status", [("OPTIONS", "200"), ("GET", "400")])
def test_a_request_for_the_target_asterisk_is_counted_under_the_route_asterisk(
    tollgate: Tollgate, method: str, status: str
) -> None:
    def counted() -> float:
        return value(families(tollgate), "tollgate_requests", route="*", method=method, status=status)

    before = counted()
    exchange(tollgate.port, method.encode() + b" * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert wait_for(lambda: counted() == before + 1, timeout=5)


@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE"])
def test_any_other_method_on_the_target_asterisk_is_400_saying_it_is_for_options(tollgate, method):
    reply = exchange(tollgate.port, method + b" * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), reply
    detail = json.loads(body)["detail"]
    assert "OPTIONS" in detail and "path" in detail, detail


def test_server_stays_healthy_after_bad_input(tollgate):
    assert httpx.get(f"{tollgate.url}/health/live").json() == {"status": "ok"}


def test_out_of_range_numbers_in_job_metadata_are_refused_not_stored(tollgate, team):
    response = post_raw(tollgate, team.key, "/api/jobs/create", b'{"job_type": "t", "metadata": {"a": 1e999}}')
    assert response.status_code == 400
    jobs = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs")
    assert jobs.status_code == 200 and jobs.json()["total"] == 0


@pytest.mark.parametrize("limit", ["\u00b2", "9" * 5000, "-1", "0", "abc"])
def test_bad_paging_parameters_are_422(tollgate, team, limit):
    response = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs", params={"limit": limit})
    assert response.status_code == 422


def test_an_unknown_status_to_list_jobs_by_is_422(tollgate, team):
    response = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs", params={"status": "done"})
    assert response.status_code == 422


def test_headers_are_read_as_starlette_reads_them_the_first_of_repeated_ones_included():
    from starlette.requests import Request

    from proxy.bodies import header

    raw = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-first"),
           (b"authorization", b"Bearer sk-second"), (b"x-job-id", b"caf\xe9")]
    request = Request({"type": "http", "headers": raw})
    for name in ("authorization", "content-type", "x-job-id", "content-length"):
        assert header(request, name.encode()) == request.headers.get(name)
    assert header(request, b"authorization") == "Bearer sk-first"


@pytest.mark.parametrize("order", ["right key first", "wrong key first", "same key twice"])
@pytest.mark.parametrize("path", ["/api/teams/{team}", "/v1/models"])
def test_a_repeated_authorization_header_is_400_whichever_comes_first(tollgate, team, order, path):
    # Two credentials are ambiguous (an intermediary may have added one): the first was taken,
    # so a request carrying the right key and any other was served.
    keys = {"right key first": [team.key, "sk-wrong"], "wrong key first": ["sk-wrong", team.key],
            "same key twice": [team.key, team.key]}[order]
    response = httpx.get(
        f"{tollgate.url}{path.format(team=team.team_id)}", headers=[("Authorization", f"Bearer {k}") for k in keys]
    )
    assert response.status_code == 400, response.text
    body = response.json()
    message = body["error"]["message"] if path.startswith("/v1/") else body["detail"]
    assert "Authorization" in message


@pytest.mark.parametrize(
    "field, bad",
    [("temperature", 3), ("top_p", -1), ("frequency_penalty", 5), ("presence_penalty", "x"), ("max_tokens", 0),
     ("max_completion_tokens", 0), ("n", 0), ("seed", 1.5), ("top_logprobs", 21), ("user", 5), ("stop", 7),
     ("response_format", "json"), ("metadata", []), ("logit_bias", 1), ("stream_options", "yes"), ("tools", {}),
     ("tool_choice", 3), ("tool_choice", {"type": "function"}), ("web_search_options", "on"), ("prompt_id", 5),
     ("prompt_label", 5), ("prompt_environment", []), ("prompt_variables", "x"), ("prompt_version", 1.5),
     ("tags", "x"), ("tags", [1]), ("additional_drop_params", "x"), ("allowed_openai_params", [None])],
)
def test_every_checked_chat_parameter_is_checked_when_it_is_the_only_one_sent(field, bad):
    from proxy.errors import ApiError
    with pytest.raises(ApiError) as refused:
        parse_call({**HELLO, field: bad}, openai=False)
    assert refused.value.status == 422 and refused.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "field, edge",
    [("temperature", 0), ("temperature", 2), ("top_p", 0), ("top_p", 1), ("frequency_penalty", -2),
     ("presence_penalty", 2), ("max_tokens", 1), ("max_completion_tokens", 10_000_000), ("n", 1), ("n", 128),
     ("top_logprobs", 0), ("top_logprobs", 20), ("seed", -(2**63)), ("seed", 2**63 - 1), ("user", ""),
     ("stop", ["s" * 1000] * 16), ("purpose", "p" * 256)],
)
def test_a_chat_parameter_at_the_edge_of_its_range_is_accepted(field, edge):
    assert parse_call({**HELLO, field: edge}, openai=False).params.get(field, edge) == edge


@pytest.mark.parametrize(
    "field, past",
    [("n", 129), ("seed", 2**63), ("seed", -(2**63) - 1), ("max_completion_tokens", 10_000_001),
     ("stop", ["s" * 1001]), ("messages", HELLO["messages"] * 10_001)],
)
def test_a_chat_parameter_just_past_the_edge_of_its_range_is_422(field, past):
    with pytest.raises(ApiError) as refused:
        parse_call({**HELLO, field: past}, openai=False)
    assert refused.value.status == 422 and refused.value.message.startswith(f"{field}: ")


def test_model_names_the_group_of_an_api_call_and_is_not_forwarded():
    call = parse_call({**HELLO, "model": "Backup"}, openai=False)
    assert call.model_group == "Backup" and "model" not in call.params
    assert parse_call({**HELLO, "model_group": "Main", "model": "Backup"}, openai=False).model_group == "Main"


def test_an_api_calls_stream_and_stream_options_are_the_gateways_and_not_forwarded():
    call = parse_call({**HELLO, "stream": True, "stream_options": {"include_usage": False}}, openai=False)
    assert "stream" not in call.params and "stream_options" not in call.params


@pytest.mark.parametrize(
    "extra, named",
    [({"model": "gpt-4o"}, "extra_body.model"), ({"temperature": 9}, "extra_body.temperature"),
     ("gpt-4o", "extra_body")],
)
def test_extra_body_carrying_the_model_or_a_checked_parameter_is_422(extra, named):
    with pytest.raises(ApiError) as refused:
        parse_call({**HELLO, "extra_body": extra}, openai=False)
    assert (refused.value.status, refused.value.param) == (422, named)


def test_of_several_bad_parameters_the_same_one_is_reported_whatever_their_order():
    bad = {"guardrails": "x", "tags": "x", "prompt_id": 5, "tool_choice": 3, "tools": {}, "logit_bias": 1,
           "stop": 7, "user": 5, "top_logprobs": 21, "n": 0, "max_tokens": 0, "presence_penalty": "x",
           "top_p": -1, "temperature": 9}
    for body in ({**HELLO, **bad}, {**HELLO, **dict(reversed(bad.items()))}):
        with pytest.raises(ApiError) as refused:
            parse_call(body, openai=False)
        assert refused.value.param == "temperature"


def test_content_parts_outside_a_user_message_are_not_held_to_the_user_part_types():
    messages = [*HELLO["messages"], {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]
    assert parse_call({"messages": messages}, openai=False).params["messages"] == messages


def test_a_job_body_carrying_the_mark_of_a_v1_calls_own_job_is_422_naming_its_metadata():
    with pytest.raises(ApiError) as refused:
        parse_job_create({"job_type": "chat.completions", "metadata": {"implicit": True}})
    assert (refused.value.status, refused.value.param) == (422, "metadata")
    assert parse_job_create({"job_type": "chat.completions", "metadata": {"implicit": False}}).metadata == {
        "implicit": False
    }


def test_a_job_may_be_completed_with_an_empty_error_message():
    assert parse_complete({"status": "failed", "error_message": ""}).error_message == ""


def test_job_lists_page_50_from_the_start_and_an_empty_status_means_any():
    assert parse_paging({}) == (None, 50, 0)
    assert parse_paging({"status": "", "limit": "", "offset": ""}) == (None, 50, 0)


def nested_arrays(levels: int) -> bytes:
    return b"[" * levels + b"1" + b"]" * levels


@pytest.mark.parametrize("levels, status", [(98, 200), (99, 400), (990, 400)])
def test_job_metadata_nested_deeper_than_100_levels_is_400_and_not_stored(tollgate, team, levels, status):
    # The body itself is one level, the metadata object a second: 98 arrays make 100.
    body = b'{"job_type": "t", "metadata": {"x": ' + nested_arrays(levels) + b"}}"
    response = post_raw(tollgate, team.key, "/api/jobs/create", body)
    assert response.status_code == status
    jobs = tollgate.client(team.key).get(f"/api/teams/{team.team_id}/jobs")
    assert jobs.status_code == 200 and jobs.json()["total"] == (1 if status == 200 else 0)
    if status == 400:
        assert "nested too deeply" in response.json()["detail"]
    else:
        job = tollgate.client(team.key).get(f"/api/jobs/{response.json()['job_id']}").json()
        assert job["metadata"]["x"] == json.loads(nested_arrays(levels))


def test_a_call_parameter_nested_too_deeply_is_400_and_no_call_is_recorded(tollgate, team, job_url):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "extra": ' + nested_arrays(1000) + b"}"
    response = post_raw(tollgate, team.key, job_url, body)
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]
    job = tollgate.client(team.key).get(job_url.removesuffix("/llm-call")).json()
    assert job["calls"] == []


def test_complete_with_metadata_nested_too_deeply_is_400_and_leaves_the_job_open(tollgate, team, job_url):
    job_path = job_url.removesuffix("/llm-call")
    body = b'{"status": "completed", "metadata": {"x": ' + nested_arrays(975) + b"}}"
    response = post_raw(tollgate, team.key, f"{job_path}/complete", body)
    assert response.status_code == 400
    job = tollgate.client(team.key).get(job_path)
    assert job.status_code == 200 and job.json()["status"] == "pending"
    assert tollgate.client(team.key).post(f"{job_path}/complete", json={"status": "completed"}).status_code == 200


def wide_arrays(count: int) -> bytes:
    """A call body whose metadata is `count` empty arrays: three bytes each, each an object."""
    return b'{"messages": [{"role": "user", "content": "hi"}], "metadata": {"x": [' + b"[]," * count + b"[]]}}"


def test_a_body_of_millions_of_small_arrays_is_read_without_a_garbage_collection():
    # Collections running while such a body was read held the event loop, every team's requests
    # waiting, six times as long as the reading itself: seconds for a 10 MiB body.
    import gc

    from proxy.bodies import parse_json_object

    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        value = parse_json_object(wide_arrays(300_000))
    finally:
        gc.callbacks.remove(count)
    assert len(value["metadata"]["x"]) == 300_001
    assert collections == []
    assert gc.isenabled()


def test_the_depth_check_of_a_wide_body_makes_nothing_per_array_or_object():
    # A stack of (item, depth) pairs, one made for every array and object of the body, took ten
    # times as long as reading the body: seconds of a held event loop for a 10 MiB body.
    import tracemalloc

    from proxy.bodies import MAX_DEPTH, _nested_deeper_than
    from proxy.json_codec import orjson_loads

    value = orjson_loads(wide_arrays(300_000))
    tracemalloc.start()
    try:
        assert not _nested_deeper_than(value, MAX_DEPTH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300_000 * 16  # a reference or two to each array; no object of its own


def read_with_headers(headers: dict[str, str], body: bytes = b'{"job_type": "t"}') -> dict:
    scope = {"type": "http", "method": "POST", "path": "/api/jobs/create",
             "headers": [(name.encode(), value.encode()) for name, value in headers.items()]}
    chunks = [body[:10], body[10:]]

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    return asyncio.run(read_json_object(Request(scope, receive), 1000))


@pytest.mark.parametrize(
    "fitting, past",
    [
        # Without a Content-Length, only the bytes read can tell the body is too large.
        ({"transfer-encoding": "chunked"}, {"transfer-encoding": "chunked"}),
        # server.max_body_bytes is the largest body taken, declared as for a chunked body.
        ({"content-length": "1000"}, {"content-length": "1001"}),
    ],
)
def test_a_body_is_read_up_to_the_limit_and_413_past_it(fitting, past):
    fits = b'{"job_type": "' + b"t" * (1000 - 16) + b'"}'
    assert read_with_headers(fitting, fits) == {"job_type": "t" * 984}
    with pytest.raises(ApiError) as refused:
        read_with_headers(past, fits + b" ")
    assert refused.value.status == 413


def test_a_body_nested_100_levels_deep_is_read_however_many_brackets_it_holds_elsewhere():
    # The depth is walked only past 100 brackets: one at the limit, with more brackets beside it
    # (in a string here), is still within it.
    body = b'{"x": ' + nested_arrays(99) + b', "y": "' + b"[" * 10 + b'"}'
    assert parse_json_object(body)["y"] == "[" * 10


def test_a_lone_surrogate_in_an_objects_key_is_400_as_in_its_value():
    # A key is stored and forwarded as text too (a job's metadata, a call's parameters).
    with pytest.raises(ApiError) as refused:
        parse_json_object(b'{"job_type": "t", "metadata": {"\\ud83d": 1}}')
    assert refused.value.status == 400 and "lone UTF-16 surrogate" in refused.value.message


def test_a_legacy_function_call_sent_back_counts_in_the_prompt_estimate():
    # As a tool call's arguments do: they are prompt text now, as they were completion text.
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"a": 1}'}}]
    assert parse_call({"messages": messages}, openai=False).prompt_chars == len("hi") + len('{"a": 1}')


def test_job_metadata_of_exactly_64_kib_as_json_is_accepted():
    filler = MAX_METADATA_BYTES - len(dumps({"x": ""}))
    metadata = {"x": "a" * filler}
    assert len(dumps(metadata)) == MAX_METADATA_BYTES
    assert parse_job_create({"job_type": "t", "metadata": metadata}).metadata == metadata


def test_a_call_of_as_many_messages_as_allowed_is_read_and_one_more_is_422():
    message = {"role": "user", "content": "hi"}
    assert parse_call({"messages": [message] * MAX_MESSAGES}, openai=False).prompt_chars == 2 * MAX_MESSAGES
    with pytest.raises(ApiError) as refused:
        parse_call({"messages": [message] * (MAX_MESSAGES + 1)}, openai=False)
    assert (refused.value.status, refused.value.param) == (422, "messages")


def test_a_chunked_transfer_coding_written_with_tabs_is_read_as_chunked():
    # Tabs are whitespace in a header's list as spaces are (RFC 9110, 5.6.1): not another coding.
    assert read_with_headers({"transfer-encoding": "\tchunked\t"}) == {"job_type": "t"}


def test_a_v1_include_usage_that_is_no_boolean_is_422_naming_it():
    # Read as truthy, "false" would have asked for the usage chunk.
    body = {"model": "Main", **HELLO, "stream": True, "stream_options": {"include_usage": "false"}}
    with pytest.raises(ApiError) as refused:
        parse_call(body, openai=True)
    assert (refused.value.status, refused.value.param) == (422, "stream_options.include_usage")


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/merge-patch+json", "Application/JSON; charset=utf-8"]
)
def test_a_json_media_type_is_read_whatever_its_suffix_case_or_parameters(content_type):
    assert read_with_headers({"content-type": content_type}) == {"job_type": "t"}


def test_a_body_labelled_with_the_identity_encoding_is_read_as_it_is():
    headers = {"content-type": "application/json", "content-encoding": " Identity "}
    assert read_with_headers(headers) == {"job_type": "t"}


@pytest.mark.parametrize(
    "length, status", [("²", 400), ("1" * 5000, 413), ("0" * 30 + "2", 200)], ids=["superscript", "huge", "zeros"]
)
def test_a_content_length_uvicorn_would_refuse_is_a_4xx_under_any_asgi_server(length, status):
    # uvicorn's parsers refuse these heads; another ASGI server may hand them on, and int()
    # raised on both the superscript digit and the 5,000 digits: a 500.
    scope = {"type": "http", "method": "POST", "path": "/api/jobs/create",
             "headers": [(b"content-length", length.encode("latin-1"))]}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    try:
        assert asyncio.run(read_json_object(Request(scope, receive), 1000)) == {}
        answered = 200
    except ApiError as refused:
        answered = refused.status
    assert answered == status


BROKE = Team("t", "o", "active", 1, 1, 0, ("Main",), None, None, None, None, 0.0)


@pytest.mark.parametrize(
    "error, status, code, retry_after",
    [
        (NotFound("no such job"), 404, "not_found", None),
        (Forbidden("another team's"), 403, "forbidden", None),
        (TeamSuspended("suspended"), 403, "team_suspended", None),
        (InsufficientCredits(BROKE, 1), 403, "insufficient_credits", None),
        (JobClosed("j", "completed"), 409, "job_closed", None),
        (Conflict("taken"), 409, "conflict", None),
        (CallInProgress("running"), 409, "conflict", None),
        (StoreBusy("locked"), 503, "store_busy", "1"),
        (StoreUnavailable("disk full"), 503, "store_unavailable", "10"),
        (StoreError("else"), 500, "internal_error", None),
    ],
)
def test_a_store_refusal_is_answered_with_its_status_code_and_retry_hint(error, status, code, retry_after):
    answer = from_store_error(error)
    assert (answer.status, answer.code, answer.headers.get("Retry-After")) == (status, code, retry_after)
    assert answer.message == (str(error) if status != 500 else "Internal error")


def test_only_an_unwritable_database_is_logged_of_the_store_refusals(caplog):
    # Refusals of the request itself are the client's business, and the access log's.
    handler = StoreErrorHandler(unwritable_database_log())
    request = Request({"type": "http", "method": "POST", "path": "/api/jobs/create", "headers": [], "query_string": b""})
    with caplog.at_level("WARNING", logger="tollgate"):
        for error in (NotFound("no such job"), Conflict("taken"), StoreUnavailable("disk full")):
            asyncio.run(handler.handle(request, error))
    assert [r.getMessage() for r in caplog.records] == [
        "POST /api/jobs/create: 503, the database cannot be written: disk full"
        " (times since last logged: 1; logged at most once a minute)"
    ]


def test_a_database_locked_past_the_busy_timeout_is_logged_naming_the_lock(caplog):
    # Another process's transaction left open answers every write 503, as a full disk does: the
    # operator must find and end it, and nothing but the clients' 503s said so.
    handler = StoreErrorHandler(unwritable_database_log())
    request = Request({"type": "http", "method": "POST", "path": "/api/jobs/create", "headers": [], "query_string": b""})
    with caplog.at_level("WARNING", logger="tollgate"):
        for _ in range(3):
            asyncio.run(handler.handle(request, StoreBusy("The database is busy; try again shortly")))
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("POST /api/jobs/create: 503, the database stayed locked by another process for longer "
                           "than database.busy_timeout")
    assert "once a minute" in line


def test_a_path_with_a_trailing_slash_is_a_404_not_a_redirect(tmp_path: Path) -> None:
    # A redirect would send the client to an address built from its own Host header.
    app = create_app(Config(database=DatabaseConfig(url=f"sqlite:///{tmp_path / 't.db'}")))
    response = TestClient(app).get("/admin/organizations/", follow_redirects=False)
    assert response.status_code == 404
