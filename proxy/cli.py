"""The `tollgate` command: serve, check-config, demo, and the admin operations.

Admin commands work directly on the configured database (no server needed) and
print the same JSON as the admin API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable, Iterator

import yaml

from .config import (
    ENV_CONFIG,
    Config,
    ConfigError,
    check_key,
    describe,
    load_config,
    require_serving_secrets,
    serving_warnings,
)
from .changes import ChangeSignal
from .errors import ApiError, from_store_error
from .store import SchemaTooNew, Store, StoreBusy, StoreError, StoreUnavailable, cannot_open

EXIT_CONFIG = 2


def _fail(message: str, code: int = 1) -> None:
    print(f"tollgate: {message}", file=sys.stderr)
    raise SystemExit(code)


def _discard_stdout() -> None:
    """Send what stdout still holds nowhere: Python's own flush at exit would fail again and
    print a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _emit(text: str) -> None:
    """Print a command's result. One that cannot be written (stdout on a full disk) is one line,
    not a traceback, saying the command is done all the same: a key made, credits added."""
    if sys.stdout is None:
        # Started with stdout closed (`>&-`): Python has no stdout, and print() would drop the
        # result without a word.
        _fail("done, but its output could not be written: standard output is closed")
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # main's: the reader went away, having read what it wanted
    except OSError as exc:
        _discard_stdout()
        _fail(f"done, but its output could not be written: {exc.strerror or exc}")


def _load(args: argparse.Namespace, serving: bool = False) -> Config:
    try:
        config = load_config(args.config)
        if serving:
            require_serving_secrets(config)
        return config
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
        raise  # unreachable


def cmd_serve(args: argparse.Namespace) -> None:
    from .app import configure_logging, create_served_app
    from .metrics import MULTIPROC_ENV
    from .server import listen, raise_open_files_limit, serve, serve_workers

    config = _load(args, serving=True)
    options = serve_options(args, config)
    raise_open_files_limit()
    where = f"{options['host']}:{options['port']}"
    try:
        # Before anything else: uvicorn would find out only once the app had started (the
        # file's declarations applied to a database perhaps another gateway serves), and not
        # name the host.
        sockets = listen(options["host"], options["port"])
    except (socket.gaierror, UnicodeError) as exc:  # a host that does not resolve: the config's
        _fail(f"cannot listen on {where}: {getattr(exc, 'strerror', None) or exc}", EXIT_CONFIG)
    except OSError as exc:  # the port taken, the address not this machine's
        _fail(f"cannot listen on {where}: {exc.strerror or exc}")
    # The database is opened (and the file's declarations applied) once here, so that a database
    # that cannot be opened is a one-line error, not a traceback from inside uvicorn's start-up.
    _run(config, follow_file=True)
    workers = config.server.workers if args.workers is None else args.workers
    configure_logging(config.logging.level)
    for warning in serving_warnings(config, workers):
        logging.getLogger("tollgate").warning(warning)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: a graceful
    # stop is a successful exit.
    signal.signal(signal.SIGTERM, _exit_successfully)
    if workers == 1:
        serve(create_served_app(config), options, sockets)
        return
    # Each worker builds its own app from a copy of the file as it was checked here, so that one
    # uvicorn starts again after a crash serves as the others do, whatever became of the file
    # since (a file edited into a mistake made each such worker die with a traceback, and be
    # started again, twice a second, for good). Metrics go where any worker answering a scrape
    # can add them all up.
    remove_left_behind(tempfile.gettempdir())
    with workers_directory("metrics") as metrics_dir, workers_directory("config") as config_dir:
        os.environ[ENV_CONFIG] = _config_for_workers(config, config_dir)
        os.environ[MULTIPROC_ENV] = metrics_dir
        serve_workers("proxy.app:app_from_environment", workers, options, sockets)


