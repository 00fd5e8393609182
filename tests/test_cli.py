"""The command line offers the admin operations, on the same database a server uses."""

import asyncio
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from uvicorn.main import STARTUP_FAILURE

from proxy import app as app_module
from proxy import cli, demo
from proxy.app import app_from_environment, create_app
from proxy.cli import (
    WORKERS_DIR_PREFIX, _config_for_workers, _run, build_parser, main, remove_left_behind, serve_options,
)
from proxy.config import ENV_CONFIG, Config, LoggingConfig, ServerConfig, load_config
from proxy.demo import DEMO_TEAM, LITELLM_VERSION, _prepare, banner, ensure_litellm
from proxy.metrics import MULTIPROC_ENV
from proxy.observe import LogHandler
from proxy.server import (
    _say_listening, _Supervisor, listen, raise_open_files_limit, serve, serve_workers, uvicorn_options,
)
from proxy.store.schema import MIGRATIONS
from tests.support import PYTHON, REPO, Tollgate, free_port, tag, tollgate_config, wait_for


def tollgate_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    return subprocess.run(
        [PYTHON, "-m", "proxy", *args, "--config", str(config)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def tollgate_demo(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    return subprocess.run(
        [PYTHON, "-m", "proxy", "demo", *args], env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def ok(config: Path, *args: str):
    result = tollgate_cli(config, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_round_trip_with_a_running_server(tmp_path, litellm):
    server = Tollgate(tmp_path, litellm.url, litellm.master_key)
    config = server.config_path

    assert ok(config, "org", "create", "cli-org", "--name", "CLI Org")["name"] == "CLI Org"
    group = ok(config, "model-group", "create", "CliGroup", "--models", "primary,backup")
    assert group["models"] == ["primary", "backup"]
    team = ok(config, "team", "create", "cli-team", "--org", "cli-org", "--groups", "CliGroup,Main", "--credits", "3")
    assert (team["credits_allocated"], team["default_model_group"]) == (3, "CliGroup")
    key = ok(config, "key", "create", "cli-team", "--name", "from-cli")
    assert key["key"].startswith("sk-")
    assert ok(config, "credits", "add", "cli-team", "4", "--reason", "top-up")["credits_allocated"] == 7
    assert ok(config, "team", "show", "cli-team")["credits_remaining"] == 7
    assert [k["key_id"] for k in ok(config, "key", "list", "cli-team")] == [key["key_id"]]

    server.start()
    try:
        client = server.client(key["key"])
        assert client.get("/api/teams/cli-team").json()["credits_allocated"] == 7
        ok(config, "key", "revoke", key["key_id"])
        assert wait_for(lambda: client.get("/api/teams/cli-team").status_code == 401, timeout=2)
    finally:
        server.stop()


def test_a_key_revoked_with_the_cli_is_refused_at_once_by_a_running_server(tmp_path):
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused")
    ok(server.config_path, "org", "create", "cli-org")
    ok(server.config_path, "team", "create", "cli-team", "--org", "cli-org", "--groups", "Main")
    key = ok(server.config_path, "key", "create", "cli-team")
    server.start()
    try:
        client = server.client(key["key"])
        assert client.get("/api/teams/cli-team").status_code == 200  # the key now cached in the server
        ok(server.config_path, "key", "revoke", key["key_id"])
        assert client.get("/api/teams/cli-team").status_code == 401
    finally:
        server.stop()


def plain_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db")))
    return config


# Unbuffered (PYTHONUNBUFFERED set, as in many containers), the print itself meets the closed
# pipe; buffered (the usual case), only the flush after the command does.
@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
def test_cli_output_to_a_reader_that_went_away_ends_without_a_traceback(tmp_path, unbuffered):
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `tollgate org list | head -0` does, before anything is written
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["PYTHONUNBUFFERED"] = unbuffered  # empty: unset, for Python
    result = subprocess.run([PYTHON, "-m", "proxy", "org", "list", "--config", str(config)], env=env, cwd=REPO,
                            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


def test_cli_names_the_database_another_process_holds_locked(tmp_path):
    database = tmp_path / "cli.db"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(database, database={"busy_timeout": "200ms"})))
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o")
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    try:
        result = tollgate_cli(config, "credits", "add", "t", "5", "--reason", "top-up")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 1
    assert result.stderr.startswith(f"tollgate: the database {database}: ")
    assert "Traceback" not in result.stderr


def test_cli_reports_refusals_without_a_traceback(tmp_path):
    config = plain_config(tmp_path)
    result = tollgate_cli(config, "team", "create", "t", "--org", "missing-org")
    assert result.returncode == 1
    assert result.stderr.strip() == "tollgate: Organization 'missing-org' not found"
    result = tollgate_cli(config, "credits", "add", "nobody", "5", "--reason", "x")
    assert result.returncode == 1
    assert result.stderr.strip() == "tollgate: Team 'nobody' not found"


def declared_config(tmp_path: Path, organization: str = "o1", **team: object) -> Path:
    config = tmp_path / "config.yaml"
    declared = {
        "organizations": [{"organization_id": "o1"}, {"organization_id": "o2"}],
        "teams": [{"team_id": "t", "organization_id": organization, "model_groups": ["Main"], **team}],
    }
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", **declared)))
    return config


def test_key_create_prints_what_the_admin_api_returns(tmp_path):
    key = ok(declared_config(tmp_path), "key", "create", "t", "--rpm", "5", "--tpm", "100")
    assert list(key) == ["key_id", "key", "name", "team_id", "created_at", "expires_at", "rpm_limit", "tpm_limit"]
    assert (key["rpm_limit"], key["tpm_limit"]) == (5, 100)


def test_apply_moves_a_declared_team_to_the_organization_the_file_names(tmp_path):
    applied = ok(declared_config(tmp_path, "o1"), "apply")
    assert (applied["organizations"], applied["teams"]) == (["o1", "o2"], ["t"])
    assert ok(declared_config(tmp_path, "o1"), "team", "show", "t")["organization_id"] == "o1"
    ok(declared_config(tmp_path, "o2"), "apply")
    assert ok(declared_config(tmp_path, "o2"), "team", "show", "t")["organization_id"] == "o2"


def test_apply_cannot_move_a_declared_team_to_an_unknown_organization(tmp_path):
    ok(declared_config(tmp_path, "o1"), "apply")
    result = tollgate_cli(declared_config(tmp_path, "nowhere"), "apply")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("config.yaml: teams[0]: Organization 'nowhere' not found")


def test_a_cli_command_creates_a_declared_team_the_database_lacks(tmp_path):
    assert ok(declared_config(tmp_path), "team", "show", "t")["status"] == "active"


def test_a_cli_command_leaves_a_declared_team_as_the_admin_api_changed_it(tmp_path):
    config = declared_config(tmp_path, "o1")
    ok(config, "team", "update", "t", "--status", "suspended", "--rpm", "7")
    ok(config, "credits", "add", "t", "5", "--reason", "top-up")  # any command: it once re-applied the file
    team = ok(declared_config(tmp_path, "o2"), "team", "show", "t")
    assert (team["status"], team["rpm_limit"], team["organization_id"]) == ("suspended", 7, "o1")


def test_team_update_takes_a_team_back_to_the_default_limits_and_group(tmp_path):
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o", "--groups", "Main, Backup", "--default", "Backup",
       "--rpm", "7", "--tpm", "700", "--credits-per-job", "3")
    team = ok(config, "team", "update", "t", "--default", "", "--rpm", "default", "--tpm", "default",
              "--credits-per-job", "default")
    assert team["default_model_group"] == "Main"  # the first granted group
    assert (team["rpm_limit"], team["tpm_limit"]) == (60, 60_000)  # config.yaml's defaults
    assert ok(config, "team", "show", "t")["rpm_limit"] == 60


def test_team_update_can_take_every_group_away(tmp_path):
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o", "--groups", "Main")
    team = ok(config, "team", "update", "t", "--groups", "")
    assert (team["model_groups"], team["default_model_group"]) == ([], None)


@pytest.mark.parametrize(
    "args, option",
    [
        (["team", "create", "t2", "--org", "o", "--groups", "Main,,Backup"], "--groups"),
        (["team", "update", "t", "--groups", "Backup,"], "--groups"),
        (["model-group", "create", "G", "--models", "a, ,b"], "--models"),
    ],
    ids=["team create", "team update", "model-group create"],
)
def test_a_comma_list_holding_an_empty_name_is_refused_and_changes_nothing(tmp_path: Path, args, option) -> None:
    # The empty names were dropped: the command went through with a list other than the one given.
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o", "--groups", "Main")
    result = tollgate_cli(config, *args)
    assert result.returncode == 2
    assert f"argument {option}: holds an empty name ({args[-1]!r})" in result.stderr.splitlines()[-1]
    assert tollgate_cli(config, "team", "show", "t2").returncode == 1
    assert ok(config, "team", "show", "t")["model_groups"] == ["Main"]
    assert "G" not in [group["name"] for group in ok(config, "model-group", "list")]


def test_team_update_refuses_a_limit_the_admin_api_refuses(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o", "--rpm", "7")
    result = tollgate_cli(config, "team", "update", "t", "--rpm", "0")
    assert result.returncode == 1 and "rpm_limit" in result.stderr, result.stderr
    assert ok(config, "team", "show", "t")["rpm_limit"] == 7


def test_credits_add_takes_a_negative_amount_away(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o", "--credits", "5")
    assert ok(config, "credits", "add", "t", "-2", "--reason", "refund corrected")["credits_allocated"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["team", "create", "t"], "the following arguments are required: --org"),
        (["credits", "add", "t", "5"], "the following arguments are required: --reason"),
        (["model-group", "create", "G"], "the following arguments are required: --models"),
        (["team", "update", "t", "--status", "paused"], "argument --status: invalid choice: 'paused'"),
    ],
)
def test_a_command_missing_an_option_or_given_an_unknown_status_is_refused_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(args)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_team_update_refuses_a_limit_that_is_neither_a_number_nor_default(tmp_path):
    result = tollgate_cli(plain_config(tmp_path), "team", "update", "t", "--rpm", "lots")
    assert result.returncode == 2
    assert "argument --rpm: expected an integer or 'default', got 'lots'" in result.stderr


def test_a_declared_organization_without_a_name_is_named_after_its_id(tmp_path):
    organizations = ok(declared_config(tmp_path), "org", "list")
    assert {o["organization_id"]: o["name"] for o in organizations} == {"o1": "o1", "o2": "o2"}


def test_apply_brings_a_declared_model_group_and_organization_back_to_the_file(tmp_path):
    config = tmp_path / "config.yaml"

    def declare(models: list[str], name: str) -> Path:
        declared = {
            "model_groups": {"G": {"models": models}},
            "organizations": [{"organization_id": "o", "name": name}],
        }
        config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", **declared)))
        return config

    ok(declare(["a"], "Old"), "apply")
    ok(declare(["b", "c"], "New"), "apply")
    groups = {group["name"]: group["models"] for group in ok(config, "model-group", "list")}
    assert groups["G"] == ["b", "c"]
    assert [o["name"] for o in ok(config, "org", "list")] == ["New"]


def test_apply_brings_a_declared_teams_limits_and_default_group_back_to_the_file(tmp_path):
    config = declared_config(tmp_path, model_groups=["Main", "Backup"], default_model_group="Backup",
                             rpm_limit=7, tpm_limit=700, credits_per_job=3)
    ok(config, "team", "update", "t", "--default", "Main", "--rpm", "8", "--tpm", "800", "--credits-per-job", "4")
    ok(config, "apply")
    team = ok(config, "team", "show", "t")
    assert (team["default_model_group"], team["rpm_limit"], team["tpm_limit"], team["credits_per_job"]) == (
        "Backup", 7, 700, 3
    )


def test_apply_brings_a_declared_team_back_to_the_file(tmp_path):
    config = declared_config(tmp_path)
    ok(config, "team", "update", "t", "--status", "suspended")
    ok(config, "apply")
    assert ok(config, "team", "show", "t")["status"] == "active"


def test_cli_reports_a_file_that_is_not_a_database_in_one_line(tmp_path):
    database = tmp_path / "not-a.db"
    database.write_text("this is not a database\n" * 100)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(database)))
    result = tollgate_cli(config, "org", "list")
    assert result.returncode == 2
    assert result.stderr == f"tollgate: cannot open the database {database}: file is not a database\n"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--port", "99999", "must be a port number (1-65535)"),
        ("--port", "0", "must be a port number (1-65535)"),
        ("--port", "http", "must be a port number (1-65535)"),
        ("--workers", "0", "must be a number of worker processes from 1 to 1024"),
        ("--workers", "-1", "must be a number of worker processes from 1 to 1024"),
        ("--workers", "1025", "must be a number of worker processes from 1 to 1024"),
        # getaddrinfo takes an empty host for every interface: a gateway open to the network.
        ("--host", "", "must be a host name or address to listen on (0.0.0.0: every IPv4 interface), without a scheme or a port (the port is server.port)"),
    ],
)
def test_serve_refuses_a_host_port_or_worker_count_the_config_key_would_refuse(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", option, value])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"tollgate serve: error: argument {option}: {message}"


def test_serve_takes_a_host_of_digits_as_the_name_it_is() -> None:
    # "0" is the usual shorthand for 0.0.0.0: read as the number 0, it was refused as no host.
    assert build_parser().parse_args(["serve", "--host", "0"]).host == "0"


def test_serve_on_a_port_in_use_fails_in_one_line_before_applying_its_files_declarations(tmp_path):
    # A second `serve` started by mistake on a running gateway's port (its file edited: a team
    # suspended, say) changed what the running gateway served before uvicorn found the port taken.
    data = tollgate_config(tmp_path / "shared.db")
    data["organizations"] = [{"organization_id": "org", "name": "Org"}]
    data["teams"] = [{"team_id": "declared", "organization_id": "org", "credits_allocated": 5, "model_groups": ["Main"]}]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_MASTER_KEY="m", TOLLGATE_UPSTREAM_KEY="k")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port), "--config", str(config)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1  # the machine's state, not the configuration's (2)
    assert result.stderr.strip().splitlines() == [f"tollgate: cannot listen on 127.0.0.1:{port}: Address already in use"]
    if (tmp_path / "shared.db").exists():
        with sqlite3.connect(tmp_path / "shared.db") as db:
            assert db.execute("SELECT name FROM sqlite_master WHERE name = 'teams'").fetchall() == []


