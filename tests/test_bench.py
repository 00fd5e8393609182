"""The benchmark still works: its smoke mode runs end to end (timings are not asserted)."""

import subprocess

from tests.support import PYTHON, REPO


def test_benchmark_smoke_mode_produces_the_whole_table():
    result = subprocess.run(
        [PYTHON, str(REPO / "bench" / "run.py"), "--smoke"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for target in ("(a) direct", "(b) Tollgate -> upstream", "(c) LiteLLM -> upstream", "(d) Tollgate -> LiteLLM"):
        assert target in result.stdout
    assert "| stream | 10 |" in result.stdout and "per streamed chunk" in result.stdout
    assert "open streams" in result.stdout
