"""Real processes for the tests: the fake upstream, LiteLLM and Tollgate itself."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml

from proxy.demo import start_litellm, stop_process, wait_until_up

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Arrays nested this deep are past what the json module reads (it raises RecursionError) on every
# Python Tollgate runs on. Its bound is the recursion limit on 3.11 (about 1,000 levels) and the
# C recursion limit from 3.12 on: about 1,500 levels there, 10,000 on 3.13, which reads 5,000.
TOO_DEEP_FOR_JSON = 100_000

# Models the test LiteLLM serves, all backed by the fake upstream; the name
# picks the fake's behaviour (see fake_upstream.py).
PRICES = {
    "primary": (1e-06, 2e-06),
    "backup": (3e-06, 4e-06),
}
FAKE_MODELS = [
    "primary", "backup", "fail-500", "fail-503", "fail-429", "fail-429-b", "fail-400",
    "abort", "garbage", "hang", "unpriced", "hang-timeout", "refused-key", "surrogate-answer",
    "surrogate-later", "fail-403", "fail-404", "no-usage", "null-message", "small-context", "error-first",
]
# LiteLLM settings of a deployment beyond its model, base and key.
DEPLOYMENT_PARAMS: dict[str, dict[str, Any]] = {
    "hang-timeout": {"timeout": 2},  # LiteLLM gives up on the hanging fake: its 408
    "refused-key": {"api_key": "wrong-provider-key"},  # the fake's 401 for an unknown key
}

# Model groups every test Tollgate declares.
GROUPS = {
    "Main": ["primary", "backup"],
    "Backup": ["backup"],
    "Fallback500": ["fail-500", "backup"],
    "Fallback503": ["fail-503", "backup"],
    "Fallback429": ["fail-429", "backup"],
    "FallbackHang": ["hang", "backup"],
    "FallbackTimeout": ["hang-timeout", "backup"],
    "FallbackRefusedKey": ["refused-key", "backup"],
    "Fallback403": ["fail-403", "backup"],
    "Fallback404": ["fail-404", "backup"],
    "FallbackErrorFirst": ["error-first", "backup"],  # its stream's first event is an error
    "FallbackUnknownModel": ["no-such-model-in-litellm", "backup"],
    "AllFail": ["fail-500", "fail-503"],
    "AllLimited": ["fail-429", "fail-429-b"],
    "Rejects": ["fail-400", "backup"],
    "Abort": ["abort"],
    "Garbage": ["garbage"],
    "Unpriced": ["unpriced"],
    "TimesOut": ["hang-timeout"],
    "RefusedKey": ["refused-key"],
    "Forbidden": ["fail-403"],
    "Usageless": ["no-usage"],
    "SmallContext": ["small-context"],  # takes prompts of up to 8 words
    "SmallContextThenBackup": ["small-context", "backup"],
    "SmallContextThenLimited": ["small-context", "fail-429"],
    # The groups the client documentation's examples name.
    "ChatAgent": ["primary", "backup"],
    "AnalysisAgent": ["primary", "backup"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def never_connecting() -> Iterator[str]:
    """The URL of a listener whose backlog is full: connecting to it hangs, as to a host that
    drops the connection's first packets (down, or firewalled)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        with socket.create_connection(listener.getsockname()):  # fills the backlog
            yield "http://%s:%d" % listener.getsockname()


