"""The in-process counters and histograms render exactly as prometheus-client's own would."""

import asyncio
import re
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy import instruments
from proxy.metrics import LATENCY_BUCKETS

CREATED = re.compile(rb"(_created\{[^}]*\}) [0-9.e+]+")


def rendered(make, observations) -> bytes:
    """The text of one metric made by `make(registry, shared)` after `observations`, both ways;
    the creation times (a clock reading each) blanked."""
    texts = []
    for shared in (True, False):
        registry = CollectorRegistry(auto_describe=True)
        metric = make(registry, shared)
        for method, labels, amount in observations:
            getattr(metric, method)(labels, amount)
        texts.append(CREATED.sub(rb"\1 T", generate_latest(registry)))
    assert texts[0] == texts[1]
    return texts[1]


def test_a_local_counter_renders_as_prometheus_clients_counter():
    def make(registry, shared):
        return instruments.counter("t_tokens_total", "Tokens", ("team", "type"), registry, shared)

    text = rendered(make, [
        ("inc", ("acme", "prompt"), 12), ("inc", ("acme", "completion"), 3), ("inc", ("acme", "prompt"), 0.5),
        ("inc", ("beta", "prompt"), 1),
    ])
    assert b't_tokens_total{team="acme",type="prompt"} 12.5' in text
    assert b"_created" in text


def test_a_local_histogram_renders_as_prometheus_clients_histogram():
    def make(registry, shared):
        return instruments.histogram("t_seconds", "Time", ("route",), LATENCY_BUCKETS, registry, shared)

    # Below the first bound, exactly on bounds, between them, past the last, and zero.
    amounts = [0.001, 0.005, 0.0051, 0.25, 1, 299.9, 300, 301, 1e9, 0.0]
    text = rendered(make, [("observe", ("/a",), amount) for amount in amounts] + [("observe", ("/b",), 0.07)])
    assert b't_seconds_bucket{le="+Inf",route="/a"} 10.0' in text
    assert b't_seconds_bucket{le="0.005",route="/a"} 3.0' in text


def test_counters_refuse_a_negative_amount_as_prometheus_clients_do():
    registry = CollectorRegistry()
    counter = instruments.counter("t_total", "T", ("a",), registry, shared=False)
    with pytest.raises(ValueError):
        counter.inc(("x",), -1)


def test_no_created_series_when_prometheus_client_is_told_not_to_export_them():
    from prometheus_client.metrics import disable_created_metrics, enable_created_metrics

    def make(registry, shared):
        return instruments.counter("t_calls_total", "Calls", ("a",), registry, shared)

    disable_created_metrics()
    try:
        assert b"_created" not in rendered(make, [("inc", ("x",), 1)])
    finally:
        enable_created_metrics()


def test_a_scrape_goes_on_without_the_balances_when_the_store_cannot_be_read():
    from proxy.metrics import Metrics
    from proxy.store import StoreUnavailable

    async def unreadable() -> list[tuple[str, int]]:
        raise StoreUnavailable("disk I/O error")

    metrics = Metrics(team_label=True)
    metrics.observe_job("t", "created")
    text = asyncio.run(metrics.render(unreadable)).decode()
    assert 'tollgate_jobs_total{status="created",team="t"} 1.0' in text
    assert "tollgate_credits_remaining" not in text


def test_the_latency_buckets_reach_the_longest_a_call_may_last_by_default():
    from proxy.config import UpstreamTimeouts

    assert LATENCY_BUCKETS[-1] >= UpstreamTimeouts().total


def test_a_scrape_of_several_workers_names_the_same_families_as_one_process_before_any_sample(
    tmp_path, monkeypatch
):
    # prometheus-client's multiprocess mode renders only what some process's file holds: a counter
    # nobody has incremented yet (no call rate limited so far) had no HELP/TYPE with --workers, as it
    # has with one process.
    from prometheus_client import values
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.metrics import MULTIPROC_ENV, Metrics

    async def no_teams() -> list[tuple[str, int]]:
        return []

    def families(text: bytes) -> list[tuple[str, str, str]]:
        return sorted((f.name, f.type, f.documentation) for f in text_string_to_metric_families(text.decode()))

    one_process = families(asyncio.run(Metrics().render(no_teams)))
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    metrics = Metrics()
    metrics.observe_request("/health/live", "GET", 200, 0.001)
    assert families(asyncio.run(metrics.render(no_teams))) == one_process


