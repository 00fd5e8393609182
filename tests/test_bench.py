"""The benchmark still works: its smoke mode runs end to end (timings are not asserted)."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

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
    assert "kernel threads ms/req (whole VM)" in result.stdout
    assert "Disk under the store: a 4 KiB fdatasync takes" in result.stdout
    assert "Against the targets of issue 7" in result.stdout


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_cpu_counted_for_a_server_includes_its_worker_processes():
    bench = load_bench()
    # A supervisor that does nothing itself, and a worker that burns half a second, then waits.
    worker = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(60)"
    supervisor = subprocess.Popen([PYTHON, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}])"])
    try:
        deadline = time.monotonic() + 20
        while bench.cpu_seconds(supervisor.pid) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bench.cpu_seconds(supervisor.pid) >= 0.5
        assert len(bench.process_tree(supervisor.pid)) == 2
    finally:
        for pid in bench.process_tree(supervisor.pid):
            os.kill(pid, signal.SIGKILL)
        supervisor.wait()


def test_a_kernel_thread_that_exits_during_a_slice_takes_none_of_the_slice_with_it(monkeypatch):
    bench = load_bench()
    before = {10: 5.0, 11: 7.0}  # thread 11 exits during the slice, thread 12 starts in it
    monkeypatch.setattr(bench, "kernel_threads", lambda: {10: 5.5, 12: 0.25})
    assert bench.kernel_seconds_since(before) == 0.75


def test_the_disk_probe_times_flushes_where_the_store_is_and_leaves_nothing_behind(tmp_path):
    bench = load_bench()
    busy, idle = bench.disk_flush(tmp_path, 5)
    assert 0 < busy < 10 and 0 < idle < 10
    assert list(tmp_path.iterdir()) == []


def make_venv_record(venv, executable):
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {executable.parent}\nversion = 3.11\nexecutable = {executable}\n")


def unset_litellm_venv(monkeypatch) -> None:
    # Set, then deleted: monkeypatch then undoes what bench sets in os.environ behind its back, which
    # a delenv of an unset variable leaves for every later test (their LiteLLM venv moved to tmp_path).
    monkeypatch.setenv("TOLLGATE_LITELLM_VENV", "")
    monkeypatch.delenv("TOLLGATE_LITELLM_VENV")


def test_litellm_runs_on_the_benchmarks_interpreter_when_its_usual_venv_was_made_from_another(monkeypatch, tmp_path):
    bench = load_bench()
    monkeypatch.setenv("HOME", str(tmp_path))
    usual = bench.litellm_venv()
    make_venv_record(usual, tmp_path / "other" / "python3.11")
    unset_litellm_venv(monkeypatch)
    assert bench.litellm_on_this_interpreter() == bench.interpreter()  # the venv to be made
    chosen = os.environ["TOLLGATE_LITELLM_VENV"]
    assert chosen.startswith(str(usual) + "-") and not os.path.exists(chosen)
    assert (usual / "pyvenv.cfg").exists()  # the usual venv is left as it is


def test_litellm_keeps_its_usual_venv_when_it_was_made_from_the_benchmarks_interpreter(monkeypatch, tmp_path):
    bench = load_bench()
    monkeypatch.setenv("HOME", str(tmp_path))
    usual = bench.litellm_venv()
    make_venv_record(usual, bench.interpreter())
    unset_litellm_venv(monkeypatch)
    assert bench.litellm_on_this_interpreter() == bench.interpreter()
    assert "TOLLGATE_LITELLM_VENV" not in os.environ


def test_a_litellm_venv_chosen_by_the_user_is_kept_and_its_interpreter_reported(monkeypatch, tmp_path):
    bench = load_bench()
    chosen = tmp_path / "mine"
    make_venv_record(chosen, tmp_path / "other" / "python3.11")
    monkeypatch.setenv("TOLLGATE_LITELLM_VENV", str(chosen))
    assert bench.litellm_on_this_interpreter() == (tmp_path / "other" / "python3.11").resolve()
    assert os.environ["TOLLGATE_LITELLM_VENV"] == str(chosen)


def row(mode, concurrency, name, rps=1000.0, p50=0.001, p99=0.002, cpu_ms=0.2):
    return (mode, concurrency, name, {"rps": rps, "p50": p50, "p99": p99, "cpu_ms": cpu_ms})


def test_the_verdict_reads_the_requests_ratio_at_the_highest_concurrency_measured():
    bench = load_bench()
    rows = [
        row("plain", 10, "(b) Tollgate -> upstream", rps=4000), row("plain", 10, "(c) LiteLLM -> upstream", rps=250),
        row("plain", 50, "(b) Tollgate -> upstream", rps=7000), row("plain", 50, "(c) LiteLLM -> upstream", rps=250),
    ]
    [(what, met)] = [v for v in bench.verdict(rows, None, None, 1000) if "20x" in v[0]]
    assert met and "28.0x at concurrency 50; 16.0x at 10" in what


def test_the_verdict_names_a_target_the_run_missed():
    bench = load_bench()
    rows = [row("plain", c, "(b) Tollgate -> upstream", cpu_ms=cpu) for c, cpu in ((1, 0.7), (10, 0.3))]
    [(what, met)] = [v for v in bench.verdict(rows, None, None, 1000) if "CPU" in v[0]]
    assert not met and "0.700 at 1, 0.300 at 10" in what


def test_the_verdict_leaves_out_the_memory_target_when_fewer_streams_were_open():
    bench = load_bench()
    assert not [v for v in bench.verdict([], None, 60.0, 50) if "resident" in v[0]]
    [(what, met)] = [v for v in bench.verdict([], None, 160.0, 1000) if "resident" in v[0]]
    assert not met and "160 MB" in what


def test_the_in_process_benchmark_runs_with_every_part_replaced_and_with_the_store_real():
    # bench/inproc.py (and so bench/instructions.sh and bench/pyfunctions.py) replaces the upstream
    # with bench/ablate.py's stand-in for `forward`, which must take what the real one takes: when
    # forward() gained an argument, the profiling tools failed at their first call.
    for extra in ([], ["--real", "store"]):
        result = subprocess.run(
            [PYTHON, str(REPO / "bench" / "inproc.py"), "--calls", "20", *extra],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "of CPU per call" in result.stdout
