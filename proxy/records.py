"""Plain records that flow between the store and the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

JobStatus = Literal["pending", "in_progress", "completed", "failed"]
TerminalJobStatus = Literal["completed", "failed"]
CallStatus = Literal["running", "success", "error", "cancelled"]
OPEN_JOB_STATUSES = ("pending", "in_progress")
TERMINAL_JOB_STATUSES = ("completed", "failed")
# A /v1 call without X-Job-Id is its own job, of this type and with {"implicit": true} in its
# metadata: it takes no other call, since it is finished (and charged) when that call ends.
IMPLICIT_JOB_TYPE = "chat.completions"


class RawJSON:
    """JSON text, written into an answer as it is (json_codec.dumps). Not a dataclass: orjson
    would write a dataclass as an object of its fields."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJSON) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


# A job's metadata; in a page of jobs (`Store.team_jobs`), the JSON text the store holds, written
# into the answer as it is: a page is up to 500 jobs of up to 128 KiB each, and decoding them
# (millions of small values, for a team that makes them so) and encoding them again took seconds
# of CPU for every request, which a team could send as often as it liked, the other teams' requests
# waiting meanwhile.
JobMetadata = dict[str, Any] | RawJSON


def is_implicit(job_type: str, metadata: JobMetadata) -> bool:
    """Whether a job carries that mark (the store reads it in SQL: `_TAKEN_IMPLICIT_JOB`)."""
    return job_type == IMPLICIT_JOB_TYPE and isinstance(metadata, dict) and metadata.get("implicit") is True


def iso(timestamp: float | None) -> str | None:
    """ISO 8601 in UTC with a trailing Z, millisecond precision."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Organization:
    organization_id: str
    name: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"organization_id": self.organization_id, "name": self.name, "created_at": iso(self.created_at)}


@dataclass(frozen=True)
class ModelGroup:
    name: str
    models: tuple[str, ...]
    description: str
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "models": list(self.models),
            "description": self.description,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True)
class Team:
    team_id: str
    organization_id: str
    status: Literal["active", "suspended"]
    credits_allocated: int
    credits_used: int
    credits_held: int
    model_groups: tuple[str, ...]
    # None: the first granted group, then the config defaults for the limits.
    default_model_group: str | None
    rpm_limit: int | None
    tpm_limit: int | None
    credits_per_job: int | None
    created_at: float

    @property
    def credits_remaining(self) -> int:
        return self.credits_allocated - self.credits_used

    @property
    def credits_available(self) -> int:
        return self.credits_remaining - self.credits_held

    @property
    def effective_default_group(self) -> str | None:
        if self.default_model_group:
            return self.default_model_group
        return self.model_groups[0] if self.model_groups else None


@dataclass(frozen=True)
class VirtualKey:
    key_id: str
    team_id: str
    name: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    rpm_limit: int | None
    tpm_limit: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "team_id": self.team_id,
            "name": self.name,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
        }


@dataclass(frozen=True)
class JobCosts:
    total_calls: int = 0
    successful_calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_cost_usd: float = 0.0
    avg_latency_ms: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Job:
    job_id: str
    team_id: str
    job_type: str
    user_id: str | None
    status: JobStatus
    metadata: JobMetadata
    error_message: str | None
    created_at: float
    completed_at: float | None
    credits_held: int
    credits_charged: int
    # The team's credits_remaining right after the job finished, so that
    # repeating a completion returns exactly the same body.
    credits_remaining_after: int | None
    costs: JobCosts = field(default_factory=JobCosts)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_JOB_STATUSES


@dataclass(frozen=True)
class CallSummary:
    call_id: str
    purpose: str | None
    model_group: str
    model: str | None
    status: CallStatus
    streamed: bool
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    cost_usd: float
    latency_ms: int | None
    time_to_first_token_ms: int | None
    attempts: int
    error: str | None
    started_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "purpose": self.purpose,
            "model_group": self.model_group,
            "model": self.model,
            "status": self.status,
            "streamed": self.streamed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "usage_estimated": self.usage_estimated,
            "cost_usd": self.cost_usd,
            "latency_ms": self.latency_ms,
            "time_to_first_token_ms": self.time_to_first_token_ms,
            "attempts": self.attempts,
            "error": self.error,
            "created_at": iso(self.started_at),
        }


@dataclass(frozen=True)
class InterruptedCall:
    """A call a sweep closed as interrupted, as the metrics count it: the process that served
    it died before it ended, and with it any count of it."""

    team_id: str
    model_group: str
    streamed: bool


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class NewCall:
    """A call admitted into a job, recorded as running before the upstream is asked."""

    call_id: str
    job_id: str
    team_id: str
    key_id: str
    model_group: str
    purpose: str | None
    streamed: bool
    started_at: float
    # When a sweeper may take the call, still running, for one a dead process left behind: the
    # serving process's own bound, whatever the sweeping process's configuration says.
    stale_at: float | None = None


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class CallOutcome:
    """How a call ended: what the upstream used, cost and took."""

    call_id: str
    status: CallStatus
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    cost_usd: float
    latency_ms: int
    time_to_first_token_ms: int | None
    attempts: int
    error: str | None
    finished_at: float


@dataclass(slots=True)  # not frozen: made for every /v1 call without X-Job-Id
class JobEnd:
    """How a call's own job ends, written with the call's record (a /v1 call without X-Job-Id)."""

    job_id: str
    status: TerminalJobStatus
    error_message: str | None


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: int
    team_id: str
    job_id: str | None
    amount: int
    reason: str
    balance_after: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id,
            "team_id": self.team_id,
            "job_id": self.job_id,
            "amount": self.amount,
            "reason": self.reason,
            "balance_after": self.balance_after,
            "created_at": iso(self.created_at),
        }