def many_teams(count: int):
    from proxy.metrics import Metrics

    metrics = Metrics(team_label=True)
    for n in range(count):
        metrics.observe_call(f"team-{n}", "fast", "m", "success", False, 10, 5, 0.001, 0.5, None, 1)
    return metrics


async def balances_of(count: int) -> list[tuple[str, int]]:
    return [(f"team-{n}", 100) for n in range(count)]


def test_the_event_loop_goes_on_while_a_large_scrape_is_rendered():
    # A fleet of 10,000 teams renders to megabytes: on the event loop that held every request in
    # flight for seconds, once per scrape interval.
    metrics = many_teams(5000)

    async def run() -> int:
        rendering = asyncio.ensure_future(metrics.render(lambda: balances_of(5000)))
        turns = 0
        while not rendering.done():
            turns += 1
            await asyncio.sleep(0)
        assert b'tollgate_llm_calls_total{model="m"' in await rendering
        return turns

    assert asyncio.run(run()) > 20  # on the loop, the scrape left it two turns: its awaits


def test_series_added_while_a_scrape_is_rendered_leave_it_whole():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = many_teams(3000)

    async def run() -> bytes:
        rendering = asyncio.ensure_future(metrics.render(lambda: balances_of(3000)))
        n = 3000
        while not rendering.done():
            metrics.observe_call(f"team-{n}", "fast", "m", "success", True, 10, 5, 0.001, 0.5, 0.1, 1)
            metrics.observe_request("/v1/chat/completions", "POST", 200, 0.5)
            n += 1
            await asyncio.sleep(0)
        return await rendering

    text = asyncio.run(run()).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    calls = [s for s in families["tollgate_llm_calls"].samples if s.name.endswith("_total")]
    assert len(calls) >= 3000
    for sample in families["tollgate_request_duration_seconds"].samples:
        if sample.name.endswith("_count"):
            infinite = [s for s in families["tollgate_request_duration_seconds"].samples
                        if s.name.endswith("_bucket") and s.labels.get("le") == "+Inf"]
            assert infinite[0].value == sample.value  # a histogram's buckets and count agree


def test_scrapes_that_come_while_one_is_rendered_share_its_text(monkeypatch):
    # Each rendered in the thread pool of its own, a scraper retrying on a slow render piled
    # renders up there, where the store's reads wait too.
    import proxy.metrics

    metrics, renders = many_teams(2000), []
    render = proxy.metrics._render

    def counted(*args):
        renders.append(1)
        return render(*args)

    monkeypatch.setattr(proxy.metrics, "_render", counted)

    async def run() -> list[bytes]:
        return await asyncio.gather(*(metrics.render(lambda: balances_of(2000)) for _ in range(5)))

    texts = asyncio.run(run())
    assert len(renders) == 1 and len(set(texts)) == 1


def rendered_families(metrics) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    async def no_teams() -> list[tuple[str, int]]:
        return []

    text = asyncio.run(metrics.render(no_teams)).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_request_latency_buckets_tell_an_answer_under_a_millisecond_from_one_of_a_few():
    # Most answers but the calls' (a key refused, a job read, a limit hit, a health probe) take
    # well under a millisecond: with 5 ms as the first bound every one of them fell in it, and a
    # quantile of them read as a few milliseconds whatever they really took.
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_request("/api/jobs/{job_id}", "GET", 200, 0.0003)
    metrics.observe_request("/api/jobs/{job_id}", "GET", 200, 0.004)
    family = rendered_families(metrics)["tollgate_request_duration_seconds"]
    counts = [s.value for s in family.samples if s.name.endswith("_bucket")]
    assert 1.0 in counts  # a bound that holds the first answer and not the second


def test_the_time_to_first_token_buckets_reach_the_longest_a_call_may_last_by_default():
    # A stream's first event may come as late as upstream.timeouts.first_byte after the request
    # (120 s; a reasoning model's first token often takes minutes), and after the models the
    # group tried before it: past the last bound, histogram_quantile reads it as that bound.
    from proxy.config import UpstreamTimeouts
    from proxy.metrics import TTFT_BUCKETS

    assert TTFT_BUCKETS[-1] >= UpstreamTimeouts().total


