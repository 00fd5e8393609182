"""How the test suite itself ends: red when a test fails, whatever the test left behind."""

import subprocess

from tests.support import PYTHON, REPO

FAILING_WITH_A_STORE_OPEN = '''
import asyncio

from proxy.config import DatabaseConfig
from proxy.store.sqlite import SQLiteStore

LEFT = []


def test_fails_with_its_store_open(tmp_path):
    async def run():
        store = SQLiteStore(DatabaseConfig(url=f"sqlite:///{tmp_path}/tollgate.db"))
        await store.open()
        LEFT.append(store)
        assert False

    asyncio.run(run())
'''


def test_a_test_failing_with_a_store_open_ends_the_run_red_rather_than_hanging(tmp_path):
    (tmp_path / "test_left_open.py").write_text(FAILING_WITH_A_STORE_OPEN)
    result = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_left_open.py")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 database connection(s) left open by the tests, closed at exit" in result.stderr
