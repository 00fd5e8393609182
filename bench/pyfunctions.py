"""Instructions per call by Python function: bench/inproc.py under callgrind, named by the
interpreter's perf trampolines.

    PYTHON=/path/to/python3.12 .venv/bin/python bench/pyfunctions.py [--rows 60] [inproc.py args]

callgrind counts machine instructions but cannot name Python functions. Python 3.12 and later
run with `-X perf` call each Python function through a trampoline of its own and list them in
/tmp/perf-<pid>.map: callgrind sees each trampoline as a function, and the map names it. A
function's figure is inclusive (what it calls counts too) and is the difference between a run
of 700 calls and one of 200, divided by 500, so start-up and warm-up cancel out. The
interpreter given must have Tollgate and its dependencies installed (a venv of its own); its
figures run about a tenth above 3.11's (bench/RESULTS.md), but their shares are what to read.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"\s*([\d,]+) \([^)]*\)\s+\?\?\?:0x([0-9a-f]+)('\d+)? ")


def costs(python: str, calls: int, extra: list[str]) -> dict[str, int]:
    """Inclusive instructions by Python function (the outermost frame of recursive ones)."""
    with tempfile.TemporaryDirectory(prefix="tollgate-pyfunctions-") as tmp:
        out = Path(tmp) / "callgrind.out"
        process = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             python, "-X", "perf", str(REPO / "bench" / "inproc.py"), "--calls", str(calls), *extra],
            capture_output=True, text=True, cwd=REPO,
        )
        pid = re.search(r"==(\d+)== Callgrind", process.stderr)
        if process.returncode != 0 or pid is None:
            sys.exit(f"callgrind failed:\n{process.stderr[-2000:]}")
        names: dict[int, str] = {}
        perf_map = Path(f"/tmp/perf-{pid.group(1)}.map")
        for line in perf_map.read_text().splitlines():
            address, _, name = line.split(" ", 2)
            names[int(address, 16)] = name.removeprefix("py::")
        perf_map.unlink()
        report = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)], capture_output=True, text=True
        ).stdout
    found: dict[str, int] = {}
    for line in report.splitlines():
        match = ROW.match(line)
        if match and not match.group(3):  # a recursive frame ('2) is inside its outer one
            name = names.get(int(match.group(2), 16))
            if name is not None:
                found[name] = found.get(name, 0) + int(match.group(1).replace(",", ""))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60)
    args, extra = parser.parse_known_args()
    python = os.environ.get("PYTHON")
    if not python:
        parser.error("set PYTHON to a Python 3.12+ interpreter with Tollgate installed")
    small, large = costs(python, 200, extra), costs(python, 700, extra)
    per_call = {name: (large[name] - small.get(name, 0)) / 500 for name in large}
    for name, cost in sorted(per_call.items(), key=lambda item: -item[1])[: args.rows]:
        print(f"{cost:10.0f}  {name}")


if __name__ == "__main__":
    main()