@pytest.mark.parametrize("name, low", [("LATENCY_BUCKETS", 1.0), ("TTFT_BUCKETS", 0.5)])
def test_the_latency_buckets_are_at_most_half_again_apart_up_to_two_minutes(name, low):
    # An LLM call's latency and first token lie between about a second and two minutes: with 2.5,
    # 5 and 10 s as neighbours, a steady 2 s read as 4.8 s at the 95th percentile.
    import proxy.metrics

    bounds = [bound for bound in getattr(proxy.metrics, name) if low <= bound <= 120]
    assert bounds[0] == low and bounds[-1] == 120
    assert all(later <= 1.5 * earlier for earlier, later in zip(bounds, bounds[1:])), bounds


def test_a_method_outside_the_usual_few_is_counted_as_unknown():
    # As the HTTP layer counts the requests it refuses: a client choosing among the dozens of
    # methods the parser knows (PROPFIND, MKCALENDAR, ...) made a series of each on every route.
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_request("/health/live", "PROPFIND", 405, 0.001)
    samples = rendered_families(metrics)["tollgate_requests"].samples
    assert {s.labels["method"] for s in samples} == {"unknown"}


def test_the_duration_buckets_reach_a_longer_call_total_configured():
    # upstream.timeouts.total of half an hour (long reasoning calls): a call of 20 minutes fell in
    # +Inf alone, and histogram_quantile read it as the 600 s bound.
    from proxy.metrics import Metrics

    metrics = Metrics(longest_call=1800.0)
    metrics.observe_call("t", "ChatAgent", "m", "success", True, 1, 1, 0.0, 1200.0, 1200.0, 1)
    families = rendered_families(metrics)
    for name in ("tollgate_upstream_latency_seconds", "tollgate_time_to_first_token_seconds"):
        buckets = {s.labels["le"]: s.value for s in families[name].samples if s.name.endswith("_bucket")}
        assert buckets["1800.0"] == 1.0 and buckets["600.0"] == 0.0


def test_the_time_to_first_token_histogram_holds_the_first_tokens_time_not_the_calls():
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_call("t", "ChatAgent", "m", "success", True, 1, 1, 0.0, 20.0, 0.25, 1)
    samples = rendered_families(metrics)["tollgate_time_to_first_token_seconds"].samples
    assert [s.value for s in samples if s.name.endswith("_sum")] == [0.25]


def test_the_latency_and_fallback_series_are_labelled_with_the_model_group_alone():
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_call("team-a", "ChatAgent", "m", "success", True, 1, 1, 0.0, 2.0, 0.25, 2)
    families = rendered_families(metrics)
    for name in ("tollgate_upstream_latency_seconds", "tollgate_time_to_first_token_seconds", "tollgate_fallbacks"):
        assert {s.labels["model_group"] for s in families[name].samples} == {"ChatAgent"}, name


def test_calls_of_two_teams_in_one_group_are_counted_under_each_team():
    from proxy.metrics import Metrics

    metrics = Metrics()
    for team in ("team-a", "team-b"):
        metrics.observe_call(team, "ChatAgent", "m", "success", False, 3, 2, 0.01, 1.0, None, 1)
    families = rendered_families(metrics)
    for name in ("tollgate_llm_calls", "tollgate_tokens", "tollgate_cost_usd"):
        teams = {s.labels["team"]: s.value for s in families[name].samples if s.name == name + "_total"}
        assert set(teams) == {"team-a", "team-b"}, name


def test_each_duration_bound_is_named_once_when_the_longest_call_is_the_last_bound():
    # upstream.timeouts.total of 600 s, the default, is already the last bound: named twice, the
    # bucket was two series of one name and labels, a sample Prometheus refuses.
    from proxy.metrics import LATENCY_BUCKETS, Metrics

    metrics = Metrics(longest_call=LATENCY_BUCKETS[-1])
    metrics.observe_request("/health/live", "GET", 200, 0.001)
    metrics.observe_call("t", "ChatAgent", "m", "success", True, 1, 1, 0.0, 1.0, 0.5, 1)
    families = rendered_families(metrics)
    for name in ("tollgate_request_duration_seconds", "tollgate_upstream_latency_seconds",
                 "tollgate_time_to_first_token_seconds"):
        bounds = [s.labels["le"] for s in families[name].samples if s.name.endswith("_bucket")]
        assert len(bounds) == len(set(bounds)), name