# The directories `serve --workers` shares with its workers (their metrics, the config's copy).
# One whose supervisor was killed (SIGKILL, the OOM killer) is left behind: each is locked while
# its supervisor lives, and the next `serve` removes those no process holds.
WORKERS_DIR_PREFIX = "tollgate-workers-"
# Made a moment before it is locked: one younger than this is never taken for left behind.
LEFT_BEHIND_AFTER = 60.0


@contextlib.contextmanager
def workers_directory(kind: str) -> Iterator[str]:
    """A new directory for this supervisor's workers, locked as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix=f"{WORKERS_DIR_PREFIX}{kind}-") as directory:
        held = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            yield directory
        finally:
            os.close(held)


def remove_left_behind(directory: str) -> None:
    """Remove the workers' directories in `directory` that no supervisor holds any more. A lock
    rather than a process id: a /tmp shared by containers is shared across their process ids."""
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(WORKERS_DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime < LEFT_BEHIND_AFTER:
                    continue
                held = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its supervisor lives
                    shutil.rmtree(entry.path, ignore_errors=True)
                finally:
                    os.close(held)


def _config_for_workers(config: Config, directory: str) -> str:
    """A copy of `config`'s file (an empty one for the defaults) in `directory`, checked to
    give what `config` holds: the file may have changed since it was read."""
    copy = os.path.join(directory, "config.yaml" if config.source == "(defaults)" else os.path.basename(config.source))
    try:
        if config.source == "(defaults)":
            open(copy, "x").close()
        else:
            shutil.copyfile(config.source, copy)
        copied = load_config(copy)
    except (OSError, ConfigError) as exc:
        _fail(f"{config.source}: changed or unreadable while the gateway started: {exc}", EXIT_CONFIG)
    if dataclasses.replace(copied, source=config.source) != config:
        _fail(f"{config.source}: changed while the gateway started; start it again", EXIT_CONFIG)
    return copy


def serve_options(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    """uvicorn's options for `serve`: the command line's host and port over the file's, and
    the file's log level for uvicorn's own lines too."""
    from .server import uvicorn_options

    host = config.server.host if args.host is None else args.host
    port = config.server.port if args.port is None else args.port
    return uvicorn_options(
        host, port, config.logging.level, config.server.shutdown_grace, config.server.read_timeout,
        config.server.max_body_bytes, config.server.keep_alive_timeout,
    )


def _exit_successfully(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def cmd_check_config(args: argparse.Namespace) -> None:
    config = _load(args, serving=True)
    _emit(f"# {config.source}: valid\n" + yaml.safe_dump(describe(config), sort_keys=False).rstrip("\n"))


def cmd_apply(args: argparse.Namespace) -> None:
    config = _load(args)
    _run(config, follow_file=True)
    applied = {
        "model_groups": list(config.model_groups),
        "organizations": [organization.organization_id for organization in config.organizations],
        "teams": [team.team_id for team in config.teams],
    }
    _emit(json.dumps(applied, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(port=args.port, litellm_port=args.litellm_port, config_path=args.config)


# --- admin operations -----------------------------------------------------------------------


def _admin(args: argparse.Namespace, operation: Callable[[Any], Awaitable[Any]]) -> None:
    from .admin import AdminService

    config = _load(args)
    # A change here reaches running servers' caches at once through the change signal.
    result = _run(config, lambda store, changes: operation(AdminService(store, config, on_change=changes.bump)))
    _emit(json.dumps(result, indent=2))


def _run(
    config: Config,
    operation: Callable[[Store, ChangeSignal], Awaitable[Any]] | None = None,
    follow_file: bool = False,
) -> Any:
    """The operation's result on the configured database; every refusal is one line on stderr
    and a non-zero exit. What the file declares and the database lacks is created first, so
    that a command works on a new database (a declared team whose organization or groups do not
    exist yet is passed over with a warning, and tried again after the operation, which may be
    the one creating them); `follow_file` also brings what exists back to
    the file (a start of `serve`, `apply`): any other command doing so would silently undo
    the admin API's changes to a declared team, such as a suspension."""
    from .declared import apply_declared
    from .store import open_store

    async def run() -> Any:
        store = open_store(config.database)
        try:
            await store.open()
        except (OSError, sqlite3.Error, SchemaTooNew) as exc:
            await store.close()
            raise ConfigError(cannot_open(config.database, exc)) from None
        try:
            with ChangeSignal.beside(config.database) as changes:
                try:
                    waiting = await apply_declared(store, config, follow_file=follow_file)
                finally:
                    # Also when a declaration fails part way: those before it are committed.
                    changes.bump()
                result = await operation(store, changes) if operation else None
                if waiting:
                    # The operation may have made what they waited for (`org create`, say).
                    try:
                        waiting = await apply_declared(store, config, follow_file=False)
                    except (StoreError, ConfigError):
                        pass  # the operation is done: its result (a key shown once) must be printed
                    finally:
                        changes.bump()
                for problem in waiting:
                    print(f"tollgate: warning: {problem} (not created yet)", file=sys.stderr)
                return result
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except ApiError as exc:
        _fail(exc.message)
    except (StoreBusy, StoreUnavailable) as exc:  # the database's state, not the command's: name it
        _fail(f"the database {config.database.sqlite_path}: {from_store_error(exc).message}")
    except StoreError as exc:
        _fail(from_store_error(exc).message)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


