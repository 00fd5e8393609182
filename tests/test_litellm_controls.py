"""What a team's key must not reach through a call's body: models outside its groups, LiteLLM's
own routing and retries, the headers LiteLLM sends the provider."""

import ast
from pathlib import Path

import pytest

from proxy.demo import litellm_venv
from proxy.errors import ApiError
from proxy.validation import parse_call
from tests.support import fake_log, tag
from tests.test_llm_calls import calls_of, new_job, say


def litellm_banned_names() -> list[str]:
    """The names LiteLLM's own source lists in _BANNED_REQUEST_BODY_PARAMS, which
    is_request_body_safe refuses in a body (the observability and pricing fields it derives
    into that list are not literals, and are left out)."""
    (source,) = Path(litellm_venv()).glob("lib/python*/site-packages/litellm/proxy/auth/auth_utils.py")
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_BANNED_REQUEST_BODY_PARAMS":
            assert isinstance(node.value, ast.Tuple)
            return [item.value for item in node.value.elts if isinstance(item, ast.Constant)]
    raise AssertionError(f"no _BANNED_REQUEST_BODY_PARAMS in {source}")


def litellm_source(module: str) -> ast.Module:
    (source,) = Path(litellm_venv()).glob(f"lib/python*/site-packages/litellm/{module}")
    return ast.parse(source.read_text())


def string_constants(node: ast.AST) -> set[str]:
    return {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}


def litellm_provider_settings() -> set[str]:
    """The provider settings LiteLLM takes from a request's kwargs over the deployment's own, as its
    source lists them: the fields of CredentialLiteLLMParams, the keys completion() reads from its
    kwargs for the provider (AWS_CREDENTIAL_KWARGS_KEYS, OPTIONAL_KWARGS_KEYS), and the kwargs-only
    fields it drops when a caller redirects api_base (clientside_credential_handler)."""
    names: set[str] = set()
    for node in ast.walk(litellm_source("types/router.py")):
        if isinstance(node, ast.ClassDef) and node.name == "CredentialLiteLLMParams":
            names.update(item.target.id for item in node.body if isinstance(item, ast.AnnAssign))
    for node in ast.walk(litellm_source("litellm_core_utils/get_litellm_params.py")):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if getattr(target, "id", None) in ("AWS_CREDENTIAL_KWARGS_KEYS", "OPTIONAL_KWARGS_KEYS"):
            names |= string_constants(node.value)
    for node in ast.walk(litellm_source("router_utils/clientside_credential_handler.py")):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "kwargs_only_fields":
            names |= string_constants(node.value)
    assert {"aws_region_name", "vertex_project", "aws_secret_access_key", "oci_key", "tenant_id"} <= names, names
    return names - {"extra_body"}  # checked on its own: it may not carry any of them


def test_extra_body_cannot_change_the_model_the_provider_is_asked_for_on_v1(tollgate, admin, fake_url):
    # LiteLLM merges extra_body into the provider's request after routing: its `model` replaced
    # the group's model there, so a team granted only 'Backup' was answered by 'primary'.
    team = admin.team(groups=("Backup",))
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "Backup", "messages": say(f"hi [tag={label}]"), "extra_body": {"model": "primary"}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "extra_body.model"
    assert fake_log(fake_url, label) == []


def test_extra_body_cannot_change_the_model_the_provider_is_asked_for_on_api(tollgate, admin, fake_url):
    team = admin.team(groups=("Backup",))
    client = tollgate.client(team.key)
    label = tag()
    body = {"messages": say(f"hi [tag={label}]"), "extra_body": {"model": "primary"}}
    response = client.post(f"/api/jobs/{new_job(client)}/llm-call", json=body)
    assert response.status_code == 422, response.text
    assert "extra_body.model" in response.json()["detail"]
    assert fake_log(fake_url, label) == []


