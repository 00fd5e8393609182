"""A small async client for Tollgate's job API, as the client documentation uses it.

    async with SaaSLLMClient(base_url="http://localhost:8003", team_id="acme-corp",
                             virtual_key="sk-...") as client:
        job_id = await client.create_job("chat")
        reply = await client.chat(job_id, [{"role": "user", "content": "Hi"}])
        print(reply.choices[0].message["content"])
        async for chunk in client.chat_stream(job_id, [{"role": "user", "content": "Hi"}]):
            if chunk.choices:
                print(chunk.choices[0].delta.get("content", ""), end="")
        result = await client.complete_job(job_id, "completed")
        print(result.credits_remaining)

It retries 429, 500 and 503 answers (honouring Retry-After) and nothing else, except
those marked `x-should-retry: false`. Only httpx is needed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx

RETRY_STATUSES = (429, 500, 503)


class SaaSLLMError(Exception):
    """An error answer from the gateway: its status and message."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Choice:
    message: dict[str, Any]
    finish_reason: str | None
    index: int = 0


@dataclass
class ChatResponse:
    call_id: str
    choices: list[Choice]
    usage: dict[str, int]
    metadata: dict[str, Any]

    @property
    def content(self) -> str:
        return self.choices[0].message.get("content") or ""


@dataclass
class ChunkChoice:
    delta: dict[str, Any]
    finish_reason: str | None
    index: int = 0


@dataclass
class ChatChunk:
    id: str | None
    model: str | None
    choices: list[ChunkChoice]
    usage: dict[str, Any] | None = None


@dataclass
class JobResult:
    job_id: str
    status: str
    costs: dict[str, Any]
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def credits_remaining(self) -> int:
        return self.costs["credits_remaining"]

    @property
    def total_cost_usd(self) -> float:
        return self.costs["total_cost_usd"]

    @property
    def total_tokens(self) -> int:
        return self.costs["total_tokens"]


class SaaSLLMClient:
    def __init__(
        self, base_url: str, team_id: str, virtual_key: str, timeout: float = 120.0, max_retries: int = 3
    ) -> None:
        self.team_id = team_id
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/api",
            headers={"Authorization": f"Bearer {virtual_key}"},
            timeout=timeout,
        )

    async def __aenter__(self) -> "SaaSLLMClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            response = await self._http.post(path, json=body)
            if _retryable(response) and attempt < self.max_retries:
                await asyncio.sleep(_retry_delay(response, attempt))
                continue
            return _json_or_raise(response)
        raise AssertionError("unreachable")

    async def create_job(self, job_type: str, metadata: dict[str, Any] | None = None, user_id: str | None = None) -> str:
        body: dict[str, Any] = {"job_type": job_type, "team_id": self.team_id}
        if metadata is not None:
            body["metadata"] = metadata
        if user_id is not None:
            body["user_id"] = user_id
        return (await self._post("/jobs/create", body))["job_id"]

    async def chat(
        self,
        job_id: str,
        messages: list[dict[str, Any]],
        model_group: str | None = None,
        purpose: str | None = None,
        **params: Any,
    ) -> ChatResponse:
        data = await self._post(f"/jobs/{job_id}/llm-call", _call_body(messages, model_group, purpose, params))
        reply = data["response"]
        message = {"role": reply.get("role", "assistant"), "content": reply.get("content", "")}
        if reply.get("tool_calls"):
            message["tool_calls"] = reply["tool_calls"]
        meta = data.get("metadata", {})
        usage = {
            "prompt_tokens": meta.get("prompt_tokens", 0),
            "completion_tokens": meta.get("completion_tokens", 0),
            "total_tokens": meta.get("tokens_used", 0),
        }
        return ChatResponse(data["call_id"], [Choice(message, reply.get("finish_reason"))], usage, meta)

    async def chat_stream(
        self,
        job_id: str,
        messages: list[dict[str, Any]],
        model_group: str | None = None,
        purpose: str | None = None,
        **params: Any,
    ) -> AsyncIterator[ChatChunk]:
        body = _call_body(messages, model_group, purpose, params)
        for attempt in range(self.max_retries + 1):
            async with self._http.stream("POST", f"/jobs/{job_id}/llm-call-stream", json=body) as response:
                if _retryable(response) and attempt < self.max_retries:
                    await response.aread()
                    await asyncio.sleep(_retry_delay(response, attempt))
                    continue
                if response.status_code != 200:
                    await response.aread()
                    _json_or_raise(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        error = chunk["error"]
                        raise SaaSLLMError(502, error.get("message", error) if isinstance(error, dict) else error)
                    yield ChatChunk(
                        id=chunk.get("id"),
                        model=chunk.get("model"),
                        choices=[
                            ChunkChoice(c.get("delta") or {}, c.get("finish_reason"), c.get("index", 0))
                            for c in chunk.get("choices") or []
                        ],
                        usage=chunk.get("usage"),
                    )
                return

    async def complete_job(
        self,
        job_id: str,
        status: str = "completed",
        metadata: dict[str, Any] | None = None,
        error_message: str | None = None,
    ) -> JobResult:
        body: dict[str, Any] = {"status": status}
        if metadata is not None:
            body["metadata"] = metadata
        if error_message is not None:
            body["error_message"] = error_message
        data = await self._post(f"/jobs/{job_id}/complete", body)
        return JobResult(data["job_id"], data["status"], data["costs"], data.get("calls", []))

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return _json_or_raise(await self._http.get(f"/jobs/{job_id}"))

    async def get_team(self) -> dict[str, Any]:
        return _json_or_raise(await self._http.get(f"/teams/{self.team_id}"))


def _retryable(response: httpx.Response) -> bool:
    # The gateway marks what a retry cannot change (a call that can never fit its limits).
    return response.status_code in RETRY_STATUSES and response.headers.get("x-should-retry") != "false"


def _call_body(
    messages: list[dict[str, Any]], model_group: str | None, purpose: str | None, params: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, **params}
    if model_group is not None:
        body["model_group"] = model_group
    if purpose is not None:
        body["purpose"] = purpose
    return body


def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = {"detail": response.text}
    if response.status_code >= 400:
        raise SaaSLLMError(response.status_code, data.get("detail", data) if isinstance(data, dict) else data)
    return data


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    retry_after = response.headers.get("retry-after", "")
    if retry_after.isdigit():
        return min(float(retry_after), 30.0)
    return min(0.5 * 2**attempt, 8.0)
