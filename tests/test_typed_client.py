"""examples/typed_client.py, the async client Tollgate ships for the client documentation."""

import asyncio

import pytest

from examples.typed_client import SaaSLLMClient, SaaSLLMError


def test_a_429_that_can_never_fit_is_not_retried(tollgate, admin):
    # API.md: what must not be retried carries `x-should-retry: false`; each retry would be
    # refused the same way, after seconds of backoff.
    team = admin.team(key={"name": "tiny", "tpm_limit": 100})
    sent: list[str] = []

    async def run() -> SaaSLLMError:
        async with SaaSLLMClient(base_url=tollgate.url, team_id=team.team_id, virtual_key=team.key) as client:
            job_id = await client.create_job("never-fits")
            client._http.event_hooks["request"].append(lambda request: _note(sent, request.url.path))
            with pytest.raises(SaaSLLMError) as info:
                await client.chat(job_id, [{"role": "user", "content": "hi"}], max_tokens=500)
            return info.value

    error = asyncio.run(run())
    assert error.status == 429 and "can never fit" in str(error)
    assert len([path for path in sent if path.endswith("/llm-call")]) == 1


async def _note(sent: list[str], path: str) -> None:
    sent.append(path)


def test_a_429_is_retried_once_its_retry_after_has_passed(make_tollgate):
    server = make_tollgate(rate_limits={"window": "2s"})
    team = server.admin().team(rpm_limit=1)
    sent: list[str] = []

    async def run() -> str:
        async with SaaSLLMClient(base_url=server.url, team_id=team.team_id, virtual_key=team.key) as client:
            job_id = await client.create_job("retries")
            client._http.event_hooks["request"].append(lambda request: _note(sent, request.url.path))
            await client.chat(job_id, [{"role": "user", "content": "first"}])
            second = await client.chat(job_id, [{"role": "user", "content": "second"}])  # the window is full
            return second.content

    assert asyncio.run(run()) == "word1 word2 word3 word4 word5 "
    assert len([path for path in sent if path.endswith("/llm-call")]) == 3


def test_an_error_other_than_429_500_or_503_is_not_retried(tollgate, admin):
    team = admin.team(groups=("Main",))
    sent: list[str] = []

    async def run() -> SaaSLLMError:
        async with SaaSLLMClient(base_url=tollgate.url, team_id=team.team_id, virtual_key=team.key) as client:
            job_id = await client.create_job("no-retry")
            client._http.event_hooks["request"].append(lambda request: _note(sent, request.url.path))
            with pytest.raises(SaaSLLMError) as info:
                await client.chat(job_id, [{"role": "user", "content": "hi"}], model_group="Backup")
            return info.value

    error = asyncio.run(run())
    assert error.status == 403 and "does not have access to model group 'Backup'" in str(error)
    assert len([path for path in sent if path.endswith("/llm-call")]) == 1