@pytest.mark.parametrize("field", ["extra_headers", "headers"])
def test_a_call_cannot_set_the_headers_litellm_sends_the_provider(tollgate, team, fake_url, field):
    # LiteLLM sends these as HTTP headers to the provider: the deployment's Authorization
    # replaced, or OpenAI-Organization / OpenAI-Project picking whose account pays.
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "Main", "messages": say(f"hi [tag={label}]"),
            field: {"Authorization": "Bearer wrong-provider-key", "OpenAI-Project": "proj-other"}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == field
    assert fake_log(fake_url, label) == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/jobs/{job}/llm-call"])
def test_router_settings_override_cannot_add_fallbacks_outside_the_teams_groups(tollgate, admin, fake_url, path):
    # LiteLLM's route_request merges a body's router_settings_override into the router's
    # kwargs: its fallbacks took a team granted only 'AllFail' to 'backup'.
    team = admin.team(groups=("AllFail",))
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "AllFail", "messages": say(f"hi [tag={label}]"),
            "router_settings_override": {"fallbacks": ["backup"]}}
    response = client.post(path.format(job=new_job(client)), json=body)
    assert response.status_code == 422, response.text
    assert "backup" not in [entry["model"] for entry in fake_log(fake_url, label)]


def test_model_group_retry_policy_cannot_make_litellm_retry_a_call(tollgate, admin, fake_url):
    # num_retries is refused; LiteLLM's per-request retry policy did the same: every failure of
    # 'fail-500' asked the provider three more times, for one call counted by the gateway.
    team = admin.team(groups=("AllFail",))
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "AllFail", "messages": say(f"hi [tag={label}]"),
            "model_group_retry_policy": {"fail-500": {"InternalServerErrorRetries": 3}}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "model_group_retry_policy"
    assert fake_log(fake_url, label) == []


def test_a_call_cannot_choose_the_providers_organization(tollgate, team, fake_url):
    # LiteLLM sends a body's `organization` to the provider as OpenAI-Organization: the account
    # that pays. The OpenAI SDKs send theirs as a header, which the gateway does not pass on.
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "Main", "messages": say(f"hi [tag={label}]"), "organization": "org-other"}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "organization"
    assert fake_log(fake_url, label) == []


def assert_refused_on_both_routes(client, fake_url: str, field: str, value, named: str | None = None) -> None:
    """A body carrying `field` is a 422 naming it (or `named`, a part of its value) on /v1 and on
    the job API, and never reaches the upstream."""
    named = named or field
    label = tag()
    on_v1 = client.post("/v1/chat/completions", json={"model": "Main", "messages": say(f"hi [tag={label}]"), field: value})
    assert on_v1.status_code == 422, on_v1.text
    assert on_v1.json()["error"]["param"] == named
    on_api = client.post(f"/api/jobs/{new_job(client)}/llm-call", json={"messages": say(f"hi [tag={label}]"), field: value})
    assert on_api.status_code == 422 and on_api.json()["detail"].startswith(f"{named}: ")
    assert fake_log(fake_url, label) == []


@pytest.mark.parametrize("field, value", [
    ("vertex_credentials", '{"type": "service_account"}'), ("azure_ad_token", "eyJ0eXAi.token"),
    ("s3_endpoint_url", "https://collector.example"), ("user_config", {"model_list": []}),
    ("aws_role_name", "arn:aws:iam::123456789012:role/other"),
])
def test_credentials_and_endpoints_litellm_bans_from_a_body_are_refused_naming_them(tollgate, team, fake_url, field,
                                                                                 value):
    # LiteLLM refuses them too, but as Tollgate installs it (without prisma) with a bare 500,
    # which was taken for a failing model: every model tried, then a 503 that clients retry.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, field, value)


def assert_refused_at_the_top_and_in_extra_body(field: str) -> None:
    for body, param in (({field: "x"}, field), ({"extra_body": {field: "x"}}, f"extra_body.{field}")):
        with pytest.raises(ApiError) as refused:
            parse_call({"model": "Main", "messages": say("hi"), **body}, openai=True)
        assert (refused.value.status, refused.value.param) == (422, param)


def test_every_credential_and_endpoint_litellm_bans_by_name_is_refused_by_the_gateway(litellm):
    # Read from the LiteLLM the tests run: one that bans more names fails here.
    names = litellm_banned_names()
    assert "vertex_credentials" in names and "api_base" in names
    for field in names:
        assert_refused_at_the_top_and_in_extra_body(field)


