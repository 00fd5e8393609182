"""Virtual keys: shown once, stored only as SHA-256, refused at once when revoked or expired."""

import asyncio
import hashlib
import json
import re
import socket
import time
from typing import Callable

import httpx
import pytest

from proxy.auth import KeyAuthenticator, bearer_token
from proxy.changes import ChangeSignal
from proxy.config import DatabaseConfig
from proxy.errors import ApiError
from proxy.records import Team, VirtualKey
from proxy.store.sqlite import SQLiteStore
from tests.support import Tollgate, fake_log, tag, wait_for

INVALID = {"detail": "Invalid, expired or revoked API key"}


def test_new_key_is_sk_plus_at_least_32_random_bytes(team):
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43,}", team.key)


def test_new_key_works(tollgate, team):
    assert tollgate.client(team.key).get(f"/api/teams/{team.team_id}").status_code == 200


def test_only_the_sha256_of_a_key_is_stored(tollgate, team):
    data = b"".join(p.read_bytes() for p in tollgate.database.parent.glob(tollgate.database.name + "*"))
    assert team.key.encode() not in data
    assert team.key[3:20].encode() not in data
    assert hashlib.sha256(team.key.encode()).digest() in data


def test_listed_keys_carry_no_secret(admin, team):
    keys = admin.ok("GET", f"/admin/teams/{team.team_id}/keys")
    assert [k["key_id"] for k in keys] == [team.key_id]
    assert "key" not in keys[0] and team.key not in str(keys)


def test_revoked_key_is_refused_at_once(tollgate, admin, team):
    client = tollgate.client(team.key)
    assert client.get(f"/api/teams/{team.team_id}").status_code == 200
    admin.ok("DELETE", f"/admin/keys/{team.key_id}")
    response = client.get(f"/api/teams/{team.team_id}")
    assert response.status_code == 401
    assert response.json() == INVALID


def test_a_revoked_key_is_listed_with_when_it_was_revoked(admin, team):
    revoked = admin.ok("DELETE", f"/admin/keys/{team.key_id}")
    (listed,) = admin.ok("GET", f"/admin/teams/{team.team_id}/keys")
    assert listed == revoked and listed["expires_at"] is None
    assert listed["revoked_at"] is not None and listed["revoked_at"] >= listed["created_at"]


def test_revoked_key_is_refused_at_once_by_another_process(tollgate, admin, team):
    other = Tollgate(tollgate.workdir, "http://127.0.0.1:9", "unused", database_file=tollgate.database).start()
    try:
        client = other.client(team.key)
        assert client.get(f"/api/teams/{team.team_id}").status_code == 200  # now cached there
        admin.ok("DELETE", f"/admin/keys/{team.key_id}")
        assert client.get(f"/api/teams/{team.team_id}").status_code == 401
    finally:
        other.stop()


def test_suspended_team_is_refused_at_once_by_another_process(tollgate, admin, team):
    other = Tollgate(tollgate.workdir, "http://127.0.0.1:9", "unused", database_file=tollgate.database).start()
    try:
        client = other.client(team.key)
        job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]  # the key now cached there
        admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"status": "suspended"})
        response = client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": [{"role": "user", "content": "hi"}]})
        assert (response.status_code, response.json()["detail"]) == (403, f"Team '{team.team_id}' is suspended")
    finally:
        other.stop()


