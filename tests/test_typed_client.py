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
