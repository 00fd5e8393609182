"""The package's type hints hold: mypy finds nothing (a hint that lies misleads every reader,
and one did hide a transport that kept a buffer its caller was free to reuse)."""

import subprocess

from tests.support import PYTHON, REPO


def test_the_package_type_checks(tmp_path):
    result = subprocess.run(
        [PYTHON, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "proxy"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
