"""Session-wide real services: a fake OpenAI-compatible upstream, a real LiteLLM
Proxy in front of it (started once: it takes seconds), and a Tollgate serving
the tests that need no special configuration. Each test gets its own team."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Iterator

import aiosqlite
import pytest

from tests.support import Admin, LiteLLM, TeamKey, Tollgate, fake_upstream, litellm_proxy


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def fake_url(workdir: Path) -> Iterator[str]:
    with fake_upstream(workdir) as url:
        yield url


@pytest.fixture(scope="session")
def litellm(workdir: Path, fake_url: str) -> Iterator[LiteLLM]:
    with litellm_proxy(workdir, fake_url) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def tollgate(workdir: Path, litellm: LiteLLM) -> Iterator[Tollgate]:
    server = Tollgate(workdir, litellm.url, litellm.master_key, name="shared").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def admin(tollgate: Tollgate) -> Admin:
    return tollgate.admin()


@pytest.fixture
def team(admin: Admin) -> TeamKey:
    """A fresh organization, team (10 credits, group 'Main') and key."""
    return admin.team()


@pytest.fixture
def make_tollgate(tmp_path: Path, litellm: LiteLLM) -> Iterator:
    """Start Tollgate processes with a configuration of the test's own."""
    started: list[Tollgate] = []

    def make(upstream_url: str | None = None, upstream_key: str | None = None, **kwargs) -> Tollgate:
        server = Tollgate(
            tmp_path, upstream_url or litellm.url, upstream_key or litellm.master_key, **kwargs
        )
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def pytest_unconfigure(config: pytest.Config) -> None:
    # aiosqlite's thread is no daemon: a test failing with a store open (its connection kept by
    # the traceback) left that thread waiting for work, and pytest hung at exit, never ending red.
    left = [c for c in gc.get_objects() if isinstance(c, aiosqlite.Connection) and c._connection is not None]
    for connection in left:
        connection.stop()  # its thread closes the connection and ends, with no loop needed
    if left:
        print(f"\n{len(left)} database connection(s) left open by the tests, closed at exit", file=sys.stderr)
