"""One LLM call, from admission to its record: the path the job API and the
OpenAI-compatible API share.

admit → (forward with fallbacks) → answer or relay the stream → record.
Every admitted call is recorded exactly once, however it ends: success,
upstream failure, client disconnect or shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from starlette.types import Receive

from .accounting import StreamTally, Usage, completion_chars, cost_of, estimated_usage, usage_from
from .auth import Principal
from .errors import (
    ApiError,
    ClientClosed,
    from_store_error,
    log_store_refusal,
    shutting_down,
    unwritable_database_log,
)
from .forwarding import Answer, Attempt, OpenStream, UpstreamFailed, UpstreamMisconfigured, UpstreamRejected, forward
from .config import RECORD_ATTEMPTS, RateLimitsConfig
from .groups import GroupCatalog
from .ids import new_id
from .limiter import Decision, Limits, RateLimiter, RedisUnavailable
from .metrics import Metrics
from .occasional import Occasional
from .pricing import Pricing
from .records import CallOutcome, CallStatus, JobEnd, ModelGroup, NewCall, Team, TerminalJobStatus
from .store import JobExpired, Store, StoreBusy, StoreError, StoreUnavailable, WrittenThenCancelled
from .streaming import RelayEnd, SSERelay
from .upstream import Upstream
from .validation import CallRequest

log = logging.getLogger("tollgate.calls")

_END_STATUS: dict[str, CallStatus] = {
    "finished": "success",
    "upstream_failed": "error",
    "client_disconnected": "cancelled",
    "shutdown": "cancelled",
}


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Call:
    """An admitted call: recorded as running, not yet answered."""

    principal: Principal
    job_id: str
    call_id: str
    group: ModelGroup
    request: CallRequest
    stream: bool
    jobs_api: bool
    started: float  # event-loop time
    started_wall: float
    deadline: float
    decision: Decision
    notes: dict[str, Any]  # the request's access-log fields
    own_job: OwnJob | None = None  # the job is the call's own: made with its start, ended with its record
    # The models asked by the time the call was cut short, in order: a model listed twice in the
    # group is there once for each place it was asked at.
    asked_before_cut: tuple[str, ...] = ()

    def cut_short_at(self) -> tuple[str | None, int]:
        """The model the call was cut short at, whose rate prices its prompt, and its attempts."""
        return (self.asked_before_cut[-1] if self.asked_before_cut else None), len(self.asked_before_cut)

    def headers(self) -> dict[str, str]:
        """The call's own headers, for an error that answers it."""
        return {name.decode(): value.decode() for name, value in self.raw_headers()}

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as ASGI carries them: what the call's answer sends."""
        call_id = self.call_id.encode()
        # x-request-id too: the OpenAI SDKs show it as a response's `_request_id` and an error's
        # `request_id`, the id a user quotes when asking about a call.
        return [(b"x-job-id", self.job_id.encode()), (b"x-call-id", call_id), (b"x-request-id", call_id),
                *self.decision.raw_headers()]


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Completed:
    answer: Answer
    outcome: CallOutcome


@dataclass(frozen=True, slots=True)
class OwnJob:
    """The job of a call that has one of its own (a /v1 call without X-Job-Id). It is made in
    the same write as the call's start and ended in the same write as the call's record: two
    writes would leave a window where a crash, or the store refusing the second, left the job
    open holding its credit (a job without its call), or a recorded call's job uncharged."""

    default_credits: int  # held (and charged) unless the team sets its own credits per job
    # How the job ends, given the outcome and whether the client has had the answer: not when
    # a non-streaming call's record was refused, and the client got a 503 in its place.
    ends_as: Callable[[CallOutcome, bool], tuple[TerminalJobStatus, str | None]]


# The error of a call the gateway's shutdown cut short: not the client's doing.
SHUT_DOWN = "cut short: the gateway shut down"
_SECRETISH = re.compile(r"sk-[A-Za-z0-9_\-.]{3,}")


def redact(text: str) -> str:
    """Upstream messages can quote keys (LiteLLM's 401 does): never pass one on. Nor half of a
    UTF-16 pair (JSON can escape one, as `\\ud83d`): the database cannot store it as text, and
    the call's record would fail, leaving the call running and its job uncompletable."""
    if not text.isascii():
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _SECRETISH.sub("sk-***", text)


def _in_one_line(error: str) -> str:
    """An upstream's error as a log line quotes it: LiteLLM's messages run over several lines (a
    line of the log each, which no reader takes for the same event) and on for pages at worst."""
    text = " ".join(redact(error).split())
    return text if len(text) <= 200 else text[:199] + "…"


