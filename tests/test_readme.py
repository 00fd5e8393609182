"""The README opens with two commands that work on a fresh machine; the first brings
up a gateway that answers the curl and the openai snippet it prints."""

import asyncio
import contextlib
import dataclasses
import os
import queue
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import app, health, jobs_api, occasional, pricing, server, sse, upstream, validation
from proxy.app import create_app
from proxy.cli import build_parser
from proxy.config import (
    MAX_GROUP_MODELS, MAX_MODEL_NAME, Config, DatabaseConfig, OrganizationSpec, TeamSpec, parse_duration,
)
from proxy.demo import port_in_use
from proxy.metrics import Metrics
from proxy.store import writer
from proxy.store.sqlite import SQLiteStore
from tests.support import PYTHON, REPO, free_port


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < text.index("\n## "), "the commands open the README"
    return block.group(1).strip().splitlines()


def test_readme_opens_with_the_demo_and_the_test_command():
    demo, tests = readme_commands()
    assert demo.endswith("tollgate demo") and tests.endswith("pytest")
    ci = (REPO / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci  # CI runs the README's second command itself


def fresh_copy(destination: Path) -> Path:
    """The repository as a clone would have it: tracked files only, no venv."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    files = [f for f in listed.stdout.decode().split("\0") if f] if listed.returncode == 0 else []
    if not files:
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).exists():
            shutil.copy2(REPO / name, target)
    return destination


def read_until(lines: "queue.Queue[str]", marker: str, timeout: float, seen: list[str], process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                raise AssertionError(f"the command exited ({process.returncode}); output:\n" + "".join(seen)) from None
            continue
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"{marker!r} did not appear; output so far:\n" + "".join(seen))


def test_first_command_starts_a_gateway_that_answers_what_it_prints(tmp_path):
    demo_command = readme_commands()[0]
    checkout = fresh_copy(tmp_path / "tollgate")
    port, litellm_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "VIRTUAL_ENV"))}
    env.update(TOLLGATE_DEMO_PORT=str(port), TOLLGATE_DEMO_LITELLM_PORT=str(litellm_port))
    process = subprocess.Popen(
        ["bash", "-c", demo_command], cwd=checkout, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        read_until(lines, "Tollgate is ready", 600, seen, process)
        read_until(lines, "Press Ctrl-C to stop", 10, seen, process)
        banner = "".join(seen)

        curl = re.search(r"^  (curl -s .*?\}')$", banner, re.S | re.M).group(1).replace("\\\n", " ")
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        assert '"content":"Hello from Tollgate' in answer.stdout, answer.stdout + answer.stderr

        snippet = re.search(r"^  (from openai import OpenAI\n.*?print\(.*?\))$", banner, re.S | re.M).group(1)
        code = "\n".join(line.removeprefix("  ") for line in snippet.splitlines())
        result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.stdout.startswith("Hello from Tollgate"), result.stdout + result.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, "".join(seen)
    deadline = time.monotonic() + 15
    while port_in_use(litellm_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_in_use(litellm_port), "LiteLLM was left running"


def test_ci_installs_prometheus_after_updating_the_package_lists_if_it_must():
    # On a clean Debian image (debian, python:3.11) /var/lib/apt/lists is empty: `apt-get install
    # prometheus` alone fails with "Unable to locate package", and `set -e` ends the CI run.
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    update = next(i for i, line in enumerate(lines) if line.startswith("apt-get update"))
    assert any(line.startswith("DEBIAN_FRONTEND=noninteractive apt-get install") for line in lines[update + 1:])


def test_contents_lists_every_section_in_order():
    # A newcomer reads the README through its Contents: a section left out, or listed out of
    # its place, is one they do not find.
    text = (REPO / "README.md").read_text()
    sections = [title for title in re.findall(r"^## (.+)$", text, re.M) if title != "Contents"]
    contents = text.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[(.+?)\]\(#([a-z0-9-]+)\)", contents, re.M)
    assert [title for title, _ in listed] == sections
    for title, anchor in listed:  # GitHub's anchor for a heading
        assert anchor == re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-"), title


def readme_table(first_header: str) -> list[list[str]]:
    """The rows of the README's table whose first column is headed `first_header`, as cells."""
    text = (REPO / "README.md").read_text()
    lines = text.split(f"\n| {first_header} |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


UNITS = {"ms": 0.001, "s": 1, "h": 3600, "MiB": 1024 * 1024}


def readme_default(text: str) -> object:
    """A default as the configuration table writes it: `8003`, 60,000, 100 ms, 10 MiB, unset."""
    text = text.strip("`")
    if text in ("unset", "none"):
        return None
    if text in ("true", "false"):
        return text == "true"
    number = re.fullmatch(r"([\d,]+(?:\.\d+)?)(?: (ms|s|h|MiB))?", text)
    if not number:
        return text
    value = float(number.group(1).replace(",", "")) * UNITS.get(number.group(2) or "", 1)
    return int(value) if value.is_integer() else value


def readme_config_defaults() -> dict[str, object]:
    """Each key of the configuration table with the default it gives; `a.b` / `.c` is `a.c`."""
    defaults: dict[str, object] = {}
    for keys_cell, defaults_cell, _ in readme_table("Key"):
        keys = re.findall(r"`([^`]+)`", keys_cell)
        keys = [keys[0].rsplit(".", 1)[0] + key if key.startswith(".") else key for key in keys]
        values = re.split(r", (?! )| / ", re.sub(r" \(.*?\)", "", defaults_cell))
        if len(values) == 1:
            values *= len(keys)
        assert len(values) == len(keys), keys_cell
        defaults.update(zip(keys, map(readme_default, values)))
    return defaults


def test_configuration_table_gives_every_key_with_its_default():
    # A default the README misstates is one an operator relies on without setting it.
    def leaves(value: object, path: str) -> dict[str, object]:
        if not dataclasses.is_dataclass(value):
            return {path: value}
        found: dict[str, object] = {}
        for field in dataclasses.fields(value):
            if field.metadata.get("yaml", True):
                found |= leaves(getattr(value, field.name), f"{path}.{field.name}".lstrip("."))
        return found

    actual = leaves(Config(), "")
    table = readme_config_defaults()
    listed = {key.split(".<", 1)[0]: value for key, value in table.items()}
    assert sorted(listed) == sorted(actual)
    for key, value in actual.items():
        empty = isinstance(value, (dict, tuple)) and not value  # pricing, model_groups, ...: none
        assert listed[key] == (None if empty else value), key


def test_module_table_names_every_module():
    # The table is where a newcomer finds which module owns what: one left out is one they miss.
    named = {name for row in readme_table("Module") for name in re.findall(r"`([\w/]+(?:\.py)?)`", row[0])}
    modules = {p.name for p in (REPO / "proxy").glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert modules | {"store/"} == named


def test_durations_take_the_units_the_readme_names():
    line = re.search(r"^Durations take seconds or units: (.*)\.$", (REPO / "README.md").read_text(), re.M).group(1)
    seconds = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for example in re.findall(r"`([^`]+)`", line):
        number, unit = re.fullmatch(r"(\d+)([a-z]+)", example).groups()
        assert parse_duration(example) == int(number) * seconds[unit], example


def test_cli_commands_the_readme_shows_parse(monkeypatch):
    # A newcomer copies these lines: an option renamed in cli.py would fail them at their first try.
    text = (REPO / "README.md").read_text()
    block = text.split("The CLI does most of the same", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].replace("[", "").replace("]", "") for line in block.splitlines()]
    assert len(lines) > 5
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])  # an unknown option or command exits
    port, litellm_port = re.search(r"`tollgate demo --port (\d+) --litellm-port (\d+)`", text).groups()
    demo = build_parser().parse_args(["demo", "--port", port, "--litellm-port", litellm_port])
    assert (demo.port, demo.litellm_port) == (int(port), int(litellm_port))
    monkeypatch.setenv("TOLLGATE_DEMO_PORT", port)  # "or TOLLGATE_DEMO_PORT and TOLLGATE_DEMO_LITELLM_PORT"
    monkeypatch.setenv("TOLLGATE_DEMO_LITELLM_PORT", litellm_port)
    demo = build_parser().parse_args(["demo"])
    assert (demo.port, demo.litellm_port) == (int(port), int(litellm_port))


