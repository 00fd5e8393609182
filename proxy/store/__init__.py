"""Persistence: the interface the rest of Tollgate uses, and how to open one.

Only SQLite is implemented; the Protocol below is what a PostgreSQL store would
provide. Every credit change happens inside the database in one transaction
(never read-modify-write in Python), so several processes may share it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol, Sequence

from ..config import DatabaseConfig
from ..records import (
    CallOutcome,
    CallSummary,
    InterruptedCall,
    Job,
    JobEnd,
    LedgerEntry,
    ModelGroup,
    NewCall,
    Organization,
    Team,
    VirtualKey,
)


class StoreError(Exception):
    """Base of the store's refusals; the HTTP layer turns them into statuses."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class Forbidden(StoreError):
    """The record exists but belongs to another team."""


class TeamSuspended(StoreError):
    pass


class InsufficientCredits(StoreError):
    def __init__(self, team: Team, needed: int) -> None:
        super().__init__(
            f"Insufficient credits: team '{team.team_id}' has {team.credits_available} available "
            f"({team.credits_remaining} remaining, {team.credits_held} held by open jobs); a job needs {needed}"
        )
        self.team = team
        self.needed = needed


class JobClosed(StoreError):
    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"Job '{job_id}' is already {status}")
        self.status = status


class JobExpired(JobClosed):
    """The job is past `jobs.expire_after`, though no sweep has failed it yet: it takes no call
    and is not charged, as if the sweep had come. `failed_now`: the refusal failed it (released
    its hold), as a sweep does; not while a call of it still runs (the sweep waits for that too)."""

    def __init__(self, job_id: str, failed_now: bool) -> None:
        StoreError.__init__(self, f"Job '{job_id}' has expired: it stayed open too long")
        self.status = "failed"
        self.failed_now = failed_now


class CallInProgress(StoreError):
    pass


class WrittenThenCancelled(asyncio.CancelledError):
    """The caller of a write was cancelled while it ran, and the write went through (writes
    refuse cancellation, see writer.py): `value` is what it returned. A CancelledError still,
    for every caller that only needs to know it was cancelled; one whose write must not be
    taken for lost (a call's record, which charges its own job) reads `value`."""

    def __init__(self, value: Any) -> None:
        super().__init__("cancelled once the write was done")
        self.value = value


class FailedThenRefused(StoreError):
    """A sweep failing jobs group by group was refused part-way (`error`, raised from here):
    `jobs` were failed before it, their holds released, and are still to be counted."""

    def __init__(self, jobs: list[Job], error: BaseException) -> None:
        super().__init__(f"{len(jobs)} jobs failed, then: {error}")
        self.jobs = jobs
        self.error = error


class StoreBusy(StoreError):
    """The database stayed locked by another process for longer than the busy timeout."""


class StoreUnavailable(StoreError):
    """The database cannot be written now: the disk is full, failing or read-only, or the
    store took no more writes after a failed fsync. Not a lock: waiting a moment won't do."""


class SchemaTooNew(StoreError):
    """The database was migrated by a later Tollgate: its schema is one this release does not
    know, so it is not opened (writing it could break what that release relies on)."""


class Unsaved(StoreUnavailable):
    """The write was committed, and then the fsync that was to put it on disk failed: every
    reader sees it, a power cut may lose it. `value` is what the write returned."""

    def __init__(self, message: str, value: Any) -> None:
        super().__init__(message)
        self.value = value


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    # organizations and model groups
    async def create_organization(self, organization_id: str, name: str) -> Organization: ...
    async def ensure_organization(self, organization_id: str, name: str) -> Organization: ...
    async def get_organization(self, organization_id: str) -> Organization | None: ...
    async def list_organizations(self) -> list[Organization]: ...
    async def create_model_group(self, name: str, models: list[str], description: str) -> ModelGroup: ...
    async def put_model_group(self, name: str, models: list[str], description: str) -> ModelGroup: ...
    async def get_model_group(self, name: str) -> ModelGroup | None: ...
    async def list_model_groups(self) -> list[ModelGroup]: ...
    async def delete_model_group(self, name: str) -> None: ...

    # teams, credits and keys
    async def create_team(self, team: Team, reason: str) -> Team: ...
    async def get_team(self, team_id: str) -> Team | None: ...
    async def list_teams(self) -> list[Team]: ...
    async def team_balances(self) -> list[tuple[str, int]]: ...
    async def update_team(self, team_id: str, changes: dict[str, Any]) -> Team: ...
    async def add_credits(self, team_id: str, amount: int, reason: str) -> Team: ...
    async def ledger(self, team_id: str, limit: int, offset: int) -> list[LedgerEntry]: ...
    async def create_key(self, key: VirtualKey, key_hash: bytes) -> VirtualKey: ...
    async def list_keys(self, team_id: str) -> list[VirtualKey]: ...
    async def revoke_key(self, key_id: str) -> VirtualKey: ...
    async def lookup_key(self, key_hash: bytes) -> tuple[VirtualKey, Team] | None: ...

    # jobs and calls
    async def create_job(
        self,
        team_id: str,
        job_type: str,
        user_id: str | None,
        metadata: dict[str, Any],
        default_credits: int,
        made_room: list[str] | None = None,
    ) -> Job: ...
    async def get_job(self, job_id: str) -> Job | None: ...
    async def job_view(self, job_id: str) -> tuple[Job, list[CallSummary], int] | None: ...
    async def team_jobs(
        self, team_id: str, status: str | None, limit: int, offset: int
    ) -> tuple[list[Job], int, int]: ...
    async def start_call(
        self, call: NewCall, own_job_default_credits: int | None = None, made_room: list[str] | None = None
    ) -> None: ...
    async def finish_call(self, outcome: CallOutcome, *, over_interrupted: bool = False) -> bool: ...
    async def finish_call_and_job(
        self, outcome: CallOutcome, job_end: JobEnd, *, over_interrupted: bool = False
    ) -> tuple[bool, bool]: ...
    async def finish_job(
        self, job_id: str, status: str, metadata: dict[str, Any] | None, error_message: str | None,
        done_if_cut: bool = False,
    ) -> tuple[Job, bool]: ...
    async def expire_jobs(self, created_before: float, limit: int) -> list[Job]: ...
    async def cancel_stale_calls(
        self, started_before: float, now: float | None = None, steps: Sequence[tuple[float, float]] = ()
    ) -> list[InterruptedCall]: ...
    async def fail_interrupted_implicit_jobs(self, limit: int) -> list[Job]: ...


def open_store(config: DatabaseConfig, expire_after: float = math.inf, existing: bool = False) -> Store:
    """The store for a database URL (not yet opened: call ``await store.open()``).
    `expire_after`: jobs.expire_after, past which a job takes no call and no charge. `existing`:
    a database that is not there is not made anew, but refused as the store opens."""
    from .sqlite import SQLiteStore

    return SQLiteStore(config, expire_after=expire_after, existing=existing)


def cannot_open(config: DatabaseConfig, exc: Exception) -> str:
    """Why the database could not be opened, in one line (what `tollgate serve` says before it
    starts, and the app, should the database be spoilt after that check or before a worker starts
    again). An OSError is said by the path it names: often a directory above the file that could
    not be made."""
    reason = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
    return f"cannot open the database {config.sqlite_path}: {reason}"