class _Lazy:
    """`function(*args)` as a log line's argument: made only if the line is said (logging formats
    its arguments then), which an Occasional line mostly is not."""

    __slots__ = ("_function", "_args")

    def __init__(self, function: Callable[..., str], *args: Any) -> None:
        self._function = function
        self._args = args

    def __str__(self) -> str:
        return self._function(*self._args)


def _attempts_in_one_line(attempts: list[Attempt]) -> str:
    return "; ".join(f"{attempt.model}: {_in_one_line(attempt.error)}" for attempt in attempts)


# What a connection to LiteLLM that this process could not open for want of a file descriptor
# fails with (EMFILE; ENFILE, the system's, says the same and more): LiteLLM is not at fault,
# and a line blaming it sends the operator to the wrong machine.
_OUT_OF_FILES = "Too many open files"

# Groups come and go through the admin API: the fault lines kept by group (and model) are let go
# past this many, as are the (group, model) pairs said not to be served.
MAX_FAULT_LINES = 1_000


def _line_of(lines: dict[Any, Occasional], key: Any) -> Occasional:
    """The once-a-minute warning kept in `lines` under `key`, made at its first use."""
    line = lines.get(key)
    if line is None:
        if len(lines) >= MAX_FAULT_LINES:
            # A bound, not a cache policy: a fault still going on is said again, a minute early.
            # A line due late is still said (its timer holds it).
            lines.clear()
        line = lines[key] = Occasional(log, logging.WARNING)
    return line


def _over_in(lines: dict[Any, Occasional], key: Any, message: str, *args: Any) -> None:
    """Say the end of the fault kept in `lines` under `key`, if its line was said."""
    line = lines.get(key)
    if line is not None and line.said:
        line.over(message, *args)


def redact_opt(text: str | None) -> str | None:
    return None if text is None else redact(text)