def _names(text: str) -> list[str]:
    """An argparse type for a comma-separated list of names ("" for none). An empty name (`a,,b`,
    a trailing comma) is refused, not dropped: the list given would not be the list stored."""
    text = _text(text)
    if not text.strip():
        return []
    names = [item.strip() for item in text.split(",")]
    if "" in names:
        raise argparse.ArgumentTypeError(f"holds an empty name ({text!r}): separate the names with single commas")
    return names


DEFAULT = "default"


def _int_or_default(text: str) -> int | str:
    """An integer, or `default`: back to config.yaml's value."""
    if text == DEFAULT:
        return DEFAULT
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or '{DEFAULT}', got {text!r}") from None


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def cmd_org_create(args: argparse.Namespace) -> None:
    body = _drop_none(organization_id=args.organization_id, name=args.name)
    _admin(args, lambda admin: _json(admin.create_organization(body)))


def cmd_org_list(args: argparse.Namespace) -> None:
    _admin(args, lambda admin: _json_list(admin.list_organizations()))


def _team_view(config_args: argparse.Namespace) -> Callable[[Any], dict[str, Any]]:
    from .views import team_json

    config = _load(config_args)
    return lambda team: team_json(team, config)


def cmd_team_create(args: argparse.Namespace) -> None:
    body = _drop_none(
        team_id=args.team_id,
        organization_id=args.org,
        model_groups=args.groups or [],
        default_model_group=args.default,
        credits_allocated=args.credits,
        rpm_limit=args.rpm,
        tpm_limit=args.tpm,
        credits_per_job=args.credits_per_job,
    )
    view = _team_view(args)
    _admin(args, lambda admin: _mapped(admin.create_team(body), view))


def cmd_team_show(args: argparse.Namespace) -> None:
    view = _team_view(args)
    _admin(args, lambda admin: _mapped(admin.get_team(args.team_id), view))


def cmd_team_update(args: argparse.Namespace) -> None:
    # What the admin API's PATCH clears with null: --groups "" (none), --default "" (the first
    # granted group), and `default` for a limit or credits per job (config.yaml's value).
    body = _drop_none(status=args.status, model_groups=args.groups)
    if args.default is not None:
        body["default_model_group"] = args.default or None
    for field, value in (("rpm_limit", args.rpm), ("tpm_limit", args.tpm), ("credits_per_job", args.credits_per_job)):
        if value is not None:
            body[field] = None if value == DEFAULT else value
    view = _team_view(args)
    _admin(args, lambda admin: _mapped(admin.update_team(args.team_id, body), view))