def start_process(args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


@contextlib.contextmanager
def fake_upstream(workdir: Path) -> Iterator[str]:
    port = free_port()
    process = start_process([PYTHON, str(REPO / "tests" / "fake_upstream.py"), "--port", str(port)], workdir / "fake.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", 30, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def litellm_config(fake_url: str) -> dict[str, Any]:
    models = []
    for name in FAKE_MODELS:
        entry: dict[str, Any] = {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{name}", "api_base": f"{fake_url}/v1", "api_key": "fake-provider-key",
                **DEPLOYMENT_PARAMS.get(name, {}),
            },
        }
        if name in PRICES:
            entry["model_info"] = {"input_cost_per_token": PRICES[name][0], "output_cost_per_token": PRICES[name][1]}
        models.append(entry)
    return {
        "model_list": models,
        # Tollgate's fallbacks and retries are under test: LiteLLM's own are off.
        "litellm_settings": {"num_retries": 0, "request_timeout": 600, "telemetry": False},
        "router_settings": {"num_retries": 0, "disable_cooldowns": True, "allowed_fails": 1_000_000, "retry_after": 0},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }


@dataclass
class LiteLLM:
    url: str
    master_key: str


@contextlib.contextmanager
def litellm_proxy(
    workdir: Path, fake_url: str, name: str = "litellm", settings: dict[str, Any] | None = None
) -> Iterator[LiteLLM]:
    """A LiteLLM Proxy in front of the fake upstream; `settings` added to its litellm_settings."""
    config = litellm_config(fake_url)
    config["litellm_settings"].update(settings or {})
    config_path = workdir / f"{name}_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    master_key = "sk-litellm-test-" + secrets.token_hex(8)
    port = free_port()
    with open(workdir / f"{name}.log", "wb") as log:
        process = start_litellm(config_path, port, master_key, log)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health/liveliness", 180, process)
            yield LiteLLM(f"http://127.0.0.1:{port}", master_key)
        finally:
            stop_process(process)


def tollgate_config(database_file: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "database": {"url": f"sqlite:///{database_file}"},
        "model_groups": {name: {"models": models} for name, models in GROUPS.items()},
        "jobs": {"sweep_interval": "1s"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


class Tollgate:
    """A `tollgate serve` process of its own, with its own config and database."""

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        upstream_key: str | None,
        *,
        master_key: str | None = "sk-master-" + "test",
        database_file: Path | None = None,
        workers: int = 1,
        name: str | None = None,
        **sections: Any,
    ) -> None:
        self.name = name or "tollgate-" + uuid.uuid4().hex[:6]
        self.workdir = workdir
        # Not `database`: that name is the config section, which **sections may carry.
        self.database = database_file or workdir / f"{self.name}.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.master_key = master_key
        self.config_path = workdir / f"{self.name}.yaml"
        self.config_path.write_text(yaml.safe_dump(tollgate_config(self.database, **sections)))
        self.log_path = workdir / f"{self.name}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
        self.env["TOLLGATE_UPSTREAM_URL"] = upstream_url
        if upstream_key is not None:
            self.env["TOLLGATE_UPSTREAM_KEY"] = upstream_key
        if master_key is not None:
            self.env["TOLLGATE_MASTER_KEY"] = master_key
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "Tollgate":
        args = [PYTHON, "-m", "proxy", "serve", "--config", str(self.config_path), "--port", str(self.port)]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        self.process = start_process(args, self.log_path, self.env)
        wait_until_up(f"{self.url}/health/live", 30, self.process)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if sig == signal.SIGKILL:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        else:
            stop_process(self.process)
        code = self.process.returncode
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self) -> "Admin":
        return Admin(self.url, self.master_key)

    def client(self, key: str, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs)


@dataclass
class TeamKey:
    team_id: str
    key: str
    key_id: str
    organization_id: str


class Admin:
    """The admin API, for setting up what a test needs."""

    def __init__(self, url: str, master_key: str | None) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {master_key}"}, timeout=30)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code in (200, 201), f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def team(
        self, credits: int = 10, groups: tuple[str, ...] = ("Main",), key: dict[str, Any] | None = None, **fields: Any
    ) -> TeamKey:
        org = "org-" + uuid.uuid4().hex[:8]
        team = fields.pop("team_id", None) or "team-" + uuid.uuid4().hex[:8]
        self.ok("POST", "/admin/organizations", json={"organization_id": org, "name": org})
        body = {"team_id": team, "organization_id": org, "model_groups": list(groups), "credits_allocated": credits}
        self.ok("POST", "/admin/teams", json={**body, **fields})
        created = self.ok("POST", f"/admin/teams/{team}/keys", json=key or {"name": "test"})
        return TeamKey(team, created["key"], created["key_id"], org)

    def get_team(self, team_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/admin/teams/{team_id}")


def fake_log(fake_url: str, tag: str) -> list[dict[str, Any]]:
    return httpx.get(f"{fake_url}/_log", params={"tag": tag}).json()


def tag() -> str:
    return "t" + uuid.uuid4().hex[:12]


def sse_data(body: str) -> list[str]:
    """The data fields of an SSE body, in order."""
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


def sse_json(body: str) -> list[Any]:
    return [json.loads(d) for d in sse_data(body) if d != "[DONE]"]


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class RedisServer:
    """A private redis-server the test can stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
        ]
        self.process = start_process(args, self.workdir / f"redis-{self.port}.log")
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def cli(self, *args: str) -> str:
        result = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True)
        return result.stdout.strip()
