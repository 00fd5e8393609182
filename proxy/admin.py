"""Administrative operations, shared by the admin API and the command line.

Bodies are plain dicts (parsed JSON, or built by the CLI); every problem is an
ApiError (422 for a bad value) or a store refusal (404, 409), so both fronts
report exactly the same messages.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from .auth import generate_key, hash_key
from .config import GROUP_NAME, IDENTIFIER, MAX_DESCRIPTION, MAX_INTEGER, MODEL_LIST_RULE, Config, is_model_list
from .errors import ApiError
from .records import Job, LedgerEntry, ModelGroup, Organization, Team, VirtualKey, iso
from .store import NotFound, Store
from .validation import invalid, optional_int, optional_str, required_str

TEAM_CHANGES = ("status", "rpm_limit", "tpm_limit", "model_groups", "default_model_group", "credits_per_job")


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [key for key in body if key not in allowed]
    if unknown:
        raise invalid(unknown[0], "unknown field (expected one of: " + ", ".join(allowed) + ")")


def _identifier(body: dict[str, Any], field: str) -> str:
    value = required_str(body, field, 64)
    if not IDENTIFIER.match(value):
        raise invalid(field, "must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
    return value


def _group_names(body: dict[str, Any], field: str) -> list[str]:
    value = body.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise invalid(field, "must be a list of model group names")
    if len(set(value)) != len(value):
        raise invalid(field, "must not name a group twice")
    return value


# Bounds that keep every stored integer far inside SQLite's 64 bits; config.yaml has the same.
MAX_CREDITS = MAX_LIMIT = MAX_INTEGER
LATEST_EXPIRY = datetime(9999, 1, 1, tzinfo=timezone.utc).timestamp()


def _limit(body: dict[str, Any], field: str) -> int | None:
    return optional_int(body, field, minimum=1, maximum=MAX_LIMIT)


def _expiry(body: dict[str, Any], now: float) -> float | None:
    raw = body.get("expires_at")
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise invalid("expires_at", "must be an ISO 8601 timestamp such as 2030-01-01T00:00:00Z")
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        # To the millisecond, as every timestamp is shown (records.iso): with the digits past it
        # kept, the key worked for up to a millisecond past the expiry it was shown with.
        moment = moment.astimezone(timezone.utc)
        expires = moment.replace(microsecond=moment.microsecond // 1000 * 1000).timestamp()
    except (ValueError, OverflowError):
        raise invalid("expires_at", "must be an ISO 8601 timestamp such as 2030-01-01T00:00:00Z") from None
    if expires <= now:
        raise invalid("expires_at", "must be in the future")
    if expires >= LATEST_EXPIRY:
        raise invalid("expires_at", "must be before the year 9999")
    return expires


def created_key_json(key: VirtualKey, plaintext: str) -> dict[str, Any]:
    """A new key as the admin API and the CLI show it: the only time its plaintext is shown."""
    return {
        "key_id": key.key_id,
        "key": plaintext,
        "name": key.name,
        "team_id": key.team_id,
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
    }


class AdminService:
    def __init__(self, store: Store, config: Config, on_change: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._config = config
        # Caches of this process (key lookups, groups) are dropped after every change.
        self._on_change = on_change

    @contextmanager
    def _signalled(self) -> Iterator[None]:
        """Signal a change once the write is over, however it ended: a write may commit and
        still raise (cancelled at shutdown, its fsync failing), and a signal too many only
        drops caches."""
        try:
            yield
        finally:
            self._on_change()

    # organizations
    async def create_organization(self, body: dict[str, Any]) -> Organization:
        _only(body, ("organization_id", "name"))
        organization_id = _identifier(body, "organization_id")
        name = optional_str(body, "name") or organization_id
        return await self._store.create_organization(organization_id, name)

    async def list_organizations(self) -> list[Organization]:
        return await self._store.list_organizations()

    # teams
    async def create_team(self, body: dict[str, Any]) -> Team:
        _only(
            body,
            ("team_id", "organization_id", "model_groups", "default_model_group", "credits_allocated", *TEAM_CHANGES),
        )
        team_id = _identifier(body, "team_id")
        organization_id = _identifier(body, "organization_id")
        if await self._store.get_organization(organization_id) is None:
            raise ApiError(404, f"Organization '{organization_id}' not found", code="not_found")
        groups = _group_names(body, "model_groups") if "model_groups" in body else []
        default = optional_str(body, "default_model_group", 128)
        if default is not None and default not in groups:
            raise invalid("default_model_group", f"'{default}' is not one of the team's model_groups")
        status = body.get("status", "active")
        if status not in ("active", "suspended"):
            raise invalid("status", "must be 'active' or 'suspended'")
        # Not a limit, whose null means config.yaml's default: a team's credits have no default
        # to go back to, and a null taken for 0 hid a client's missing value.
        if "credits_allocated" in body and body["credits_allocated"] is None:
            raise invalid("credits_allocated", "must be an integer (leave it out for 0)")
        team = Team(
            team_id=team_id,
            organization_id=organization_id,
            status=status,
            credits_allocated=optional_int(body, "credits_allocated", minimum=0, maximum=MAX_CREDITS) or 0,
            credits_used=0,
            credits_held=0,
            model_groups=tuple(groups),
            default_model_group=default,
            rpm_limit=_limit(body, "rpm_limit"),
            tpm_limit=_limit(body, "tpm_limit"),
            credits_per_job=optional_int(body, "credits_per_job", minimum=0, maximum=MAX_CREDITS),
            created_at=time.time(),
        )
        return await self._store.create_team(team, reason="initial allocation")

    async def get_team(self, team_id: str) -> Team:
        team = await self._store.get_team(team_id)
        if team is None:
            raise NotFound(f"Team '{team_id}' not found")
        return team

    async def list_teams(self) -> list[Team]:
        return await self._store.list_teams()

    async def update_team(self, team_id: str, body: dict[str, Any]) -> Team:
        _only(body, TEAM_CHANGES)
        team = await self.get_team(team_id)
        changes: dict[str, Any] = {}
        if "status" in body:
            if body["status"] not in ("active", "suspended"):
                raise invalid("status", "must be 'active' or 'suspended'")
            changes["status"] = body["status"]
        for field in ("rpm_limit", "tpm_limit"):
            if field in body:
                changes[field] = _limit(body, field)
        if "credits_per_job" in body:
            changes["credits_per_job"] = optional_int(body, "credits_per_job", minimum=0, maximum=MAX_CREDITS)
        groups = list(team.model_groups)
        if "model_groups" in body:
            groups = changes["model_groups"] = _group_names(body, "model_groups")
        default = team.default_model_group
        if "default_model_group" in body:
            default = changes["default_model_group"] = optional_str(body, "default_model_group", 128)
        if default is not None and default not in groups:
            raise invalid("default_model_group", f"'{default}' is not one of the team's model_groups")
        with self._signalled():
            return await self._store.update_team(team_id, changes)

    async def add_credits(self, team_id: str, body: dict[str, Any]) -> Team:
        _only(body, ("amount", "reason"))
        amount = optional_int(body, "amount", minimum=-MAX_CREDITS, maximum=MAX_CREDITS)
        if not amount:
            raise invalid("amount", "is required and must be a non-zero integer")
        reason = required_str(body, "reason", 1000)
        if not reason.strip():  # a ledger entry's reason says why the credits changed: blank says nothing
            raise invalid("reason", "must not be empty or only whitespace")
        await self.get_team(team_id)
        return await self._store.add_credits(team_id, amount, reason)

    async def ledger(self, team_id: str, limit: int, offset: int) -> list[LedgerEntry]:
        await self.get_team(team_id)
        return await self._store.ledger(team_id, limit, offset)

    async def list_jobs(
        self, team_id: str, status: str | None, limit: int, offset: int
    ) -> tuple[list[Job], int, int]:
        """A page of the team's jobs, how many match, and the team's credits_remaining of the
        same moment."""
        await self.get_team(team_id)
        return await self._store.team_jobs(team_id, status, limit, offset)

    # keys
    async def create_key(self, team_id: str, body: dict[str, Any]) -> tuple[VirtualKey, str]:
        """A new key and its plaintext, which is shown this once and never stored."""
        _only(body, ("name", "expires_at", "rpm_limit", "tpm_limit"))
        now = time.time()
        await self.get_team(team_id)
        plaintext = generate_key()
        key = VirtualKey(
            key_id="key_" + uuid.uuid4().hex[:16],
            team_id=team_id,
            name=optional_str(body, "name"),
            created_at=now,
            expires_at=_expiry(body, now),
            revoked_at=None,
            rpm_limit=_limit(body, "rpm_limit"),
            tpm_limit=_limit(body, "tpm_limit"),
        )
        return await self._store.create_key(key, hash_key(plaintext)), plaintext

    async def list_keys(self, team_id: str) -> list[VirtualKey]:
        await self.get_team(team_id)
        return await self._store.list_keys(team_id)

    async def revoke_key(self, key_id: str) -> VirtualKey:
        with self._signalled():
            return await self._store.revoke_key(key_id)

    # model groups
    def _group_body(self, body: dict[str, Any]) -> tuple[list[str], str]:
        models = body.get("models")
        if not isinstance(models, list) or not is_model_list(models):
            raise invalid("models", f"must be {MODEL_LIST_RULE}")
        return models, optional_str(body, "description", MAX_DESCRIPTION, allow_empty=True) or ""

    @staticmethod
    def _group_name(name: Any, field: str = "name") -> str:
        if not isinstance(name, str) or not GROUP_NAME.match(name):
            raise invalid(field, "must be a model group name (letters, digits, '.', '_', ':', '-')")
        return name

    async def create_model_group(self, body: dict[str, Any]) -> ModelGroup:
        _only(body, ("name", "models", "description"))
        name = self._group_name(body.get("name"))
        models, description = self._group_body(body)
        with self._signalled():
            return await self._store.create_model_group(name, models, description)

    async def put_model_group(self, name: str, body: dict[str, Any]) -> ModelGroup:
        _only(body, ("name", "models", "description"))
        self._group_name(name)
        if body.get("name", name) != name:
            raise invalid("name", "must match the name in the path")
        models, description = self._group_body(body)
        with self._signalled():
            return await self._store.put_model_group(name, models, description)

    async def get_model_group(self, name: str) -> ModelGroup:
        group = await self._store.get_model_group(name)
        if group is None:
            raise NotFound(f"Model group '{name}' not found")
        return group

    async def list_model_groups(self) -> list[ModelGroup]:
        return await self._store.list_model_groups()

    async def delete_model_group(self, name: str) -> None:
        with self._signalled():
            await self._store.delete_model_group(name)