def cmd_key_create(args: argparse.Namespace) -> None:
    from .admin import created_key_json

    body = _drop_none(name=args.name, expires_at=args.expires_at, rpm_limit=args.rpm, tpm_limit=args.tpm)

    async def create(admin: Any) -> dict[str, Any]:
        return created_key_json(*await admin.create_key(args.team_id, body))

    _admin(args, create)


def cmd_key_list(args: argparse.Namespace) -> None:
    _admin(args, lambda admin: _json_list(admin.list_keys(args.team_id)))


def cmd_key_revoke(args: argparse.Namespace) -> None:
    _admin(args, lambda admin: _json(admin.revoke_key(args.key_id)))


def cmd_credits_add(args: argparse.Namespace) -> None:
    view = _team_view(args)
    body = {"amount": args.amount, "reason": args.reason}
    _admin(args, lambda admin: _mapped(admin.add_credits(args.team_id, body), view))


def cmd_model_group_create(args: argparse.Namespace) -> None:
    body = _drop_none(name=args.name, models=args.models, description=args.description)
    _admin(args, lambda admin: _json(admin.create_model_group(body)))


def cmd_model_group_list(args: argparse.Namespace) -> None:
    _admin(args, lambda admin: _json_list(admin.list_model_groups()))


async def _json(result: Awaitable[Any]) -> Any:
    return (await result).to_json()


async def _json_list(result: Awaitable[list[Any]]) -> list[Any]:
    return [item.to_json() for item in await result]


async def _mapped(result: Awaitable[Any], view: Callable[[Any], Any]) -> Any:
    return view(await result)