# Fields LiteLLM refuses in a body that the gateway does not name itself: an observability
# destination, a price, a banned name inside metadata.
LITELLM_REFUSED_BODIES = [
    {"langfuse_host": "https://collector.example"},
    {"cache_read_input_token_cost": 0},
    {"metadata": {"api_base": "https://collector.example"}},
]


@pytest.mark.parametrize("route", ["llm-call", "llm-call-stream"])
@pytest.mark.parametrize("extra", LITELLM_REFUSED_BODIES, ids=lambda extra: next(iter(extra)))
def test_a_body_litellm_refuses_is_a_400_once_every_model_got_its_bare_500(tollgate, team, fake_url, route, extra):
    # LiteLLM without prisma hides its refusal behind a bare 500, the same for every model: a 503
    # made clients resend it forever. Each model is asked (the same 500 also answers a model's
    # answer LiteLLM failed to send), none of their providers.
    client = tollgate.client(team.key)
    job_id = new_job(client)
    label = tag()
    response = client.post(f"/api/jobs/{job_id}/{route}", json={"messages": say(f"hi [tag={label}]"), **extra})
    assert response.status_code == 400, response.text
    assert "retry-after" not in response.headers
    assert "LiteLLM refused the request before trying any model" in response.json()["detail"]
    (call,) = calls_of(client, job_id)
    assert (call["status"], call["model"], call["attempts"]) == ("error", "backup", 2)
    assert "LiteLLM refused the request" in call["error"]
    assert fake_log(fake_url, label) == []


def test_a_body_litellm_refuses_is_a_400_in_openais_shape_on_v1(tollgate, team):
    client = tollgate.client(team.key)
    body = {"model": "Main", "messages": say("hi"), "langfuse_host": "https://collector.example"}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_rejected" and "before trying any model" in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/jobs/{job}/llm-call", "/api/jobs/{job}/llm-call-stream"])
def test_litellm_refusing_a_body_with_its_401_is_the_callers_400_not_the_gateways_misconfiguration(make_tollgate,
                                                                                                 fake_url, path):
    # A LiteLLM with prisma (its Docker image) says why, as a 401 typed auth_error: that is not
    # LiteLLM refusing Tollgate's key. The fake answers a body carrying langfuse_host as it does.
    server = make_tollgate(upstream_url=fake_url)
    client = server.client(server.admin().team().key)
    label = tag()
    body = {"model": "Main", "messages": say(f"hi [tag={label}]"), "langfuse_host": "https://collector.example"}
    response = client.post(path.format(job=new_job(client)), json=body)
    assert response.status_code == 400, response.text
    assert "Rejected Request: langfuse_host is not allowed in request body." in response.text
    assert "allow_client_side_credentials" not in response.text  # LiteLLM's advice is for its operator
    assert [sent["model"] for sent in fake_log(fake_url, label)] == ["primary"]
    assert "upstream key" not in server.log()


@pytest.mark.parametrize("field, value", [
    ("aws_region_name", "ap-southeast-2"), ("vertex_project", "someone-elses-project"),
    ("vertex_location", "asia-east1"),
    ("aws_access_key_id", "AKIAIOSFODNN7EXAMPLE"), ("litellm_credential_name", "other-team-azure"),
    ("tenant_id", "00000000-0000-0000-0000-000000000000"), ("use_litellm_proxy", True), ("ssl_verify", False),
])
def test_a_call_cannot_override_the_provider_settings_of_a_groups_models(tollgate, team, fake_url, field, value):
    # LiteLLM's router puts a body's fields over the deployment's own: aws_region_name would send a
    # Bedrock call to another region of the operator's AWS account, vertex_project bill another GCP
    # project, litellm_credential_name use another of the credentials LiteLLM stores. They reached it.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, field, value)


def test_every_provider_setting_litellm_lets_a_body_override_is_refused_by_the_gateway(litellm):
    # Read from the LiteLLM the tests run: one that takes more from a body fails here.
    for field in sorted(litellm_provider_settings()):
        assert_refused_at_the_top_and_in_extra_body(field)


