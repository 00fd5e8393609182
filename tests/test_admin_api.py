"""The admin API, behind the master key, exactly as API.md's table."""

import asyncio
import os
import re
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.admin import AdminService
from proxy.config import Config, DatabaseConfig
from proxy.errors import ApiError
from proxy.records import Team, VirtualKey, iso
from proxy.store import Conflict, NotFound
from proxy.store.sqlite import SQLiteStore
from tests.support import Tollgate, wait_for


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-master-key", "Basic abc", "Bearer"])
def test_admin_refuses_without_the_master_key(tollgate, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(f"{tollgate.url}/admin/organizations", headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"]


def test_admin_refuses_a_virtual_key(tollgate, team):
    response = httpx.get(f"{tollgate.url}/admin/organizations", headers={"Authorization": f"Bearer {team.key}"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid master key"}


def test_admin_refuses_everything_when_no_master_key_is_configured(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, master_key=None).start()
    try:
        for key in ("x", "anything", "sk-master-test"):
            response = httpx.get(f"{server.url}/admin/organizations", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 401
            assert "disabled" in response.json()["detail"]
    finally:
        server.stop()


def test_create_organization_is_201_then_409(admin):
    org = uid("org")
    created = admin.request("POST", "/admin/organizations", json={"organization_id": org, "name": "Org"})
    assert created.status_code == 201
    assert created.json()["organization_id"] == org and created.json()["name"] == "Org"
    again = admin.request("POST", "/admin/organizations", json={"organization_id": org, "name": "Org"})
    assert again.status_code == 409
    assert org in [o["organization_id"] for o in admin.ok("GET", "/admin/organizations")]


def test_create_team_returns_the_team_with_defaults(admin):
    org, team = uid("org"), uid("team")
    admin.ok("POST", "/admin/organizations", json={"organization_id": org})
    response = admin.request(
        "POST",
        "/admin/teams",
        json={"team_id": team, "organization_id": org, "model_groups": ["Main", "Backup"], "credits_allocated": 5},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["model_groups"] == ["Main", "Backup"] and body["default_model_group"] == "Main"
    assert (body["credits_allocated"], body["credits_remaining"], body["credits_available"]) == (5, 5, 5)
    assert (body["rpm_limit"], body["tpm_limit"], body["credits_per_job"], body["status"]) == (60, 60000, 1, "active")
    assert admin.request("POST", "/admin/teams", json={"team_id": team, "organization_id": org}).status_code == 409


def test_create_team_with_unknown_organization_or_group_is_404(admin):
    response = admin.request("POST", "/admin/teams", json={"team_id": uid("t"), "organization_id": "no-such-org"})
    assert response.status_code == 404
    org = uid("org")
    admin.ok("POST", "/admin/organizations", json={"organization_id": org})
    response = admin.request(
        "POST", "/admin/teams", json={"team_id": uid("t"), "organization_id": org, "model_groups": ["NoSuchGroup"]}
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Model group 'NoSuchGroup' not found"}


def test_create_team_with_bad_fields_is_422(admin, team):
    response = admin.request("POST", "/admin/teams", json={"team_id": "bad id!", "organization_id": team.organization_id})
    assert response.status_code == 422
    response = admin.request(
        "POST", "/admin/teams", json={"team_id": uid("t"), "organization_id": team.organization_id, "rpm_limit": 0}
    )
    assert response.status_code == 422 and response.json() == {"detail": "rpm_limit: must be at least 1"}


def test_patch_team_changes_status_limits_and_groups(admin, team):
    body = admin.ok(
        "PATCH",
        f"/admin/teams/{team.team_id}",
        json={"status": "suspended", "rpm_limit": 5, "model_groups": ["Backup", "Main"], "default_model_group": "Main"},
    )
    assert (body["status"], body["rpm_limit"], body["model_groups"], body["default_model_group"]) == (
        "suspended", 5, ["Backup", "Main"], "Main",
    )
    assert admin.get_team(team.team_id)["status"] == "suspended"


def test_patch_team_refuses_a_default_outside_its_groups(admin, team):
    response = admin.request("PATCH", f"/admin/teams/{team.team_id}", json={"default_model_group": "Backup"})
    assert response.status_code == 422


def test_credits_are_ledger_entries_with_reason_and_balance(admin, team):
    admin.ok("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": 5, "reason": "top-up"})
    body = admin.ok("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": -3, "reason": "correction"})
    assert body["credits_allocated"] == 12
    ledger = admin.ok("GET", f"/admin/teams/{team.team_id}/ledger")
    assert [(e["amount"], e["reason"], e["balance_after"]) for e in ledger] == [
        (-3, "correction", 12),
        (5, "top-up", 15),
        (10, "initial allocation", 10),
    ]


def test_a_credit_change_while_jobs_hold_credits_records_the_balance_remaining_after_it(tollgate, admin, team):
    # balance_after is credits_remaining (allocated - used): what open jobs hold is not taken off it.
    tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "hold"}).raise_for_status()
    body = admin.ok("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": 5, "reason": "top-up"})
    assert (body["credits_remaining"], body["credits_held"], body["credits_available"]) == (15, 1, 14)
    (entry,) = admin.ok("GET", f"/admin/teams/{team.team_id}/ledger?limit=1")
    assert (entry["amount"], entry["reason"], entry["balance_after"]) == (5, "top-up", 15)


def test_a_ledger_entry_has_the_documented_fields_and_a_charge_names_its_job(tollgate, admin, team):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status()
    charge, allocation = admin.ok("GET", f"/admin/teams/{team.team_id}/ledger")
    for entry in (charge, allocation):
        assert set(entry) == {"entry_id", "team_id", "job_id", "amount", "reason", "balance_after", "created_at"}
        assert entry["team_id"] == team.team_id and entry["reason"]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", entry["created_at"])
    assert charge["entry_id"] > allocation["entry_id"]  # newest first
    assert (charge["job_id"], charge["amount"], charge["balance_after"]) == (job_id, -1, 9)
    assert (allocation["job_id"], allocation["amount"], allocation["balance_after"]) == (None, 10, 10)
    assert admin.get_team(team.team_id)["credits_remaining"] == charge["balance_after"]


def test_the_ledger_takes_no_job_status_filter(admin, team):
    # The job lists' paging was read for it, status included: ?status=bogus was a 422 about job
    # statuses, and ?status=completed was silently not applied.
    ledger = admin.ok("GET", f"/admin/teams/{team.team_id}/ledger?status=bogus&limit=1")
    assert [(e["amount"], e["reason"]) for e in ledger] == [(10, "initial allocation")]


def test_a_page_of_the_ledger_holds_up_to_1000_entries(admin, team):
    # README: at most 1,000 for the ledger (500 for jobs).
    assert [e["amount"] for e in admin.ok("GET", f"/admin/teams/{team.team_id}/ledger?limit=1000")] == [10]
    response = admin.request("GET", f"/admin/teams/{team.team_id}/ledger?limit=1001")
    assert response.status_code == 422


def test_a_head_of_an_admin_path_with_several_methods_is_answered_as_its_get(admin, team):
    get, head = admin.request("GET", "/admin/teams"), admin.request("HEAD", "/admin/teams")
    assert (head.status_code, head.headers["content-length"]) == (200, get.headers["content-length"])


def test_the_answer_showing_a_new_keys_plaintext_is_not_to_be_cached(admin, team):
    response = admin.request("POST", f"/admin/teams/{team.team_id}/keys", json={"name": "once"})
    assert (response.status_code, response.headers["cache-control"]) == (201, "no-store")


def test_credits_cannot_drop_below_used_plus_held(tollgate, admin, team):
    tollgate.client(team.key).post("/api/jobs/create", json={"job_type": "hold"}).raise_for_status()
    response = admin.request("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": -10, "reason": "x"})
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Cannot remove 10 credits from team '{team.team_id}': only 9 are neither used nor held"
    }
    assert admin.get_team(team.team_id)["credits_allocated"] == 10