def _as_key(key: str, number: bool = True) -> Callable[[str], Any]:
    """An argparse type for an option that overrides the file's `key`: the key's own rule, so
    that `--port 99999` is refused as `server.port: 99999` would be, in one line."""

    def parse(text: str) -> Any:
        value: Any = text  # refused below if it must be a number, in the key's own words
        if number:
            with contextlib.suppress(ValueError):
                value = int(text)
        try:
            return check_key(key, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _text(text: str) -> str:
    """An argument as the admin operations take it. A byte that is not UTF-8 reaches Python as
    a lone surrogate (surrogateescape), which SQLite refuses in a traceback from inside the write
    and the admin API's JSON never carries (a model name so stored is one no request could name);
    config.yaml refuses it in the same words."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("must be UTF-8 text (no lone surrogate such as \\ud800)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description="An LLM gateway in front of LiteLLM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(sub: Any, name: str, handler: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        # Every argument without a type of its own is text checked as the admin API's JSON is.
        p.register("type", None, _text)
        # A path is the file system's bytes, UTF-8 or not: it is only opened, never stored.
        p.add_argument("--config", type=str, help="config file (default: $TOLLGATE_CONFIG, else ./config.yaml)")
        p.set_defaults(handler=handler)
        return p

    serve = command(commands, "serve", cmd_serve, "run the gateway")
    # Each overrides its key of the file: the default is the file's (8003 only if it sets none).
    serve.add_argument("--host", type=_as_key("server.host", number=False),
                       help="interface to listen on (default: server.host, 127.0.0.1 unless set)")
    serve.add_argument("--port", type=_as_key("server.port"), help="port (default: server.port, 8003 unless set)")
    serve.add_argument("--workers", type=_as_key("server.workers"),
                       help="worker processes (default: server.workers, 1 unless set)")
    command(commands, "check-config", cmd_check_config, "validate and print the effective configuration")
    command(commands, "apply", cmd_apply, "bring the database's declared groups, organizations and teams to the file now, as a start of serve does")
    demo = command(commands, "demo", cmd_demo, "run LiteLLM with offline models and Tollgate in front of it")
    # String defaults go through `type` as typed values do: a bad variable is a one-line error too.
    port = _as_key("server.port")
    demo.add_argument("--port", type=port, default=os.environ.get("TOLLGATE_DEMO_PORT", "8003"),
                      help="Tollgate's port (default: $TOLLGATE_DEMO_PORT, else 8003)")
    demo.add_argument("--litellm-port", type=port, default=os.environ.get("TOLLGATE_DEMO_LITELLM_PORT", "4000"),
                      help="LiteLLM's port (default: $TOLLGATE_DEMO_LITELLM_PORT, else 4000)")

    org = commands.add_parser("org", help="organizations").add_subparsers(dest="action", required=True)
    p = command(org, "create", cmd_org_create, "create an organization")
    p.add_argument("organization_id")
    p.add_argument("--name")
    command(org, "list", cmd_org_list, "list organizations")

    team = commands.add_parser("team", help="teams").add_subparsers(dest="action", required=True)
    p = command(team, "create", cmd_team_create, "create a team")
    p.add_argument("team_id")
    p.add_argument("--org", required=True, help="organization id")
    p.add_argument("--groups", type=_names, help="comma-separated model groups the team may use")
    p.add_argument("--default", help="default model group")
    p.add_argument("--credits", type=int, help="initial credits")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p.add_argument("--credits-per-job", type=int)
    p = command(team, "show", cmd_team_show, "show a team and its balance")
    p.add_argument("team_id")
    p = command(team, "update", cmd_team_update, "change a team's status, groups or limits")
    p.add_argument("team_id")
    p.add_argument("--status", choices=["active", "suspended"])
    p.add_argument("--groups", type=_names, help='comma-separated model groups the team may use ("" for none)')
    p.add_argument("--default", help='default model group ("": the first of its groups)')
    p.add_argument("--rpm", type=_int_or_default, help="requests per minute (default: config.yaml's)")
    p.add_argument("--tpm", type=_int_or_default, help="tokens per minute (default: config.yaml's)")
    p.add_argument("--credits-per-job", type=_int_or_default, help="credits per job (default: config.yaml's)")

    key = commands.add_parser("key", help="virtual keys").add_subparsers(dest="action", required=True)
    p = command(key, "create", cmd_key_create, "create a key (shown once)")
    p.add_argument("team_id")
    p.add_argument("--name")
    p.add_argument("--expires-at", help="ISO 8601, e.g. 2030-01-01T00:00:00Z")
    p.add_argument("--rpm", type=int)
    p.add_argument("--tpm", type=int)
    p = command(key, "list", cmd_key_list, "list a team's keys (without secrets)")
    p.add_argument("team_id")
    p = command(key, "revoke", cmd_key_revoke, "revoke a key")
    p.add_argument("key_id")

    credits = commands.add_parser("credits", help="credits").add_subparsers(dest="action", required=True)
    p = command(credits, "add", cmd_credits_add, "add (or, negative, remove) credits")
    p.add_argument("team_id")
    p.add_argument("amount", type=int)
    p.add_argument("--reason", required=True)

    groups = commands.add_parser("model-group", help="model groups").add_subparsers(dest="action", required=True)
    p = command(groups, "create", cmd_model_group_create, "create a model group")
    p.add_argument("name")
    p.add_argument("--models", type=_names, required=True, help="comma-separated LiteLLM model names, primary first")
    p.add_argument("--description")
    command(groups, "list", cmd_model_group_list, "list model groups")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
        if sys.stdout is not None:  # None when started with stdout closed (see _emit)
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`tollgate key list t | head -1`): what it read is all it wanted.
        _discard_stdout()
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C (`serve` and `demo` stop on it themselves): one line, not Python's traceback. A
        # write under way is let finish (the store refuses to cancel one), unprinted: a key made,
        # say, whose plaintext is lost, so it is worth a look before the command is repeated.
        print("tollgate: interrupted; a change it was making may have been made all the same", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as shells report it


if __name__ == "__main__":
    main()
