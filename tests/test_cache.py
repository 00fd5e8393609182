"""Store lookups reused for a short time (proxy/cache.py), and forgotten at once when any
process sharing the database signals a change (proxy/changes.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.cache import ExpiringCache
from proxy.changes import ChangeSignal
from proxy.config import DatabaseConfig, load_config
from proxy.groups import GroupCatalog
from proxy.records import ModelGroup
from proxy.store.sqlite import SQLiteStore
from tests.support import Tollgate, tollgate_config


class Loads:
    """A store lookup that counts its calls; `gate` holds a lookup in flight."""

    def __init__(self) -> None:
        self.count = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, key: str) -> str:
        self.count += 1
        value = f"{key} as read {self.count}"
        await self.gate.wait()
        return value


def test_a_lookup_is_reused_until_a_change_is_signalled():
    async def run() -> tuple[str, str, str, int]:
        loads = Loads()
        changes = ChangeSignal()
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=60, changes=changes)
        first, again = await cache.get("k"), await cache.get("k")
        changes.bump()
        return first, again, await cache.get("k"), loads.count

    assert asyncio.run(run()) == ("k as read 1", "k as read 1", "k as read 2", 2)


def test_a_change_signalled_drops_every_lookup_kept_not_only_the_one_read_next():
    async def run() -> str:
        changes = ChangeSignal()
        cache: ExpiringCache[str, str] = ExpiringCache(Loads(), ttl=60, changes=changes)
        await cache.get("a")
        await cache.get("b")
        changes.bump()
        await cache.get("a")
        return await cache.get("b")

    assert asyncio.run(run()) == "b as read 4"


def test_a_full_cache_is_emptied_rather_than_grown():
    # Random keys sent by anyone are looked up too: the cache must not grow without end.
    async def run() -> tuple[int, int]:
        loads = Loads()
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=60, changes=ChangeSignal(), limit=2)
        for key in ("a", "b", "c", "a"):
            await cache.get(key)
        return loads.count, len(cache._entries)

    assert asyncio.run(run()) == (4, 2)


def test_every_change_signalled_gives_a_stamp_never_seen_before():
    # Two changes must not bring back an earlier stamp: a lookup read under it would be kept.
    changes = ChangeSignal()
    seen = [changes.stamp()]
    for _ in range(3):
        changes.bump()
        seen.append(changes.stamp())
    assert len(set(map(bytes, seen))) == 4


def test_a_lookup_in_flight_when_a_change_is_signalled_is_not_kept():
    # A key revoked while a request was reading it: that request may use what it read, but no
    # later one may find the old entry in the cache.
    async def run() -> tuple[str, str, int]:
        loads = Loads()
        changes = ChangeSignal()
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=60, changes=changes)
        loads.gate.clear()
        in_flight = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        changes.bump()
        loads.gate.set()
        old = await in_flight
        return old, await cache.get("k"), loads.count

    assert asyncio.run(run()) == ("k as read 1", "k as read 2", 2)


def test_a_lookup_in_flight_when_a_change_is_signalled_does_not_replace_one_read_after_it():
    # A key revoked while a request was reading it, and read again (revoked) by another request
    # meanwhile: the first lookup, ending last, must not put the key back as it was.
    async def run() -> tuple[str, str, str]:
        first_read_may_end = asyncio.Event()
        reads = 0

        async def load(key: str) -> str:
            nonlocal reads
            reads += 1
            value = f"{key} as read {reads}"
            if reads == 1:
                await first_read_may_end.wait()
            return value

        changes = ChangeSignal()
        cache: ExpiringCache[str, str] = ExpiringCache(load, ttl=60, changes=changes)
        in_flight = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        changes.bump()
        after_the_change = await cache.get("k")
        first_read_may_end.set()
        return await in_flight, after_the_change, await cache.get("k")

    assert asyncio.run(run()) == ("k as read 1", "k as read 2", "k as read 2")


def test_closing_the_signal_keeps_the_stamp_it_had(tmp_path: Path):
    # What was read under it stays good: a process shutting down does not drop its lookups.
    changes = ChangeSignal.beside(DatabaseConfig(url=f"sqlite:///{tmp_path / 'tollgate.db'}"))
    changes.open()
    changes.bump()
    stamp = changes.stamp()
    changes.close()
    assert changes.stamp() == stamp


def cached_twice_then_again(cache: ExpiringCache[str, str], between) -> list[str]:
    async def run() -> list[str]:
        first = await cache.get("k")
        between()
        return [first, await cache.get("k")]

    return asyncio.run(run())


def test_a_change_signalled_by_another_process_drops_the_cache_at_once(tmp_path: Path):
    database = DatabaseConfig(url=f"sqlite:///{tmp_path / 'tollgate.db'}")
    bump_elsewhere = (
        "import sys; from proxy.changes import ChangeSignal; from proxy.config import DatabaseConfig\n"
        "with ChangeSignal.beside(DatabaseConfig(url=sys.argv[1])) as changes: changes.bump()"
    )
    with ChangeSignal.beside(database) as changes:
        cache: ExpiringCache[str, str] = ExpiringCache(Loads(), ttl=60, changes=changes)
        seen = cached_twice_then_again(
            cache, lambda: subprocess.run([sys.executable, "-c", bump_elsewhere, database.url], check=True)
        )
    assert seen == ["k as read 1", "k as read 2"]


def test_without_a_change_another_process_opening_the_signal_keeps_the_cache(tmp_path: Path):
    database = DatabaseConfig(url=f"sqlite:///{tmp_path / 'tollgate.db'}")
    with ChangeSignal.beside(database) as changes:
        cache: ExpiringCache[str, str] = ExpiringCache(Loads(), ttl=60, changes=changes)
        seen = cached_twice_then_again(cache, lambda: ChangeSignal.beside(database).open())
    assert seen == ["k as read 1", "k as read 1"]


def test_a_signal_that_cannot_share_its_file_says_so_and_still_works_in_its_process(tmp_path: Path, caplog):
    database = DatabaseConfig(url=f"sqlite:///{tmp_path / 'missing-directory' / 'tollgate.db'}")
    with caplog.at_level(logging.WARNING, logger="tollgate"), ChangeSignal.beside(database) as changes:
        cache: ExpiringCache[str, str] = ExpiringCache(Loads(), ttl=60, changes=changes)
        seen = cached_twice_then_again(cache, changes.bump)
    assert seen == ["k as read 1", "k as read 2"]
    assert "tollgate.db-changes" in caplog.text and "within auth.cache_ttl" in caplog.text


def test_a_signal_on_a_filesystem_that_allocates_nothing_ahead_is_still_shared(tmp_path: Path, monkeypatch):
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    database = DatabaseConfig(url=f"sqlite:///{tmp_path / 'tollgate.db'}")
    with ChangeSignal.beside(database) as one, ChangeSignal.beside(database) as other:
        before = other.stamp()
        one.bump()
        assert other.stamp() != before


def test_an_in_memory_database_shares_no_file(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ChangeSignal.beside(DatabaseConfig(url="sqlite:///:memory:")) as changes:
        changes.bump()
    assert list(tmp_path.iterdir()) == []


def test_processes_naming_the_database_through_a_symbolic_link_share_the_signal(tmp_path: Path):
    (tmp_path / "tollgate.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "tollgate.db")
    with ChangeSignal.beside(DatabaseConfig(url=f"sqlite:///{tmp_path / 'tollgate.db'}")) as changes:
        cache: ExpiringCache[str, str] = ExpiringCache(Loads(), ttl=60, changes=changes)
        linked = ChangeSignal.beside(DatabaseConfig(url=f"sqlite:///{tmp_path / 'link.db'}"))
        seen = cached_twice_then_again(cache, lambda: (linked.open(), linked.bump(), linked.close()))
    assert seen == ["k as read 1", "k as read 2"]


def test_with_the_change_signal_unusable_a_model_group_is_seen_within_auth_cache_ttl(tmp_path: Path):
    # The README bounds how late any change (a group's included) is seen by auth.cache_ttl
    # should the signal's file be unusable; 0 reuses no lookup at all.
    server = Tollgate(tmp_path, "http://127.0.0.1:9", "unused", auth={"cache_ttl": 0})
    (tmp_path / f"{server.database.name}-changes").mkdir()  # the signal's file cannot be made
    server.start()
    try:
        team = server.admin().team()
        client = server.client(team.key)
        assert client.get("/v1/models/LateGroup").status_code == 404  # no such group, as read now

        async def created_by_a_process_whose_signal_never_came() -> None:
            store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{server.database}"))
            await store.open()
            try:
                await store.put_model_group("LateGroup", ["primary"], "")
            finally:
                await store.close()

        asyncio.run(created_by_a_process_whose_signal_never_came())
        response = client.get("/v1/models/LateGroup")
        assert response.status_code == 403, response.text  # it exists now; the team is not granted it
    finally:
        server.stop()


def test_fresh_gives_what_get_would_answer_without_loading_and_nothing_else():
    async def run() -> list[object]:
        loads = Loads()
        changes = ChangeSignal()
        now = [100.0]
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=1, changes=changes, clock=lambda: now[0])
        seen: list[object] = [cache.fresh("k")]  # never read
        value = await cache.get("k")
        seen += [cache.fresh("k"), value]
        changes.bump()
        seen.append(cache.fresh("k"))  # a change signalled
        await cache.get("k")
        now[0] += 1
        seen.append(cache.fresh("k"))  # expired
        seen.append(loads.count)
        return seen

    assert asyncio.run(run()) == [None, (101.0, "k as read 1"), "k as read 1", None, None, 2]


def test_a_lookup_is_read_again_from_the_instant_its_ttl_runs_out():
    async def run() -> tuple[str, int]:
        loads = Loads()
        now = [100.0]
        cache: ExpiringCache[str, str] = ExpiringCache(loads, ttl=1, changes=ChangeSignal(), clock=lambda: now[0])
        await cache.get("k")
        now[0] += 1
        return await cache.get("k"), loads.count

    assert asyncio.run(run()) == ("k as read 2", 2)


class NoGroups:
    """The store as GroupCatalog reads it, knowing no group; its reads counted."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_model_group(self, name: str) -> ModelGroup | None:
        self.reads += 1
        return None


