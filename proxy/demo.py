"""`tollgate demo`: a real LiteLLM Proxy answering with offline models, and
Tollgate in front of it, with the organization, team and key the client
documentation assumes.

LiteLLM lives in a virtual environment of its own (created on first use), so it
never pins Tollgate's dependencies. The tests start it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Mapping, NoReturn

if TYPE_CHECKING:
    from .config import Config
    from .records import Team

LITELLM_VERSION = "1.102.4"
DEMO_TEAM = "acme-corp"
DEMO_GROUPS = ["ChatAgent", "ResumeAgent", "AnalysisAgent", "SummaryAgent", "WritingAgent"]
DEMO_CREDITS = 100


def litellm_venv() -> Path:
    configured = os.environ.get("TOLLGATE_LITELLM_VENV")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "tollgate" / f"litellm-{LITELLM_VERSION}"


def ensure_litellm(say: Callable[[str], None] = print) -> Path:
    """The `litellm` executable, installing LiteLLM Proxy into its own venv on first use."""
    venv = litellm_venv()
    executable = venv / "bin" / "litellm"
    marker = venv / ".tollgate-installed"
    if marker.exists() and executable.exists():
        return executable
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions must not install at once
        if not (marker.exists() and executable.exists()):
            say(f"Installing LiteLLM Proxy {LITELLM_VERSION} into {venv} (once; about a minute)...")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                 f"litellm[proxy]=={LITELLM_VERSION}"],
                check=True,
            )
            marker.write_text(LITELLM_VERSION)
    return executable


def litellm_environment(master_key: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LITELLM_MASTER_KEY=master_key,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY_DISABLED="true",
        DISABLE_SCHEMA_UPDATE="true",
    )
    env.pop("DATABASE_URL", None)  # LiteLLM runs without a database here
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_in_use(port: int) -> bool:
    """Whether something listens on the port (connections lingering in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_litellm(config_path: str | Path, port: int, master_key: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    executable = ensure_litellm()
    if port_in_use(port):
        # LiteLLM would quietly pick another port, leaving us talking to whatever holds this one.
        raise RuntimeError(f"port {port} is already in use; stop what listens there or choose another port")
    return subprocess.Popen(
        [str(executable), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)],
        env=litellm_environment(master_key),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def wait_until_up(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_litellm(config_path: str | Path, port: int, master_key: str, log_path: Path) -> Iterator[None]:
    with open(log_path, "wb") as log:
        process = start_litellm(config_path, port, master_key, log)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health/liveliness", 180, process)
            yield
        finally:
            stop_process(process)


async def _prepare(config: "Config") -> tuple[str, "Team"]:
    """Create the demo organization, team and key; return the key and the team.

    The configuration may declare them itself (config.yaml's own commented example declares the
    team `acme-corp`): what the file's declarations created is used as it is."""
    from .admin import AdminService
    from .declared import apply_declared
    from .store import open_store

    store = open_store(config.database)
    await store.open()
    try:
        await apply_declared(store, config)
        admin = AdminService(store, config)
        if await store.get_team(DEMO_TEAM) is None:
            groups = [g for g in DEMO_GROUPS if await store.get_model_group(g) is not None]
            if await store.get_organization(DEMO_TEAM) is None:
                await admin.create_organization({"organization_id": DEMO_TEAM, "name": "Acme Corp"})
            await admin.create_team(
                {
                    "team_id": DEMO_TEAM,
                    "organization_id": DEMO_TEAM,
                    "model_groups": groups,
                    "default_model_group": groups[0] if groups else None,
                    "credits_allocated": DEMO_CREDITS,
                }
            )
        _, key = await admin.create_key(DEMO_TEAM, {"name": "demo"})
        return key, await admin.get_team(DEMO_TEAM)
    finally:
        await store.close()


def banner(port: int, key: str, master_key: str, workdir: str, team: "Team | None" = None) -> str:
    base = f"http://localhost:{port}"
    credits = DEMO_CREDITS if team is None else team.credits_available
    groups = DEMO_GROUPS if team is None else list(team.model_groups)
    return f"""
Tollgate is ready on {base} (LiteLLM with offline models behind it).
Team '{DEMO_TEAM}' has {credits} credits and the groups {", ".join(groups)}.

  virtual key:  {key}
  master key:   {master_key}   (admin API, /admin/...)
  data:         {workdir}

Try it with curl:

  curl -s {base}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "ChatAgent", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

or with the openai SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  reply = client.chat.completions.create(model="ChatAgent", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

The job API (jobs, credits) is at {base}/api; see README.md. Press Ctrl-C to stop.
"""


def demo_environment(environ: Mapping[str, str], workdir: str, litellm_port: int) -> dict[str, str]:
    """The variables the demo's Tollgate reads: its own database and LiteLLM, whatever is set.

    A master key already set is kept: the README's admin examples send `$TOLLGATE_MASTER_KEY`,
    and a demo that made its own answered them 401.
    """
    env = dict(environ)
    env.update(
        TOLLGATE_DATABASE_URL=f"sqlite:///{workdir}/tollgate.db",
        TOLLGATE_UPSTREAM_URL=f"http://127.0.0.1:{litellm_port}",
        TOLLGATE_UPSTREAM_KEY="sk-litellm-demo-" + secrets.token_urlsafe(16),
        TOLLGATE_MASTER_KEY=environ.get("TOLLGATE_MASTER_KEY") or "sk-master-demo-" + secrets.token_urlsafe(16),
    )
    return env


def run_demo(port: int, litellm_port: int, config_path: str | None) -> None:
    import uvicorn

    from .app import configure_logging, create_app
    from .config import ConfigError, load_config
    from .errors import ApiError, from_store_error
    from .server import uvicorn_options
    from .store import StoreError

    def refuse(message: str) -> NoReturn:
        # One line and the exit status of `serve`'s refusals, never a traceback.
        print(f"tollgate demo: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)

    litellm_config = Path("litellm_config.yaml")
    if not litellm_config.exists():
        refuse("run it from Tollgate's directory (litellm_config.yaml not found)")
    # Both ports are checked before anything is installed or started: a LiteLLM already
    # listening on its default port (4000) is the likeliest collision.
    if port == litellm_port:
        refuse(f"Tollgate and LiteLLM cannot both listen on port {port} (--port, --litellm-port)")
    for taken, how in ((port, "TOLLGATE_DEMO_PORT or --port"), (litellm_port, "TOLLGATE_DEMO_LITELLM_PORT or --litellm-port")):
        if port_in_use(taken):
            refuse(f"port {taken} is already in use (set {how})")
    workdir = tempfile.mkdtemp(prefix="tollgate-demo-")
    env = demo_environment(os.environ, workdir, litellm_port)
    upstream_key, master_key = env["TOLLGATE_UPSTREAM_KEY"], env["TOLLGATE_MASTER_KEY"]
    try:
        config = load_config(config_path, env)
        # The database first, LiteLLM after: what the file declares may be impossible (a team of
        # an organization it does not declare, the database being new), and is said in one line
        # before LiteLLM is installed or started for nothing.
        key, team = asyncio.run(_prepare(config))
    except ConfigError as exc:
        refuse(str(exc))
    except ApiError as exc:
        refuse(exc.message)
    except StoreError as exc:
        refuse(from_store_error(exc).message)
    ensure_litellm()
    log_path = Path(workdir) / "litellm.log"
    print(f"Starting LiteLLM Proxy on 127.0.0.1:{litellm_port} (log: {log_path})...", flush=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(running_litellm(litellm_config, litellm_port, upstream_key, log_path))
        except RuntimeError as exc:  # the port taken meanwhile, or LiteLLM exited or never answered
            refuse(f"LiteLLM did not start: {exc} (see {log_path})")
        try:
            configure_logging()
            options = uvicorn_options(
                "127.0.0.1", port, "warning", config.server.shutdown_grace, config.server.read_timeout,
                config.server.max_body_bytes, config.server.keep_alive_timeout,
            )
            server = uvicorn.Server(uvicorn.Config(create_app(config), **options))

            async def serve() -> None:
                task = asyncio.create_task(server.serve())
                while not server.started and not task.done():
                    await asyncio.sleep(0.05)
                if server.started:
                    print(banner(port, key, master_key, workdir, team), flush=True)
                await task

            with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
                asyncio.run(serve())
            print("Stopped.", flush=True)
        finally:
            # A second Ctrl-C or SIGTERM must not cut short stopping LiteLLM.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