def test_the_balances_are_read_from_the_store_once_within_the_credits_cache():
    from proxy.metrics import Metrics

    reads = []

    async def balances() -> list[tuple[str, int]]:
        reads.append(1)
        return [("t", 5)]

    async def scrape_twice() -> None:
        metrics = Metrics(credits_ttl=60.0)
        for _ in range(2):
            assert b'tollgate_credits_remaining{team="t"} 5.0' in await metrics.render(balances)

    asyncio.run(scrape_twice())
    assert len(reads) == 1


@pytest.mark.parametrize("method", ["inc", "observe"])
def test_a_series_keeps_the_creation_time_of_its_first_observation(method):
    # A `_created` that moved with every observation reads as a counter reset each time.
    registry = CollectorRegistry()
    if method == "inc":
        metric = instruments.counter("t_calls_total", "Calls", ("a",), registry, shared=False)
    else:
        metric = instruments.histogram("t_seconds", "Time", ("a",), LATENCY_BUCKETS, registry, shared=False)

    def created() -> bytes:
        return re.findall(rb"_created\{[^}]*\} (\S+)", generate_latest(registry))

    getattr(metric, method)(("x",), 1)
    first = created()
    time.sleep(0.05)
    getattr(metric, method)(("x",), 1)
    assert created() == first


def test_a_request_the_app_fails_before_answering_is_counted_as_a_500():
    from proxy.metrics import Metrics
    from proxy.observe import ObserveMiddleware

    async def failing(scope, receive, send):
        raise RuntimeError("a fault before any answer")

    metrics = Metrics()
    middleware = ObserveMiddleware(failing, metrics, log_format="off")
    with pytest.raises(RuntimeError):
        asyncio.run(middleware({"type": "http", "method": "GET", "path": "/x"}, None, None))
    samples = rendered_families(metrics)["tollgate_requests"].samples
    assert {s.labels["status"] for s in samples if s.name == "tollgate_requests_total"} == {"500"}


def test_a_request_the_app_failed_no_longer_counts_as_running():
    # The shutdown waits for the requests still running before it closes the store.
    from proxy.metrics import Metrics
    from proxy.observe import ObserveMiddleware

    async def failing(scope, receive, send):
        raise RuntimeError("a fault before any answer")

    middleware = ObserveMiddleware(failing, Metrics(), log_format="off")
    with pytest.raises(RuntimeError):
        asyncio.run(middleware({"type": "http", "method": "GET", "path": "/x"}, None, None))
    assert middleware.running.count == 0


def test_a_streamed_call_is_counted_under_stream_true_and_a_plain_one_under_false():
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_call("t", "ChatAgent", "m", "success", True, 1, 1, 0.0, 1.0, 0.5, 1)
    metrics.observe_call("t", "ChatAgent", "m", "success", False, 1, 1, 0.0, 1.0, None, 1)
    metrics.observe_call("t", "ChatAgent", "m", "success", False, 1, 1, 0.0, 1.0, None, 1)
    samples = rendered_families(metrics)["tollgate_llm_calls"].samples
    assert {s.labels["stream"]: s.value for s in samples if s.name == "tollgate_llm_calls_total"} == {
        "true": 1.0, "false": 2.0,
    }


def test_a_call_that_reached_no_model_is_counted_under_model_none():
    # As the sweep counts an interrupted call: an empty label value reads as no label at all.
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_call("t", "ChatAgent", None, "failed", False, 0, 0, 0.0, 0.1, None, 1)
    samples = rendered_families(metrics)["tollgate_llm_calls"].samples
    assert {s.labels["model"] for s in samples if s.name == "tollgate_llm_calls_total"} == {"none"}


def test_a_histograms_snapshot_keeps_the_values_it_was_taken_with():
    # A scrape renders its snapshot in another thread while the loop goes on observing.
    registry = CollectorRegistry()
    histogram = instruments.histogram("t_seconds", "Time", ("a",), LATENCY_BUCKETS, registry, shared=False)
    histogram.observe(("x",), 1.0)
    taken = histogram.snapshot()  # type: ignore[attr-defined]
    histogram.observe(("x",), 2.0)
    (metric,) = taken.collect()
    assert [(s.name, s.value) for s in metric.samples if s.name in ("t_seconds_count", "t_seconds_sum")] == [
        ("t_seconds_count", 1.0), ("t_seconds_sum", 1.0),
    ]


def test_a_refusal_is_counted_under_the_limit_that_refused_it():
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_rate_limited("t", "tokens")
    samples = rendered_families(metrics)["tollgate_rate_limited"].samples
    assert {s.labels["limit"] for s in samples if s.name == "tollgate_rate_limited_total"} == {"tokens"}


