"""examples/typed_client.py, the async client Tollgate ships for the client documentation."""

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from examples.typed_client import SaaSLLMClient, SaaSLLMError


@contextlib.asynccontextmanager
async def client_in_a_job(url: str, team, job_type: str) -> AsyncIterator[tuple[SaaSLLMClient, str, list[str]]]:
    """The team's client, a job it created, and the paths of the requests it sends from then on."""
    sent: list[str] = []
    async with SaaSLLMClient(base_url=url, team_id=team.team_id, virtual_key=team.key) as client:
        job_id = await client.create_job(job_type)
        client._http.event_hooks["request"].append(lambda request: _note(sent, request.url.path))
        yield client, job_id, sent


async def _note(sent: list[str], path: str) -> None:
    sent.append(path)


def llm_calls(sent: list[str]) -> int:
    return len([path for path in sent if path.endswith("/llm-call")])


def test_a_429_that_can_never_fit_is_not_retried(tollgate, admin):
    # API.md: what must not be retried carries `x-should-retry: false`; each retry would be
    # refused the same way, after seconds of backoff.
    team = admin.team(key={"name": "tiny", "tpm_limit": 100})

    async def run() -> tuple[SaaSLLMError, int]:
        async with client_in_a_job(tollgate.url, team, "never-fits") as (client, job_id, sent):
            with pytest.raises(SaaSLLMError) as info:
                await client.chat(job_id, [{"role": "user", "content": "hi"}], max_tokens=500)
            return info.value, llm_calls(sent)

    error, calls = asyncio.run(run())
    assert error.status == 429 and "can never fit" in str(error)
    assert calls == 1


def test_a_429_is_retried_once_its_retry_after_has_passed(make_tollgate):
    server = make_tollgate(rate_limits={"window": "2s"})
    team = server.admin().team(rpm_limit=1)

    async def run() -> tuple[str, int]:
        async with client_in_a_job(server.url, team, "retries") as (client, job_id, sent):
            await client.chat(job_id, [{"role": "user", "content": "first"}])
            second = await client.chat(job_id, [{"role": "user", "content": "second"}])  # the window is full
            return second.content, llm_calls(sent)

    content, calls = asyncio.run(run())
    assert content == "word1 word2 word3 word4 word5 "
    assert calls == 3


def test_an_error_other_than_429_500_or_503_is_not_retried(tollgate, admin):
    team = admin.team(groups=("Main",))

    async def run() -> tuple[SaaSLLMError, int]:
        async with client_in_a_job(tollgate.url, team, "no-retry") as (client, job_id, sent):
            with pytest.raises(SaaSLLMError) as info:
                await client.chat(job_id, [{"role": "user", "content": "hi"}], model_group="Backup")
            return info.value, llm_calls(sent)

    error, calls = asyncio.run(run())
    assert error.status == 403 and "does not have access to model group 'Backup'" in str(error)
    assert calls == 1