@pytest.mark.parametrize("field, value", [("original_function", 1), ("_target_order", 1), ("specific_deployment", True),
                                          ("client", 1), ("self", 1)])
def test_litellm_internal_arguments_are_refused_not_tried_on_every_model(tollgate, team, fake_url, field, value):
    # LiteLLM failed on them: a 500 (original_function, whatever its value) or a 429 "No deployments
    # available" (_target_order, specific_deployment) that the gateway took for the model failing,
    # so every model of the group was asked in vain; `client` a 400 that named no field; `self`, a
    # second one to LiteLLM's router, a 500 whatever its value.
    client = tollgate.client(team.key)
    label = tag()
    body = {"model": "Main", "messages": say(f"hi [tag={label}]"), field: value}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == field
    assert fake_log(fake_url, label) == []


def test_a_call_cannot_name_the_key_litellm_caches_its_answer_under(tollgate, team, fake_url):
    # LiteLLM reads and writes its response cache under a body's cache_key as given: with caching
    # on, a team was served another team's cached answer by naming its key, and stored its own
    # answer under another team's key, which that team then got for its own question.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "cache_key", "0" * 64)


@pytest.mark.parametrize("field, value", [("litellm_params", {"preset_cache_key": "0" * 64}), ("litellm_params", {}),
                                          ("preset_cache_key", "0" * 64)])
def test_a_call_cannot_name_the_key_litellm_caches_its_answer_under_in_its_litellm_params(tollgate, team, fake_url,
                                                                                          field, value):
    # LiteLLM takes a body's litellm_params for its own: their preset_cache_key is the key its
    # response cache reads and writes the call's answer under, as cache_key's was. With caching on,
    # a team stored its answer to a prompt of its choosing under the key of another team's
    # question, which that team was then served, and read any answer cached under a key it named.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, field, value)


def test_a_call_cannot_set_how_long_litellm_cools_down_a_deployment_it_fails_on(tollgate, team, fake_url):
    # LiteLLM's router takes a body's cooldown_time over the router's own when the call fails a
    # deployment (a 429 from its provider, a timeout): one call of `cooldown_time: 86400` took that
    # deployment away from every team's calls for a day, where LiteLLM's own setting gave it back
    # after seconds.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "cooldown_time", 86_400)


def test_a_call_cannot_turn_off_the_operators_logging(tollgate, team, fake_url):
    # "no-log": true made LiteLLM skip every logging callback the operator configured (all but its
    # own spend tracking) for the call.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "no-log", True)


def test_a_call_cannot_have_litellm_log_its_request_and_answer(tollgate, team, fake_url):
    # litellm_request_debug: true made LiteLLM write the call's whole request (a curl command with
    # its messages) and the provider's raw answer to its log at WARNING, whatever level the operator
    # set its log to, for every call a team chose.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "litellm_request_debug", True)


@pytest.mark.parametrize("field, value", [("success_callback", ["s3"]), ("failure_callback", ["langfuse"]),
                                          ("success_callback", [{"name": "x"}])])
def test_a_call_cannot_turn_on_the_operators_logging_integrations(tollgate, team, fake_url, field, value):
    # LiteLLM ran the integrations a body named for the call (its prompt and answer logged to S3,
    # Langfuse... with the credentials in the operator's environment); an object among them failed
    # with a 500 of LiteLLM's that the gateway took for the model failing (every model tried, a 503).
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, field, value)


def test_a_call_cannot_turn_down_the_operators_langsmith_sampling(tollgate, team, fake_url):
    # LiteLLM takes a body's langsmith_sampling_rate over the operator's: at 0 its LangSmith
    # logging skipped the call, as "no-log" skipped every callback.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "langsmith_sampling_rate", 0)


def test_a_call_cannot_keep_its_answer_in_litellms_cache_longer_than_the_operator_does(tollgate, team, fake_url):
    # LiteLLM stores the answer under a body's cache.ttl over its cache's own: with a TTL of seconds
    # set by the operator, the answer was still served an hour later to every team asking the same.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "cache", {"ttl": 3600}, "cache.ttl")