def test_each_of_the_usual_methods_is_counted_by_its_name():
    from proxy.metrics import Metrics

    metrics = Metrics()
    usual = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    for method in usual:
        metrics.observe_request("/x", method, 405, 0.001)
    samples = rendered_families(metrics)["tollgate_requests"].samples
    assert {s.labels["method"] for s in samples if s.name == "tollgate_requests_total"} == set(usual)


def test_the_first_scrape_reads_the_balances_however_recently_the_machine_started(monkeypatch):
    # time.monotonic() counts from boot: a machine up for less than metrics.credits_cache read
    # "never fetched" (time 0) as fetched just now, and served no balances until then.
    import types

    from proxy import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "time", types.SimpleNamespace(monotonic=lambda: 2.0))

    async def balances() -> list[tuple[str, int]]:
        return [("t", 5)]

    text = asyncio.run(metrics_module.Metrics(credits_ttl=5.0).render(balances))
    assert b'tollgate_credits_remaining{team="t"} 5.0' in text


def workers_metrics(tmp_path, monkeypatch):
    """Metrics as a worker of `serve --workers` makes them: prometheus-client's multiprocess
    mode, in a directory of their own, no file of this process's opened but the live gauge's."""
    from prometheus_client import values

    from proxy.metrics import MULTIPROC_ENV, Metrics

    directory = tmp_path / "metrics"
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    return Metrics(), directory


def test_a_worker_whose_metrics_directory_was_removed_goes_on_counting_nothing(tmp_path, monkeypatch, caplog):
    # Its first count of a kind (a counter's file, a histogram's) raised FileNotFoundError inside
    # the call: a 500 to the client, after the call's job was made.
    import shutil

    metrics, directory = workers_metrics(tmp_path, monkeypatch)
    shutil.rmtree(directory)
    metrics.observe_job("team-a", "created")
    metrics.observe_call("team-a", "fast", "m", "success", False, 10, 5, 0.001, 0.5, 0.1, 2)
    metrics.observe_request("/v1/chat/completions", "POST", 200, 0.5)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tollgate.metrics"]
    assert f"the workers' metrics directory {directory} is gone" in line and "until serve is restarted" in line


def test_a_scrape_of_workers_whose_metrics_directory_was_removed_says_so(tmp_path, monkeypatch):
    # Each scrape was a 500 and a traceback in the log.
    import shutil

    from proxy.metrics import MetricsUnavailable

    metrics, directory = workers_metrics(tmp_path, monkeypatch)
    shutil.rmtree(directory)

    async def no_teams() -> list[tuple[str, int]]:
        return []

    with pytest.raises(MetricsUnavailable, match=f"the workers' metrics directory {directory} is gone"):
        asyncio.run(metrics.render(no_teams))


def test_a_scrape_that_meets_another_workers_file_being_made_renders_what_is_counted(tmp_path, monkeypatch):
    # prometheus-client makes a worker's file empty, then sizes it: a scrape by another worker
    # in between (a worker's first count, as it starts or is started again) failed reading it,
    # a 500 and a traceback in the log (seen with `serve --workers 3`, a worker killed under load).
    metrics, directory = workers_metrics(tmp_path, monkeypatch)
    metrics.observe_request("/health/live", "GET", 200, 0.001)
    (directory / "counter_4242.db").touch()  # another worker's, as it is being made
    samples = rendered_families(metrics)["tollgate_requests"].samples
    assert [s.value for s in samples if s.name == "tollgate_requests_total"] == [1.0]


def test_a_scrape_after_the_last_one_ended_renders_what_was_counted_since():
    # Scrapes share a render only while it runs: one that came later was given the old text.
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_request("/health/live", "GET", 200, 0.001)
    first = rendered_families(metrics)["tollgate_requests"].samples
    metrics.observe_request("/health/live", "GET", 200, 0.001)
    second = rendered_families(metrics)["tollgate_requests"].samples
    assert [s.value for s in first if s.name == "tollgate_requests_total"] == [1.0]
    assert [s.value for s in second if s.name == "tollgate_requests_total"] == [2.0]