def test_credits_may_drop_to_exactly_what_is_used_plus_held(tollgate, admin, team):
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status()
    client.post("/api/jobs/create", json={"job_type": "hold"}).raise_for_status()
    body = admin.ok("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": -8, "reason": "down to the floor"})
    assert (body["credits_allocated"], body["credits_used"], body["credits_held"], body["credits_available"]) == (2, 1, 1, 0)
    assert admin.request("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": -1, "reason": "x"}).status_code == 409
    assert client.post("/api/jobs/create", json={"job_type": "t"}).status_code == 403


def test_credits_need_a_reason_and_a_non_zero_amount(admin, team):
    assert admin.request("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": 5}).status_code == 422
    assert admin.request("POST", f"/admin/teams/{team.team_id}/credits", json={"amount": 0, "reason": "x"}).status_code == 422


def test_model_group_lifecycle(admin):
    name = uid("Group")
    created = admin.request("POST", "/admin/model-groups", json={"name": name, "models": ["primary", "backup"]})
    assert created.status_code == 201 and created.json()["models"] == ["primary", "backup"]
    assert admin.request("POST", "/admin/model-groups", json={"name": name, "models": ["x"]}).status_code == 409
    assert admin.ok("PUT", f"/admin/model-groups/{name}", json={"models": ["backup"]})["models"] == ["backup"]
    assert admin.ok("GET", f"/admin/model-groups/{name}")["models"] == ["backup"]
    assert name in [g["name"] for g in admin.ok("GET", "/admin/model-groups")]
    assert admin.request("DELETE", f"/admin/model-groups/{name}").status_code == 200
    assert admin.request("GET", f"/admin/model-groups/{name}").status_code == 404


