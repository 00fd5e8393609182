"""What a team's key must not reach through a call's body: models outside its groups, LiteLLM's
own routing and retries, the headers LiteLLM sends the provider."""

import pytest

from tests.support import fake_log, tag
from tests.test_llm_calls import new_job, say


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
