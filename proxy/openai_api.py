"""The OpenAI-compatible API under /v1, for a one-line `base_url` swap.

A call joins the open job named by `X-Job-Id`, or else is a job of its own:
completed (and charged) when the call succeeds, or when the client hung up
after tokens were spent; failed otherwise. Answers are the upstream's bytes.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import KeyAuthenticator
from .bodies import header, read_json_object
from .calls import SHUT_DOWN, CallPipeline, OwnJob
from .config import Config
from .errors import ApiError
from .groups import GroupCatalog
from .ids import new_id
from .jobs_api import canonical_job_id
from .json_codec import JSONAnswer, JSONResponse
from .observe import notes
from .records import CallOutcome, TerminalJobStatus
from .streaming import SSERelay
from .validation import parse_call

UNANSWERED = "the answer never reached the client: the database refused its call's record (503)"


class OpenAIApi:
    def __init__(self, auth: KeyAuthenticator, calls: CallPipeline, groups: GroupCatalog, config: Config) -> None:
        self._auth = auth
        self._calls = calls
        self._groups = groups
        self._max_body = config.server.max_body_bytes
        # How a call made without X-Job-Id makes and ends a job of its own: one for all such calls.
        self._own_job = OwnJob(config.jobs.credits_per_job, _own_job_end)

    def call_routes(self) -> list[Route]:
        """The route of LLM calls, the hot path (proxy/call_routes.py)."""
        return [Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]

    def routes(self) -> list[Route]:
        return [
            *self.call_routes(),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model}", self.get_model, methods=["GET"]),
        ]

    async def chat_completions(self, request: Request) -> Response | SSERelay:
        principal = await self._auth.authenticate(header(request, b"authorization"))
        notes(request)["team"] = principal.team.team_id
        call_request = parse_call(await read_json_object(request, self._max_body), openai=True)
        if not self._auth.unchanged(principal):  # as of the body's arrival: a key revoked meanwhile starts no call
            principal = await self._auth.authenticate(header(request, b"authorization"))
            notes(request)["team"] = principal.team.team_id
        group = await self._calls.check(principal, call_request)
        job_header = _job_header(request)
        # Without X-Job-Id the call is a job of its own, made as the call starts.
        own_job = None if job_header else self._own_job
        job_id = new_id() if own_job is not None else canonical_job_id(job_header)
        call = await self._calls.admit(
            principal,
            job_id,
            call_request,
            stream=call_request.stream,
            jobs_api=False,
            group=group,
            notes=notes(request),
            own_job=own_job,
        )
        if not call_request.stream:
            done = await self._calls.complete(call, request.receive)
            return JSONAnswer(done.answer.body, call.raw_headers())  # the upstream's bytes, as they came
        return await self._calls.stream(call, request.receive, drop_usage_only=not call_request.client_wants_usage)

    async def list_models(self, request: Request) -> Response:
        principal = await self._auth.authenticate(header(request, b"authorization"))
        data = []
        for name in principal.team.model_groups:
            group = await self._groups.get(name)
            if group is not None:
                data.append(_model_json(name, group.created_at))
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        principal = await self._auth.authenticate(header(request, b"authorization"))
        group = await self._calls.resolve_group(principal.team, request.path_params["model"])
        return JSONResponse(_model_json(group.name, group.created_at))


def _own_job_end(outcome: CallOutcome, answered: bool) -> tuple[TerminalJobStatus, str | None]:
    """How a call's own job ends: charged when the call succeeded, or when the client hung up
    after tokens were spent; failed (its hold released) otherwise, a shutdown's cut included,
    and so is one whose answer the client never had (a 503: its record was refused)."""
    if not answered:
        return "failed", UNANSWERED
    spent = outcome.status == "cancelled" and outcome.completion_tokens > 0 and outcome.error != SHUT_DOWN
    return ("completed" if outcome.status == "success" or spent else "failed"), outcome.error


def _model_json(name: str, created: float) -> dict[str, object]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "tollgate"}


def _job_header(request: Request) -> str:
    """X-Job-Id's value, or "" without one. Two are ambiguous (an intermediary may have added
    one), as two credentials are: neither is taken, rather than whichever came first."""
    values = [value for name, value in request.scope["headers"] if name == b"x-job-id"]
    if len(values) > 1:
        raise ApiError(400, "The request has more than one X-Job-Id header; send at most one")
    return values[0].decode("latin-1").strip() if values else ""
