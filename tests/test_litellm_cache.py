"""LiteLLM's own response cache, which an operator may switch on, kept per team: a call is
answered from it only with an answer its own team's calls stored there.

LiteLLM keys that cache by the call's OpenAI parameters and `user`, which a client chooses, and
not by who calls (every call comes with Tollgate's key). Its fields that change the answer but
not the key (`litellm_system_prompt` here) would otherwise let one team store answers of its
making for another team's questions."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support import LiteLLM, TeamKey, Tollgate, fake_log, litellm_proxy, tag


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