def test_a_name_no_model_group_can_have_is_neither_read_nor_kept():
    # GET /v1/models/{model} looks up whatever its path names, up to a 64 KiB head: each such
    # name was kept until 10,000 of them filled the cache, over 600 MB a client could fill.
    async def run() -> tuple[list[ModelGroup | None], int, list[str]]:
        store = NoGroups()
        groups = GroupCatalog(store, ChangeSignal(), ttl=60)  # type: ignore[arg-type]
        found = [await groups.get(name) for name in ("x" * 60_000, "no group", "-Main", "Main\n")]
        await groups.get("Unknown")  # a name a group may have: read, and kept as ever
        return found, store.reads, list(groups._entries)

    assert asyncio.run(run()) == ([None] * 4, 1, ["Unknown"])


def on_a_full_filesystem(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """`code` run by Python in a directory (argv[1]) on a filesystem of its own, full before it
    runs: a tmpfs in a mount namespace of its own (unprivileged, through a user namespace)."""
    import shutil

    import pytest

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    directory = tmp_path / "full"
    directory.mkdir()
    fill = (
        "import os, sys\n"
        "fd = os.open(os.path.join(sys.argv[1], 'filler'), os.O_WRONLY | os.O_CREAT)\n"
        "try:\n"
        "    while True: os.write(fd, bytes(4096))\n"
        "except OSError: pass\n"
    )
    script = f'mount -t tmpfs -o size=64k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no unprivileged mount namespaces here")
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(directory), sys.executable, fill + code],
        capture_output=True, text=True, timeout=60,
    )


