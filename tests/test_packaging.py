"""What `pip install .` (the Dockerfile's install) puts in place: the whole package."""

import shutil
import subprocess
import zipfile

from tests.support import PYTHON, REPO


def build_wheel(into, verbose=False):
    """Built from what the Dockerfile copies, in a directory of its own: a build directory left
    in the source tree by an earlier build would otherwise be packaged as it is. `verbose`: the
    wheel and the build's own output (pip shows the build backend's warnings only then)."""
    source = into / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--verbose" if verbose else "--quiet", "--no-deps",
         "--disable-pip-version-check", "-w", str(into), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = into.glob("tollgate-*.whl")
    return (wheel, result.stdout + result.stderr) if verbose else wheel


def test_the_built_wheel_holds_every_module_of_the_package(tmp_path):
    wheel = build_wheel(tmp_path)
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("proxy/")}
    sources = {str(path.relative_to(REPO)) for path in (REPO / "proxy").rglob("*.py")}
    assert sources - packaged == set()


def test_the_build_uses_nothing_setuptools_has_deprecated(tmp_path):
    # build-system.requires takes the newest setuptools (the Dockerfile's `pip install .` too):
    # what it deprecates today, with a date, a later release refuses, and the image no longer builds.
    _, output = build_wheel(tmp_path, verbose=True)
    assert "SetuptoolsDeprecationWarning" not in output, output[-3000:]


def test_the_installed_package_imports_every_module_away_from_the_source_tree(tmp_path):
    wheel = build_wheel(tmp_path / "wheel")
    site = tmp_path / "site"
    subprocess.run(
        [PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "proxy").rglob("*.py")
        if path.name != "__main__.py"  # runs the command line
    )
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(site)!r}), module.__file__\n"
        "print('imported', len(sys.modules))\n"
    )
    # From elsewhere, the installed copy first: the source tree's own (editable) one must not answer.
    result = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_starlette_required_at_least_names_the_route_a_request_matched():
    # observe.py counts and logs a request under the route template Starlette's router leaves in
    # `scope["route"]`, which it does from 1.7 on: under any Starlette the requirement let in
    # before it, every request but the calls' (health, metrics, jobs, admin) was `unmatched`.
    import tomllib

    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (starlette,) = [r for r in requirements if r.split(">")[0].split("=")[0].strip() == "starlette"]
    floor = starlette.split(">=")[1].split(",")[0].strip()
    assert tuple(int(part) for part in floor.split(".")) >= (1, 7), starlette
