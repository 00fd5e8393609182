"""The OpenAI-compatible API under /v1, for a one-line `base_url` swap.

A call joins the open job named by `X-Job-Id`, or else is a job of its own:
completed (and charged) when the call succeeds, or when the client hung up
after tokens were spent; failed otherwise. Answers are the upstream's bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import KeyAuthenticator
from .bodies import header, read_json_object
from .calls import SHUT_DOWN, CallPipeline
from .config import Config
from .errors import ApiError
from .groups import GroupCatalog
from .ids import new_id
from .jobs_api import canonical_job_id
from .json_codec import JSONResponse
from .metrics import Metrics
from .observe import notes
from .records import IMPLICIT_JOB_TYPE, CallOutcome
from .store import NotFound, Store
from .streaming import SSERelay
from .validation import parse_call

log = logging.getLogger("tollgate.openai")
UNANSWERED = "the answer never reached the client: the database refused its call's record (503)"


class OpenAIApi:
    def __init__(
        self,
        store: Store,
        auth: KeyAuthenticator,
        calls: CallPipeline,
        groups: GroupCatalog,
        metrics: Metrics,
        config: Config,
    ) -> None:
        self._store = store
        self._auth = auth
        self._calls = calls
        self._groups = groups
        self._metrics = metrics
        self._config = config
        self._max_body = config.server.max_body_bytes

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
        team_id = principal.team.team_id
        notes(request)["team"] = team_id
        call_request = parse_call(await read_json_object(request, self._max_body), openai=True)
        group = await self._calls.check(principal, call_request)
        job_header = (header(request, b"x-job-id") or "").strip()
        implicit = not job_header
        # The implicit job's id is chosen here, so it can be failed even if creating it is interrupted.
        job_id = new_id() if implicit else canonical_job_id(job_header)
        finished = False

        async def finish_implicit(completed: bool, error: str | None = None) -> None:
            nonlocal finished
            if not implicit or finished:
                return
            status = "completed" if completed else "failed"
            # Done only once the store took it: a refusal leaves it to be done again.
            _, changed = await self._store.finish_job(job_id, status, None, error)
            finished = True
            if changed:
                self._metrics.observe_job(team_id, status)

        async def recorded(outcome: CallOutcome, answered: bool) -> None:
            # The call's own job: charged when it succeeded, or when the client hung up after
            # tokens were spent; failed (its hold released) otherwise, a shutdown's cut included,
            # and so is one whose answer the client never had (a 503: its record was refused).
            if not answered:
                await finish_implicit(False, UNANSWERED)
                return
            spent = outcome.status == "cancelled" and outcome.completion_tokens > 0 and outcome.error != SHUT_DOWN
            await finish_implicit(outcome.status == "success" or spent, outcome.error)

        job_begun = False  # until then there is no implicit job to fail

        async def create_implicit_job() -> None:
            nonlocal job_begun
            job_begun = True
            await self._store.create_job(
                team_id, IMPLICIT_JOB_TYPE, None, {"implicit": True}, self._config.jobs.credits_per_job, job_id
            )
            self._metrics.observe_job(team_id, "created")

        try:
            # The implicit job is made once the call's limits admit it: a rate-limited call
            # makes no job, and holds no credit a job of the team's own could need.
            call = await self._calls.admit(
                principal,
                job_id,
                call_request,
                stream=call_request.stream,
                jobs_api=False,
                group=group,
                notes=notes(request),
                on_recorded=recorded,
                before_start=create_implicit_job if implicit else None,
            )
        except BaseException as exc:
            if job_begun:
                await self._fail_quietly(finish_implicit, exc)
            raise
        if not call_request.stream:
            done = await self._calls.complete(call, request.receive)
            response = Response(done.answer.body, media_type="application/json")
            response.raw_headers += call.raw_headers()
            return response
        return await self._calls.stream(call, request.receive, drop_usage_only=not call_request.client_wants_usage)

    @staticmethod
    async def _fail_quietly(finish: Callable[[bool, str | None], Awaitable[None]], exc: BaseException) -> None:
        """Fail an implicit job whose call never started, without hiding why it did not."""
        try:
            await asyncio.shield(finish(False, _reason(exc)))
        except NotFound:
            pass  # the job was never created
        except BaseException:
            log.exception("could not fail the implicit job of a refused call")

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


def _model_json(name: str, created: float) -> dict[str, object]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "tollgate"}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    return type(exc).__name__