def test_the_demo_serves_where_the_readme_says_it_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client examples (curl, openai) all assume the port the first paragraph names.
    for name in ("TOLLGATE_DEMO_PORT", "TOLLGATE_DEMO_LITELLM_PORT"):
        monkeypatch.delenv(name, raising=False)
    port = build_parser().parse_args(["demo"]).port
    assert f"puts Tollgate in front of it on `http://localhost:{port}`" in (REPO / "README.md").read_text()


def test_figures_the_readme_gives_are_the_codes():
    # Each bound the README states, beside the constant that sets it: a constant changed without
    # the README (or the other way round) fails here, not in an operator's surprise.
    text = " ".join((REPO / "README.md").read_text().split())
    mib = 1024 * 1024
    stated = [
        f"`stop`** takes at most {validation.MAX_STOP_SEQUENCES} sequences of at most "
        f"{validation.MAX_STOP_LENGTH:,} characters",
        f"`max_tokens` at most {validation.MAX_TOKENS:,}; `messages` at most {validation.MAX_MESSAGES:,};",
        f"`job_type` and `user_id` at most {validation.MAX_LABEL} characters",
        f"at most {validation.MAX_METADATA_BYTES // 1024} KiB as JSON",
        f"A model group lists 1 to {MAX_GROUP_MODELS} models",
        f"each name 1 to {MAX_MODEL_NAME} characters",
        f"let go after {upstream.KEEPALIVE_EXPIRY:g} s idle",
        f"only up to {sse.MAX_EVENT_BYTES // mib} MiB",
        f"at {upstream.MAX_ANSWER_BYTES // mib} MiB",
        f"A start waits (up to {pricing.MODEL_INFO_TIMEOUT:g} s)",
        f"once it is past {writer.WAL_SIZE_LIMIT // mib} MiB, a checkpoint waits up to {writer.RESTART_WAIT:g} s",
        f"if none has begun within {writer.START_SYNC_AFTER:g} s",
        f"each with a {health.CHECK_TIMEOUT:g}-second timeout",
        f"by the {app.DRAIN_TIMEOUT:g} s in which the requests it cut end",
        f"its head must fit in {server.MAX_HEAD_BYTES // 1024} KiB",
        f"for twice this long and {server.UNREAD_MARGIN:g} s more",
    ]
    assert jobs_api.CALL_END_GRACE == 0.5 and "waits up to half a second" in text
    assert occasional.EVERY == 60 and "once a minute at most" in text
    missing = [phrase for phrase in stated if phrase not in text]
    assert not missing, missing