def test_serve_listens_where_the_command_line_says_over_the_file():
    config = Config()
    options = serve_options(build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "18401"]), config)
    assert (options["host"], options["port"]) == ("0.0.0.0", 18401)
    defaults = serve_options(build_parser().parse_args(["serve"]), config)
    assert (defaults["host"], defaults["port"]) == (config.server.host, config.server.port)


def test_serve_help_gives_the_files_keys_as_the_defaults_of_host_port_and_workers(capsys):
    # The options override server.host, .port and .workers: a help saying "default 8003" would
    # send an operator whose file says 9000 looking for the gateway on 8003.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    server = Config().server
    for option, key in (("--host HOST", "host"), ("--port PORT", "port"), ("--workers WORKERS", "workers")):
        assert f"(default: server.{key}, {getattr(server, key)} unless set)" in text.split(option, 2)[2], option


# The second is no name to resolve at all: a label over 63 characters fails in the idna codec.
@pytest.mark.parametrize("host", ["no-such-host.invalid", "a" * 64 + ".example"])
def test_serve_refuses_a_host_it_cannot_resolve_in_one_line_before_starting(tmp_path, host):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_MASTER_KEY="m", TOLLGATE_UPSTREAM_KEY="k", TOLLGATE_UPSTREAM_URL="http://127.0.0.1:9")
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "serve", "--host", host, "--port", "18402",
         "--config", str(plain_config(tmp_path))],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"tollgate: cannot listen on {host}:18402: ")
    assert "[Errno" not in result.stderr  # the reason in words, as for a port in use
    assert len(result.stderr.splitlines()) == 1