def test_a_scraper_that_hangs_up_leaves_the_shared_render_to_the_others():
    from proxy.metrics import Metrics

    metrics = Metrics()

    async def run() -> bytes:
        answer = asyncio.Event()

        async def slow_balances() -> list[tuple[str, int]]:
            await answer.wait()
            return [("t", 5)]

        gone = asyncio.create_task(metrics.render(slow_balances))
        staying = asyncio.create_task(metrics.render(slow_balances))
        await asyncio.sleep(0.01)  # both wait on the one render
        gone.cancel()
        await asyncio.sleep(0.01)
        answer.set()
        return await asyncio.wait_for(staying, 30)

    assert b'tollgate_credits_remaining{team="t"} 5.0' in asyncio.run(run())


def test_a_call_a_sweep_closed_as_interrupted_is_counted_as_cancelled_under_model_none():
    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.observe_interrupted_call("t", "ChatAgent", True)
    samples = rendered_families(metrics)["tollgate_llm_calls"].samples
    assert [(s.labels, s.value) for s in samples if s.name == "tollgate_llm_calls_total"] == [
        ({"team": "t", "model_group": "ChatAgent", "model": "none", "status": "cancelled", "stream": "true"}, 1.0)
    ]


def test_without_the_team_label_a_scrape_neither_reads_nor_shows_the_balances():
    # metrics.team_label: false is for fleets too large for a series per team.
    from proxy.metrics import Metrics

    reads = []

    async def balances() -> list[tuple[str, int]]:
        reads.append(1)
        return [("t", 5)]

    text = asyncio.run(Metrics(team_label=False).render(balances))
    assert b"tollgate_credits_remaining" not in text and reads == []


def test_the_label_values_kept_for_teams_and_groups_are_bounded(monkeypatch):
    # Teams and groups come and go: a long-lived process must not keep every pair it ever saw.
    import proxy.metrics
    from proxy.metrics import Metrics

    monkeypatch.setattr(proxy.metrics, "MAX_CACHED_LABELS", 3)
    metrics = Metrics()
    for team in range(10):
        metrics.observe_call(f"t{team}", "ChatAgent", "m", "success", False, 1, 1, 0.0, 1.0, None, 1)
    assert len(metrics._call_label_cache) <= 3


def test_a_request_the_shutdown_cuts_after_its_answer_began_is_cut_not_answered_again():
    # Its head is sent: a 503 after it would be a second answer on the one response.
    from proxy.metrics import Metrics
    from proxy.observe import ObserveMiddleware

    sent: list[dict] = []

    async def streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.Event().wait()  # a stream, until the shutdown cancels it

    async def send(message):
        sent.append(message)

    metrics = Metrics()
    middleware = ObserveMiddleware(streaming, metrics, log_format="off")

    async def run() -> None:
        request = asyncio.create_task(middleware({"type": "http", "method": "GET", "path": "/x"}, None, send))
        await asyncio.sleep(0.01)
        request.cancel()
        await request

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200]
    samples = rendered_families(metrics)["tollgate_requests"].samples
    assert {s.labels["status"] for s in samples if s.name == "tollgate_requests_total"} == {"200"}


def test_a_request_the_shutdown_cuts_before_its_answer_is_answered_503_and_goes_on_uncancelled():
    # Answered rather than cut: what runs after it in the request's task (uvicorn's own end of
    # the response) must not be cancelled in turn.
    from proxy.metrics import Metrics
    from proxy.observe import ObserveMiddleware

    sent: list[dict] = []

    async def waiting(scope, receive, send):
        await asyncio.Event().wait()  # the upstream has not answered yet

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    metrics = Metrics()
    middleware = ObserveMiddleware(waiting, metrics, log_format="off")
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}

    async def request() -> int:
        await middleware(scope, receive, send)
        return asyncio.current_task().cancelling()  # type: ignore[union-attr]

    async def run() -> int:
        task = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    assert asyncio.run(run()) == 0
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [503]
    samples = rendered_families(metrics)["tollgate_requests"].samples
    assert {s.labels["status"] for s in samples if s.name == "tollgate_requests_total"} == {"503"}


def test_the_shutdown_waits_for_the_requests_still_running_to_end():
    from proxy.observe import RunningRequests

    running = RunningRequests()
    running.count = 1

    async def run() -> float:
        async def end_soon() -> None:
            await asyncio.sleep(0.1)
            running.count = 0

        ending = asyncio.create_task(end_soon())
        started = time.monotonic()
        await running.drain(timeout=30)
        waited = time.monotonic() - started
        await ending
        return waited

    assert 0.09 <= asyncio.run(run()) < 5