class CallPipeline:
    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        pricing: Pricing,
        groups: GroupCatalog,
        limiter: RateLimiter,
        rate_limits: RateLimitsConfig,
        metrics: Metrics,
        total_timeout: float,
        stall_timeout: float = 30.0,
        stale_margin: float = 60.0,
        unwritable: Occasional | None = None,
    ) -> None:
        """`unwritable`: the app's `unwritable_database_log`, for a call's start the database refuses."""
        self._store = store
        self._upstream = upstream
        self._pricing = pricing
        self._groups = groups
        self._limiter = limiter
        self._rate_limits = rate_limits
        self._metrics = metrics
        self._total_timeout = total_timeout
        self._stall_timeout = stall_timeout  # how long a stream may wait on a client reading nothing
        # How long after its start a call still running counts as left by a dead process
        # (jobs.stale_call_margin past the total timeout): written with the call, for every
        # process's sweeper, whatever its own configuration.
        self._stale_after = total_timeout + stale_margin
        self._running: set[str] = set()  # admitted calls not yet recorded
        # Outcomes the store refused (disk full, I/O error, ...), by call id, with how the call's
        # own job ends (if it has one) and its team, not the whole call (whose request may be
        # megabytes): written by `record_kept` once it takes writes again. Their rows stay
        # 'running' meanwhile.
        self._kept: dict[str, tuple[CallOutcome, JobEnd | None, str]] = {}
        self._key_refused = Occasional(log, logging.ERROR)
        self._unreachable = Occasional(log, logging.WARNING)
        self._out_of_files = Occasional(log, logging.ERROR)  # this process's limit of open files reached
        self._unwritable = unwritable or unwritable_database_log()
        self._said_not_served: set[tuple[str, str]] = set()  # (group, model), said once each
        self._failing_groups: dict[str, Occasional] = {}  # by group: every model failed its calls
        # By (group, model): a model failing calls that the group's next model then answered,
        # which only the calls' records and the fallbacks metric would otherwise tell.
        self._failing_models: dict[tuple[str, str], Occasional] = {}
        # By (group, model): a model breaking streams past their first event, which no fallback
        # can take over: its clients got an error event each, which only the calls' records and
        # the error counter told.
        self._breaking_models: dict[tuple[str, str], Occasional] = {}
        self._pool_full = Occasional(log, logging.WARNING)  # calls waited past upstream.timeouts.connect for a connection
        self.cut_by_shutdown = 0  # calls the shutdown cut short, its grace being over: said as it ends

    async def drain(self, timeout: float) -> tuple[int, int]:
        """At shutdown: wait for calls still being recorded, then try once more to write the
        outcomes kept; return how many calls were never recorded, and how many of those are
        kept outcomes (their figures are in the log)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._running and loop.time() < deadline:
            await asyncio.sleep(0.02)
        kept = await self.record_kept()
        return len(self._running) + kept, kept

    async def record_kept(self) -> int:
        """Write the outcomes the store refused before, oldest first, stopping at the first it
        refuses again; return how many are still kept. Written over the call's row while it
        is running, or closed as interrupted by the sweeper of another process, which could
        not know the outcome was kept here; a retry is safe."""
        written = finished = 0
        for call_id, (outcome, job_end, team_id) in list(self._kept.items()):
            try:
                recorded = await self._write_outcome(outcome, job_end, team_id)
            except Exception as exc:
                log.warning("%d call outcomes still wait for the store (%d written now): %s",
                            len(self._kept), written, exc)
                break
            self._kept.pop(call_id, None)
            if not recorded:
                finished += 1
                continue
            written += 1
        else:
            if written:
                log.warning("%d call outcomes the store had refused are now recorded", written)
        if finished:
            log.warning("%d call outcomes the store had refused were found recorded already: left as they are",
                        finished)
        return len(self._kept)

    async def resolve_group(self, team: Team, name: str | None) -> ModelGroup:
        name = name or team.effective_default_group
        if name is None:
            raise ApiError(403, f"Team '{team.team_id}' has no model group granted", code="no_model_group")
        kept = self._groups.fresh(name)
        group = kept[1] if kept is not None else await self._groups.get(name)
        if group is None:
            raise ApiError(404, f"Model group '{name}' not found", code="model_group_not_found", param="model")
        if name not in team.model_groups:
            raise ApiError(
                403,
                f"Team '{team.team_id}' does not have access to model group '{name}'",
                code="model_group_not_allowed",
                param="model",
            )
        return group

    async def check(self, principal: Principal, request: CallRequest) -> ModelGroup:
        """What must hold before a call may start: an active team and a group it may use."""
        team = principal.team
        if team.status != "active":
            raise ApiError(403, f"Team '{team.team_id}' is suspended", code="team_suspended")
        return await self.resolve_group(team, request.model_group)

    async def admit(
        self,
        principal: Principal,
        job_id: str,
        request: CallRequest,
        *,
        stream: bool,
        jobs_api: bool,
        group: ModelGroup | None = None,
        notes: dict[str, Any] | None = None,
        own_job: OwnJob | None = None,
    ) -> Call:
        """Record the call as running in its job; `group` if `check` already ran. With
        `own_job`, the job `job_id` is the call's own, made as the call starts, once its limits
        admitted it (a call its limits refuse makes no job, and holds no credit)."""
        team = principal.team
        if group is None:
            group = await self.check(principal, request)
        call_id = new_id()
        notes = {} if notes is None else notes
        # The access log names only records that exist: the job once made, the call once started.
        notes["team"] = team.team_id  # set one by one: `update(**fields)` makes a dict to copy
        notes["model_group"] = group.name
        if own_job is None:
            notes["job"] = job_id
        decision = await self._limit(principal, call_id, request)
        now = asyncio.get_running_loop().time()
        # The per-call records are made with positional arguments: by keyword, each is matched by
        # name on every call. Fields in order: principal, job_id, call_id, group, request, stream,
        # jobs_api, started, started_wall, deadline, decision, notes, own_job.
        call = Call(principal, job_id, call_id, group, request, stream, jobs_api,
                    now, time.time(), now + self._total_timeout, decision, notes, own_job)
        new_call = NewCall(
            call_id, job_id, team.team_id, principal.key.key_id, group.name, request.purpose, stream, call.started_wall,
            call.started_wall + self._stale_after,
        )
        # Counted from its start's write on: a start waiting on another process's lock when the
        # shutdown cuts it is written once the lock ends, and the store must still be open for
        # the call's record then (shutdown's drain waits for the calls counted).
        self._running.add(call_id)
        # The own job's: the team's expired jobs failed to free its hold, as a sweep would have.
        made_room: list[str] | None = None if own_job is None else []
        try:
            await self._store.start_call(new_call, None if own_job is None else own_job.default_credits, made_room)
        except asyncio.CancelledError as cut:
            await self._limiter.settle(decision, 0, release=True)
            if not isinstance(cut, WrittenThenCancelled):  # nothing of it written: no call to record
                self._running.discard(call_id)
                raise _cut_by_shutdown("the call was cut short before it started", decision.released().headers()) from None
            # The store finished the insert before letting the cancellation through: the call
            # (and its own job) exists, and is closed rather than left running.
            notes["job"], notes["call"] = job_id, call_id
            if made_room is not None:
                self._observe_own_job(team.team_id, made_room)
            await asyncio.shield(self._finish(call, "cancelled", None, Usage(0, 0), 0, "cancelled before it started"))
            headers = {**call.headers(), **decision.released().headers()}
            raise _cut_by_shutdown("the call was cut short before it started", headers) from None
        except BaseException as exc:
            self._running.discard(call_id)
            await self._limiter.settle(decision, 0, release=True)  # a call that never started counts for nothing
            if isinstance(exc, JobExpired) and exc.failed_now:  # failed by this refusal, as a sweep would have
                self._metrics.observe_job(team.team_id, "failed")
            # Answered here, not by the store's error handler: said through its line.
            log_store_refusal(self._unwritable, "a call could not start", exc)
            refusal = _with_limit_headers(exc, decision)
            if refusal is exc:
                raise
            raise refusal from exc
        notes["job"], notes["call"] = job_id, call_id
        if made_room is not None:
            self._observe_own_job(team.team_id, made_room)
        if self._unwritable.said:  # the call's start was written
            self._unwritable.over("the database takes writes again")
        return call

    def _observe_own_job(self, team_id: str, made_room: list[str]) -> None:
        """A /v1 call's own job made, and the jobs failed to make room for its hold."""
        self._metrics.observe_job(team_id, "created")
        self._metrics.observe_jobs(team_id, "failed", len(made_room))

    async def _limit(self, principal: Principal, call_id: str, request: CallRequest) -> Decision:
        team, key, defaults = principal.team, principal.key, self._rate_limits
        limits = Limits(  # team_id, key_id, team_rpm, team_tpm, key_rpm, key_tpm
            team.team_id,
            key.key_id,
            team.rpm_limit if team.rpm_limit is not None else defaults.rpm,
            team.tpm_limit if team.tpm_limit is not None else defaults.tpm,
            key.rpm_limit,
            key.tpm_limit,
        )
        estimate = request.prompt_estimate + (request.max_tokens or defaults.default_max_tokens)
        try:
            decision = await self._limiter.admit(limits, call_id, estimate)
        except RedisUnavailable:
            # Sooner than the breaker asks Redis again, the retry would be refused the same way.
            retry = max(1, math.ceil(self._limiter.reopens_in()))
            raise ApiError(
                503,
                "Rate limiting is unavailable (Redis is down and on_redis_error is 'deny'); retry shortly",
                code="rate_limiter_unavailable",
                headers={"Retry-After": str(retry)},
            ) from None
        if not decision.admitted:
            self._metrics.observe_rate_limited(team.team_id, decision.refused_kind or "tokens")
            advice = _never_fits_advice(request, defaults.default_max_tokens)
            message, headers = decision.refusal(self._rate_limits.window, advice)
            raise ApiError(429, message, code="rate_limit_exceeded", headers=headers)
        return decision

    def payload(self, call: Call) -> dict[str, Any]:
        payload = dict(call.request.params)
        if call.jobs_api and payload.get("temperature") is None:
            payload["temperature"] = 0.7  # the job API's documented default
        team_id = call.principal.team.team_id
        if payload.get("user") is None:
            payload["user"] = team_id
        # Name team, job and call to LiteLLM so its own logs attribute the spend.
        metadata = dict(payload.get("metadata") or {})
        tags = metadata.get("tags")
        # The client's own tags are kept, but none that could pass for Tollgate's attribution.
        own = [t for t in tags if not (isinstance(t, str) and t.startswith("tollgate-"))] if isinstance(tags, list) else []
        metadata["tags"] = [
            *own,
            f"tollgate-team:{team_id}",
            f"tollgate-job:{call.job_id}",
            f"tollgate-call:{call.call_id}",
            f"tollgate-model-group:{call.group.name}",
        ]
        metadata["tollgate_team_id"] = team_id
        metadata["tollgate_job_id"] = call.job_id
        metadata["tollgate_call_id"] = call.call_id
        metadata["tollgate_model_group"] = call.group.name
        # LiteLLM's response cache, if the operator switches it on, keys a call by its parameters
        # and `user` (the client's to choose), not by who calls: each team's answers are kept
        # under a namespace of the team's own, so no team reads another's, nor stores one for it.
        metadata["redis_namespace"] = "tollgate-team:" + team_id
        payload["metadata"] = metadata
        if payload.get("tags"):  # strings (validation), which LiteLLM adds to the metadata's
            payload["tags"] = [t for t in payload["tags"] if not t.startswith("tollgate-")]
        if call.stream:
            payload["stream"] = True
            options = payload.get("stream_options")  # a /v1 client's own (validation: an object)
            payload["stream_options"] = {**options, "include_usage": True} if options else {"include_usage": True}
        elif "stream_options" in payload:
            del payload["stream_options"]  # for streams only, and LiteLLM drops it from an answer's request
        return payload

    async def complete(self, call: Call, receive: Receive) -> Completed:
        """A non-streaming call: forward, record, return the upstream's answer."""
        try:
            answer = await self._forward(call, receive)
        except BaseException as exc:
            raise await self._failed(call, exc) from None
        assert isinstance(answer, Answer)
        reported = answer.data.get("usage")
        usage = usage_from(reported, answer.headers.get("x-litellm-response-cost"))
        if usage is None:
            # Every choice's text (`n` > 1), as a stream's estimate counts every choice's deltas.
            generated = sum(completion_chars(choice.get("message")) for choice in answer.data["choices"]
                            if isinstance(choice, dict))
            usage = estimated_usage(call.request.prompt_chars, generated, reported)
        try:
            outcome = await self._finish(call, "success", answer.model, usage, answer.attempts, None)
        except StoreUnavailable as exc:
            raise _unrecorded(call, exc) from None
        except asyncio.CancelledError:
            raise _cut_while_recording(call) from None
        return Completed(answer, outcome)

    async def stream(self, call: Call, receive: Receive, drop_usage_only: bool = False) -> SSERelay:
        """A streaming call: forward until the first event, then hand back the relay."""
        try:
            opened = await self._forward(call, receive)
        except BaseException as exc:
            raise await self._failed(call, exc) from None
        assert isinstance(opened, OpenStream)
        tally = StreamTally()

        async def on_end(end: RelayEnd) -> None:
            usage = tally.usage or estimated_usage(call.request.prompt_chars, tally.completion_chars, tally.reported)
            ttft = None if end.first_event_at is None else end.first_event_at - call.started
            error = end.error or (SHUT_DOWN if end.reason == "shutdown" else None)
            if end.reason == "shutdown":
                self.cut_by_shutdown += 1
            elif end.reason == "upstream_failed":
                _line_of(self._breaking_models, (call.group.name, opened.model))(
                    "streams of model '%s' of group '%s' break after their first event (%s): their clients get "
                    "an error event, no fallback", opened.model, call.group.name, _Lazy(_in_one_line, error or ""),
                )
            elif end.reason == "finished" and self._breaking_models:
                _over_in(
                    self._breaking_models, (call.group.name, opened.model),
                    "streams of model '%s' of group '%s' end whole again", opened.model, call.group.name,
                )
            await self._finish(call, _END_STATUS[end.reason], opened.model, usage, opened.attempts, redact_opt(error), ttft)

        return SSERelay(
            opened, tally, call.raw_headers(), call.deadline, on_end, drop_usage_only, self._metrics.active_streams,
            self._stall_timeout,
        )

    async def _forward(self, call: Call, receive: Receive) -> Answer | OpenStream:
        """Forward the call (fallbacks included) while watching its client: a hang-up before
        the answer, or before a stream's first event, cancels the upstream request at once,
        and the call ends as cancelled rather than run on for nobody, holding its job open."""
        task = asyncio.current_task()
        assert task is not None
        cancels_before = task.cancelling()
        hung_up = False

        async def watch() -> None:
            nonlocal hung_up
            while (await receive())["type"] != "http.disconnect":
                pass
            hung_up = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        payload = self.payload(call)
        asked: list[str] = []  # forward() adds each model as it asks it
        failed: list[Attempt] = []  # and each model's failure
        try:
            answered = await forward(
                self._upstream, call.group.models, payload, call.stream, call.deadline, asked, failed
            )
        except asyncio.CancelledError:
            call.asked_before_cut = tuple(asked)
            # Only the watcher's own cancel is taken back: one from anyone else in the same
            # turn (a shutdown's) still stands, though the task was thrown a single error.
            if not hung_up or task.uncancel() > cancels_before:
                raise
            raise ClientClosed("The client closed the connection before the call was answered") from None
        finally:
            watcher.cancel()
            if failed:
                self._say_not_served(call.group.name, failed)
                if any(attempt.pool_full for attempt in failed):
                    self._pool_full(
                        "every connection to LiteLLM was in use (upstream.max_connections: %d) for longer than "
                        "upstream.timeouts.connect: calls moved on to their group's next model, or failed; raise it "
                        "if LiteLLM takes more", self._upstream.max_connections,
                    )
        # Every answered call passes here: what it has to say is looked for without a call.
        if self._unreachable.said or self._key_refused.said or self._out_of_files.said:
            self._heard_from_litellm()
        if self._failing_groups:
            _over_in(self._failing_groups, call.group.name, "model group '%s' answers again", call.group.name)
        if failed:
            self._models_fail(call.group.name, failed, answered.model)
        if self._failing_models:
            _over_in(
                self._failing_models, (call.group.name, answered.model),
                "model '%s' of group '%s' answers again", answered.model, call.group.name,
            )
        return answered

    def _models_fail(self, group: str, failed: list[Attempt], answered_by: str) -> None:
        for attempt in failed:
            # Not the model failing: the group's mistake (said once), the request's, LiteLLM's
            # connection, which another attempt made (one replica of several down), or Tollgate's
            # own pool of them, full (said on its own).
            if attempt.not_served or attempt.too_long or attempt.unreachable or attempt.pool_full:
                continue
            _line_of(self._failing_models, (group, attempt.model))(
                "model '%s' of group '%s' fails calls (%s): the group's next models answer them ('%s' this time)",
                attempt.model, group, _Lazy(_in_one_line, attempt.error), answered_by,
            )

    def _say_not_served(self, group: str, failed: list[Attempt]) -> None:
        """Say, once per group and model, a model the group names that LiteLLM does not serve (or
        not to Tollgate's key): it fails every call, and a fallback answering them hides it."""
        for attempt in failed:
            if attempt.not_served and (group, attempt.model) not in self._said_not_served:
                if len(self._said_not_served) >= MAX_FAULT_LINES:
                    self._said_not_served.clear()  # those still named are said again, once
                self._said_not_served.add((group, attempt.model))
                log.warning(
                    "model group '%s' names model '%s', which LiteLLM does not serve (%s): correct the group's "
                    "models, or LiteLLM's model_list",
                    group, attempt.model, _in_one_line(attempt.error),
                )

    def _group_fails(self, group: str, exc: UpstreamFailed) -> None:
        _line_of(self._failing_groups, group)(
            "model group '%s': every model failed (%s): its calls fail until one answers",
            group, _Lazy(_attempts_in_one_line, exc.attempts),
        )

    def _heard_from_litellm(self, key_accepted: bool = True) -> None:
        """LiteLLM answered a call (and did not refuse Tollgate's key): the faults said of it are over."""
        self._unreachable.over("LiteLLM answers again")
        self._out_of_files.over("this process opens connections to LiteLLM again")
        if key_accepted:
            self._key_refused.over("LiteLLM accepts Tollgate's upstream key again")

    async def _failed(self, call: Call, exc: BaseException) -> BaseException:
        """Record a call that got no answer; return what the client should get."""
        try:
            return await self._record_failure(call, exc)
        except asyncio.CancelledError:
            return _cut_while_recording(call)
        except StoreUnavailable as refused:
            # Kept, as an answered call's is (`complete`): its 503 names the call and job too.
            return _unrecorded(call, refused)

    async def _record_failure(self, call: Call, exc: BaseException) -> BaseException:
        none = Usage(0, 0)
        if isinstance(exc, ClientClosed):
            # The prompt went upstream, so it counts as spent, estimated, as after a hang-up
            # mid-stream; nothing was generated for the client.
            usage = estimated_usage(call.request.prompt_chars, 0)
            model, attempts = call.cut_short_at()
            await self._finish(call, "cancelled", model, usage, attempts, "the client disconnected before the answer")
            return exc
        if isinstance(exc, UpstreamFailed):
            model = exc.attempts[-1].model if exc.attempts else None
            if exc.all_too_long:
                # The request's fault, as a refused body is: said with OpenAI's code, which
                # clients read to shorten the prompt; the group is not failing.
                self._heard_from_litellm()
                message = f"The messages are longer than any model of group '{call.group.name}' takes: {redact(str(exc))}"
                await self._finish(call, "error", model, none, len(exc.attempts), message)
                return ApiError(400, message, code="context_length_exceeded", param="messages", headers=call.headers())
            if exc.unreachable and _OUT_OF_FILES in exc.unreachable_error:
                self._out_of_files(
                    "this process is out of file descriptors (%s): calls it cannot open a connection to LiteLLM "
                    "for answer 503; raise its limit of open files (systemd's LimitNOFILE, docker's --ulimit nofile)",
                    exc.unreachable_error,
                )
            elif exc.unreachable:
                # Every call fails so while LiteLLM is down; a model failing is the call's own news.
                self._unreachable(
                    "LiteLLM cannot be reached at %s, or drops the connection (%s): calls answer 503 until it is back",
                    self._upstream.url, exc.unreachable_error,
                )
            elif not exc.pool_full:  # the models' own failures, which LiteLLM answered
                self._heard_from_litellm()
                self._group_fails(call.group.name, exc)
            await self._finish(call, "error", model, none, len(exc.attempts), redact(str(exc)))
            if exc.all_rate_limited:
                return ApiError(
                    429,
                    f"Every model of group '{call.group.name}' is rate limited upstream: {redact(str(exc))}",
                    code="upstream_rate_limited",
                    headers={**call.headers(), "Retry-After": str(exc.retry_after)},
                )
            return ApiError(
                503,
                f"Model group '{call.group.name}' is unavailable: {redact(str(exc))}",
                code="upstream_unavailable",
                headers={**call.headers(), "Retry-After": "1"},
            )
        if isinstance(exc, UpstreamMisconfigured):
            # Readiness finds this too: it asks LiteLLM with the same key.
            # LiteLLM's message quotes the key it received: neither log nor store it.
            self._heard_from_litellm(key_accepted=False)
            self._key_refused("LiteLLM refused Tollgate's upstream key (HTTP %s): check TOLLGATE_UPSTREAM_KEY", exc.status)
            await self._finish(call, "error", exc.model, none, exc.attempts, "the upstream refused the gateway's key")
            return ApiError(
                503,
                "The gateway cannot use its model provider: the upstream refused the gateway's credentials",
                code="upstream_misconfigured",
                headers={**call.headers(), "Retry-After": "30"},
            )
        if isinstance(exc, UpstreamRejected):
            self._heard_from_litellm()
            message = redact(exc.message)
            await self._finish(call, "error", exc.model, none, exc.attempts, message)
            return ApiError(400, message, code="upstream_rejected", param=exc.param, headers=call.headers())
        if isinstance(exc, asyncio.CancelledError):  # the shutdown's (a hang-up is ClientClosed)
            self.cut_by_shutdown += 1
            usage = estimated_usage(call.request.prompt_chars, 0)
            model, attempts = call.cut_short_at()
            await self._finish(call, "cancelled", model, usage, attempts, SHUT_DOWN)
            return _cut_by_shutdown("the call was cut short before its answer", call.headers())
        await self._finish(call, "error", None, none, 0, f"{type(exc).__name__}")
        return exc

    async def _finish(
        self,
        call: Call,
        status: CallStatus,
        model: str | None,
        usage: Usage,
        attempts: int,
        error: str | None,
        ttft: float | None = None,
    ) -> CallOutcome:
        """Record how the call ended (and its own job's end, if it has one)."""
        try:
            return await self._record(call, status, model, usage, attempts, error, ttft)
        finally:
            self._running.discard(call.call_id)  # only now may shutdown's drain stop waiting

    async def _record(self, call: Call, status: CallStatus, model: str | None, usage: Usage, attempts: int,
                      error: str | None, ttft: float | None) -> CallOutcome:
        latency = asyncio.get_running_loop().time() - call.started
        outcome = CallOutcome(  # positional, as the Call in `admit`: the fields in their order
            call.call_id,
            status,
            model,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.estimated,
            cost_of(usage, model, self._pricing),
            round(latency * 1000),
            None if ttft is None else round(ttft * 1000),  # time_to_first_token_ms
            attempts,
            error,
            time.time(),  # finished_at
        )
        # The estimate the limiter admitted the call on gives way to what it really used: sent
        # now and not waited for, so it is ahead of any admit that follows this call's answer,
        # and its reply comes in while the record is written rather than wake an idle loop
        # after the answer. The tokens were spent whether or not the record can be written.
        self._limiter.settle_soon(call.decision, usage.total_tokens)
        try:
            await self._store_outcome(call, outcome)
        finally:  # the call happened, whether or not its record could be written yet
            self._metrics.observe_call(
                call.principal.team.team_id,
                call.group.name,
                model,
                status,
                call.stream,
                usage.prompt_tokens,
                usage.completion_tokens,
                outcome.cost_usd,
                latency,
                ttft,
                attempts,
            )
            notes = call.notes  # one by one, in the access log's order, as in `admit`
            notes["model"] = model
            notes["call_status"] = status
            notes["prompt_tokens"] = usage.prompt_tokens
            notes["completion_tokens"] = usage.completion_tokens
        return outcome

    async def _store_outcome(self, call: Call, outcome: CallOutcome) -> None:
        """Write the outcome, trying again while the database stays locked by another process.
        One the store refuses (disk full, I/O error, a lock that outlasts the retries) is kept
        for `record_kept` and logged with every figure; the caller hears StoreUnavailable.
        Written over the call's closing as interrupted, as a kept one is: another process's
        sweeper may have come first while this record waited on a locked database."""
        team_id = call.principal.team.team_id
        job_end = _job_end(call, outcome, answered=True)
        attempt = 1
        try:
            while True:
                try:
                    if not await self._write_outcome(outcome, job_end, team_id):
                        # Finished otherwise (closed by a hang-up's own record, say), or never
                        # written: a start the client's hang-up cut may have failed.
                        log.warning("call %s was found finished already, or was never started: its outcome is "
                                    "not recorded: %r", outcome.call_id, outcome)
                    return
                except StoreBusy as exc:
                    if attempt == RECORD_ATTEMPTS:
                        failure: Exception = exc
                        break
                except Exception as exc:
                    failure = exc
                    break
                await asyncio.sleep(0.1 * attempt)
                attempt += 1
        except WrittenThenCancelled as cut:
            # The shutdown cut the call while its record was being written, and it was: the call
            # is recorded, its own job ended as answered (charged), so the answer still goes
            # out. Refused, the client would get a 500 for an answer it was charged for.
            if job_end is not None and cut.value[1]:
                self._metrics.observe_job(team_id, job_end.status)
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return
        except asyncio.CancelledError:
            # The shutdown cut the call (server.shutdown_grace is over) while its record waited
            # for the database: kept, for the drain to write (a record the write it cut had
            # committed already is found recorded then, and left as it is).
            self._kept[outcome.call_id] = (outcome, _job_end(call, outcome, answered=call.stream), team_id)
            log.error("call %s was cut by the shutdown while its record was being written: kept, to be written "
                      "(if it is not already) before the gateway stops: %r", outcome.call_id, outcome)
            raise
        if not isinstance(failure, StoreError):
            # Not the database's state but this outcome: writing it again would fail again, and a
            # kept outcome holds the sweeper back, so the sweeper closes the call as interrupted.
            # Its traceback is logged once, by the server the failure is raised on to.
            log.error("could not record call %s (%s, its traceback follows): %r", outcome.call_id,
                      type(failure).__name__, outcome)
            raise failure
        # A stream's client has had the answer by now; a non-streaming one gets a 503 instead.
        self._kept[outcome.call_id] = (outcome, _job_end(call, outcome, answered=call.stream), team_id)
        log.error("could not record call %s (%s): kept, to be written once the database takes writes again: %r",
                  outcome.call_id, failure, outcome)
        raise StoreUnavailable(
            f"The call's record could not be written ({failure}); "
            "it will be recorded once the database takes writes again"
        ) from failure

    async def _write_outcome(self, outcome: CallOutcome, job_end: JobEnd | None, team_id: str) -> bool:
        """Write the outcome, with the end of the call's own job if it has one, over the call's
        closing as interrupted by a sweeper that could not know of it; whether the call was
        recorded now (see `Store.finish_call`)."""
        if job_end is None:
            return await self._store.finish_call(outcome, over_interrupted=True)
        recorded, ended = await self._store.finish_call_and_job(outcome, job_end, over_interrupted=True)
        if ended:
            self._metrics.observe_job(team_id, job_end.status)
        return recorded