def test_serve_gives_uvicorn_the_files_log_level():
    config = Config(logging=LoggingConfig(level="warning"))
    assert serve_options(build_parser().parse_args(["serve"]), config)["log_level"] == "warning"


def test_demo_refuses_a_port_it_could_not_listen_on_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    for args, extra in ((["--port", "99999"], {}), ([], {"TOLLGATE_DEMO_LITELLM_PORT": "four"})):
        result = subprocess.run(
            [PYTHON, "-m", "proxy", "demo", *args], env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True,
            timeout=60,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("tollgate demo: error: argument --")


def test_an_apply_that_fails_part_way_still_tells_running_servers_what_it_changed(tmp_path):
    """The teams a failing `apply` brought back to the file before it stopped stay changed: the
    servers' caches must hear of it at once (here: a suspension), not only within the cache TTL."""
    import sqlite3

    config = declared_config(tmp_path)
    ok(config, "apply")
    stamp_file = tmp_path / "cli.db-changes"
    before = stamp_file.read_bytes()
    declared = {
        "organizations": [{"organization_id": "o1"}],
        "teams": [
            {"team_id": "t", "organization_id": "o1", "model_groups": ["Main"], "status": "suspended"},
            {"team_id": "u", "organization_id": "o1", "model_groups": ["NoSuchGroup"]},
        ],
    }
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", **declared)))
    result = tollgate_cli(config, "apply")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("teams[1]: Model group 'NoSuchGroup' not found")
    with sqlite3.connect(tmp_path / "cli.db") as db:
        assert db.execute("SELECT status FROM teams WHERE team_id = 't'").fetchone() == ("suspended",)
    assert stamp_file.read_bytes() != before


def demo_config(tmp_path: Path, **sections: Any) -> Config:
    """The bundled config.yaml, as the demo reads it, with `sections` over it and a database of the test's own."""
    bundled = yaml.safe_load((REPO / "config.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**bundled, **sections, "database": {"url": f"sqlite:///{tmp_path / 'demo.db'}"}}))
    return load_config(str(path), {})


def test_the_demo_keeps_a_master_key_the_environment_sets(tmp_path):
    # The README's admin examples send $TOLLGATE_MASTER_KEY: a demo that made its own answered them 401.
    env = demo.demo_environment({"TOLLGATE_MASTER_KEY": "sk-my-own-master-key"}, str(tmp_path), 4011)
    assert env["TOLLGATE_MASTER_KEY"] == "sk-my-own-master-key"
    master = load_config(None, env).master_key
    assert master is not None and master.value == "sk-my-own-master-key"


@pytest.mark.parametrize("environ", [{}, {"TOLLGATE_MASTER_KEY": ""}], ids=["unset", "empty"])
def test_the_demo_makes_a_master_key_when_none_is_set(tmp_path, environ):
    env = demo.demo_environment(environ, str(tmp_path), 4011)
    assert env["TOLLGATE_MASTER_KEY"].startswith("sk-master-demo-") and len(env["TOLLGATE_MASTER_KEY"]) > 30


def test_the_demo_uses_its_own_database_and_litellm_whatever_the_environment_says(tmp_path):
    environ = {"TOLLGATE_DATABASE_URL": "sqlite:////srv/prod.db", "TOLLGATE_UPSTREAM_URL": "http://prod:4000",
               "TOLLGATE_UPSTREAM_KEY": "sk-prod"}
    env = demo.demo_environment(environ, str(tmp_path), 4011)
    assert env["TOLLGATE_DATABASE_URL"] == f"sqlite:///{tmp_path}/tollgate.db"
    assert env["TOLLGATE_UPSTREAM_URL"] == "http://127.0.0.1:4011"
    assert env["TOLLGATE_UPSTREAM_KEY"].startswith("sk-litellm-demo-")


def test_the_demo_creates_what_the_client_documentation_assumes(tmp_path):
    # API.md: the organization and team acme-corp, the five groups the seeds name on the offline
    # models of litellm_config.yaml, a default group, credits and a key.
    config = demo_config(tmp_path)
    key, team = asyncio.run(_prepare(config))
    assert key.startswith("sk-")
    assert (team.team_id, team.organization_id) == (DEMO_TEAM, DEMO_TEAM) == ("acme-corp", "acme-corp")
    groups = ("ChatAgent", "ResumeAgent", "AnalysisAgent", "SummaryAgent", "WritingAgent")
    assert team.model_groups == groups and team.effective_default_group == "ChatAgent"
    assert team.status == "active" and team.credits_available > 0
    offline = {m["model_name"] for m in yaml.safe_load((REPO / "litellm_config.yaml").read_text())["model_list"]}
    assert all(set(config.model_groups[group].models) <= offline for group in groups)


def test_demo_prepares_its_team_when_the_config_declares_it_as_the_bundled_example_does(tmp_path):
    # config.yaml's commented example declares the organization and team `acme-corp`, the demo's
    # own: uncommented, `tollgate demo` stopped with a traceback (Organization 'acme-corp' already
    # exists) instead of printing a key for the declared team.
    declared = {
        "organizations": [{"organization_id": DEMO_TEAM, "name": "Acme Corp"}],
        "teams": [{"team_id": DEMO_TEAM, "organization_id": DEMO_TEAM, "model_groups": ["ChatAgent", "AnalysisAgent"],
                   "credits_allocated": 100}],
    }
    key, team = asyncio.run(_prepare(demo_config(tmp_path, **declared)))
    assert key.startswith("sk-")
    assert (team.team_id, team.model_groups, team.credits_allocated) == (DEMO_TEAM, ("ChatAgent", "AnalysisAgent"), 100)


def test_demo_refuses_a_taken_or_shared_port_or_a_bad_config_in_one_line(tmp_path):
    # A LiteLLM already running on its default port (4000) is the likeliest collision: it ended in
    # a RuntimeError's traceback, as did a config.yaml (or TOLLGATE_* variable) `serve` refuses in one line.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy, both = str(taken.getsockname()[1]), free()
        cases = (
            (["--port", free(), "--litellm-port", busy], {},
             f"tollgate demo: port {busy} is already in use (set TOLLGATE_DEMO_LITELLM_PORT or --litellm-port)"),
            (["--port", busy, "--litellm-port", free()], {},
             f"tollgate demo: port {busy} is already in use (set TOLLGATE_DEMO_PORT or --port)"),
            (["--port", both, "--litellm-port", both], {},
             f"tollgate demo: Tollgate and LiteLLM cannot both listen on port {both} (--port, --litellm-port)"),
            (["--port", free(), "--litellm-port", free(), "--config", str(tmp_path / "missing.yaml")], {},
             f"tollgate demo: {tmp_path / 'missing.yaml'}: file not found"),
            (["--port", free(), "--litellm-port", free()], {"TOLLGATE_REDIS_URL": "http://x"},
             "tollgate demo: TOLLGATE_REDIS_URL: redis.url: must be a redis://, rediss:// or unix:// URL"),
        )
        for args, extra, message in cases:
            result = tollgate_demo(*args, **extra)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr


def free() -> str:
    return str(free_port())


def test_a_database_a_newer_tollgate_migrated_is_refused_in_one_line(tmp_path):
    # Rolled back to an older release, Tollgate ran on a schema it does not know (columns, triggers
    # and constraints it never writes or reads), and failed only later, on requests.
    import sqlite3


    config = declared_config(tmp_path)
    ok(config, "org", "list")
    with sqlite3.connect(tmp_path / "cli.db") as db:
        db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    result = tollgate_cli(config, "org", "list")
    assert result.returncode == 2
    assert result.stderr == (
        f"tollgate: cannot open the database {tmp_path / 'cli.db'}: its schema is version {len(MIGRATIONS) + 1}, "
        f"newer than this Tollgate's ({len(MIGRATIONS)}): run the Tollgate release that migrated it, or a later one\n"
    )


def test_the_cli_creates_the_organization_a_declared_team_waits_for(tmp_path):
    # README: a declared team's organization may be "created before" the file names it. Every CLI
    # command first created the declared teams, and failed on this one: `org create` itself, the
    # command that would make it valid, was refused.
    config = tmp_path / "config.yaml"
    declared = {"teams": [{"team_id": "t", "organization_id": "acme", "model_groups": ["Main"]}]}
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", **declared)))
    created = tollgate_cli(config, "org", "create", "acme")
    assert (created.returncode, created.stderr) == (0, "")  # the team created by this same command: no warning
    assert json.loads(created.stdout)["organization_id"] == "acme"
    assert ok(config, "team", "show", "t")["organization_id"] == "acme"  # created once it could be


def test_a_cli_command_says_which_declared_team_it_could_not_create_yet(tmp_path):
    config = tmp_path / "config.yaml"
    declared = {"teams": [{"team_id": "t", "organization_id": "acme", "model_groups": ["Main"]}]}
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", **declared)))
    result = tollgate_cli(config, "org", "list")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert result.stderr == f"tollgate: warning: {config}: teams[0]: Organization 'acme' not found (not created yet)\n"


def test_demo_refuses_a_declared_team_it_cannot_create_in_one_line(tmp_path):
    # The demo's database is new: a team the file declares in an organization it does not declare
    # can never be created. That ended in a traceback, after LiteLLM had been started for nothing.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"teams": [{"team_id": "x", "organization_id": "nowhere"}]}))
    result = tollgate_demo("--port", free(), "--litellm-port", free(), "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"tollgate demo: {config}: teams[0]: Organization 'nowhere' not found\n"
    assert "Starting LiteLLM" not in result.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_says_where_it_listens(tmp_path, workers):
    # uvicorn.run logged it; a uvicorn given the socket bound before the app starts does not.
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", workers=workers).start()
    try:
        assert wait_for(lambda: f"Uvicorn running on http://127.0.0.1:{server.port} (Press CTRL+C to quit)"
                        in server.log(), timeout=10)
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="resource.prlimit and a hard limit above 256: Linux")
def test_serve_raises_its_limit_of_open_files_to_the_hard_limit(tmp_path):
    # Started with the soft limit systemd and Docker give (1,024, the hard one far above), a
    # gateway took a connection and another to LiteLLM for each stream: past about 800 streams
    # new clients were dropped unanswered, unlogged, and calls failed as if LiteLLM were down.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:  # Linux has none unbounded
        pytest.skip("no hard limit of open files above 256 to lower the soft one under")
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what the server process inherits
    try:
        server.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert server.process is not None
        assert resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        server.stop()


@pytest.mark.parametrize("hard", ["unbounded", "above the maximum"])
def test_open_files_are_raised_to_the_kernels_maximum_when_the_hard_limit_is_above_it(monkeypatch, hard):
    # macOS gives an unbounded hard limit and refuses a soft one above its own maximum (10,240),
    # and Linux one above fs.nr_open: the soft limit was left as it was (256 on macOS).
    resource = pytest.importorskip("resource")
    limits = [256, resource.RLIM_INFINITY if hard == "unbounded" else 1 << 21]
    maximum = 10_240

    def setrlimit(which: int, wanted: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and wanted[1] == limits[1]
        if wanted[0] > maximum or wanted[0] == resource.RLIM_INFINITY:
            raise ValueError("current limit exceeds maximum limit")
        limits[0] = wanted[0]

    monkeypatch.setattr(resource, "getrlimit", lambda which: tuple(limits))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    raise_open_files_limit()
    assert limits[0] == maximum


def test_serve_with_workers_gives_them_its_app_factory_as_one(tmp_path: Path) -> None:
    # Not as an app: uvicorn calls a callable it was not told is a factory all the same, but warns
    # in every worker ("ASGI app factory detected"), a warning about nothing an operator did.
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", workers=2).start()
    try:
        assert wait_for(lambda: server.log().count("Application startup complete") == 2, timeout=20)
        assert "factory" not in server.log()
    finally:
        server.stop()


def test_serve_listens_on_every_address_its_host_names_ipv6_ones_for_ipv6_alone(monkeypatch):
    # As uvicorn.run (asyncio's create_server) bound them: `localhost` where it names both
    # 127.0.0.1 and ::1, a socket for each; one socket of the first address took IPv4 alone.
    port = free_port()
    both = socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM) + socket.getaddrinfo(
        "::1", port, type=socket.SOCK_STREAM
    )
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both)
    sockets = listen("localhost", port)
    try:
        assert sorted(sock.family for sock in sockets) == sorted([socket.AF_INET, socket.AF_INET6])
        (six,) = [sock for sock in sockets if sock.family == socket.AF_INET6]
        assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert all(sock.getsockname()[1] == port for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_serve_on_an_empty_host_listens_on_every_interface() -> None:
    # As uvicorn.run (asyncio's create_server) took an empty host: every interface, not an error.
    sockets = listen("", 0)
    try:
        assert {sock.getsockname()[0] for sock in sockets} <= {"0.0.0.0", "::"}
        assert "0.0.0.0" in {sock.getsockname()[0] for sock in sockets}
    finally:
        for sock in sockets:
            sock.close()


def test_serve_listens_once_on_an_address_its_host_names_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hosts file may list an address twice for one name: a second socket on it could not listen.
    port = free_port()
    twice = socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM) * 2
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: twice)
    sockets = listen("localhost", port)
    try:
        assert [sock.getsockname() for sock in sockets] == [("127.0.0.1", port)]
    finally:
        for sock in sockets:
            sock.close()


def test_serve_that_cannot_listen_on_one_address_of_its_host_keeps_none_of_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free, busy = free_port(), taken.getsockname()[1]
        both = [address for port in (free, busy)
                for address in socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both)
        # Held, as a caller handling it holds it: its traceback keeps whatever `listen` left open.
        with pytest.raises(OSError) as refused:
            listen("localhost", free)
    with socket.socket() as again:  # without SO_REUSEADDR: refused while a socket bound to it is left open
        again.bind(("127.0.0.1", free))
    assert refused.value.errno == errno.EADDRINUSE


@contextlib.asynccontextmanager
async def _failing_start(app: Starlette) -> AsyncIterator[None]:
    raise RuntimeError("the app cannot start")
    yield


def test_serve_of_an_app_that_fails_to_start_closes_its_sockets() -> None:
    # uvicorn never took them: left open, the port stayed taken in a process that embeds `serve`.
    sockets = listen("127.0.0.1", 0)
    options = uvicorn_options("127.0.0.1", 0, "info", shutdown_grace=1.0, read_timeout=30.0, max_body_bytes=1024)
    with pytest.raises(SystemExit) as exited:
        serve(Starlette(lifespan=_failing_start), options, sockets)
    assert exited.value.code == STARTUP_FAILURE
    assert all(sock.fileno() == -1 for sock in sockets)


def _schema_newer(database: Path) -> str:

    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    return (
        f"its schema is version {len(MIGRATIONS) + 1}, newer than this Tollgate's ({len(MIGRATIONS)}): "
        "run the Tollgate release that migrated it, or a later one"
    )


def _not_a_database(database: Path) -> str:
    for path in database.parent.glob(database.name + "*"):
        path.unlink()
    database.write_text("this is not a database\n" * 100)
    return "file is not a database"


def _a_file_where_its_directory_was(database: Path) -> str:
    shutil.rmtree(database.parent)
    database.parent.write_text("")
    return f"{database.parent}: File exists"


def _said_by_serve_failing_to_start(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What `serve` of the app of `config` writes to stderr, its start failing as it must."""
    sockets = listen("127.0.0.1", 0)
    options = uvicorn_options("127.0.0.1", 0, "info", shutdown_grace=1.0, read_timeout=30.0, max_body_bytes=1024)
    # What `serve` logs through (configure_logging), on a stream of the test's own: capsys's
    # is closed by the time logging's shutdown flushes every handler made.
    logged = io.StringIO()
    handler = LogHandler(logged)
    logging.getLogger().addHandler(handler)
    # uvicorn's loggers as a new process has them, passing their lines on to that handler: an
    # earlier test's uvicorn server, run with uvicorn's own logging config, gave them handlers of
    # their own, and stopped them passing lines on.
    uvicorns = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    as_they_were = [(logger.handlers, logger.propagate) for logger in uvicorns]
    for logger in uvicorns:
        logger.handlers, logger.propagate = [], True
    try:
        with pytest.raises(SystemExit) as exited:
            serve(create_app(load_config(str(config))), options, sockets)
    finally:
        logging.getLogger().removeHandler(handler)
        for logger, (handlers, propagate) in zip(uvicorns, as_they_were):
            logger.handlers, logger.propagate = handlers, propagate
    assert exited.value.code == STARTUP_FAILURE
    handler.flush()
    return logged.getvalue() + capsys.readouterr().err


@pytest.mark.parametrize("spoil", [_schema_newer, _not_a_database, _a_file_where_its_directory_was])
def test_serve_of_a_database_that_cannot_be_opened_as_the_app_starts_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spoil: Callable[[Path], str]
) -> None:
    # What `serve` checked a moment before (or a worker uvicorn starts again, long after) may no
    # longer hold: uvicorn logged the app's traceback, where the command's check says one line.
    database = tmp_path / "data" / "cli.db"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(database)))
    ok(config, "org", "list")  # the database, made as a start of serve makes it
    reason = spoil(database)
    said = _said_by_serve_failing_to_start(config, capsys)
    assert f" ERROR uvicorn.error: tollgate: cannot open the database {database}: {reason}\n" in said
    assert "Traceback" not in said


def test_serve_whose_database_cannot_take_the_files_declarations_as_the_app_starts_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A worker uvicorn starts again creates a declared group the admin API removed meanwhile: on a
    # database another process keeps locked (or a full disk) uvicorn logged the app's traceback.
    database = tmp_path / "cli.db"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(database, database={"busy_timeout": "200ms"})))
    ok(config, "org", "list")
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("DELETE FROM model_groups")
    holder.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    try:
        said = _said_by_serve_failing_to_start(config, capsys)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert f" ERROR uvicorn.error: tollgate: the database {database}: " in said
    assert "Traceback" not in said


def test_serve_of_an_app_failing_to_start_for_an_unforeseen_reason_logs_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a refusal whose message says it whole is cut to one line: a fault nobody foresaw is
    # found by its traceback.
    async def unforeseen(*args: Any, **kwargs: Any) -> list[str]:
        raise RuntimeError("an unforeseen fault")

    database = tmp_path / "cli.db"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(database)))
    ok(config, "org", "list")
    monkeypatch.setattr(app_module, "apply_declared", unforeseen)
    said = _said_by_serve_failing_to_start(config, capsys)
    assert "Traceback" in said and "RuntimeError: an unforeseen fault" in said


def test_serve_with_workers_exits_as_a_failed_start_when_a_worker_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn's supervisor stops every worker once one fails before serving (it would fail alike
    # each time it was started again), and returned as from a stop asked for: `serve` exited 0,
    # which a process manager takes for a stop it need not restart or report.
    config = plain_config(tmp_path)
    ok(config, "org", "list")
    _schema_newer(tmp_path / "cli.db")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the supervisor's handlers: not this process's
    monkeypatch.setenv(ENV_CONFIG, str(config))  # what the workers read
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    options = uvicorn_options("127.0.0.1", 0, "info", shutdown_grace=1.0, read_timeout=30.0, max_body_bytes=1024)
    with pytest.raises(SystemExit) as exited:
        serve_workers("proxy.app:app_from_environment", 2, options, listen("127.0.0.1", 0))
    assert exited.value.code == STARTUP_FAILURE


def test_a_worker_that_cannot_read_its_copy_of_the_config_fails_its_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The copy `serve --workers` made in the temporary directory, removed since (a cleaner of old
    # files): each worker uvicorn started again died with a traceback, and was started again, every
    # second or two, for good. A failed start stops the supervisor instead.
    monkeypatch.setenv(ENV_CONFIG, str(tmp_path / "gone.yaml"))
    with pytest.raises(SystemExit) as exited:
        app_from_environment()
    assert exited.value.code == STARTUP_FAILURE
    assert capsys.readouterr().err == f"tollgate: {tmp_path / 'gone.yaml'}: file not found\n"


def test_a_worker_whose_metrics_directory_is_removed_as_it_starts_fails_its_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Removed after the worker looked for it, before it made its files there: a traceback.
    from prometheus_client import values

    directory = tmp_path / "metrics"
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    monkeypatch.setenv(ENV_CONFIG, str(plain_config(tmp_path)))
    build = app_module.create_served_app
    monkeypatch.setattr(app_module, "create_served_app", lambda config: (shutil.rmtree(directory), build(config))[1])
    with pytest.raises(SystemExit) as exited:
        app_from_environment()
    assert exited.value.code == STARTUP_FAILURE
    assert capsys.readouterr().err.startswith(f"tollgate: the workers' metrics directory {directory} is gone")


def test_a_worker_that_cannot_build_its_app_for_an_unforeseen_reason_logs_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Its start fails, and stops the gateway: what failed is then known by this log line alone.
    def unforeseen() -> None:
        raise RuntimeError("an unforeseen fault")

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(app_module, "load_config", unforeseen)
    with caplog.at_level(logging.ERROR, logger="tollgate"), pytest.raises(SystemExit) as exited:
        app_module.app_from_environment()
    assert exited.value.code == STARTUP_FAILURE
    (record,) = [record for record in caplog.records if record.name == "tollgate"]
    assert record.exc_info is not None and str(record.exc_info[1]) == "an unforeseen fault"


def test_serve_stops_gracefully_on_sigint_and_exits_0(tmp_path: Path) -> None:
    # Ctrl-C at a terminal: uvicorn raises the signal again once it has stopped, a KeyboardInterrupt.
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused").start()
    try:
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 0
        assert "Traceback" not in server.log() and "Application shutdown complete" in server.log()
    finally:
        server.stop()


def test_an_idle_gateway_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    # Nothing to drain: the sweeper is told to stop, not waited out for the drain's 10 s.
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused").start()
    try:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        assert time.monotonic() - started < 5
    finally:
        server.stop()


def test_serve_says_an_ipv6_address_it_listens_on_in_brackets() -> None:
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
            _say_listening("::1", [sock])
            port = sock.getsockname()[1]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    assert said == [f"Uvicorn running on http://[::1]:{port} (Press CTRL+C to quit)"]


@pytest.mark.parametrize("signal_handler", ["handle_int", "handle_term"])
def test_the_supervisor_of_workers_stops_listening_on_every_socket_once_told_to_stop(
    monkeypatch: pytest.MonkeyPatch, signal_handler: str
) -> None:
    # Kept open, the kernel took new connections on a socket no worker accepted on any more, and left
    # them unanswered until the workers had drained.
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # not this test process's handlers
    sockets = [socket.socket(), socket.socket()]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    supervisor = _Supervisor(uvicorn.Config("proxy.app:app_from_environment", factory=True, workers=2), sockets=sockets)
    try:
        getattr(supervisor, signal_handler)()
        assert supervisor.should_exit.is_set()
        assert all(sock.fileno() == -1 for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_a_file_changed_while_serve_starts_is_refused_before_workers_serve_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each worker reads the copy: a file edited meanwhile would be served by workers the checks
    # at the start never saw.
    path = plain_config(tmp_path)
    config = load_config(str(path))
    path.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", server={"read_timeout": "7s"})))
    (tmp_path / "copy").mkdir()
    with pytest.raises(SystemExit) as exit:
        _config_for_workers(config, str(tmp_path / "copy"))
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"tollgate: {path}: changed while the gateway started; start it again\n"


def test_the_workers_of_a_gateway_without_a_file_get_the_defaults(tmp_path: Path) -> None:
    assert Path(_config_for_workers(Config(), str(tmp_path))).read_text() == ""


def test_demo_run_outside_tollgates_directory_says_where_to_run_it(tmp_path: Path) -> None:
    result = tollgate_demo("--port", free(), "--litellm-port", free(), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "tollgate demo: run it from Tollgate's directory (litellm_config.yaml not found)\n"


def broken_litellm(tmp_path: Path) -> Path:
    """A LiteLLM venv, installed as far as Tollgate can tell, whose `litellm` exits at once with
    status 3 (as one whose venv broke since would)."""
    venv = tmp_path / "litellm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "litellm").write_text("#!/bin/sh\nexit 3\n")
    (venv / "bin" / "litellm").chmod(0o755)
    (venv / ".tollgate-installed").write_text(LITELLM_VERSION)
    return venv


def test_demo_says_in_one_line_when_litellm_does_not_start(tmp_path: Path) -> None:
    port = free()
    result = tollgate_demo("--port", free(), "--litellm-port", port, TOLLGATE_LITELLM_VENV=str(broken_litellm(tmp_path)))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(
        f"tollgate demo: LiteLLM did not start: the process serving http://127.0.0.1:{port}/health/liveliness "
        "exited with status 3 (see "
    ), result.stderr


def test_litellm_is_not_started_on_a_port_something_else_listens_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LiteLLM would quietly take another port, leaving Tollgate talking to whatever holds this one.
    monkeypatch.setenv("TOLLGATE_LITELLM_VENV", str(broken_litellm(tmp_path)))
    with socket.socket() as taken, open(tmp_path / "litellm.log", "wb") as log:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} is already in use"):
            demo.start_litellm(REPO / "litellm_config.yaml", port, "sk-unused", log)


def test_an_interrupted_litellm_install_is_done_again_and_a_finished_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "litellm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "litellm").touch()  # an install cut short: its executable, but not its marker
    monkeypatch.setenv("TOLLGATE_LITELLM_VENV", str(venv))
    ran: list[list[str]] = []
    monkeypatch.setattr(demo.subprocess, "run", lambda args, check: ran.append(args))
    said: list[str] = []
    assert ensure_litellm(said.append) == venv / "bin" / "litellm"
    assert ran == [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"litellm[proxy]=={LITELLM_VERSION}"],
    ]
    assert len(said) == 1
    ran.clear()
    assert ensure_litellm(said.append) == venv / "bin" / "litellm"
    assert (ran, len(said)) == ([], 1)


def test_demo_makes_its_team_in_the_organization_the_config_declares(tmp_path: Path) -> None:
    config = demo_config(tmp_path, organizations=[{"organization_id": DEMO_TEAM, "name": "Acme Corp"}])
    key, team = asyncio.run(_prepare(config))
    assert (team.team_id, team.organization_id, len(team.model_groups)) == (DEMO_TEAM, DEMO_TEAM, 5)


@pytest.mark.parametrize("groups", [("AnalysisAgent",), ()])
def test_demo_grants_its_team_the_demo_groups_the_config_has(tmp_path: Path, groups: tuple[str, ...]) -> None:
    bundled = yaml.safe_load((REPO / "config.yaml").read_text())["model_groups"]
    declared = {name: bundled[name] for name in groups} | {"Other": bundled["ChatAgent"]}
    key, team = asyncio.run(_prepare(demo_config(tmp_path, model_groups=declared)))
    assert (team.model_groups, team.effective_default_group) == (groups, groups[0] if groups else None)


def test_the_demo_banner_gives_the_declared_teams_credits_and_groups(tmp_path: Path) -> None:
    declared = {
        "organizations": [{"organization_id": DEMO_TEAM}],
        "teams": [{"team_id": DEMO_TEAM, "organization_id": DEMO_TEAM, "model_groups": ["AnalysisAgent", "ChatAgent"],
                   "credits_allocated": 40}],
    }
    key, team = asyncio.run(_prepare(demo_config(tmp_path, **declared)))
    text = banner(8003, key, "sk-master", str(tmp_path), team)
    assert f"Team '{DEMO_TEAM}' has 40 credits and the groups AnalysisAgent, ChatAgent." in text


def serve_in_process(monkeypatch: pytest.MonkeyPatch, config: Path, *args: str) -> list[int]:
    """`tollgate serve` run here up to where uvicorn would start: the worker counts it started with."""
    from proxy import server

    started: list[int] = []

    def listen(host: str, port: int) -> list[socket.socket]:
        sock = socket.socket()
        sock.close()  # no port of this machine's
        return [sock]

    monkeypatch.setattr(server, "listen", listen)
    monkeypatch.setattr(server, "serve", lambda app, options, sockets: started.append(1))
    monkeypatch.setattr(server, "serve_workers", lambda target, workers, options, sockets: started.append(workers))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # serve's SIGTERM handler: not this process's
    for name in (ENV_CONFIG, MULTIPROC_ENV):  # serve sets them for its workers: set here, they are undone after
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("TOLLGATE_MASTER_KEY", "sk-master-test")
    monkeypatch.setenv("TOLLGATE_UPSTREAM_KEY", "sk-upstream-test")
    main(["serve", "--config", str(config), *args])
    return started


def test_serve_runs_as_many_workers_as_the_command_line_says_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", server={"workers": 2})))
    started = [serve_in_process(monkeypatch, config, *workers) for workers in (["--workers", "3"], ["--workers", "1"], [])]
    assert started == [[3], [1], [2]]


def test_a_start_of_serve_brings_a_declared_team_back_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = declared_config(tmp_path)
    ok(config, "team", "update", "t", "--status", "suspended")
    serve_in_process(monkeypatch, config)
    assert ok(config, "team", "show", "t")["status"] == "active"


def test_a_command_done_prints_its_result_though_the_declared_team_it_allowed_cannot_be_created_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its result may be a key shown only this once: the command is done, whatever the retry of
    # the declared teams after it meets (here: the database locked by another writer meanwhile).
    database = tmp_path / "cli.db"
    declared = {"teams": [{"team_id": "t", "organization_id": "acme", "model_groups": ["Main"]}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tollgate_config(database, database={"busy_timeout": "200ms"}, **declared)))
    holder = sqlite3.connect(database, isolation_level=None)

    async def create_the_organization_then_lock(store: Any, changes: Any) -> str:
        await store.ensure_organization("acme", "acme")
        holder.execute("BEGIN IMMEDIATE")
        return "sk-shown-once"

    try:
        assert _run(load_config(str(path), {}), create_the_organization_then_lock) == "sk-shown-once"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert capsys.readouterr().err == f"tollgate: warning: {path}: teams[0]: Organization 'acme' not found (not created yet)\n"


def workers_dir(directory: Path, name: str, age: float) -> Path:
    """A directory as `serve --workers` makes them, last changed `age` seconds ago."""
    made = directory / f"{WORKERS_DIR_PREFIX}{name}"
    made.mkdir()
    (made / "counter_1.db").write_bytes(b"")
    when = time.time() - age
    os.utime(made, (when, when))
    return made


def test_the_workers_directories_a_killed_supervisor_left_behind_are_removed(tmp_path: Path) -> None:
    # A supervisor killed outright (SIGKILL, the OOM killer) leaves its workers' metrics and the
    # config's copy in /tmp: one set more with every such death, for good.
    left = workers_dir(tmp_path, "metrics-left", age=120)
    held = workers_dir(tmp_path, "metrics-held", age=120)
    new = workers_dir(tmp_path, "config-new", age=0)  # made a moment before its supervisor locks it
    other = tmp_path / "tollgate-other"
    other.mkdir()
    lock = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # its supervisor's, alive
        remove_left_behind(str(tmp_path))
    finally:
        os.close(lock)
    assert (left.exists(), held.exists(), new.exists(), other.exists()) == (False, True, True, True)


def test_serve_with_workers_removes_what_a_killed_one_left_behind_and_keeps_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A temporary directory of the test's own, as the server's too: what it removes is then only
    # ever the test's (a fault in the name or lock check once emptied the machine's /tmp).
    temp = tmp_path / "tmp"
    temp.mkdir()
    left = workers_dir(temp, f"metrics-{tag()}", age=120)
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", workers=2)
    server.env["TMPDIR"] = str(temp)
    server.start()
    try:
        assert wait_for(lambda: server.log().count("Application startup complete") == 2, timeout=20)
        assert not left.exists()
        assert [entry.name.startswith(WORKERS_DIR_PREFIX) for entry in temp.iterdir()] == [True, True]  # its own
        monkeypatch.setattr(cli, "LEFT_BEHIND_AFTER", 0.0)
        remove_left_behind(str(temp))  # as the next `serve` would, past the minute
        assert httpx.get(f"{server.url}/metrics").status_code == 200  # its workers' metrics are still there
    finally:
        server.stop()


@pytest.mark.parametrize("spoil", ["invalid", "removed"])
def test_a_file_made_invalid_or_removed_while_serve_starts_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spoil: str
) -> None:
    # The copy the workers would read cannot be served: a refusal in one line, not a traceback.
    path = plain_config(tmp_path)
    config = load_config(str(path))
    if spoil == "invalid":
        path.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", server={"port": 99999})))
    else:
        path.unlink()
    (tmp_path / "copy").mkdir()
    with pytest.raises(SystemExit) as exit:
        _config_for_workers(config, str(tmp_path / "copy"))
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"tollgate: {path}: changed or unreadable while the gateway started: ")
    assert error.count("\n") == 1


def test_a_cli_command_keeps_its_change_to_a_declared_team_while_another_waits_for_its_organization(tmp_path):
    # After the command, the declared teams still waiting are tried again; that retry only
    # creates what is absent: following the file, it would undo the command's own change.
    config = tmp_path / "config.yaml"
    declared = {
        "organizations": [{"organization_id": "o1"}],
        "teams": [
            {"team_id": "t", "organization_id": "o1", "model_groups": ["Main"]},
            {"team_id": "u", "organization_id": "acme", "model_groups": ["Main"]},
        ],
    }
    config.write_text(yaml.safe_dump(tollgate_config(tmp_path / "cli.db", **declared)))
    assert ok(config, "team", "update", "t", "--status", "suspended")["status"] == "suspended"
    assert ok(config, "team", "show", "t")["status"] == "suspended"


def test_team_update_sets_a_teams_credits_per_job(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    ok(config, "org", "create", "o")
    ok(config, "team", "create", "t", "--org", "o", "--credits-per-job", "3")
    assert ok(config, "team", "update", "t", "--credits-per-job", "5")["credits_per_job"] == 5
    assert ok(config, "team", "show", "t")["credits_per_job"] == 5


@pytest.mark.parametrize("args", [[], ["org"], ["team"], ["key"], ["credits"], ["model-group"]])
def test_a_command_or_action_left_out_is_refused_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    # Not a traceback from a handler that was never chosen.
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err.splitlines()[-1]


def test_serve_gives_uvicorn_the_files_shutdown_grace_read_timeout_and_body_limit() -> None:
    config = Config(server=ServerConfig(shutdown_grace=7.0, read_timeout=11.0, max_body_bytes=1234))
    options = serve_options(build_parser().parse_args(["serve"]), config)
    assert options["timeout_graceful_shutdown"] == 7.0
    assert (options["http"].keywords["read_timeout"], options["http"].keywords["max_body_bytes"]) == (11.0, 1234)


def test_key_create_gives_the_key_the_expiry_the_command_line_says(tmp_path: Path) -> None:
    config = declared_config(tmp_path)
    key = ok(config, "key", "create", "t", "--expires-at", "2030-01-01T00:00:00Z")
    assert key["expires_at"] == ok(config, "key", "list", "t")[0]["expires_at"] == "2030-01-01T00:00:00.000Z"


def test_model_group_create_keeps_the_description_the_command_line_gives(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    created = ok(config, "model-group", "create", "G", "--models", "a,b", "--description", "for tests")
    listed = {group["name"]: group for group in ok(config, "model-group", "list")}
    assert created["description"] == listed["G"]["description"] == "for tests"


def test_the_demos_litellm_runs_without_the_database_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # LiteLLM given a DATABASE_URL (one set for another program) would try to use it.
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/db")
    env = demo.litellm_environment("sk-litellm-master")
    assert "DATABASE_URL" not in env
    assert env["LITELLM_MASTER_KEY"] == "sk-litellm-master"


# "\udcff" is how Python reads the byte 0xff of an argument that is not UTF-8 (surrogateescape),
# and how subprocess writes it back: SQLite, like the admin API's JSON, can hold no such text.
@pytest.mark.parametrize(
    "args, option",
    [
        (["org", "create", "o", "--name", "Acme\udcff"], "--name"),
        (["team", "show", "t\udcff"], "team_id"),
        (["credits", "add", "t", "5", "--reason", "invoice\udcff"], "--reason"),
        (["key", "create", "t", "--name", "prod\udcff"], "--name"),
        (["model-group", "create", "G", "--models", "a\udcff"], "--models"),
    ],
)
def test_an_argument_that_is_not_utf8_is_refused_in_one_line_and_nothing_is_stored(
    tmp_path: Path, args: list[str], option: str
) -> None:
    config = declared_config(tmp_path)
    result = tollgate_cli(config, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"argument {option}: must be UTF-8 text (no lone surrogate such as \\ud800)"
    ), result.stderr
    assert "G" not in [group["name"] for group in ok(config, "model-group", "list")]
    assert [o["organization_id"] for o in ok(config, "org", "list")] == ["o1", "o2"]
    assert ok(config, "key", "list", "t") == []


def test_a_result_that_cannot_be_written_is_one_line_and_the_command_stays_done(tmp_path: Path) -> None:
    config = plain_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    with open("/dev/full", "w") as full:  # stdout on a full disk
        result = subprocess.run(
            [PYTHON, "-m", "proxy", "org", "create", "o", "--config", str(config)],
            env=env, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr == "tollgate: done, but its output could not be written: No space left on device\n"
    assert [o["organization_id"] for o in ok(config, "org", "list")] == ["o"]


def test_a_result_with_standard_output_closed_is_one_line_and_the_command_stays_done(tmp_path: Path) -> None:
    # Run with stdout closed (`tollgate key create t >&-`, from cron or a daemon), Python has no
    # sys.stdout: the key was made, and the command ended in a traceback rather than saying so.
    config = plain_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "org", "create", "o", "--config", str(config)],
        env=env, cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1),
    )
    assert result.returncode == 1
    assert result.stderr == "tollgate: done, but its output could not be written: standard output is closed\n"
    assert [o["organization_id"] for o in ok(config, "org", "list")] == ["o"]


def test_a_command_interrupted_while_it_waits_for_the_database_ends_in_one_line(tmp_path: Path) -> None:
    database = tmp_path / "cli.db"
    config = tmp_path / "config.yaml"
    # Long enough for the Ctrl-C to come while the command waits, however slow the machine; the
    # command waits it out (the store lets a write under way finish) before it stops.
    config.write_text(yaml.safe_dump(tollgate_config(database, database={"busy_timeout": "5s"})))
    ok(config, "org", "create", "o")
    changes = Path(f"{database}-changes")
    stamp = changes.read_bytes()
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    try:
        command = subprocess.Popen(
            [PYTHON, "-m", "proxy", "org", "create", "o2", "--config", str(config)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # The command stamps the change file once it has applied the declarations, just before
        # its own write, which then waits for the holder's lock.
        assert wait_for(lambda: changes.read_bytes() != stamp, timeout=30)
        time.sleep(0.3)
        command.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = command.communicate(timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert command.returncode == 130
    assert err == "tollgate: interrupted; a change it was making may have been made all the same\n"