def test_a_model_groups_update_time_moves_on_and_its_creation_time_stays(admin):
    name = uid("Group")
    created = admin.ok("POST", "/admin/model-groups", json={"name": name, "models": ["primary"]})
    time.sleep(0.01)  # the times are written to the millisecond
    updated = admin.ok("PUT", f"/admin/model-groups/{name}", json={"models": ["backup"]})
    assert created["created_at"] == created["updated_at"] == updated["created_at"] < updated["updated_at"]


@pytest.mark.parametrize(
    "models",
    [["m"] * 33, ["m" * 257], ["gpt-4o\n"], ["gpt\x00"], [], [""], "primary", [1]],
    ids=["33 models", "a name of 257 characters", "a newline", "a NUL", "none", "an empty name", "a string",
         "a number"],
)
def test_a_model_group_refuses_models_outside_the_bounds_on_create_and_put(admin, models):
    name = uid("Group")
    for method, path, body in [("POST", "/admin/model-groups", {"name": name, "models": models}),
                               ("PUT", f"/admin/model-groups/{name}", {"models": models})]:
        response = admin.request(method, path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("models: must be a list of 1 to 32 model names")
    assert admin.request("GET", f"/admin/model-groups/{name}").status_code == 404


def test_a_model_group_takes_32_models_of_256_characters(admin):
    name, models = uid("Group"), ["m" * 256] * 31 + ["backup model"]
    created = admin.request("POST", "/admin/model-groups", json={"name": name, "models": models})
    assert created.status_code == 201 and created.json()["models"] == models


def test_a_team_created_without_groups_can_make_no_call_until_one_is_granted(tollgate, admin):
    org, team_id = uid("org"), uid("team")
    admin.ok("POST", "/admin/organizations", json={"organization_id": org})
    created = admin.request("POST", "/admin/teams", json={"team_id": team_id, "organization_id": org, "credits_allocated": 1})
    assert created.status_code == 201
    assert (created.json()["model_groups"], created.json()["default_model_group"]) == ([], None)
    client = tollgate.client(admin.ok("POST", f"/admin/teams/{team_id}/keys", json={})["key"])
    job_id = client.post("/api/jobs/create", json={"job_type": "t"}).json()["job_id"]
    call = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post(f"/api/jobs/{job_id}/llm-call", json=call).status_code == 403
    admin.ok("PATCH", f"/admin/teams/{team_id}", json={"model_groups": ["Main"]})
    assert client.post(f"/api/jobs/{job_id}/llm-call", json=call).status_code == 200


def test_a_put_of_a_model_group_that_does_not_exist_creates_it_with_201(admin):
    # HTTP's PUT: 201 when it created the resource, 200 when it replaced one, so that a client
    # (or a script declaring groups) can tell a typo'd name from the group it meant to change.
    name = uid("Group")
    response = admin.request("PUT", f"/admin/model-groups/{name}", json={"models": ["primary"], "description": "d"})
    assert response.status_code == 201
    assert admin.ok("GET", f"/admin/model-groups/{name}")["models"] == ["primary"]


def test_a_put_of_an_existing_model_group_replaces_it_with_200(admin):
    name = uid("Group")
    assert admin.request("PUT", f"/admin/model-groups/{name}", json={"models": ["primary"]}).status_code == 201
    response = admin.request("PUT", f"/admin/model-groups/{name}", json={"models": ["backup"]})
    assert response.status_code == 200 and response.json()["models"] == ["backup"]


def test_model_group_in_use_cannot_be_deleted(admin, team):
    response = admin.request("DELETE", "/admin/model-groups/Main")
    assert response.status_code == 409
    assert team.team_id in response.json()["detail"]


def test_admin_lists_a_teams_jobs_newest_first(tollgate, admin, team):
    client = tollgate.client(team.key)
    ids = [client.post("/api/jobs/create", json={"job_type": f"j{i}"}).json()["job_id"] for i in range(3)]
    page = admin.ok("GET", f"/admin/teams/{team.team_id}/jobs?limit=2")
    assert [j["job_id"] for j in page["jobs"]] == [ids[2], ids[1]]
    assert page["total"] == 3
    client.post(f"/api/jobs/{ids[0]}/complete", json={"status": "failed"}).raise_for_status()
    failed = admin.ok("GET", f"/admin/teams/{team.team_id}/jobs?status=failed")
    assert ([j["job_id"] for j in failed["jobs"]], failed["total"]) == ([ids[0]], 1)
    assert all("costs" in j for j in page["jobs"])


def test_create_key_is_201_showing_the_key_once(tollgate, admin, team):
    response = admin.request(
        "POST", f"/admin/teams/{team.team_id}/keys", json={"name": "ci", "expires_at": "2999-01-01T00:00:00Z"}
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) >= {"key_id", "key", "name", "team_id", "created_at", "expires_at"}
    assert (body["name"], body["team_id"], body["expires_at"]) == ("ci", team.team_id, "2999-01-01T00:00:00.000Z")
    assert tollgate.client(body["key"]).get(f"/api/teams/{team.team_id}").status_code == 200
    listed = [k for k in admin.ok("GET", f"/admin/teams/{team.team_id}/keys") if k["key_id"] == body["key_id"]]
    assert len(listed) == 1 and "key" not in listed[0]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("PATCH", "/admin/teams/no-such-team", {"status": "active"}),
        ("POST", "/admin/teams/no-such-team/credits", {"amount": 1, "reason": "x"}),
        ("GET", "/admin/teams/no-such-team/ledger", None),
        ("POST", "/admin/teams/no-such-team/keys", {}),
        ("GET", "/admin/teams/no-such-team/keys", None),
        ("GET", "/admin/teams/no-such-team/jobs", None),
        ("DELETE", "/admin/model-groups/NoSuchGroup", None),
    ],
)
def test_every_admin_route_naming_an_unknown_team_or_group_is_404(admin, method, path, body):
    response = admin.request(method, path, json=body) if body is not None else admin.request(method, path)
    assert response.status_code == 404, response.text
    assert response.json()["detail"] in ("Team 'no-such-team' not found", "Model group 'NoSuchGroup' not found")


