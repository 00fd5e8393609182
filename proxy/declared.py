"""Model groups, organizations and teams declared in config.yaml, applied at start-up.

Groups, organizations and a team's organization, groups, limits and status follow
the file at every start of `tollgate serve` and on `tollgate apply`; a team's credits are
set only when it is first created (later changes go through the ledger). Anything else
(another CLI command, a worker process) only creates what is absent: `serve` applied the
file before starting its workers, and neither may undo the admin API's changes since.
"""

from __future__ import annotations

import time

from .config import Config, ConfigError
from .records import Team
from .store import Conflict, NotFound, Store


async def apply_declared(store: Store, config: Config, follow_file: bool = True) -> list[str]:
    """`follow_file=False`: only create what is absent, leaving what exists as it is (for a
    CLI command, or a worker that uvicorn starts again after a crash: no start of the gateway,
    they must not undo what the admin API changed since). A declared team it cannot create
    for want of its organization or a group is then passed over and named in the list returned:
    the CLI command being run may be the one that creates it (README: the organization may be
    "created before"). Following the file, that is a ConfigError, as is a team it cannot update."""
    waiting: list[str] = []
    for name, group in config.model_groups.items():
        if follow_file or await store.get_model_group(name) is None:
            await store.put_model_group(name, list(group.models), group.description)
    for organization in config.organizations:
        if follow_file or await store.get_organization(organization.organization_id) is None:
            await store.ensure_organization(
                organization.organization_id, organization.name or organization.organization_id
            )
    for index, spec in enumerate(config.teams):
        team = Team(
            team_id=spec.team_id,
            organization_id=spec.organization_id,
            status=spec.status,
            credits_allocated=spec.credits_allocated,
            credits_used=0,
            credits_held=0,
            model_groups=spec.model_groups,
            default_model_group=spec.default_model_group,
            rpm_limit=spec.rpm_limit,
            tpm_limit=spec.tpm_limit,
            credits_per_job=spec.credits_per_job,
            created_at=time.time(),
        )
        try:
            if await store.get_team(spec.team_id) is None:
                try:
                    await store.create_team(team, reason="initial allocation (config.yaml)")
                    continue
                except Conflict:
                    pass  # another process created it a moment ago
                except NotFound as exc:
                    if follow_file:
                        raise
                    waiting.append(f"{config.source}: teams[{index}]: {exc}")
                    continue
            if not follow_file:
                continue
            await store.update_team(
                spec.team_id,
                {
                    # The file is the only place a team's organization is set after creation.
                    "organization_id": spec.organization_id,
                    "status": spec.status,
                    "model_groups": spec.model_groups,
                    "default_model_group": spec.default_model_group,
                    "rpm_limit": spec.rpm_limit,
                    "tpm_limit": spec.tpm_limit,
                    "credits_per_job": spec.credits_per_job,
                },
            )
        except NotFound as exc:
            raise ConfigError(f"{config.source}: teams[{index}]: {exc}") from None
    return waiting
