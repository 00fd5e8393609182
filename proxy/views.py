"""The JSON shapes of teams and jobs, shared by the client and admin APIs."""

from __future__ import annotations

from typing import Any

from .config import Config
from .records import CallSummary, Job, Team, iso


def team_json(team: Team, config: Config) -> dict[str, Any]:
    return {
        "team_id": team.team_id,
        "organization_id": team.organization_id,
        "status": team.status,
        "credits_allocated": team.credits_allocated,
        "credits_used": team.credits_used,
        "credits_remaining": team.credits_remaining,
        "credits_held": team.credits_held,
        "credits_available": team.credits_available,
        "model_groups": list(team.model_groups),
        "default_model_group": team.effective_default_group,
        "rpm_limit": team.rpm_limit if team.rpm_limit is not None else config.rate_limits.rpm,
        "tpm_limit": team.tpm_limit if team.tpm_limit is not None else config.rate_limits.tpm,
        "credits_per_job": team.credits_per_job if team.credits_per_job is not None else config.jobs.credits_per_job,
        "created_at": iso(team.created_at),
    }


def costs_json(job: Job, credits_remaining: int) -> dict[str, Any]:
    costs = job.costs
    return {
        "total_calls": costs.total_calls,
        "successful_calls": costs.successful_calls,
        "failed_calls": costs.failed_calls,
        "prompt_tokens": costs.prompt_tokens,
        "completion_tokens": costs.completion_tokens,
        "total_tokens": costs.total_tokens,
        "total_cost_usd": costs.total_cost_usd,
        "avg_latency_ms": costs.avg_latency_ms,
        "credit_applied": job.status == "completed" and job.credits_charged > 0,
        "credits_charged": job.credits_charged,
        "credits_held": job.credits_held if job.is_open else 0,
        "credits_remaining": credits_remaining,
    }


def job_json(job: Job, team_credits_remaining: int, calls: list[CallSummary] | None = None) -> dict[str, Any]:
    """A job with its costs; a finished job reports the balance right after it finished,
    so that asking again (or completing again) gives the very same body."""
    remaining = job.credits_remaining_after if job.credits_remaining_after is not None else team_credits_remaining
    body: dict[str, Any] = {
        "job_id": job.job_id,
        "team_id": job.team_id,
        "job_type": job.job_type,
        "user_id": job.user_id,
        "status": job.status,
        "metadata": job.metadata,
        "error_message": job.error_message,
        "created_at": iso(job.created_at),
        "completed_at": iso(job.completed_at),
        "costs": costs_json(job, remaining),
    }
    if calls is not None:
        body["calls"] = [call.to_json() for call in calls]
    return body


def jobs_page_json(team_id: str, jobs: list[Job], total: int, limit: int, offset: int, remaining: int) -> dict[str, Any]:
    return {
        "team_id": team_id,
        "jobs": [job_json(job, remaining) for job in jobs],
        "total": total,
        "limit": limit,
        "offset": offset,
    }