def test_admin_errors_are_json_with_a_detail_unknown_routes_and_wrong_methods_included(admin):
    # API.md: errors on /admin as on /api.
    for response in (admin.request("GET", "/admin/nothing-here"), admin.request("PUT", "/admin/organizations")):
        assert response.status_code in (404, 405)
        assert list(response.json()) == ["detail"] and response.json()["detail"]


def test_unknown_team_is_404(admin):
    assert admin.request("GET", "/admin/teams/no-such-team").status_code == 404
    assert admin.request("DELETE", "/admin/keys/key_nope").status_code == 404

@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("PUT", "/admin/teams/{team}", "GET, HEAD, PATCH"),
        ("PATCH", "/admin/model-groups/Main", "DELETE, GET, HEAD, PUT"),
        ("PUT", "/admin/teams", "GET, HEAD, POST"),
        ("DELETE", "/admin/organizations", "GET, HEAD, POST"),
        ("PUT", "/admin/teams/{team}/keys", "GET, HEAD, POST"),
        ("GET", "/admin/keys/key_nope", "DELETE"),
    ],
)
def test_a_wrong_method_is_405_allowing_every_method_of_the_path(admin, team, method, path, allowed):
    # Each method of a path was a route of its own, and the 405 allowed only the first's: a PUT
    # to a team was told GET alone, as if teams could not be changed (they take PATCH).
    answer = admin.request(method, path.format(team=team.team_id))
    assert answer.status_code == 405, answer.text
    assert sorted(answer.headers["allow"].split(", ")) == allowed.split(", ")



@pytest.mark.parametrize(
    "path_suffix, body",
    [
        ("/credits", {"amount": 2**64, "reason": "overflow"}),
        ("/keys", {"expires_at": "9999-12-31T23:59:59-23:00"}),
        ("/keys", {"expires_at": "tomorrow"}),
        ("/keys", {"rpm_limit": 10**30}),
    ],
)
def test_out_of_range_admin_values_are_422(admin, team, path_suffix, body):
    response = admin.request("POST", f"/admin/teams/{team.team_id}{path_suffix}", json=body)
    assert response.status_code == 422, response.text


def test_huge_team_limits_are_422(admin, team):
    response = admin.request("PATCH", f"/admin/teams/{team.team_id}", json={"credits_per_job": 2**70})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/admin/teams", {"credits_allocated": -5}),
        ("POST", "/admin/teams", {"credits_per_job": -1}),
        ("PATCH", "/admin/teams/{team}", {"credits_per_job": -1}),
    ],
)
def test_negative_credits_of_a_team_are_422(admin, team, method, path, body):
    # Left to the database, a negative allocation would fail its check as "organization not found",
    # and a negative price would make every job of the team a 500 (its hold below zero).
    team_id = team.team_id
    if method == "POST":
        team_id = uid("team")
        body = {**body, "team_id": team_id, "organization_id": team.organization_id, "model_groups": ["Main"]}
    response = admin.request(method, path.format(team=team_id), json=body)
    assert response.status_code == 422, response.text
    if method == "POST":
        assert admin.request("GET", f"/admin/teams/{team_id}").status_code == 404
    else:
        assert admin.get_team(team_id)["credits_per_job"] == 1


def test_a_teams_credits_per_job_can_be_changed_to_0(tollgate, admin, team):
    body = admin.ok("PATCH", f"/admin/teams/{team.team_id}", json={"credits_per_job": 0})
    assert body["credits_per_job"] == 0
    client = tollgate.client(team.key)
    job_id = client.post("/api/jobs/create", json={"job_type": "free"}).json()["job_id"]
    done = client.post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).json()
    assert (done["costs"]["credits_charged"], done["costs"]["credits_remaining"]) == (0, 10)