def test_a_call_cannot_set_how_long_litellms_cache_keeps_its_answer(tollgate, team, fake_url):
    # A body's top-level ttl does the same where the operator set no TTL of the cache's own.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "ttl", 86_400)


@pytest.mark.parametrize("field, value, named", [("cache", {"namespace": "staging"}, "cache.namespace"),
                                                 ("metadata", {"redis_namespace": "staging"}, "metadata.redis_namespace")])
def test_a_call_cannot_choose_the_namespace_of_litellms_cache(tollgate, team, fake_url, field, value, named):
    # LiteLLM reads and writes its cache under a body's namespace over the operator's: a team read
    # and filled the cache of whatever else shares that Redis under another namespace (staging, say).
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, field, value, named)


def litellm_langfuse_metadata_keys() -> set[str]:
    """The metadata keys LiteLLM's own source names as Langfuse's controls of a call: those its
    Langfuse OTEL logger maps onto the span (_set_metadata_attributes) and its proxy's trace
    controls (LITELLM_TRACE_CONTROL_METADATA_FIELDS)."""
    names: set[str] = set()
    for node in ast.walk(litellm_source("integrations/langfuse/langfuse_otel.py")):
        if isinstance(node, ast.FunctionDef) and node.name == "_set_metadata_attributes":
            for assign in ast.walk(node):
                if isinstance(assign, ast.AnnAssign) and getattr(assign.target, "id", None) == "mapping":
                    names |= {key.value for key in assign.value.keys if isinstance(key, ast.Constant)}
    for node in ast.walk(litellm_source("proxy/litellm_pre_call_utils.py")):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if getattr(target, "id", None) == "LITELLM_TRACE_CONTROL_METADATA_FIELDS":
            names |= string_constants(node.value)
    assert {"existing_trace_id", "mask_input", "trace_id", "session_id", "generation_name"} <= names, names
    return names


# The labels of a call that LiteLLM's logging integrations read from its metadata: they describe
# the call's own record and are passed on.
LOGGING_LABELS = {"generation_name": "summarise", "trace_name": "nightly", "trace_user_id": "alice",
                  "trace_session_id": "conversation-7", "trace_version": "2", "trace_release": "r1",
                  "trace_metadata": {"run": 7}, "trace_tags": ["a"], "version": 3, "tags": ["nightly"],
                  "run_name": "summarise", "span_name": "summarise", "name": "summarise", "display_name": "summarise",
                  "thread_id": "t-1", "opik": {"tags": ["a"], "thread_id": "t-1"}, "spend_logs_metadata": {"run": 7},
                  "Helicone-Property-Feature": "summary", "Helicone-User-Id": "alice", "Helicone-Session-Id": "s-1"}


@pytest.mark.parametrize("key, value", [
    ("trace_id", "another-teams-trace"), ("session_id", "another-teams-trace"),
    ("existing_trace_id", "another-teams-trace"), ("update_trace_keys", ["input", "output"]),
    ("generation_id", "another-calls-generation"), ("parent_observation_id", "another-teams-span"),
    ("id", "3f0c8a52-5d4e-4f0a-9a57-7c1d2b9e4a11"), ("run_id", "3f0c8a52-5d4e-4f0a-9a57-7c1d2b9e4a11"),
    ("parent_run_id", "3f0c8a52-5d4e-4f0a-9a57-7c1d2b9e4a11"), ("dotted_order", "20240101T000000000000Z3f0c8a52"),
    ("span_id", "another-teams-span"), ("parent_id", "another-teams-span"), ("root_span_id", "another-teams-span"),
    ("step_id", "another-teams-step"),
])
def test_a_call_cannot_write_into_another_record_of_the_operators_logging(tollgate, team, fake_url, key, value):
    # LiteLLM's logging wrote the call's prompt and answer under the id its metadata named: Langfuse's
    # trace of that id (session_id is LiteLLM's trace id too), another team's, was sent the call's
    # name, input and output over its own; existing_trace_id added the call to that trace,
    # generation_id wrote over another call's generation (its model, usage and cost); LangSmith,
    # Datadog and Braintrust put the call's run or span under the parent and trace named.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "metadata", {key: value}, f"metadata.{key}")


