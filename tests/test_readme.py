"""The README opens with two commands that work on a fresh machine; the first brings
up a gateway that answers the curl and the openai snippet it prints."""

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from proxy.demo import port_in_use
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