def test_organizations_and_teams_declared_in_config_follow_the_file_but_keep_their_credits(tmp_path, litellm):
    declared = {
        "organizations": [{"organization_id": "yaml-org", "name": "From YAML"}],
        "teams": [{"team_id": "yaml-team", "organization_id": "yaml-org", "model_groups": ["Main"],
                   "credits_allocated": 7, "rpm_limit": 30}],
    }
    server = Tollgate(tmp_path, litellm.url, litellm.master_key, name="declared", **declared).start()
    admin = server.admin()
    team = admin.get_team("yaml-team")
    assert (team["organization_id"], team["credits_allocated"], team["rpm_limit"]) == ("yaml-org", 7, 30)
    admin.ok("POST", "/admin/teams/yaml-team/credits", json={"amount": 5, "reason": "top-up"})
    server.stop()

    declared["teams"][0].update(rpm_limit=90, credits_allocated=1000, model_groups=["Main", "Backup"])
    restarted = Tollgate(tmp_path, litellm.url, litellm.master_key, name="declared", database_file=server.database, **declared).start()
    try:
        team = restarted.admin().get_team("yaml-team")
        assert (team["rpm_limit"], team["model_groups"]) == (90, ["Main", "Backup"])
        assert team["credits_allocated"] == 12  # set at creation, then moved only by the ledger
    finally:
        restarted.stop()


def uvicorn_workers(server: Tollgate) -> set[int]:
    workers = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == server.process.pid and b"spawn_main" in command:
            workers.add(int(stat.parent.name))
    return workers


def test_a_worker_started_again_after_a_crash_keeps_the_admin_apis_changes_to_a_declared_team(make_tollgate):
    declared = {
        "organizations": [{"organization_id": "yaml-org"}],
        "teams": [{"team_id": "yaml-team", "organization_id": "yaml-org", "model_groups": ["Main"], "rpm_limit": 30}],
    }
    server = make_tollgate(workers=2, **declared)
    admin = server.admin()
    admin.ok("PATCH", "/admin/teams/yaml-team", json={"status": "suspended", "rpm_limit": 5})
    first = wait_for(lambda: len(w := uvicorn_workers(server)) == 2 and w, timeout=10)
    # Both started, so that the one killed has logged its start and the count below is of restarts.
    assert wait_for(lambda: server.log().count("Application startup complete") >= 2, timeout=20)
    os.kill(min(first), signal.SIGKILL)
    assert wait_for(lambda: len(w := uvicorn_workers(server)) == 2 and w != first, timeout=20), "no worker restarted"
    # At least the restarted one: under load uvicorn may also replace a worker slow to answer its health check.
    assert wait_for(lambda: server.log().count("Application startup complete") >= 3, timeout=20)
    for _ in range(10):  # whichever worker answers
        team = admin.get_team("yaml-team")
        assert (team["status"], team["rpm_limit"]) == ("suspended", 5)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/admin/organizations", {"organization_id": "acme\n"}),
        ("/admin/teams", {"team_id": "acme-web\n", "organization_id": "acme"}),
        ("/admin/model-groups", {"name": "Group\n", "models": ["primary"]}),
    ],
)
def test_names_with_a_trailing_newline_are_422(admin, path, body):
    response = admin.request("POST", path, json=body)
    assert response.status_code == 422, response.text


def test_put_model_group_refuses_a_name_with_a_trailing_newline(admin):
    assert admin.request("PUT", "/admin/model-groups/Group%0A", json={"models": ["primary"]}).status_code == 422


def test_the_store_reports_a_group_granted_twice_as_such(tmp_path):
    async def grant_twice() -> str:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
        await store.open()
        try:
            await store.create_organization("o", "O")
            await store.put_model_group("X", ["primary"], "")
            team = Team(
                team_id="t", organization_id="o", status="active", credits_allocated=0, credits_used=0,
                credits_held=0, model_groups=(), default_model_group=None, rpm_limit=None, tpm_limit=None,
                credits_per_job=None, created_at=time.time(),
            )
            await store.create_team(team, reason="test")
            with pytest.raises(Conflict) as info:
                await store.update_team("t", {"model_groups": ["X", "X"]})
            return str(info.value)
        finally:
            await store.close()

    assert asyncio.run(grant_twice()) == "Model group 'X' is named twice"


async def admin_of_team_t(store: SQLiteStore, groups: list[str]) -> AdminService:
    """The admin service of `store`, once it holds organization 'o', the model groups 'Main' and
    'Backup', and team 't' granted `groups`."""
    admin = AdminService(store, Config())
    await store.create_organization("o", "O")
    for group in ("Main", "Backup"):
        await store.put_model_group(group, ["primary"], "")
    await admin.create_team({"team_id": "t", "organization_id": "o", "model_groups": groups})
    return admin