@pytest.mark.parametrize("key, value", [
    ("mask_input", True), ("mask_output", "yes"), ("langsmith_sampling_rate", 0), ("trace_input", "nothing"),
    ("trace_output", "nothing"), ("trace_timestamp", "2001-01-01T00:00:00Z"), ("prompt", {"type": "chat"}),
    ("prompt", "v2-summary"),
])
def test_a_call_cannot_hide_its_content_from_the_operators_logging(tollgate, team, fake_url, key, value):
    # Langfuse was sent "redacted-by-litellm" for the call's prompt or answer (mask_*), or the
    # trace's given by the call (trace_input, trace_output), a trace dated 2001, out of every recent
    # view, or no generation at all (a prompt that is not a Langfuse prompt object, a string say);
    # LangSmith left the call out at a sampling rate of 0, as the top-level field (refused) did.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "metadata", {key: value}, f"metadata.{key}")


@pytest.mark.parametrize("value, named", [
    ({"project_name": "another-teams-project"}, "metadata.project_name"),
    ({"project_id": "another-teams-project"}, "metadata.project_id"),
    ({"opik": {"project_name": "another-teams-project"}}, "metadata.opik.project_name"),
    ({"opik": {"current_span_data": {"trace_id": "another-teams-trace", "id": "span"}}},
     "metadata.opik.current_span_data"),
    ({"trace_public": True}, "metadata.trace_public"),
    ({"trace_environment": "production"}, "metadata.trace_environment"),
    ({"debug_langfuse": True}, "metadata.debug_langfuse"),
])
def test_a_call_cannot_choose_where_the_operators_logging_writes_it(tollgate, team, fake_url, value, named):
    # LangSmith logged the call into the project named, Braintrust and Opik likewise; Langfuse made
    # its trace public (readable by anyone with its link) or put it in another environment than the
    # operator's; debug_langfuse wrote LiteLLM's own metadata of the call (its key's hash, its
    # address) into the trace, past the operator's redact_user_api_key_info.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "metadata", value, named)


@pytest.mark.parametrize("key", ["Helicone-Omit-Request", "Helicone-Omit-Response", "Helicone-Auth", "helicone-omit-request"])
def test_a_call_cannot_set_the_helicone_headers_of_the_operators_logging(key):
    # LiteLLM's Helicone logging sends the metadata as its log's Helicone headers, over its own
    # Helicone-Auth: the call's prompt or answer kept out of the operator's Helicone, or logged
    # to another account.
    with pytest.raises(ApiError) as refused:
        parse_call({"model": "Main", "messages": say("hi"), "metadata": {key: "true"}}, openai=True)
    assert (refused.value.status, refused.value.param) == (422, f"metadata.{key}")


@pytest.mark.parametrize("key", ["generation_name", "trace_name", "version"])
@pytest.mark.parametrize("value", [{"a": 1}, ["a"]])
def test_langfuse_labels_that_are_not_strings_are_refused_naming_them(key, value):
    # Langfuse dropped the generation (generation_name), the trace (trace_name) or both (version) of
    # a call so labelled: the operator's logging had no record of it.
    with pytest.raises(ApiError) as refused:
        parse_call({"model": "Main", "messages": say("hi"), "metadata": {key: value}}, openai=True)
    assert (refused.value.status, refused.value.param) == (422, f"metadata.{key}")


def test_a_calls_labels_are_passed_on_to_litellms_logging():
    request = parse_call({"model": "Main", "messages": say("hi"), "metadata": LOGGING_LABELS}, openai=True)
    assert request.params["metadata"] == LOGGING_LABELS


def test_every_langfuse_control_litellm_reads_from_metadata_is_refused_or_a_label(litellm):
    # Read from the LiteLLM the tests run: one that reads another control fails here.
    for key in sorted(litellm_langfuse_metadata_keys() - LOGGING_LABELS.keys()):
        with pytest.raises(ApiError) as refused:
            parse_call({"model": "Main", "messages": say("hi"), "metadata": {key: "x"}}, openai=True)
        assert refused.value.param == f"metadata.{key}", key