def answer_to_a_slow_body(tollgate, key: str, path: str, body: dict, meanwhile: Callable[[], None]) -> tuple[int, dict]:
    """Send a request's head and the start of its body, call `meanwhile` once the gateway has
    looked the key up, then send the rest: the answer's status and JSON (or what it was else)."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", tollgate.port), timeout=15) as sock:
        sock.sendall(head + data[:5])
        time.sleep(0.5)  # the key is looked up as the head arrives, before the body is read
        meanwhile()
        sock.sendall(data[5:])
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, answer = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(answer) if b"application/json" in head.lower() else {"not json": answer[:200]}


def test_a_key_revoked_while_a_calls_body_arrives_starts_no_call(tollgate, admin, team, fake_url):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    marker = tag()
    status, answer = answer_to_a_slow_body(
        tollgate, team.key, f"/api/jobs/{job_id}/llm-call", {"messages": [{"role": "user", "content": f"[tag={marker}]"}]},
        lambda: admin.ok("DELETE", f"/admin/keys/{team.key_id}"),
    )
    assert (status, answer) == (401, INVALID)
    assert fake_log(fake_url, marker) == []
    assert admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"][0]["costs"]["total_calls"] == 0


def test_a_key_revoked_while_its_stream_runs_leaves_that_call_to_end_recorded_and_charged(tollgate, admin, team):
    # A change applies to the calls admitted after it (README): the answer the team is paying
    # for is not cut off half-way, and its own job is charged as any other.
    client = tollgate.client(team.key)
    body = {"model": "Main", "stream": True, "messages": [{"role": "user", "content": "a [chunks=6] [delay_ms=100]"}]}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["x-job-id"]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        admin.ok("DELETE", f"/admin/keys/{team.key_id}")
        assert client.get(f"/api/teams/{team.team_id}").status_code == 401
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    jobs = admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"]
    assert [(j["job_id"], j["status"], j["costs"]["successful_calls"], j["costs"]["credits_charged"]) for j in jobs] == [
        (job_id, "completed", 1, 1)
    ]


def test_a_team_suspended_while_a_calls_body_arrives_starts_no_call(tollgate, admin, team, fake_url):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    marker = tag()
    status, answer = answer_to_a_slow_body(
        tollgate, team.key, f"/api/jobs/{job_id}/llm-call-stream",
        {"messages": [{"role": "user", "content": f"[tag={marker}]"}]},
        lambda: admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"status": "suspended"}),
    )
    assert (status, answer) == (403, {"detail": f"Team '{team.team_id}' is suspended"})
    assert fake_log(fake_url, marker) == []


def test_a_group_taken_away_while_a_v1_calls_body_arrives_starts_no_call(tollgate, admin, fake_url):
    team = admin.team(groups=("Main", "Backup"))
    marker = tag()
    status, answer = answer_to_a_slow_body(
        tollgate, team.key, "/v1/chat/completions",
        {"model": "Main", "messages": [{"role": "user", "content": f"[tag={marker}]"}]},
        lambda: admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"model_groups": ["Backup"]}),
    )
    assert (status, answer["error"]["code"]) == (403, "model_group_not_allowed")
    assert fake_log(fake_url, marker) == []
    assert admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"] == []


def test_a_key_revoked_while_a_job_creations_body_arrives_creates_no_job(tollgate, admin, team):
    status, answer = answer_to_a_slow_body(
        tollgate, team.key, "/api/jobs/create", {"job_type": "t"},
        lambda: admin.ok("DELETE", f"/admin/keys/{team.key_id}"),
    )
    assert (status, answer) == (401, INVALID)
    assert admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"] == []
    assert admin.get_team(team.team_id)["credits_held"] == 0


def test_a_key_revoked_while_a_completions_body_arrives_finishes_no_job(tollgate, admin, team):
    # As job creation and calls: a completion charges (or releases) credits, and a key revoked
    # before its body was whole must not.
    job_id = tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    status, answer = answer_to_a_slow_body(
        tollgate, team.key, f"/api/jobs/{job_id}/complete", {"status": "completed"},
        lambda: admin.ok("DELETE", f"/admin/keys/{team.key_id}"),
    )
    assert (status, answer) == (401, INVALID)
    assert admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"][0]["status"] == "pending"
    body = admin.get_team(team.team_id)
    assert (body["credits_used"], body["credits_held"]) == (0, 1)


def test_a_key_expiring_while_a_job_creations_body_arrives_creates_no_job(tollgate, admin):
    expires = int(time.time()) + 3
    team = admin.team(key={"name": "short-lived", "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))})
    status, answer = answer_to_a_slow_body(
        tollgate, team.key, "/api/jobs/create", {"job_type": "t"},
        lambda: time.sleep(max(0.0, expires + 0.2 - time.time())),
    )
    assert (status, answer) == (401, INVALID)
    assert admin.ok("GET", f"/admin/teams/{team.team_id}/jobs")["jobs"] == []


def test_with_the_change_signal_unusable_a_key_revoked_while_a_body_arrives_is_refused_within_auth_cache_ttl(
    tmp_path,
):
    # README: should `<database>-changes` be unusable, auth.cache_ttl still bounds how late a
    # change is seen. A body arriving for longer than that must not start a job on the key as
    # it was read when the head came.
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", auth={"cache_ttl": 0.5})
    (tmp_path / f"{server.database.name}-changes").mkdir()  # the signal's file cannot be made
    server.start()
    try:
        admin = server.admin()
        team = admin.team()

        async def revoked_by_a_process_whose_signal_never_came() -> None:
            store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{server.database}"))
            await store.open()
            try:
                await store.revoke_key(team.key_id)
            finally:
                await store.close()

        status, answer = answer_to_a_slow_body(
            server, team.key, "/api/jobs/create", {"job_type": "t"},
            lambda: (asyncio.run(revoked_by_a_process_whose_signal_never_came()), time.sleep(1.0)),
        )
        assert (status, answer) == (401, INVALID)
        assert admin.get_team(team.team_id)["credits_held"] == 0
    finally:
        server.stop()


def test_expired_key_is_refused(tollgate, admin):
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    team = admin.team(key={"name": "short-lived", "expires_at": expires})
    client = tollgate.client(team.key)
    assert client.get(f"/api/teams/{team.team_id}").status_code == 200
    assert wait_for(lambda: client.get(f"/api/teams/{team.team_id}").status_code == 401, timeout=5)
    assert client.get(f"/api/teams/{team.team_id}").json() == INVALID


def test_expiry_in_the_past_is_refused_at_creation(admin, team):
    response = admin.request("POST", f"/admin/teams/{team.team_id}/keys", json={"expires_at": "2001-01-01T00:00:00Z"})
    assert response.status_code == 422
    assert response.json() == {"detail": "expires_at: must be in the future"}


def test_wrong_key_gets_the_same_answer_whatever_was_wrong(tollgate, team):
    near_miss = team.key[:-1] + ("A" if team.key[-1] != "A" else "B")
    for key in (near_miss, "sk-" + "x" * 43, "not-even-a-key", "sk-"):
        response = tollgate.client(key).get(f"/api/teams/{team.team_id}")
        assert (response.status_code, response.json()) == (401, INVALID), key


def test_missing_authorization_is_401_with_a_hint(tollgate, team):
    response = tollgate.client("x").get(f"/api/teams/{team.team_id}", headers={"Authorization": ""})
    assert response.status_code == 401
    assert "Bearer" in response.json()["detail"]


def test_an_empty_authorization_header_is_reported_as_missing(tollgate, team):
    response = tollgate.client("x").post("/v1/chat/completions", headers={"Authorization": ""}, json={})
    assert (response.status_code, response.json()["error"]["code"]) == (401, "missing_api_key")


def test_master_key_is_not_a_virtual_key(tollgate, team):
    response = tollgate.client(tollgate.master_key).get(f"/api/teams/{team.team_id}")
    assert (response.status_code, response.json()) == (401, INVALID)


def test_keys_never_appear_in_the_log(tollgate, team):
    tollgate.client(team.key).get(f"/api/teams/{team.team_id}")
    tollgate.client(team.key + "x").get(f"/api/teams/{team.team_id}")
    assert team.key not in tollgate.log()


def test_the_authorization_scheme_is_read_in_any_case(tollgate, team):
    # RFC 9110 (11.1): the scheme is case-insensitive, and some clients write it `bearer`.
    for scheme in ("bearer", "BEARER"):
        response = httpx.get(f"{tollgate.url}/api/teams/{team.team_id}", headers={"Authorization": f"{scheme} {team.key}"})
        assert response.status_code == 200, scheme


class OneKey:
    """A store holding one key; `meanwhile` runs as each lookup reads it."""

    def __init__(self, meanwhile: Callable[[], None] = lambda: None, expires_at: float | None = None) -> None:
        self.meanwhile = meanwhile
        self.expires_at = expires_at
        self.lookups = 0

    async def lookup_key(self, key_hash: bytes) -> tuple[VirtualKey, Team]:
        self.lookups += 1
        self.meanwhile()
        key = VirtualKey("key", "team", None, 0.0, self.expires_at, None, None, None)
        return key, Team("team", "org", "active", 10, 0, 0, ("Main",), None, None, None, None, 0.0)


def test_a_key_changed_while_it_was_looked_up_is_read_again_once_the_body_arrives():
    # The change stamp is read before the lookup: a revocation committed while the row was read
    # makes what was read stale, though the stamp has not moved since the lookup ended.
    changes = ChangeSignal()
    auth = KeyAuthenticator(OneKey(meanwhile=changes.bump), 60, changes)  # type: ignore[arg-type]
    principal = asyncio.run(auth.authenticate("Bearer sk-key"))
    assert not auth.unchanged(principal)


def test_a_key_is_looked_up_once_while_nothing_changes():
    store = OneKey()
    auth = KeyAuthenticator(store, 60, ChangeSignal())  # type: ignore[arg-type]

    async def twice() -> None:
        await auth.authenticate("Bearer sk-key")
        await auth.authenticate("Bearer sk-key")

    asyncio.run(twice())
    assert store.lookups == 1


def test_the_key_is_read_past_any_spaces_after_the_scheme():
    assert bearer_token("Bearer   sk-key ") == "sk-key"


def test_a_key_is_refused_from_the_instant_it_expires():
    auth = KeyAuthenticator(OneKey(expires_at=100.0), 60, ChangeSignal(), wall_clock=lambda: 100.0)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as refused:
        asyncio.run(auth.authenticate("Bearer sk-key"))
    assert (refused.value.status, refused.value.message) == (401, INVALID["detail"])


def test_a_bearer_scheme_with_no_key_after_it_is_refused_as_malformed():
    with pytest.raises(ApiError) as refused:
        bearer_token("Bearer   ")
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert refused.value.message.startswith("Malformed Authorization header")


def test_a_key_that_expires_while_a_calls_body_arrives_no_longer_stands_from_that_instant():
    now = [99.0]
    auth = KeyAuthenticator(OneKey(expires_at=100.0), 60, ChangeSignal(), wall_clock=lambda: now[0])  # type: ignore[arg-type]
    principal = asyncio.run(auth.authenticate("Bearer sk-key"))
    now[0] = 100.0
    assert not auth.unchanged(principal)


def test_a_key_nothing_changed_since_it_was_read_still_stands_once_the_body_arrives():
    auth = KeyAuthenticator(OneKey(), 60, ChangeSignal())  # type: ignore[arg-type]
    principal = asyncio.run(auth.authenticate("Bearer sk-key"))
    assert auth.unchanged(principal)


def test_a_key_read_longer_ago_than_the_cache_ttl_is_read_again_once_the_body_arrives():
    # The TTL bounds how late a change is seen when the change signal never came (its file
    # unusable, or a process that died between its commit and its stamp): a lookup older than
    # that no longer stands for a body that took longer to arrive.
    now = [0.0]
    auth = KeyAuthenticator(OneKey(), 0.5, ChangeSignal(), clock=lambda: now[0])  # type: ignore[arg-type]
    principal = asyncio.run(auth.authenticate("Bearer sk-key"))
    now[0] = 0.5
    assert not auth.unchanged(principal)