def test_concurrent_patches_never_leave_a_default_group_the_team_is_not_granted(tmp_path):
    """Two PATCHes that each pass the check on their own (one sets the default, the other drops
    that group) must not both land: the team would keep a default it may not call, and every
    call naming no group would be refused with a 403."""

    class BothReadFirst(SQLiteStore):
        """Each PATCH's read of the team happens before either writes, as when two admins
        (or two workers) answer at the same moment."""

        readers = 0  # how many coming reads of a team wait for each other

        async def get_team(self, team_id):
            team = await super().get_team(team_id)
            if self.readers:
                self.readers -= 1
                if self.readers:
                    await asyncio.wait_for(self.both_read.wait(), 10)  # a failure, not a hang
                else:
                    self.both_read.set()
            return team

    async def race() -> Team:
        store = BothReadFirst(DatabaseConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
        await store.open()
        try:
            admin = await admin_of_team_t(store, ["Main", "Backup"])
            store.readers, store.both_read = 2, asyncio.Event()
            results = await asyncio.gather(
                admin.update_team("t", {"default_model_group": "Backup"}),
                admin.update_team("t", {"model_groups": ["Main"]}),
                return_exceptions=True,
            )
            assert all(isinstance(r, (Team, ApiError, Conflict)) for r in results), results
            team = await store.get_team("t")
            assert team is not None
            return team
        finally:
            await store.close()

    team = asyncio.run(race())
    assert team.default_model_group is None or team.default_model_group in team.model_groups, (
        team.model_groups, team.default_model_group,
    )


def test_a_put_model_group_racing_its_delete_answers_what_it_wrote(tmp_path):
    """A PUT whose group is deleted right after its write (another admin, another worker)
    answers the group it wrote, not a 500 for the group gone by the time it was read back."""
    from proxy.store import ModelGroup

    async def race() -> list[object]:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
        await store.open()
        try:
            await store.put_model_group("Racing", ["primary"], "")
            return await asyncio.gather(
                store.put_model_group("Racing", ["backup"], "new"), store.delete_model_group("Racing"),
                return_exceptions=True,
            )
        finally:
            await store.close()

    put, deleted = asyncio.run(race())
    assert deleted is None
    assert isinstance(put, ModelGroup) and (put.name, put.models, put.description) == ("Racing", ("backup",), "new")


def test_a_change_is_signalled_even_when_its_write_commits_and_then_raises(tmp_path: Path):
    from proxy.store import StoreUnavailable

    class CommitsThenFails(SQLiteStore):
        async def revoke_key(self, key_id):
            await super().revoke_key(key_id)
            raise StoreUnavailable("the fsync after the commit failed")

    async def revoke() -> int:
        store = CommitsThenFails(DatabaseConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
        await store.open()
        signals = []
        try:
            admin = AdminService(store, Config(), on_change=lambda: signals.append(1))
            await store.create_organization("o", "O")
            await admin.create_team({"team_id": "t", "organization_id": "o"})
            key, _ = await admin.create_key("t", {})
            with pytest.raises(StoreUnavailable):
                await admin.revoke_key(key.key_id)
            return len(signals)
        finally:
            await store.close()

    assert asyncio.run(revoke()) == 1


def with_admin(tmp_path: Path, action):
    """What `action(admin)` returns, run against a store of its own holding organization 'o',
    team 't' and the model groups 'Main' and 'Backup'."""

    async def run():
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
        await store.open()
        try:
            return await action(await admin_of_team_t(store, ["Main"]))
        finally:
            await store.close()

    return asyncio.run(run())


def refusal(tmp_path: Path, action) -> tuple[int, str]:
    async def refused(admin):
        with pytest.raises(ApiError) as info:
            await action(admin)
        return info.value.status, info.value.message

    return with_admin(tmp_path, refused)


def test_an_organization_created_without_a_name_is_named_by_its_id(tmp_path):
    async def create(admin):
        return await admin.create_organization({"organization_id": "acme"})

    assert with_admin(tmp_path, create).name == "acme"


def test_an_organization_created_with_a_null_name_is_named_by_its_id_and_an_empty_one_is_422(tmp_path):
    # config.yaml's declarations follow the same rule (tests/test_config.py).
    async def create(admin):
        named = await admin.create_organization({"organization_id": "acme", "name": None})
        with pytest.raises(ApiError) as info:
            await admin.create_organization({"organization_id": "acme2", "name": ""})
        return named.name, info.value.status, info.value.message

    assert with_admin(tmp_path, create) == ("acme", 422, "name: must not be empty")


def test_a_model_group_created_with_a_null_description_has_none(tmp_path):
    async def create(admin):
        return await admin.create_model_group({"name": "Plain", "models": ["primary"], "description": None})

    assert with_admin(tmp_path, create).description == ""


@pytest.mark.parametrize("change", ["create", "patch"])
def test_a_team_status_other_than_active_or_suspended_is_422(tmp_path, change):
    async def set_status(admin):
        if change == "create":
            return await admin.create_team({"team_id": "t2", "organization_id": "o", "status": "paused"})
        return await admin.update_team("t", {"status": "paused"})

    assert refusal(tmp_path, set_status) == (422, "status: must be 'active' or 'suspended'")


@pytest.mark.parametrize("groups", [["Main", "Main"], ["Main", ""]], ids=["a group twice", "an empty name"])
def test_model_groups_naming_a_group_twice_or_an_empty_name_are_422(tmp_path, groups):
    async def grant(admin):
        return await admin.update_team("t", {"model_groups": groups})

    assert refusal(tmp_path, grant)[0] == 422


def test_a_key_expiry_with_a_lowercase_z_is_read_as_utc(tmp_path):
    async def create(admin):
        key, _ = await admin.create_key("t", {"expires_at": "2999-01-01t00:00:00z"})
        return key.expires_at

    assert with_admin(tmp_path, create) == datetime(2999, 1, 1, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("expires_at", ["2100-01-01T00:00:00.9999Z", "2100-01-01T00:00:00.999999999Z",
                                        "2100-01-01T01:00:00.9995+01:00"])
def test_a_key_expiry_finer_than_a_millisecond_is_kept_as_it_is_shown(tmp_path, expires_at):
    # Shown to the millisecond (.999Z), it was enforced to the digits given: the key worked past
    # the expiry every listing showed.
    async def create(admin):
        key, _ = await admin.create_key("t", {"expires_at": expires_at})
        return key.expires_at, iso(key.expires_at)

    expires, shown = with_admin(tmp_path, create)
    assert shown == "2100-01-01T00:00:00.999Z"
    assert expires == datetime(2100, 1, 1, 0, 0, 0, 999_000, tzinfo=timezone.utc).timestamp()


def test_a_key_expiry_a_moment_ago_is_422(tmp_path):
    async def create(admin):
        return await admin.create_key("t", {"expires_at": iso(time.time() - 0.5)})

    assert refusal(tmp_path, create) == (422, "expires_at: must be in the future")


@pytest.mark.parametrize("reason", [" ", "   ", "\t\n"])
def test_a_credit_reason_of_only_whitespace_is_422_as_an_empty_one_and_adds_nothing(tmp_path, reason):
    # Every credit change is a ledger entry with a reason (API.md): a blank one gives none.
    async def add(admin):
        before = await admin.ledger("t", 100, 0)
        with pytest.raises(ApiError) as info:
            await admin.add_credits("t", {"amount": 5, "reason": reason})
        return info.value.status, info.value.message, await admin.ledger("t", 100, 0) == before

    assert with_admin(tmp_path, add) == (422, "reason: must not be empty or only whitespace", True)


def test_a_team_created_with_null_credits_allocated_is_422_naming_it(tmp_path):
    # Left out it is 0; null is no amount at all, refused as a null status or model_groups is.
    async def create(admin):
        return await admin.create_team({"team_id": "t2", "organization_id": "o", "credits_allocated": None})

    assert refusal(tmp_path, create) == (422, "credits_allocated: must be an integer (leave it out for 0)")


def test_a_put_model_group_whose_body_names_another_group_is_422(tmp_path):
    async def put(admin):
        return await admin.put_model_group("Main", {"name": "Backup", "models": ["backup"]})

    assert refusal(tmp_path, put) == (422, "name: must match the name in the path")


def test_a_model_groups_description_may_be_empty(tmp_path):
    async def create(admin):
        return await admin.create_model_group({"name": "Plain", "models": ["primary"], "description": ""})

    assert with_admin(tmp_path, create).description == ""


def test_an_unknown_field_of_an_admin_body_is_422_naming_it(tmp_path):
    async def create(admin):
        return await admin.create_organization({"organization_id": "acme", "credits": 5})

    status, message = refusal(tmp_path, create)
    assert (status, message.split(":")[0]) == (422, "credits")


def test_a_team_created_with_a_default_outside_its_groups_is_422(tmp_path):
    async def create(admin):
        return await admin.create_team(
            {"team_id": "t2", "organization_id": "o", "model_groups": ["Main"], "default_model_group": "Backup"}
        )

    assert refusal(tmp_path, create) == (422, "default_model_group: 'Backup' is not one of the team's model_groups")


def test_a_team_may_be_created_with_credits_per_job_0(tmp_path):
    async def create(admin):
        return await admin.create_team({"team_id": "t2", "organization_id": "o", "credits_per_job": 0})

    assert with_admin(tmp_path, create).credits_per_job == 0


def test_taking_away_a_teams_default_group_without_naming_another_is_422(tmp_path):
    async def regrant(admin):
        await admin.update_team("t", {"default_model_group": "Main"})
        return await admin.update_team("t", {"model_groups": ["Backup"]})

    assert refusal(tmp_path, regrant) == (422, "default_model_group: 'Main' is not one of the team's model_groups")


def test_organizations_teams_and_model_groups_are_listed_by_name(tmp_path: Path) -> None:
    async def list_all(admin: AdminService) -> Any:
        for name in ("c", "a", "b"):
            await admin.create_organization({"organization_id": f"org-{name}"})
            await admin.create_team({"team_id": f"team-{name}", "organization_id": "o"})
            await admin.create_model_group({"name": f"Group-{name}", "models": ["primary"]})
        return (
            [o.organization_id for o in await admin.list_organizations()],
            [t.team_id for t in await admin.list_teams()],
            [g.name for g in await admin.list_model_groups()],
        )

    organizations, teams, groups = with_admin(tmp_path, list_all)
    assert organizations == ["o", "org-a", "org-b", "org-c"]
    assert teams == ["t", "team-a", "team-b", "team-c"]
    assert groups == ["Backup", "Group-a", "Group-b", "Group-c", "Main"]


def test_a_teams_model_groups_keep_the_order_they_were_granted_in(tmp_path: Path) -> None:
    async def grant(admin: AdminService) -> Any:
        created = await admin.create_team({"team_id": "t2", "organization_id": "o", "model_groups": ["Main", "Backup"]})
        updated = await admin.update_team("t", {"model_groups": ["Main", "Backup"]})
        return created.model_groups, updated.model_groups, (await admin.get_team("t2")).model_groups

    assert with_admin(tmp_path, grant) == (("Main", "Backup"),) * 3


def test_the_ledger_is_newest_first_a_page_at_a_time(tmp_path: Path) -> None:
    async def page(admin: AdminService) -> Any:
        for amount in (1, 2, 3):
            await admin.add_credits("t", {"amount": amount, "reason": f"add {amount}"})
        return [entry.amount for entry in await admin.ledger("t", limit=2, offset=1)]

    assert with_admin(tmp_path, page) == [2, 1]


def test_a_teams_keys_are_listed_oldest_first_and_no_other_teams(tmp_path: Path) -> None:
    async def listed(admin: AdminService) -> Any:
        await admin.create_team({"team_id": "t2", "organization_id": "o"})
        # Created in an order other than their ids'.
        for created_at, (key_id, team_id) in enumerate([("key_c", "t"), ("key_b", "t2"), ("key_a", "t")]):
            key = VirtualKey(key_id, team_id, None, float(created_at), None, None, None, None)
            await admin._store.create_key(key, key_id.encode())
        return [key.key_id for key in await admin.list_keys("t")]

    assert with_admin(tmp_path, listed) == ["key_c", "key_a"]


def test_a_model_groups_models_are_read_back_in_their_order(tmp_path: Path) -> None:
    async def read_back(admin: AdminService) -> Any:
        await admin.create_model_group({"name": "Created", "models": ["primary", "backup"]})
        await admin.put_model_group("Put", {"models": ["primary", "backup"]})
        return [(await admin.get_model_group(name)).models for name in ("Created", "Put")]

    assert with_admin(tmp_path, read_back) == [("primary", "backup")] * 2


def test_a_key_revoked_twice_keeps_the_time_of_its_first_revocation(tmp_path: Path) -> None:
    async def revoke_twice(admin: AdminService) -> Any:
        key, _ = await admin.create_key("t", {"name": "k"})
        first = await admin.revoke_key(key.key_id)
        await asyncio.sleep(0.01)  # the times are written to the millisecond
        return first, await admin.revoke_key(key.key_id)

    first, second = with_admin(tmp_path, revoke_twice)
    assert first.revoked_at is not None and second.revoked_at == first.revoked_at


def test_a_model_group_refused_deletion_names_the_teams_granted_it_by_name(tmp_path: Path) -> None:
    async def delete(admin: AdminService) -> Any:
        await admin.create_team({"team_id": "a", "organization_id": "o", "model_groups": ["Main"]})
        with pytest.raises(Conflict) as info:
            await admin.delete_model_group("Main")
        return str(info.value)

    assert with_admin(tmp_path, delete) == "Model group 'Main' is granted to teams: a, t; remove it from them first"


def test_the_store_refuses_to_change_a_team_that_does_not_exist(tmp_path: Path) -> None:
    # The admin API reads the team first; the store's own answer is what the CLI and a change
    # racing the read rely on.
    async def change(admin: AdminService) -> Any:
        with pytest.raises(NotFound) as info:
            await admin._store.update_team("nope", {"status": "suspended"})
        return str(info.value)

    assert with_admin(tmp_path, change) == "Team 'nope' not found"


def test_the_store_refuses_a_key_for_a_team_that_does_not_exist(tmp_path: Path) -> None:
    async def create(admin: AdminService) -> Any:
        with pytest.raises(NotFound) as info:
            await admin._store.create_key(VirtualKey("key_x", "nope", None, 0.0, None, None, None, None), b"x")
        return str(info.value)

    assert with_admin(tmp_path, create) == "Team 'nope' not found"