def test_a_call_may_still_keep_out_of_litellms_cache():
    # Its own answer only: not read from the cache, not stored in it.
    cache = {"no-cache": True, "no-store": True}
    assert parse_call({"model": "Main", "messages": say("hi"), "cache": cache}, openai=True).params["cache"] == cache


@pytest.mark.parametrize("value", [True, ["ttl"]])
def test_cache_controls_that_are_not_an_object_are_refused_naming_them(value):
    with pytest.raises(ApiError) as refused:
        parse_call({"model": "Main", "messages": say("hi"), "cache": value}, openai=True)
    assert (refused.value.status, refused.value.param) == (422, "cache")


def test_a_call_cannot_choose_how_litellm_spreads_calls_over_a_models_deployments(tollgate, team, fake_url):
    # LiteLLM's router takes a body's routing_strategy over the operator's for the call: with two
    # deployments weighted 100 to 1, usage-based-routing-v2 sent half of a team's calls to the one
    # the operator kept for overflow (another account, another region, or a smaller quota).
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "routing_strategy", "usage-based-routing-v2")


def test_a_call_cannot_choose_its_place_in_litellms_request_queue(tollgate, team, fake_url):
    # A body's priority sent the call through LiteLLM's scheduler at that place (lower first):
    # ahead of every other team's calls while the deployments are busy.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "priority", -100)


def test_a_call_cannot_search_litellms_vector_stores(tollgate, team, fake_url):
    # LiteLLM searched any vector store registered with it (Tollgate's key may use them all) and
    # put the documents it found into the call's prompt: another team's knowledge base.
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "vector_store_ids", ["vs_other_team"])


def test_a_tool_cannot_search_litellms_vector_stores(tollgate, team, fake_url):
    # A file_search tool naming vector stores is searched by LiteLLM as vector_store_ids are.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}},
             {"type": "file_search", "vector_store_ids": ["vs_other_team"]}]
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "tools", tools, "tools[1].vector_store_ids")


def test_a_call_cannot_run_the_tools_of_litellms_mcp_servers(tollgate, team, fake_url):
    # LiteLLM listed the named MCP server's tools for the model, ran the one it called (every
    # server is open to Tollgate's key) and asked the model again with its answer: the operator's
    # internal tools reached, and two model calls made for the one the gateway counted.
    tools = [{"type": "mcp", "server_label": "internal", "server_url": "litellm_proxy/mcp/internal",
              "require_approval": "never"}]
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, "tools", tools, "tools[0].type")


@pytest.mark.parametrize("where, named", [("top", "guardrails[1]"), ("metadata", "metadata.guardrails[1]")])
def test_a_call_cannot_set_the_parameters_of_the_operators_guardrails(tollgate, team, fake_url, where, named):
    # An object naming a guardrail carries `extra_body`, which LiteLLM (Enterprise) sends the
    # guardrail's API over the operator's settings: its thresholds turned off for the team's calls.
    guardrails = ["pii-mask", {"lakera-guard": {"extra_body": {"breakdown": False, "payload": False}}}]
    field, value = ("guardrails", guardrails) if where == "top" else ("metadata", {"guardrails": guardrails})
    assert_refused_on_both_routes(tollgate.client(team.key), fake_url, field, value, named)


@pytest.mark.parametrize("value", ["pii-mask", {"pii-mask": {}}])
def test_guardrails_that_are_not_a_list_are_refused_naming_them(value):
    with pytest.raises(ApiError) as refused:
        parse_call({"model": "Main", "messages": say("hi"), "guardrails": value}, openai=True)
    assert (refused.value.status, refused.value.param) == (422, "guardrails")


def test_guardrails_named_by_the_call_are_passed_on():
    request = parse_call({"model": "Main", "messages": say("hi"), "guardrails": ["pii-mask"],
                          "metadata": {"guardrails": ["toxicity"], "run": 7}}, openai=True)
    assert request.params["guardrails"] == ["pii-mask"]
    assert request.params["metadata"] == {"guardrails": ["toxicity"], "run": 7}