def test_a_signal_whose_file_finds_the_disk_full_says_so_rather_than_killing_its_process(tmp_path: Path):
    # The file was made by ftruncate alone, a page with no room on disk yet: its first stamp,
    # written through the map on a full disk, killed the process with SIGBUS (`serve` on a
    # full disk died so, with no word of why).
    done = on_a_full_filesystem(tmp_path, (
        "from proxy.changes import ChangeSignal\n"
        "from proxy.config import DatabaseConfig\n"
        "with ChangeSignal.beside(DatabaseConfig(url='sqlite:///' + sys.argv[1] + '/tollgate.db')) as changes:\n"
        "    before = changes.stamp(); changes.bump(); assert changes.stamp() != before\n"
        "print('bumped')\n"
    ))
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout == "bumped\n"
    assert "tollgate.db-changes: No space left on device" in done.stderr and "within auth.cache_ttl" in done.stderr


def test_a_group_a_starting_worker_creates_from_the_file_is_seen_at_once_by_the_others(tmp_path: Path, fake_url: str):
    # A worker uvicorn starts again after a crash creates a declared group deleted meanwhile;
    # the other workers had found it absent, and would refuse it for all of auth.cache_ttl.
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tollgate_config(tmp_path / "tollgate.db", upstream={"url": fake_url})))
    config = load_config(str(config_path), env={})

    async def before_and_after() -> list[ModelGroup | None]:
        store = SQLiteStore(config.database)
        await store.open()
        try:
            with ChangeSignal.beside(config.database) as changes:
                groups = GroupCatalog(store, changes, ttl=3600)
                before = await groups.get("Main")
                with TestClient(create_app(config)):
                    pass
                return [before, await groups.get("Main")]
        finally:
            await store.close()

    before, after = asyncio.run(before_and_after())
    assert before is None and after is not None and after.name == "Main"
