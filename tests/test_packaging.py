"""What `pip install .` (the Dockerfile's install) puts in place: the whole package."""

import subprocess
import zipfile

from tests.support import PYTHON, REPO


def test_the_built_wheel_holds_every_module_of_the_package(tmp_path):
    subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("tollgate-*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("proxy/")}
    sources = {str(path.relative_to(REPO)) for path in (REPO / "proxy").rglob("*.py")}
    assert sources - packaged == set()