# How the OpenAI SDKs call each /v1 route: the README names the SDK's calls, not the paths.
OPENAI_SDK_CALLS = {
    ("POST", "/v1/chat/completions"): "chat.completions.create",
    ("GET", "/v1/models"): "models.list",
    ("GET", "/v1/models/{model}"): "models.retrieve",
}


def served_routes(prefix: str) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves under `prefix`, HEAD aside."""
    routes = create_app(Config()).routes  # built, not started: nothing is opened
    return {(method, route.path) for route in routes if route.path.startswith(prefix) for method in route.methods - {"HEAD"}}


def test_the_drop_in_names_every_v1_route_by_its_sdk_call():
    # "... and no other endpoint": a route served but not named (GET /v1/models/{model} was) is
    # one a user is told is not there.
    assert served_routes("/v1/") == set(OPENAI_SDK_CALLS)
    text = " ".join((REPO / "README.md").read_text().split())
    bullet = text.split("- OpenAI drop-in:", 1)[1].split(" - ", 1)[0]
    missing = [call for call in OPENAI_SDK_CALLS.values() if f"`{call}`" not in bullet]
    assert not missing, missing


def test_the_readme_lists_every_job_api_route():
    text = " ".join((REPO / "README.md").read_text().split())
    listed = text.split("## Using it", 1)[1].split("## Configuration", 1)[0]
    for method, path in served_routes("/api/"):
        written = re.sub(r"{\w+}", "{id}", path)  # /api/jobs/{job_id} as /api/jobs/{id}
        assert f"`{method} {written}" in listed, (method, path)


def test_configuration_table_names_every_key_of_a_declared_organization_and_team():
    # The table's test above stops at `organizations` and `teams`: their entries' keys are keys
    # of the file too, refused when misspelt, so an operator must find them listed.
    (row,) = [row for row in readme_table("Key") if row[0] == "`organizations`, `teams`"]
    named = set(re.findall(r"`(\w+)`", row[2]))
    for spec in (OrganizationSpec, TeamSpec):
        missing = {f.name for f in dataclasses.fields(spec)} - named
        assert not missing, (spec.__name__, missing)


def test_metrics_the_readme_names_are_those_served_with_their_labels():
    # A family renamed, or a label added or dropped, changes every dashboard and alert built on it.
    metrics = Metrics()
    metrics.observe_request("/api/jobs/create", "POST", 200, 0.01)
    metrics.observe_call("t", "G", "m", "success", True, 1, 2, 0.5, 1.0, 0.1, 2)
    metrics.observe_rate_limited("t", "requests")
    metrics.observe_job("t", "created")

    async def balances() -> list[tuple[str, int]]:
        return [("t", 5)]

    served = {}
    for family in text_string_to_metric_families(asyncio.run(metrics.render(balances)).decode()):
        if family.name.endswith("_created"):  # a counter's creation times, a family of their own here
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        served[name] = {label for sample in family.samples for label in sample.labels if label != "le"}
    operations = (REPO / "README.md").read_text().split("\n## Operations\n", 1)[1].split("\n## ", 1)[0]
    named = {
        name: set(labels.split(",")) if labels else set()
        for name, labels in re.findall(r"`(tollgate_\w+)(?:\{([\w,]+)\})?`", operations)
    }
    assert named == served


def test_the_readme_warns_that_a_copy_written_over_the_database_in_place_goes_unnoticed(tmp_path):
    # A restore made with `cp backup.db tollgate.db` under a running gateway writes into the file
    # SQLite has open: it is the same file, so the store does not stop, and it served the mixture
    # of the copy and its own WAL (corrupt: 500s, jobs just made not found) while the README
    # promised that a replaced database stops the store within a second.
    path, backup = tmp_path / "tollgate.db", tmp_path / "backup.db"

    async def copy_in_place_under_an_open_store() -> None:
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{path}"))
        await store.open()
        try:
            await store.create_organization("before", "Before")
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute("VACUUM INTO ?", (str(backup),))
            shutil.copyfile(backup, path)
            await store.ping()  # not noticed: nothing tells this file from the one SQLite opened
        finally:
            await store.close()

    asyncio.run(copy_in_place_under_an_open_store())
    text = " ".join((REPO / "README.md").read_text().split())
    assert "A copy written over `tollgate.db` in place (`cp` onto it, the very file SQLite has open) is not noticed" in text