def _never_fits_advice(request: CallRequest, default_max_tokens: int) -> str:
    """What a call too large for its TPM limit should change: the completion limit its estimate
    counted (max_completion_tokens is the SDKs' name for it now, max_tokens deprecated), or, with
    none sent, one below the default it was counted at; a client told to lower a field it never
    sent would not know what to do."""
    if request.max_tokens is None:
        return f"set max_tokens (a call without it is counted at {default_max_tokens}) or shorten the prompt"
    params = request.params  # both checked (validation): an integer from 1, or None
    larger = (params.get("max_completion_tokens") or 0) > (params.get("max_tokens") or 0)
    return f"lower {'max_completion_tokens' if larger else 'max_tokens'} or the prompt"


def _with_limit_headers(exc: BaseException, decision: Decision) -> BaseException:
    """A refusal of a call its limits had admitted (its job finished meanwhile, its credits or
    the database failed it) answers with the rate-limit headers too, as every call's answer
    does, showing the limits without it. A new error: one store error can fail a whole batch."""
    if isinstance(exc, StoreError):
        refusal = from_store_error(exc)
    elif type(exc) is ApiError:
        refusal = ApiError(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)
    else:
        return exc
    refusal.headers = {**decision.released().headers(), **refusal.headers}
    return refusal


