"""The client API under /api: jobs, their LLM calls, and the caller's own team."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .accounting import message_content
from .auth import KeyAuthenticator, Principal
from .bodies import header, read_json_object
from .calls import Call, CallPipeline, Completed
from .config import Config
from .errors import ApiError
from .ids import canonical_uuid
from .json_codec import JSONAnswer, JSONResponse, dumps
from .metrics import Metrics
from .observe import notes
from .records import Job, is_implicit, iso
from .streaming import SSERelay
from .store import CallInProgress, JobExpired, Store
from .validation import parse_call, parse_complete, parse_job_create, parse_paging
from .views import job_json, jobs_page_json, team_json


# How long a completion waits for a call of its job still running to end before answering 409.
# A client that hangs up on a call and at once completes (or fails) its job, as a client timing
# out does, reaches the gateway a moment before the hang-up's record: the call is about to be
# recorded as cancelled, and the job, left open, would hold its credit until it expired.
CALL_END_GRACE = 0.5


def canonical_job_id(raw: str) -> str:
    """The job id in its stored form; anything that is not a UUID is simply not found."""
    job_id = canonical_uuid(raw)
    if job_id is None:
        raise ApiError(404, f"Job '{raw[:100]}' not found", code="not_found")
    return job_id


def _owned(principal: Principal, job_id: str, job: Job | None) -> Job:
    """The job, if it exists and is the caller's team's: else its 404 or 403."""
    if job is None:
        raise ApiError(404, f"Job '{job_id}' not found", code="not_found")
    if job.team_id != principal.team.team_id:
        raise ApiError(403, f"Job '{job_id}' belongs to another team", code="forbidden")
    return job


class JobsApi:
    def __init__(
        self, store: Store, auth: KeyAuthenticator, calls: CallPipeline, metrics: Metrics, config: Config
    ) -> None:
        self._store = store
        self._auth = auth
        self._calls = calls
        self._metrics = metrics
        self._config = config
        self._max_body = config.server.max_body_bytes

    def call_routes(self) -> list[Route]:
        """The routes of LLM calls, the hot path (proxy/call_routes.py)."""
        return [
            Route("/api/jobs/{job_id}/llm-call", self.llm_call, methods=["POST"]),
            Route("/api/jobs/{job_id}/llm-call-stream", self.llm_call_stream, methods=["POST"]),
        ]

    def routes(self) -> list[Route]:
        return [
            *self.call_routes(),
            Route("/api/jobs/create", self.create_job, methods=["POST"]),
            Route("/api/jobs/{job_id}", self.get_job, methods=["GET"]),
            Route("/api/jobs/{job_id}/complete", self.complete_job, methods=["POST"]),
            Route("/api/teams/{team_id}", self.get_team, methods=["GET"]),
            Route("/api/teams/{team_id}/jobs", self.list_jobs, methods=["GET"]),
        ]

    async def _principal(self, request: Request) -> Principal:
        principal = await self._auth.authenticate(header(request, b"authorization"))
        notes(request)["team"] = principal.team.team_id
        return principal

    async def _own_job(self, principal: Principal, job_id: str) -> Job:
        return _owned(principal, job_id, await self._store.get_job(job_id))

    async def _job_body(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """The job with its costs, its calls and (for an open job) the team's balance, all of one
        moment, so that they agree with each other."""
        view = await self._store.job_view(job_id)
        job, calls, remaining = view if view is not None else (None, [], 0)
        return job_json(_owned(principal, job_id, job), remaining, calls)

    async def create_job(self, request: Request) -> Response:
        principal = await self._principal(request)  # before the body: a bad key's is never read
        body = parse_job_create(await read_json_object(request, self._max_body))
        if not self._auth.unchanged(principal):  # as of the body's arrival
            principal = await self._principal(request)
        team = principal.team
        if body.team_id is not None and body.team_id != team.team_id:
            raise ApiError(403, f"This key belongs to team '{team.team_id}', not '{body.team_id}'", code="forbidden")
        made_room: list[str] = []  # the team's expired jobs failed to free its hold, as a sweep would
        job = await self._store.create_job(
            team.team_id, body.job_type, body.user_id, body.metadata, self._config.jobs.credits_per_job, made_room
        )
        self._metrics.observe_job(team.team_id, "created")
        self._metrics.observe_jobs(team.team_id, "failed", len(made_room))
        notes(request)["job"] = job.job_id
        return JSONResponse({"job_id": job.job_id, "status": job.status, "created_at": iso(job.created_at)})

    async def get_job(self, request: Request) -> Response:
        if request.path_params["job_id"] == "create":
            # No job id is "create" (they are UUIDs): the router matched the template where the
            # client meant the create route with the wrong method.
            raise HTTPException(405, headers={"Allow": "POST"})
        principal = await self._principal(request)
        return JSONResponse(await self._job_body(principal, canonical_job_id(request.path_params["job_id"])))

    async def _admit(self, request: Request, stream: bool) -> Call:
        principal = await self._principal(request)
        job_id = canonical_job_id(request.path_params["job_id"])
        call_request = parse_call(await read_json_object(request, self._max_body), openai=False)
        if not self._auth.unchanged(principal):  # as of the body's arrival: see create_job
            principal = await self._principal(request)
        return await self._calls.admit(
            principal, job_id, call_request, stream=stream, jobs_api=True, notes=notes(request)
        )

    async def llm_call(self, request: Request) -> Response:
        call = await self._admit(request, stream=False)
        done = await self._calls.complete(call, request.receive)
        return JSONAnswer(dumps(self._call_body(call, done)), call.raw_headers())

    async def llm_call_stream(self, request: Request) -> SSERelay:
        call = await self._admit(request, stream=True)
        return await self._calls.stream(call, request.receive)

    @staticmethod
    def _call_body(call: Call, done: Completed) -> dict[str, Any]:
        choice = done.answer.data["choices"][0]
        message = choice.get("message") or {}
        response: dict[str, Any] = {
            "content": message_content(message),
            "role": "assistant",
            "finish_reason": choice.get("finish_reason"),
        }
        if isinstance(message, dict) and message.get("tool_calls"):
            response["tool_calls"] = message["tool_calls"]
        outcome = done.outcome
        return {
            "call_id": call.call_id,
            "response": response,
            "metadata": {
                "tokens_used": outcome.prompt_tokens + outcome.completion_tokens,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "usage_estimated": outcome.usage_estimated,
                "latency_ms": outcome.latency_ms,
                "model_group": call.group.name,
                "model": outcome.model,
                "attempts": outcome.attempts,
                "cost_usd": outcome.cost_usd,
            },
        }

    async def complete_job(self, request: Request) -> Response:
        principal = await self._principal(request)
        job_id = canonical_job_id(request.path_params["job_id"])
        body = parse_complete(await read_json_object(request, self._max_body))
        if not self._auth.unchanged(principal):  # as of the body's arrival: see create_job
            # A key revoked meanwhile finishes no job. A team suspended meanwhile still may
            # (README's Decisions): authenticate() does not refuse a suspended team.
            principal = await self._principal(request)
        job = await self._own_job(principal, job_id)
        if job.status == "in_progress" and is_implicit(job.job_type, job.metadata):
            # The own job of a /v1 call made without X-Job-Id: the gateway finishes (and charges)
            # it when that call ends; the client finishing it first would take the charge away.
            raise ApiError(
                409,
                f"Job '{job_id}' is the own job of a /v1 call made without X-Job-Id: "
                "it is finished when that call ends",
                code="conflict",
            )
        notes(request)["job"] = job_id
        try:
            job, changed = await self._finish_job(job_id, body.status, body.metadata, body.error_message)
        except JobExpired:  # failed now, past its expiry, as a sweep would have
            self._metrics.observe_job(job.team_id, "failed")
            raise
        if changed:
            self._metrics.observe_job(job.team_id, job.status)
        return JSONResponse(await self._job_body(principal, job_id))

    async def _finish_job(
        self, job_id: str, status: str, metadata: dict[str, Any] | None, error_message: str | None
    ) -> tuple[Job, bool]:
        """Finish the job, giving a call of it still running CALL_END_GRACE to end first."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CALL_END_GRACE
        pause = 0.005
        while True:
            try:
                return await self._store.finish_job(job_id, status, metadata, error_message, done_if_cut=True)
            except CallInProgress:
                if loop.time() + pause > give_up:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _own_team(self, principal: Principal, team_id: str) -> None:
        if team_id != principal.team.team_id:
            raise ApiError(403, f"This key belongs to team '{principal.team.team_id}', not '{team_id[:100]}'")

    async def get_team(self, request: Request) -> Response:
        principal = await self._principal(request)
        self._own_team(principal, request.path_params["team_id"])
        team = await self._store.get_team(principal.team.team_id)
        if team is None:
            raise ApiError(404, "Team not found")
        return JSONResponse(team_json(team, self._config))

    async def list_jobs(self, request: Request) -> Response:
        principal = await self._principal(request)
        team_id = request.path_params["team_id"]
        self._own_team(principal, team_id)
        status, limit, offset = parse_paging(request.query_params)
        jobs, total, remaining = await self._store.team_jobs(team_id, status, limit, offset)
        return JSONResponse(jobs_page_json(team_id, jobs, total, limit, offset, remaining))