def _unrecorded(call: Call, refused: StoreUnavailable) -> ApiError:
    """The 503 of a call whose record the store refused: kept and written later, so the client
    hears which call and job it is (a /v1 call's own job has no other way to it)."""
    refusal = from_store_error(refused)
    refusal.headers.update(call.headers())
    return refusal


def _cut_while_recording(call: Call) -> ApiError:
    """What a non-streaming call's client gets when the shutdown cut the call while its record
    waited on a locked database. Its outcome is kept (`_store_outcome`), its own job to be
    failed as unanswered."""
    return _cut_by_shutdown(
        "the call's record could not be written before it stopped; it will be recorded once the database takes "
        "writes again",
        call.headers(),
    )


def _cut_by_shutdown(what: str, headers: dict[str, str]) -> ApiError:
    """`errors.shutting_down`, the cancellation taken back so that the answer can be sent."""
    asyncio.current_task().uncancel()  # type: ignore[union-attr]
    return shutting_down(what, headers)


def _job_end(call: Call, outcome: CallOutcome, answered: bool) -> JobEnd | None:
    """How the call's own job ends, if it has one; `answered`: whether its client had the answer."""
    if call.own_job is None:
        return None
    status, error = call.own_job.ends_as(outcome, answered)
    return JobEnd(call.job_id, status, error)
