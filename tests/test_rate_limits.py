"""Per-team and per-key RPM/TPM limits: exact across processes, OpenAI headers, Redis failures."""

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import httpx
import openai
import pytest

import proxy.limiter as limiter_module
import proxy.resp as resp_module
from proxy.config import RateLimitsConfig, RedisConfig
from proxy.limiter import (
    Decision, Limits, LocalLimiter, RateLimiter, RedisLimiter, RedisUnavailable, Usage, openai_duration
)
from proxy.resp import Script
from tests.support import RedisServer, Tollgate, fake_log, free_port, tag, wait_for

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "redis"])
def admit(request):
    """One limiter's `admit`, run to its decision: the in-process one, or Redis's script."""
    if request.param == "local":
        yield LocalLimiter(60.0).admit
        return
    server = request.getfixturevalue("redis_server")
    loop = asyncio.new_event_loop()
    limiter = RedisLimiter(RedisConfig(url=server.url), 60.0)
    yield lambda limits, call_id, estimate: loop.run_until_complete(limiter.admit(limits, call_id, estimate))
    loop.run_until_complete(limiter.close())
    loop.close()


@contextlib.contextmanager
def paused(server: RedisServer):
    """Redis stopped mid-flight: it reads nothing and answers nothing until it goes on."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def team_keys(team_id: str) -> str:
    """The head of a team's limiter keys in Redis (the default key prefix); each key adds its part."""
    return f"tollgate:{{team:{team_id}}}:team:{team_id}"


async def open_the_breaker(limiter: RateLimiter, limits: Limits, redis: RedisServer, call_id: str) -> None:
    """An admit while Redis is paused: it times out, the call is admitted locally, the breaker opens."""
    with paused(redis):
        assert (await limiter.admit(limits, call_id, 10)).backend == "local"


async def released_while_the_breaker_is_open(redis: RedisServer, call_id: str) -> tuple[RateLimiter, Limits, Decision]:
    """A call admitted by Redis, then the breaker opened and the call released: the release
    waits for Redis to come back. The breaker closes 0.2 s on."""
    limits = Limits(tag(), "key-a", team_rpm=5, team_tpm=100_000)
    limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis.url, breaker_cooldown=0.2))
    decision = await limiter.admit(limits, call_id, 10)
    await open_the_breaker(limiter, limits, redis, "timed-out")
    await limiter.settle(decision, 0, release=True)  # Redis is not asked while the breaker is open
    return limiter, limits, decision


async def only_the_next_call_counts(limiter: RateLimiter, limits: Limits, redis: RedisServer) -> None:
    """Redis admits the next call, and the team's requests in its window are that call alone."""
    requests = team_keys(limits.team_id) + ":requests"
    assert (await limiter.admit(limits, "after", 10)).backend == "redis"
    assert redis.cli("ZRANGE", requests, "0", "-1").split() == ["after"]
    await limiter.close()


def call(server: Tollgate, key: str, job_id: str, **body) -> httpx.Response:
    with server.client(key) as client:
        return client.post(f"/api/jobs/{job_id}/llm-call", json={"messages": HELLO, **body})


def open_job(server: Tollgate, key: str) -> str:
    return server.client(key).post("/api/jobs/create", json={"job_type": "limits"}).json()["job_id"]


def concurrently(n: int, fn) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


def patient(redis_server: RedisServer) -> dict:
    """Redis settings for a test of what Redis decides: the defaults (0.1 s) give up on a Redis
    that a loaded machine leaves unscheduled that long, and the calls are limited by each
    process's own count instead (on_redis_error)."""
    return {"url": redis_server.url, "connect_timeout": 5, "timeout": 5}


def test_rpm_5_with_20_concurrent_calls_admits_exactly_5(make_tollgate, redis_server):
    server = make_tollgate(redis=patient(redis_server))
    team = server.admin().team(rpm_limit=5)
    job_id = open_job(server, team.key)
    responses = concurrently(20, lambda _: call(server, team.key, job_id))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 15
    for refused in (r for r in responses if r.status_code == 429):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert "5 requests per minute" in refused.json()["detail"]
    # The refused calls counted against nothing.
    assert redis_server.cli("ZCARD", team_keys(team.team_id) + ":requests") == "5"


def test_two_processes_sharing_redis_admit_exactly_the_limit(make_tollgate, redis_server, tmp_path):
    first = make_tollgate(redis=patient(redis_server))
    second = make_tollgate(redis=patient(redis_server), database_file=first.database)
    team = first.admin().team(rpm_limit=10)
    job_id = open_job(first, team.key)
    responses = concurrently(40, lambda i: call((first, second)[i % 2], team.key, job_id))
    assert sum(r.status_code == 200 for r in responses) == 10
    assert sum(r.status_code == 429 for r in responses) == 30


def test_caller_is_admitted_again_as_soon_as_the_window_allows(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url}, rate_limits={"window": "2s"})
    team = server.admin().team(rpm_limit=2)
    job_id = open_job(server, team.key)
    assert [call(server, team.key, job_id).status_code for _ in range(3)] == [200, 200, 429]
    refused_at = time.monotonic()
    assert wait_for(lambda: call(server, team.key, job_id).status_code == 200, timeout=4, interval=0.1)
    assert time.monotonic() - refused_at < 2.5


def test_calls_logged_before_redis_clock_stepped_back_count_for_a_window_not_until_it_catches_up(redis_server):
    # The admit script reads Redis's own clock (TIME, the wall clock of Redis's host). Stepped an
    # hour back (an NTP correction), the calls of the window before were logged an hour ahead of
    # it, and counted until it caught up: a team at its limit was refused for an hour, told to
    # retry in 3601 s.
    team_id = tag()
    limits = Limits(team_id, "key-a", team_rpm=2, team_tpm=1000)
    base = team_keys(team_id)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 1.0)
        assert [(await limiter.admit(limits, f"c{n}", 10)).admitted for n in range(2)] == [True, True]
        for call_id in ("c0", "c1"):  # as if logged on a clock an hour ahead of Redis's now
            for log in ("requests", "tokens"):
                redis_server.cli("ZINCRBY", f"{base}:{log}", "3600000", call_id)
        refused = await limiter.admit(limits, "c2", 10)
        assert not refused.admitted
        assert refused.retry_after is not None and refused.retry_after <= 1.0
        await asyncio.sleep(1.1)
        assert (await limiter.admit(limits, "c3", 10)).admitted
        await limiter.close()

    asyncio.run(run())


def test_tokens_logged_before_redis_clock_stepped_back_count_for_a_window_not_until_it_catches_up(redis_server):
    # As the requests above: a team whose tokens were full as the clock stepped an hour back must
    # not be refused for an hour, told to retry in 3601 s.
    team_id = tag()
    limits = Limits(team_id, "key-a", team_rpm=100, team_tpm=100)
    base = team_keys(team_id)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 1.0)
        assert (await limiter.admit(limits, "c0", 100)).admitted
        for log in ("requests", "tokens"):  # as if logged on a clock an hour ahead of Redis's now
            redis_server.cli("ZINCRBY", f"{base}:{log}", "3600000", "c0")
        refused = await limiter.admit(limits, "c1", 100)
        assert (refused.admitted, refused.refused_kind) == (False, "tokens")
        assert refused.retry_after is not None and refused.retry_after <= 1.0
        await asyncio.sleep(1.1)
        assert (await limiter.admit(limits, "c2", 100)).admitted
        await limiter.close()

    asyncio.run(run())


def test_a_429_names_the_configured_window_not_a_minute(make_tollgate):
    server = make_tollgate(rate_limits={"window": "10s"})
    team = server.admin().team(rpm_limit=1)
    job_id = open_job(server, team.key)
    assert [call(server, team.key, job_id).status_code for _ in range(2)] == [200, 429]
    refused = call(server, team.key, job_id)
    assert "allows 1 requests per 10 s;" in refused.json()["detail"]


def test_a_429_names_a_window_longer_than_a_minute_in_seconds():
    limiter = LocalLimiter(120.0)
    limits = Limits("t1", "key-a", team_rpm=1, team_tpm=100_000)
    limiter.admit(limits, "first", 10)
    message, _ = limiter.admit(limits, "second", 10).refusal(120.0)
    assert "allows 1 requests per 120 s;" in message


def test_success_responses_carry_the_openai_rate_limit_headers(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(rpm_limit=7, tpm_limit=5000)
    job_id = open_job(server, team.key)
    first = call(server, team.key, job_id, max_tokens=100)
    second = call(server, team.key, job_id, max_tokens=100)
    assert first.headers["x-ratelimit-limit-requests"] == "7"
    assert first.headers["x-ratelimit-remaining-requests"] == "6"
    assert second.headers["x-ratelimit-remaining-requests"] == "5"
    assert first.headers["x-ratelimit-limit-tokens"] == "5000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 5000 - 101  # estimate: 1 + max_tokens
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")


def test_streamed_and_openai_answers_carry_the_rate_limit_headers_too(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(rpm_limit=7, tpm_limit=5000)
    job_id = open_job(server, team.key)
    with server.client(team.key) as client:
        streamed = client.post(f"/api/jobs/{job_id}/llm-call-stream", json={"messages": HELLO, "max_tokens": 100})
        plain_v1 = client.post("/v1/chat/completions", json={"model": "Main", "messages": HELLO, "max_tokens": 100})
        streamed_v1 = client.post(
            "/v1/chat/completions", json={"model": "Main", "messages": HELLO, "max_tokens": 100, "stream": True}
        )
    for number, response in enumerate((streamed, plain_v1, streamed_v1), start=1):
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "7"
        assert response.headers["x-ratelimit-remaining-requests"] == str(7 - number)
        assert response.headers["x-ratelimit-limit-tokens"] == "5000"
        assert response.headers["x-ratelimit-reset-tokens"].endswith("s")
        assert response.headers["x-job-id"] and response.headers["x-call-id"]


def test_a_call_refused_after_its_admission_carries_the_rate_limit_headers_without_counting_itself(
    make_tollgate, redis_server
):
    # The job's status is read as the call starts, after its limits admitted it: 409 then.
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(rpm_limit=7, tpm_limit=5000)
    job_id = open_job(server, team.key)
    assert call(server, team.key, job_id, max_tokens=100).status_code == 200
    server.client(team.key).post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status()
    refused = call(server, team.key, job_id, max_tokens=100)
    assert refused.status_code == 409
    assert refused.headers["x-should-retry"] == "false"
    assert refused.headers["x-ratelimit-limit-requests"] == "7"
    assert refused.headers["x-ratelimit-remaining-requests"] == "6"  # the first call only
    assert refused.headers["x-ratelimit-limit-tokens"] == "5000"
    assert refused.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_a_call_refused_after_its_admission_leaves_the_limits_as_if_it_had_never_come(make_tollgate, redis_server):
    # Its request and its token estimate are taken back: the calls after it have them to spend.
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(rpm_limit=7, tpm_limit=5000)
    job_id = open_job(server, team.key)
    server.client(team.key).post(f"/api/jobs/{job_id}/complete", json={"status": "completed"}).raise_for_status()
    assert call(server, team.key, job_id, max_tokens=100).status_code == 409
    answered = call(server, team.key, open_job(server, team.key), max_tokens=100)
    assert answered.status_code == 200
    assert answered.headers["x-ratelimit-remaining-requests"] == "6"  # the answered call only


def test_an_own_job_refused_for_credits_after_admission_carries_the_rate_limit_headers(make_tollgate, redis_server):
    # A /v1 call's own job holds its credit as the call starts, once its limits admitted it.
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(credits=0, rpm_limit=7, tpm_limit=5000)
    with server.client(team.key) as client:
        refused = client.post("/v1/chat/completions", json={"model": "Main", "messages": HELLO, "max_tokens": 100})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_credits"
    assert refused.headers["x-ratelimit-limit-requests"] == "7"
    assert refused.headers["x-ratelimit-remaining-requests"] == "7"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "5000"
    # Without the call, nothing counts: nothing to reset, as a window that never held it says.
    assert (refused.headers["x-ratelimit-reset-requests"], refused.headers["x-ratelimit-reset-tokens"]) == ("0s", "0s")


def test_reset_durations_are_written_as_openai_writes_them_hours_included():
    seconds = (0, 0.0201, 1, 59.2, 360, 3599, 3600, 86400)
    assert [openai_duration(s) for s in seconds] == [
        b"0s", b"21ms", b"1s", b"1m0s", b"6m0s", b"59m59s", b"1h0m0s", b"24h0m0s"
    ]


def test_a_reset_just_short_of_a_second_is_written_as_one_second_not_1000ms():
    # Rounded up to whole milliseconds it is a whole second, which OpenAI writes `1s`.
    assert openai_duration(0.9995) == b"1s"


def test_the_rate_limit_headers_name_the_scope_closest_to_each_limit():
    limits = Limits("t1", "key-a", 100, 10_000, key_rpm=5, key_tpm=1_000_000)
    team = Usage("team", 100, 10, 30.0, 10_000, 9_000, 0.5)
    key = Usage("key", 5, 4, 59.9, 1_000_000, 9_000, 61.0)
    decision = Decision(True, "call-1", limits, 100, "redis", (team, key))
    assert decision.headers() == {
        "x-ratelimit-limit-requests": "5",  # the key has 1 request left, the team 90
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "10000",  # the team has 1,000 tokens left, the key far more
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "500ms",
    }
    assert decision.raw_headers() == [(k.encode(), v.encode()) for k, v in decision.headers().items()]


def test_the_reset_headers_count_from_the_oldest_call_in_the_window(admit):
    # They say when the first call in the way leaves, not the last.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    assert admit(limits, "c0", 10).admitted
    time.sleep(0.5)
    usage = admit(limits, "c1", 10).usage[0]
    assert usage.requests_reset <= 59.75 and usage.tokens_reset <= 59.75  # c0's (59.5), not c1's (60)


def test_the_reset_headers_are_0s_while_nothing_counts(admit):
    # A call that can never fit, on a window that holds nothing: both limits are whole, and reset in
    # 0s, with Redis and in-process alike.
    refused = admit(Limits(tag(), "key-a", team_rpm=10, team_tpm=100), "too-big", 101)
    assert refused.never_fits and refused.retry_after is None
    headers = refused.headers()
    assert (headers["x-ratelimit-reset-requests"], headers["x-ratelimit-reset-tokens"]) == ("0s", "0s")


def test_the_headers_of_a_call_refused_after_its_admission_say_0s_to_reset_when_it_was_all_the_window_held(admit):
    # Counted without the call, which never started, the window holds nothing: its limits are
    # whole and reset in 0s, as a window that never held it says; not in a minute.
    admitted = admit(Limits(tag(), "key-a", team_rpm=10, team_tpm=1000), "never-started", 100)
    headers = admitted.released().headers()
    assert (headers["x-ratelimit-remaining-requests"], headers["x-ratelimit-remaining-tokens"]) == ("10", "1000")
    assert (headers["x-ratelimit-reset-requests"], headers["x-ratelimit-reset-tokens"]) == ("0s", "0s")


def test_a_tpm_limit_overrun_by_real_usage_shows_no_tokens_remaining_not_fewer_than_none():
    # A call's real usage may exceed its estimate, and the limit: the window then holds more tokens
    # than the limit, and x-ratelimit-remaining-tokens says 0, as OpenAI never says less.
    limiter = LocalLimiter(60.0)
    limits = Limits("t1", "key-a", team_rpm=100, team_tpm=1000)
    limiter.settle(limiter.admit(limits, "long", 10), 5000)
    refused = limiter.admit(limits, "next", 10)
    assert (refused.admitted, refused.refused_kind) == (False, "tokens")
    assert refused.headers()["x-ratelimit-remaining-tokens"] == "0"


def test_tpm_refuses_the_third_concurrent_call_and_fits_new_ones_after_reconciliation(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(tpm_limit=1000)
    job_id = open_job(server, team.key)
    slow = {"messages": [{"role": "user", "content": "slow [chunks=5] [delay_ms=300]"}], "max_tokens": 390}
    url = f"{server.url}/api/jobs/{job_id}/llm-call-stream"
    headers = {"Authorization": f"Bearer {team.key}"}
    with httpx.stream("POST", url, json=slow, headers=headers, timeout=30) as a, httpx.stream(
        "POST", url, json=slow, headers=headers, timeout=30
    ) as b:
        assert (a.status_code, b.status_code) == (200, 200)  # ~398 tokens each are now held
        third = call(server, team.key, job_id, max_tokens=390)
        assert third.status_code == 429
        assert "tokens per minute" in third.json()["detail"] and int(third.headers["retry-after"]) >= 1
        a.read(), b.read()
    # Both streams used about 10 tokens each: their estimates gave way to that.
    assert call(server, team.key, job_id, max_tokens=390).status_code == 200
    assert call(server, team.key, job_id, max_tokens=390).status_code == 200


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_the_real_usage_of_a_call_that_outlived_the_window_still_counts(make_tollgate, request, backend):
    # A stream longer than the window: its admission (and estimate) left the window before it
    # ended. Its real usage must still count, or long calls would spend tokens no limit sees.
    redis = {"url": request.getfixturevalue("redis_server").url} if backend == "redis" else {}
    server = make_tollgate(redis=redis, rate_limits={"window": "2s", "default_max_tokens": 1})
    team = server.admin().team(tpm_limit=100)
    job_id = open_job(server, team.key)
    long = {"messages": [{"role": "user", "content": "x [chunks=60] [delay_ms=50]"}]}  # 3 s
    streamed = server.client(team.key).post(f"/api/jobs/{job_id}/llm-call-stream", json=long)
    assert streamed.status_code == 200  # admitted on its estimate: 7 + 1 tokens; it used 63
    refused = call(server, team.key, job_id, max_tokens=50)  # 1 + 50 more would make 114 of 100
    assert refused.status_code == 429 and "tokens per 2 s" in refused.json()["detail"]


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_calls_real_usage_counts_for_a_whole_window_from_its_end(request, backend):
    # Counted from its admission instead, a call ending near the end of its window would count
    # its tokens for a moment only: calls lasting nearly a window would spend many times the TPM.
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(window=1.0), RedisConfig(url=url, connect_timeout=5, timeout=5))
        long_call = await limiter.admit(limits, "long-call", 10)
        await asyncio.sleep(0.7)
        limiter.settle_soon(long_call, 900)  # it ends, having used 900 tokens
        await asyncio.sleep(0.5)  # its admission has left the window; its end has not
        after = await limiter.admit(limits, "after", 200)
        assert (after.backend, after.admitted, after.refused_kind) == (backend, False, "tokens")
        # Its end's window has about 0.5 s left: Redis's clock counts whole milliseconds, and the
        # settle is sent a loop turn after the sleep began, hence the millisecond's slack.
        assert after.retry_after is not None and 0.1 < after.retry_after <= 0.51
        await limiter.close()

    asyncio.run(run())


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_the_tokens_reset_header_is_0s_while_no_token_counts(request, backend):
    # A failed call ends having used no token: the window's tokens are back to the full limit,
    # so they reset in 0s, with Redis and in-process alike (not when its 0 tokens leave).
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    limits = Limits(tag(), "key-a", team_rpm=1, team_tpm=1000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=url, connect_timeout=5, timeout=5))
        failed = await limiter.admit(limits, "failed", 10)
        limiter.settle_soon(failed, 0)
        await asyncio.sleep(0.1)
        refused = await limiter.admit(limits, "next", 10)
        assert (refused.backend, refused.admitted, refused.refused_kind) == (backend, False, "requests")
        headers = refused.headers()
        assert headers["x-ratelimit-remaining-tokens"] == "1000"
        assert headers["x-ratelimit-reset-tokens"] == "0s"
        await limiter.close()

    asyncio.run(run())


def test_a_calls_token_estimate_is_its_text_rounded_up_once_plus_the_default_max_tokens(tollgate, admin):
    # API.md: all message text's characters ÷ 4, rounded up once (6 characters: 2 tokens, not
    # 1 per message), plus rate_limits.default_max_tokens (1,024) when the call sets no max_tokens.
    team = admin.team(tpm_limit=5000)
    messages = [
        {"role": "system", "content": "ab"},
        {"role": "user", "content": [{"type": "text", "text": "ab"}]},
        {"role": "user", "content": "ab"},
    ]
    response = call(tollgate, team.key, open_job(tollgate, team.key), messages=messages)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-tokens"] == str(5000 - (2 + 1024))


def test_a_tool_round_trip_is_estimated_on_the_arguments_of_the_calls_in_its_history_too(tollgate, admin):
    # The model reads its own tool calls again on the next turn: their arguments are text of the
    # prompt, as they were of the answer that made them (counted in its estimate). Left out, an
    # agent whose tools take whole files as arguments was admitted on a fraction of its prompt.
    team = admin.team(tpm_limit=5000)
    arguments = '{"path": "a.txt", "text": "' + "x" * 3000 + '"}'
    messages = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "write", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        # The legacy functions API's round trip, as LiteLLM's tutorial makes it.
        {"role": "assistant", "content": None, "function_call": {"name": "write", "arguments": "{}"}},
        {"role": "function", "name": "write", "content": "ok"},
    ]
    response = call(tollgate, team.key, open_job(tollgate, team.key), messages=messages, max_tokens=1)
    assert response.status_code == 200, response.text
    text = "ab" + arguments + "ok" + "{}" + "ok"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(5000 - (math.ceil(len(text) / 4) + 1))


def test_a_call_that_sets_both_max_tokens_and_max_completion_tokens_is_estimated_on_the_larger(tollgate, admin):
    # API.md estimates on max_tokens; the upstream may honour either one (LiteLLM maps both to
    # some providers' one limit), so a small max_completion_tokens must not hide a large max_tokens.
    for max_tokens, max_completion_tokens in ((1000, 1), (1, 1000)):
        team = admin.team(tpm_limit=5000)
        response = call(tollgate, team.key, open_job(tollgate, team.key),
                        max_tokens=max_tokens, max_completion_tokens=max_completion_tokens)
        assert response.headers["x-ratelimit-remaining-tokens"] == str(5000 - (1 + 1000))


def test_a_call_counts_once_however_many_models_it_tried(tollgate, admin):
    team = admin.team(groups=("Fallback500",), rpm_limit=2, tpm_limit=5000)
    job_id = open_job(tollgate, team.key)
    first = call(tollgate, team.key, job_id, max_tokens=100)
    assert first.status_code == 200 and first.json()["metadata"]["attempts"] == 2
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(5000 - 101)
    assert call(tollgate, team.key, job_id, max_tokens=100).status_code == 200


def test_call_that_can_never_fit_is_429_without_retry_after(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(tpm_limit=1000)
    response = call(server, team.key, open_job(server, team.key), max_tokens=5000)
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.headers["x-should-retry"] == "false"
    assert "can never fit" in response.json()["detail"]


def test_a_call_that_can_never_fit_is_told_so_even_while_the_requests_limit_is_full(admit):
    limits = Limits(tag(), "key-a", team_rpm=1, team_tpm=500)
    assert admit(limits, "small", 10).admitted
    refused = admit(limits, "too-big", 602)  # the window has no request left, and 602 > 500 ever
    assert refused.never_fits and (refused.refused_scope, refused.refused_kind) == ("team", "tokens")
    message, headers = refused.refusal()
    assert "can never fit" in message
    assert "retry-after" not in headers and headers["x-should-retry"] == "false"


def test_a_key_limit_that_can_never_fit_wins_over_the_teams_full_window(admit):
    team_id = tag()
    assert admit(Limits(team_id, "key-b", 100, 1000), "filler", 990).admitted  # another key of the team
    refused = admit(Limits(team_id, "key-a", 100, 1000, key_tpm=300), "too-big", 402)
    assert refused.never_fits and refused.refused_scope == "key"
    message, headers = refused.refusal()
    assert "key 'key-a'" in message and "can never fit" in message
    assert "retry-after" not in headers and headers["x-should-retry"] == "false"


def test_a_team_limit_that_can_never_fit_wins_over_the_keys_full_window_and_its_limit_that_can_neither(admit):
    # The scopes are looked at team first: once one is found that the call can never fit, neither
    # a full window nor a tighter limit of the key's changes what the caller is told.
    team_id = tag()
    assert admit(Limits(team_id, "key-a", 100, 300, key_rpm=1), "filler", 10).admitted
    refused = admit(Limits(team_id, "key-a", 100, 300, key_rpm=1), "too-big", 402)
    assert refused.never_fits and (refused.refused_scope, refused.refused_kind, refused.retry_after) == (
        "team", "tokens", None
    )
    refused = admit(Limits(tag(), "key-b", 100, 300, key_tpm=200), "too-big", 402)
    assert refused.never_fits and refused.refused_scope == "team"
    assert "team '" in refused.refusal()[0]


def test_retry_after_waits_for_the_last_full_limit_not_the_first_found(admit):
    team_id = tag()
    assert admit(Limits(team_id, "key-b", 100, 1000), "filler", 990).admitted
    time.sleep(1.0)
    assert admit(Limits(team_id, "key-a", 100, 1000, key_rpm=1), "first", 5).admitted
    # The team's tokens have room once the filler leaves, in 59 s; the key's one request
    # a second later: retrying before then would be refused by the key.
    refused = admit(Limits(team_id, "key-a", 100, 1000, key_rpm=1), "second", 20)
    assert (refused.refused_scope, refused.refused_kind) == ("key", "requests")
    assert refused.retry_after is not None and 59.5 < refused.retry_after <= 60.0


def test_retry_after_waits_for_the_tokens_when_they_have_room_after_the_requests(admit):
    # Both limits full: a request leaves with the oldest call, 10 tokens with it are not enough.
    limits = Limits(tag(), "key-a", team_rpm=2, team_tpm=1000)
    assert admit(limits, "c0", 10).admitted
    time.sleep(0.5)
    assert admit(limits, "c1", 990).admitted
    refused = admit(limits, "c2", 20)
    assert (refused.refused_scope, refused.refused_kind) == ("team", "tokens")
    assert refused.retry_after is not None and 59.75 < refused.retry_after <= 60.0  # c1's, not c0's (59.5)


def test_retry_after_for_tokens_is_when_just_enough_of_them_has_left(admit):
    # 600 tokens counted (two calls, half a second apart), the limit 1,000 and a call of 700:
    # 300 must leave, and the oldest call's leaving frees exactly that.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)
    assert admit(limits, "c0", 300).admitted
    time.sleep(0.5)
    assert admit(limits, "c1", 300).admitted
    refused = admit(limits, "c2", 700)
    assert (refused.admitted, refused.refused_kind) == (False, "tokens")
    assert refused.retry_after is not None and refused.retry_after <= 59.75  # c0's (59.5), not c1's (60)


def test_a_lowered_rpm_limit_waits_for_enough_calls_to_leave_and_shows_none_remaining(admit):
    # Three calls counted, and the team's limit lowered to 2: two must leave the window before a
    # call fits, so the retry is when the second oldest leaves, not the oldest; and the headers say
    # no request remains, not -1.
    team_id = tag()
    assert admit(Limits(team_id, "key-a", 3, 100_000), "c0", 10).admitted
    time.sleep(0.5)
    assert admit(Limits(team_id, "key-a", 3, 100_000), "c1", 10).admitted
    assert admit(Limits(team_id, "key-a", 3, 100_000), "c2", 10).admitted
    refused = admit(Limits(team_id, "key-a", 2, 100_000), "c3", 10)
    assert (refused.admitted, refused.refused_kind) == (False, "requests")
    assert refused.retry_after is not None and 59.75 < refused.retry_after <= 60.0  # c1's, not c0's (59.5)
    assert refused.headers()["x-ratelimit-remaining-requests"] == "0"


def test_a_caller_retrying_when_a_429_said_is_admitted():
    # Retry-After is the whole seconds until the call in the way leaves the window (rounded up,
    # never down: sooner, the retry is refused again), and a call that leaves at that very
    # moment no longer counts.
    now = [0.0]
    limiter = LocalLimiter(60.0, clock=lambda: now[0])
    by_requests = Limits("t1", "key-a", team_rpm=1, team_tpm=100_000)
    by_tokens = Limits("t2", "key-b", team_rpm=100, team_tpm=100)
    assert limiter.admit(by_requests, "first", 10).admitted
    assert limiter.admit(by_tokens, "first", 100).admitted
    now[0] = 10.75
    for limits in (by_requests, by_tokens):
        refused = limiter.admit(limits, "early", 10)
        assert not refused.admitted and refused.retry_after == 60.0 - 10.75
        assert refused.refusal()[1]["retry-after"] == "50"
    now[0] = 60.0  # "first" leaves the window
    assert limiter.admit(by_requests, "on-time", 10).admitted
    assert limiter.admit(by_tokens, "on-time", 10).admitted


def test_the_tpm_limit_admits_calls_up_to_exactly_its_tokens(admit):
    # "fit the TPM limit": a window's tokens may reach the limit, not only stay below it.
    alone = Limits(tag(), "key-a", team_rpm=10, team_tpm=500)
    assert admit(alone, "all-of-it", 500).admitted  # an estimate of the whole limit fits an empty window
    shared = Limits(tag(), "key-a", team_rpm=10, team_tpm=500)
    assert [admit(shared, call_id, estimate).admitted for call_id, estimate in (("a", 300), ("b", 200))] == [True, True]
    refused = admit(shared, "c", 1)
    assert (refused.admitted, refused.refused_kind, refused.never_fits) == (False, "tokens", False)


def test_a_call_still_counts_seconds_after_its_admission(admit):
    # Redis's keys expire a second after the window: a minute's calls are still there later on.
    limits = Limits(tag(), "key-a", team_rpm=1, team_tpm=100_000)
    assert admit(limits, "first", 10).admitted
    time.sleep(1.5)
    refused = admit(limits, "second", 10)
    assert (refused.admitted, refused.refused_kind) == (False, "requests")


def test_key_limit_tighter_than_the_teams_wins(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(rpm_limit=10, key={"name": "tight", "rpm_limit": 2})
    job_id = open_job(server, team.key)
    responses = [call(server, team.key, job_id) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert f"key '{team.key_id}' allows 2 requests per minute" in responses[2].json()["detail"]
    assert responses[0].headers["x-ratelimit-limit-requests"] == "2"


def test_without_redis_the_in_process_limiter_is_exact_too(make_tollgate):
    server = make_tollgate()
    team = server.admin().team(rpm_limit=3)
    job_id = open_job(server, team.key)
    responses = concurrently(10, lambda _: call(server, team.key, job_id))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 7


def test_the_in_process_limiter_forgets_teams_and_keys_idle_for_a_whole_window():
    # Teams and keys come and go (a key rotated, a team gone quiet): a window none of their
    # calls can still count in must not be kept, with its calls, for the life of the process.
    now = [0.0]
    limiter = LocalLimiter(60.0, clock=lambda: now[0])
    for n in range(1_000):
        for call_id in range(3):
            limiter.admit(Limits(f"team-{n}", f"key-{n}", 60, 100_000, key_rpm=30), f"{n}-{call_id}", 10)
    now[0] += 61.0
    assert limiter.admit(Limits("team-new", "key-new", 60, 100_000), "new", 10).admitted
    assert len(limiter._windows) == 1
    assert sum(len(window.requests) for window in limiter._windows.values()) == 1


def test_a_team_forgotten_by_the_in_process_limiter_is_limited_afresh():
    now = [0.0]
    limiter = LocalLimiter(60.0, clock=lambda: now[0])
    limits = Limits("t1", "key-a", team_rpm=2, team_tpm=100_000)
    assert [limiter.admit(limits, f"c{n}", 10).admitted for n in range(3)] == [True, True, False]
    now[0] += 30.0
    assert not limiter.admit(limits, "c3", 10).admitted  # still within the window: still full
    limiter.admit(Limits("t2", "key-b", 2, 100_000), "other", 10)
    assert ("team", "t1") in limiter._windows
    now[0] += 31.0
    assert [limiter.admit(limits, f"d{n}", 10).admitted for n in range(3)] == [True, True, False]


def test_the_in_process_limiter_forgets_an_idle_team_behind_one_still_in_use():
    now = [0.0]
    limiter = LocalLimiter(60.0, clock=lambda: now[0])
    busy, idle = Limits("busy", "key-a", 60, 100_000), Limits("idle", "key-b", 60, 100_000)
    limiter.admit(busy, "b0", 10)
    limiter.admit(idle, "i0", 10)
    now[0] = 50.0
    limiter.admit(busy, "b1", 10)
    now[0] = 100.0  # "idle" has not called for a whole window, "busy" has
    limiter.admit(Limits("new", "key-c", 60, 100_000), "n0", 10)
    assert set(limiter._windows) == {("team", "busy"), ("team", "new")}


def test_the_in_process_limiter_keeps_a_team_whose_calls_still_count():
    now = [0.0]
    limiter = LocalLimiter(60.0, clock=lambda: now[0])
    limits = Limits("t1", "key-a", team_rpm=2, team_tpm=100_000)
    assert limiter.admit(limits, "c0", 10).admitted
    now[0] = 50.0
    assert limiter.admit(limits, "c1", 10).admitted
    now[0] = 70.0  # c0 has left the window, c1 has not
    assert [limiter.admit(limits, f"d{n}", 10).admitted for n in range(2)] == [True, False]


def test_a_call_released_by_the_in_process_limiter_counts_for_nothing():
    limiter = LocalLimiter(60.0)
    limits = Limits("t1", "key-a", team_rpm=1, team_tpm=100)
    limiter.settle(limiter.admit(limits, "never-started", 100), 0, release=True)
    after = limiter.admit(limits, "after", 100)
    assert after.admitted and (after.usage[0].requests, after.usage[0].tokens) == (1, 100)


def test_limits_apply_to_the_openai_routes(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(credits=5, rpm_limit=1)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=team.key, max_retries=0)
    client.chat.completions.create(model="Main", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="Main", messages=HELLO)
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    # A call refused before it started opens no job and holds no credit.
    assert server.admin().get_team(team.team_id)["credits_held"] == 0


def test_job_create_and_reads_are_not_rate_limited(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(rpm_limit=1)
    client = server.client(team.key)
    for _ in range(3):
        job_id = open_job(server, team.key)
        assert client.get(f"/api/jobs/{job_id}").status_code == 200


def test_redis_outage_under_local_keeps_serving_and_limits_return_with_redis(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url, "breaker_cooldown": "0.5s"})
    team = server.admin().team(rpm_limit=3)
    job_id = open_job(server, team.key)
    assert call(server, team.key, job_id).status_code == 200
    redis_server.stop()
    for _ in range(2):
        started = time.monotonic()
        assert call(server, team.key, job_id).status_code == 200
        assert time.monotonic() - started < 2
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["components"]["redis"].startswith("degraded")
    redis_server.start()  # empty: it keeps nothing on disk
    time.sleep(0.6)
    statuses = [call(server, team.key, job_id).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert httpx.get(f"{server.url}/health/ready").json()["components"]["redis"] == "ok"


def test_one_call_at_a_time_finds_out_whether_redis_is_back_and_then_every_call_asks_it(redis_server):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, breaker_cooldown=0.2))
        assert limiter.redis is not None
        asked: list[str] = []
        admit = limiter.redis.admit

        async def counted(limits: Limits, call_id: str, estimate: int) -> Decision:
            asked.append(call_id)
            return await admit(limits, call_id, estimate)

        limiter.redis.admit = counted  # type: ignore[method-assign]
        await open_the_breaker(limiter, limits, redis_server, "opens-it")
        await asyncio.sleep(0.3)  # the cooldown is over; Redis is still away
        with paused(redis_server):
            decisions = await asyncio.gather(*(limiter.admit(limits, f"away-{n}", 10) for n in range(3)))
        assert [d.backend for d in decisions] == ["local"] * 3
        assert asked == ["opens-it", "away-0"]  # the others did not wait for Redis's timeout too
        await asyncio.sleep(0.3)
        assert (await limiter.admit(limits, "probe", 10)).backend == "redis"  # Redis is back
        decisions = await asyncio.gather(*(limiter.admit(limits, f"back-{n}", 10) for n in range(3)))
        assert [d.backend for d in decisions] == ["redis"] * 3
        await limiter.close()

    asyncio.run(run())


def test_redis_outage_under_deny_refuses_calls_quickly(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url}, rate_limits={"on_redis_error": "deny"})
    team = server.admin().team()
    job_id = open_job(server, team.key)
    redis_server.stop()
    for _ in range(3):
        started = time.monotonic()
        response = call(server, team.key, job_id)
        assert response.status_code == 503 and time.monotonic() - started < 2
        assert "Redis" in response.json()["detail"]
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 503 and "redis" in ready.json()["failing"]


def test_under_deny_retry_after_is_when_the_breaker_lets_redis_be_asked_again(make_tollgate, redis_server):
    # Sooner, the retry meets the open breaker and is refused again.
    server = make_tollgate(redis={"url": redis_server.url, "breaker_cooldown": "20s"},
                           rate_limits={"on_redis_error": "deny"})
    team = server.admin().team()
    job_id = open_job(server, team.key)
    redis_server.stop()
    for _ in range(2):
        response = call(server, team.key, job_id)
        assert response.status_code == 503
        assert 15 <= int(response.headers["retry-after"]) <= 20


def test_redis_outage_under_allow_admits_everything_with_this_processs_own_count_in_the_headers(
    make_tollgate, redis_server
):
    server = make_tollgate(redis={"url": redis_server.url}, rate_limits={"on_redis_error": "allow"})
    team = server.admin().team(rpm_limit=1)
    job_id = open_job(server, team.key)
    redis_server.stop()
    responses = [call(server, team.key, job_id) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]  # over the limit: admitted all the same
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["0", "0", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "1" for r in responses)


def test_a_finished_calls_real_usage_reaches_redis_without_waiting_for_another_call(make_tollgate, redis_server):
    server = make_tollgate(redis={"url": redis_server.url})
    team = server.admin().team(tpm_limit=5000)
    response = call(server, team.key, open_job(server, team.key), max_tokens=100)
    assert int(response.headers["x-ratelimit-remaining-tokens"]) == 5000 - 101  # admitted on its estimate
    total = team_keys(team.team_id) + ":total"
    real = response.json()["metadata"]["tokens_used"]
    assert wait_for(lambda: redis_server.cli("GET", total) == str(real), timeout=2, interval=0.02)


def test_a_calls_answer_does_not_wait_for_redis_to_take_its_real_usage(make_tollgate, redis_server, fake_url):
    server = make_tollgate(redis={"url": redis_server.url, "timeout": 10})  # patient: the settle is not lost
    team = server.admin().team(tpm_limit=5000)
    job_id = open_job(server, team.key)
    label = tag()
    body = {"messages": [{"role": "user", "content": f"hi [tag={label}] [first_byte_ms=1000]"}], "max_tokens": 100}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(lambda: call(server, team.key, job_id, **body))
        assert wait_for(lambda: fake_log(fake_url, label), timeout=10)  # admitted: the upstream has it
        redis_server.cli("CLIENT", "PAUSE", "3000", "WRITE")  # scripts wait from here on
        paused = time.monotonic()
        response = answer.result()
    assert response.status_code == 200
    assert time.monotonic() - paused < 2  # answered while Redis still held the settle back
    total = team_keys(team.team_id) + ":total"
    real = response.json()["metadata"]["tokens_used"]
    assert wait_for(lambda: redis_server.cli("GET", total) == str(real), timeout=10, interval=0.05)


def test_a_teams_redis_keys_are_built_once_and_a_limited_key_has_its_own():
    limiter = RedisLimiter(RedisConfig(url="redis://127.0.0.1:1/0"), 60.0)
    team_only = limiter._keys(Limits("t1", "key-a", 10, 1000))
    assert limiter._keys(Limits("t1", "key-b", 20, 2000)) is team_only  # same team, no key limits
    assert [name.rsplit(":", 1)[1] for name in team_only.names] == ["requests", "tokens", "amounts", "total"]
    limited = limiter._keys(Limits("t1", "key-a", 10, 1000, key_rpm=5))
    assert limited.names[:4] == team_only.names and len(limited.names) == 8
    assert all(":key:key-a:" in name for name in limited.names[4:])
    assert limiter._keys(Limits("t2", "key-a", 10, 1000)).names[0].startswith(f"{limiter._prefix}{{team:t2}}")


def test_the_set_of_encoded_redis_keys_stays_bounded(monkeypatch):
    monkeypatch.setattr(limiter_module, "MAX_KEYSETS", 3)
    limiter = RedisLimiter(RedisConfig(url="redis://127.0.0.1:1/0"), 60.0)
    for n in range(10):
        limiter._keys(Limits(f"team-{n}", "k", 10, 1000))
        assert len(limiter._keysets) <= 3


@pytest.mark.parametrize("policy", ["local", "deny"])
def test_an_admit_redis_ran_after_it_timed_out_is_released_once_redis_answers_again(redis_server, policy):
    limits = Limits(tag(), "key-a", team_rpm=2, team_tpm=100_000)
    requests = team_keys(limits.team_id) + ":requests"

    async def run() -> None:
        config = RedisConfig(url=redis_server.url, breaker_cooldown=0.2)
        limiter = RateLimiter(RateLimitsConfig(on_redis_error=policy), config)
        assert (await limiter.admit(limits, "before", 10)).backend == "redis"
        with paused(redis_server):
            if policy == "deny":
                with pytest.raises(RedisUnavailable):  # the client is told its call was refused
                    await limiter.admit(limits, "timed-out", 10)
            else:
                assert (await limiter.admit(limits, "timed-out", 10)).backend == "local"
        # The admit was already written: Redis runs it on going on, though nobody waits for it.
        assert wait_for(lambda: redis_server.cli("ZSCORE", requests, "timed-out"), timeout=5)
        await asyncio.sleep(0.3)  # the breaker lets the next call ask Redis again
        after = await limiter.admit(limits, "after", 10)
        assert after.backend == "redis" and after.admitted  # decided without the timed-out call
        assert redis_server.cli("ZRANGE", requests, "0", "-1").split() == ["before", "after"]
        await limiter.close()

    asyncio.run(run())


def test_releasing_a_call_redis_never_recorded_changes_nothing(redis_server):
    limits = Limits(tag(), "key-a", team_rpm=10, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url), 60.0)
        assert (await limiter.admit(limits, "recorded", 100)).admitted
        await limiter.settle(Decision(False, "never-recorded", limits, 100, "redis"), 0, release=True)
        await limiter.close()

    asyncio.run(run())
    assert redis_server.cli("ZRANGE", f"{base}:requests", "0", "-1") == "recorded"
    assert redis_server.cli("HKEYS", f"{base}:amounts") == "recorded"
    assert redis_server.cli("GET", f"{base}:total") == "100"


def test_the_admits_left_to_release_stay_bounded(monkeypatch):
    monkeypatch.setattr(limiter_module, "MAX_UNKNOWN", 3)
    limiter = RedisLimiter(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0"), 60.0)

    async def run() -> None:
        for n in range(10):
            with pytest.raises(RedisUnavailable):
                await limiter.admit(Limits("t1", "key-a", 10, 1000), f"call-{n}", 1)
            assert len(limiter._unknown) <= 3
        assert list(limiter._unknown) == ["call-7", "call-8", "call-9"]  # the oldest give way

    asyncio.run(run())


def test_a_release_skipped_while_redis_failed_is_done_once_it_answers_again(redis_server):
    async def run() -> None:
        limiter, limits, _ = await released_while_the_breaker_is_open(redis_server, "never-started")
        await asyncio.sleep(0.3)
        await only_the_next_call_counts(limiter, limits, redis_server)

    asyncio.run(run())


def test_a_release_skipped_while_redis_failed_stands_when_the_calls_zero_usage_follows_it(redis_server):
    # A call the shutdown cuts before it starts is released, then finished with no usage: queued
    # under the same call id, the settle replaced the release, and the call's request went on
    # counting against the team's RPM for the rest of its window.
    async def run() -> None:
        limiter, limits, cut = await released_while_the_breaker_is_open(redis_server, "cut-before-it-started")
        limiter.settle_soon(cut, 0)  # its record's end, as for any call
        await asyncio.sleep(0.3)
        await only_the_next_call_counts(limiter, limits, redis_server)

    asyncio.run(run())


def test_a_release_lost_with_its_connection_is_sent_again_with_the_next_admit(redis_server):
    # Sent ahead of an admit that timed out, a release may never have reached Redis: it is kept,
    # and a call that never started does not count for the rest of its window.
    async def run() -> None:
        limiter, limits, _ = await released_while_the_breaker_is_open(redis_server, "never-started")
        await asyncio.sleep(0.3)
        # Scripts wait, and are dropped with the connection that gives up on them.
        redis_server.cli("CLIENT", "PAUSE", "1000", "WRITE")
        assert (await limiter.admit(limits, "probe", 10)).backend == "local"  # the releases went ahead of it
        await asyncio.sleep(1.3)
        await only_the_next_call_counts(limiter, limits, redis_server)

    asyncio.run(run())


def test_a_release_that_redis_failed_to_take_is_sent_again_with_the_next_admit(redis_server):
    # The release of a call that never started, lost with the connection that timed out on it:
    # dropped, the call would count for the rest of its window though it never ran.
    limits = Limits(tag(), "key-a", team_rpm=5, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, breaker_cooldown=0.2))
        never_started = await limiter.admit(limits, "never-started", 10)
        # Scripts wait, and are dropped with the connection that gives up on them.
        redis_server.cli("CLIENT", "PAUSE", "1000", "WRITE")
        await limiter.settle(never_started, 0, release=True)
        assert limiter.degraded
        await asyncio.sleep(1.3)
        await only_the_next_call_counts(limiter, limits, redis_server)

    asyncio.run(run())


def test_a_release_while_the_breaker_is_open_does_not_wait_for_redis(redis_server):
    # The release of a call that never started is awaited on its refusal's way (a job not found,
    # finished...): Redis, away, must not hold that answer up for its timeout.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        config = RedisConfig(url=redis_server.url, connect_timeout=1.0, timeout=1.0, breaker_cooldown=5.0)
        limiter = RateLimiter(RateLimitsConfig(), config)
        never_started = await limiter.admit(limits, "never-started", 10)
        loop = asyncio.get_running_loop()
        with paused(redis_server):
            assert (await limiter.admit(limits, "opens-it", 10)).backend == "local"
            started = loop.time()
            await limiter.settle(never_started, 0, release=True)
            assert loop.time() - started < 0.5
        await limiter.close()

    asyncio.run(run())


def test_a_calls_real_usage_reaches_redis_even_when_it_ends_while_the_breaker_is_open(redis_server):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, breaker_cooldown=0.2))
        long_call = await limiter.admit(limits, "long-call", 1034)  # admitted by Redis on its estimate
        await open_the_breaker(limiter, limits, redis_server, "during-blip")
        limiter.settle_soon(long_call, 5000)  # it ends now, having really used 5,000 tokens
        await asyncio.sleep(0.3)
        assert (await limiter.admit(limits, "after", 10)).backend == "redis"
        await limiter.close()

    asyncio.run(run())
    assert redis_server.cli("HGET", f"{base}:amounts", "long-call") == "5000"
    assert redis_server.cli("GET", f"{base}:total") == str(5000 + 10)


def test_a_calls_real_usage_kept_while_the_breaker_was_open_reaches_redis_when_the_gateway_stops(redis_server):
    # No admit follows it in this process (a rolling restart): its estimate, and the request of
    # a call that never started, stood for the rest of the window.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, breaker_cooldown=0.2))
        long_call = await limiter.admit(limits, "long-call", 1034)  # admitted by Redis on its estimate
        never_started = await limiter.admit(limits, "never-started", 1034)
        await open_the_breaker(limiter, limits, redis_server, "during-blip")
        limiter.settle_soon(long_call, 5000)  # it ends now, having really used 5,000 tokens
        await limiter.settle(never_started, 0, release=True)
        await asyncio.sleep(0.3)  # Redis is back; no call comes before the shutdown
        await limiter.close()

    asyncio.run(run())
    assert redis_server.cli("HGET", f"{base}:amounts", "long-call") == "5000"
    assert redis_server.cli("ZRANGE", f"{base}:requests", "0", "-1").split() == ["long-call"]
    assert redis_server.cli("GET", f"{base}:total") == "5000"


@pytest.mark.parametrize("outage", ["shorter", "longer"])
def test_a_calls_usage_that_waited_for_redis_counts_for_a_window_from_its_end_not_from_its_sending(
    redis_server, outage
):
    # A call that ended while the breaker was open had its usage counted for a window from when
    # Redis was asked again: after an outage longer than the window, the tokens of the calls that
    # ended during it were counted for a whole window more, and refused calls the limit admits.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        config = RedisConfig(url=redis_server.url, breaker_cooldown=0.3 if outage == "shorter" else 1.2)
        limiter = RateLimiter(RateLimitsConfig(window=1.0), config)
        long_call = await limiter.admit(limits, "long-call", 100)
        await open_the_breaker(limiter, limits, redis_server, "during-blip")
        limiter.settle_soon(long_call, 900)  # it ends now, having used 900 tokens
        if outage == "shorter":
            await asyncio.sleep(0.4)
            sends = await limiter.admit(limits, "sends-it", 10)  # the usage reaches Redis with it
            assert (sends.backend, sends.admitted, sends.usage[0].tokens) == ("redis", True, 910)
            await asyncio.sleep(0.65)  # a window since the call ended, not since Redis had its usage
        else:
            await asyncio.sleep(1.3)  # a window has passed since it ended; the breaker lets Redis be asked
        after = await limiter.admit(limits, "after", 500)
        assert (after.backend, after.admitted) == ("redis", True)
        assert after.usage[0].tokens == (510 if outage == "shorter" else 500)
        await limiter.close()

    asyncio.run(run())


def test_a_calls_usage_whose_sending_failed_counts_for_a_window_from_its_end_not_from_the_failure(redis_server):
    # The settle sent as the call ended waits out Redis's timeout before it is kept for later:
    # kept from the failure, it counted up to that timeout longer than a window from its end.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        config = RedisConfig(url=redis_server.url, timeout=0.5, breaker_cooldown=0.1)
        limiter = RateLimiter(RateLimitsConfig(window=1.0), config)
        long_call = await limiter.admit(limits, "long-call", 100)
        loop = asyncio.get_running_loop()
        with paused(redis_server):
            ended = loop.time()
            limiter.settle_soon(long_call, 900)  # it ends now, having used 900 tokens; no reply comes
            while not limiter.degraded:  # its reply has timed out
                await asyncio.sleep(0.01)
        await asyncio.sleep(max(limiter.reopens_in(), ended + 0.8 - loop.time()))
        sends = await limiter.admit(limits, "sends-it", 10)  # the usage reaches Redis with it
        assert (sends.backend, sends.admitted, sends.usage[0].tokens) == ("redis", True, 910)
        await asyncio.sleep(ended + 1.2 - loop.time())  # a window since the call ended, not since the failure
        after = await limiter.admit(limits, "after", 500)
        assert (after.backend, after.admitted, after.usage[0].tokens) == ("redis", True, 510)
        await limiter.close()

    asyncio.run(run())


def test_a_calls_real_usage_counts_for_a_whole_window_from_its_end_after_its_admission_is_gone(redis_server):
    # The admission sets its scope's keys to expire a window (and a second) later: the usage of a
    # call ending after that must move their expiry, or it is forgotten before its window is out.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 1.0)
        long_call = await limiter.admit(limits, "long-call", 10)  # its keys: a window and a second from now
        await asyncio.sleep(1.5)
        await limiter.settle(long_call, 900)  # it ends, having used 900 tokens, counted for a window
        await asyncio.sleep(0.8)  # past the keys' first expiry, within the usage's window
        after = await limiter.admit(limits, "after", 200)
        assert (after.admitted, after.refused_kind) == (False, "tokens")
        await limiter.close()

    asyncio.run(run())


@pytest.mark.parametrize("evicted", ["tokens", "amounts", "total"])
def test_a_scopes_key_evicted_alone_leaves_its_tokens_counted_afresh_not_wrongly(redis_server, evicted):
    # An evicting maxmemory policy takes keys one at a time (volatile-* too: all of these expire).
    # What was left of the team's counts went on counting wrongly for as long as calls kept it
    # alive: tokens that never left the window, or that left it twice.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 1.0)
        assert (await limiter.admit(limits, "first", 600)).admitted
        redis_server.cli("DEL", f"{base}:{evicted}")  # as the policy evicts it
        await asyncio.sleep(0.5)
        assert (await limiter.admit(limits, "second", 300)).admitted
        await asyncio.sleep(0.6)  # "first" has left the window, "second" has not
        third = await limiter.admit(limits, "third", 600)
        assert (third.admitted, third.usage[0].tokens) == (True, 900)
        await limiter.close()

    asyncio.run(run())


@pytest.mark.parametrize("evicted", ["tokens", "amounts", "total"])
def test_a_call_ending_after_a_key_of_its_scope_was_evicted_is_counted_afresh_not_wrongly(redis_server, evicted):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 60.0)
        first = await limiter.admit(limits, "first", 600)
        assert (await limiter.admit(limits, "second", 300)).admitted
        redis_server.cli("DEL", f"{base}:{evicted}")  # as the policy evicts it
        await limiter.settle(first, 100)
        third = await limiter.admit(limits, "third", 500)
        # Counted afresh from the first call's end: what it used and the third's estimate. The
        # second call went with what the eviction took.
        assert (third.admitted, third.usage[0].tokens) == (True, 600)
        await limiter.close()

    asyncio.run(run())


def test_a_scopes_token_log_and_amounts_evicted_together_leave_no_total_counting(redis_server):
    # The total left alone by the eviction of both would count its tokens for as long as calls kept
    # it alive: nothing is left in the log to take them out of it as they leave the window.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 60.0)
        assert (await limiter.admit(limits, "first", 600)).admitted
        redis_server.cli("DEL", f"{base}:tokens", f"{base}:amounts")  # as the policy evicts them
        second = await limiter.admit(limits, "second", 300)
        assert (second.admitted, second.usage[0].tokens) == (True, 300)
        await limiter.close()

    asyncio.run(run())


def test_a_redis_that_wants_a_password_the_url_does_not_give_is_reported_as_such(redis_server):
    # Redis refused the scripts loaded as the connection opened (NOAUTH), which passed for a proxy
    # that takes no SCRIPT command: the admit sent next was refused as a protocol error
    # ("unauthenticated multibulk length") and the connection closed, and the log named that.
    redis_server.cli("CONFIG", "SET", "requirepass", "secret")
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url), 60.0)
        with pytest.raises(RedisUnavailable, match="NOAUTH Authentication required"):
            await limiter.admit(limits, "refused", 10)
        await limiter.close()

    asyncio.run(run())


def test_a_redis_out_of_memory_refuses_the_admits_as_it_refuses_the_settles(redis_server):
    # maxmemory reached under noeviction: Redis refuses a script's first write if it adds data,
    # and lets the rest through once one was made. An admit's first was a trim: admits went on
    # being recorded while the settles were refused, so the breaker opened on each settle and
    # closed on the next admit, the limits switching between Redis and on_redis_error.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url), 60.0)
        first = await limiter.admit(limits, "first", 10)
        redis_server.cli("CONFIG", "SET", "maxmemory", "1")
        with pytest.raises(RedisUnavailable, match="OOM"):
            await limiter.settle(first, 5)
        with pytest.raises(RedisUnavailable, match="OOM"):
            await limiter.admit(limits, "second", 10)
        await limiter.close()

    asyncio.run(run())


def test_a_redis_that_refuses_the_limiters_writes_is_reported_degraded(redis_server):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        assert (await limiter.admit(limits, "before", 10)).backend == "redis"
        redis_server.cli("REPLICAOF", "127.0.0.1", str(free_port()))  # read-only, as after a failover
        with pytest.raises(RedisUnavailable):  # every call is refused with a 503...
            await limiter.admit(limits, "refused", 10)
        assert (await limiter.check()).startswith("degraded")  # ...so readiness must not say "ok"
        await limiter.close()

    asyncio.run(run())


def test_redis_unavailable_is_logged_with_its_address_and_without_its_password(tmp_path, caplog):
    # The line said only why ("Connection refused"): not which Redis was tried, the first thing to
    # check when the URL names `localhost` inside a container.
    port = free_port()
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=f"redis://:hunter2@127.0.0.1:{port}/0"))
        assert (await limiter.admit(limits, "down", 10)).backend == "local"
        await limiter.close()

    with caplog.at_level(logging.INFO, logger="tollgate.limiter"):
        asyncio.run(run())
    (said,) = [r.getMessage() for r in caplog.records if r.name == "tollgate.limiter"]
    assert said.startswith(f"Redis at redis://127.0.0.1:{port} unavailable ("), said
    assert "hunter2" not in said


def test_redis_down_for_many_breaker_cooldowns_is_said_once_and_its_return_once(redis_server, caplog):
    # Each cooldown's probe that found Redis still down said "rate limits now follow ..." again,
    # as news: 720 lines for an hour down (at the default 5 s), however few calls came.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="allow"), RedisConfig(url=redis_server.url,
                                                                                     breaker_cooldown=0.05))
        assert (await limiter.admit(limits, "before", 10)).backend == "redis"
        redis_server.stop()
        for number in range(10):  # each after the breaker let a call ask Redis again
            await asyncio.sleep(limiter.reopens_in() + 0.01)
            await limiter.admit(limits, f"down-{number}", 10)
        redis_server.start()
        await asyncio.sleep(limiter.reopens_in() + 0.01)
        assert (await limiter.admit(limits, "after", 10)).backend == "redis"
        await limiter.close()

    with caplog.at_level(logging.INFO, logger="tollgate.limiter"):
        asyncio.run(run())
    said = [r.getMessage() for r in caplog.records if r.name == "tollgate.limiter"]
    assert len(said) == 2, said
    assert said[0].startswith(f"Redis at redis://127.0.0.1:{redis_server.port} unavailable"), said
    assert said[1].startswith("Redis is back"), said


def limiter_lines_within_a_short_minute(
    run: Callable[[RateLimiter, Limits], Awaitable[None]], redis_server, caplog, monkeypatch
) -> list[str]:
    """What the limiter logs while `run` plays out Redis's outages on it ('allow', a breaker
    cooldown of 50 ms), its lines' minute shortened to a second."""
    monkeypatch.setattr(limiter_module, "OUTAGE_LOG_EVERY", 1.0, raising=False)
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def played() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="allow"), RedisConfig(url=redis_server.url,
                                                                                     breaker_cooldown=0.05))
        try:
            await run(limiter, limits)
        finally:
            await limiter.close()

    with caplog.at_level(logging.INFO, logger="tollgate.limiter"):
        asyncio.run(played())
    return [r.getMessage() for r in caplog.records if r.name == "tollgate.limiter"]


def test_a_redis_outage_begun_within_a_minute_of_the_last_ones_line_is_said_once_the_minute_is_up(
    redis_server, caplog, monkeypatch
):
    # Logged once a minute at most, an outage that began and ended within the minute after the
    # last one's line was said neither as it began nor as it ended, nor ever after unless Redis
    # failed again past the minute: under 'allow', a team was admitted any number of calls over
    # its limit without a line (seen with Redis stalled twice, 25 s apart).
    async def run(limiter: RateLimiter, limits: Limits) -> None:
        for outage in range(2):
            with paused(redis_server):
                assert (await limiter.admit(limits, f"down-{outage}", 10)).backend == "local"
            await asyncio.sleep(limiter.reopens_in() + 0.01)
            assert (await limiter.admit(limits, f"back-{outage}", 10)).backend == "redis"
        await asyncio.sleep(1.5)  # the minute is up, and Redis has not failed again

    said = limiter_lines_within_a_short_minute(run, redis_server, caplog, monkeypatch)
    assert len(said) == 4, said
    assert re.match(r"Redis at \S+ unavailable \(RedisError: Redis did not answer in time\)", said[2]), said
    assert re.search(r"times since last logged: 1; .*: said late, first due [01] s ago\)$", said[2]), said
    assert re.fullmatch(r"Redis is back: rate limits are shared again \([01] s ago\)", said[3]), said


def test_a_redis_outage_begun_within_a_minute_of_the_last_ones_line_and_still_on_is_said_as_the_minute_ends(
    redis_server, caplog, monkeypatch
):
    # As above, with Redis still down and no call asking it: said when the minute is up, as
    # an outage begun, and its end as it comes.
    async def run(limiter: RateLimiter, limits: Limits) -> None:
        await open_the_breaker(limiter, limits, redis_server, "down-0")
        await asyncio.sleep(limiter.reopens_in() + 0.01)
        assert (await limiter.admit(limits, "back-0", 10)).backend == "redis"
        redis_server.stop()
        assert (await limiter.admit(limits, "down-1", 10)).backend == "local"
        await asyncio.sleep(1.5)  # the minute is up, and no call has asked Redis since
        redis_server.start()
        assert (await limiter.admit(limits, "back-1", 10)).backend == "redis"

    said = limiter_lines_within_a_short_minute(run, redis_server, caplog, monkeypatch)
    assert len(said) == 4, said
    assert said[2].startswith("Redis at ") and " unavailable (" in said[2] and "now follow" in said[2], said
    assert "times since last logged: 1;" in said[2], said
    assert said[3].startswith("Redis is back"), said


def test_a_redis_failure_heard_of_as_the_limiter_closes_says_no_line_after_it_closed(redis_server, caplog, monkeypatch):
    # A settle's reply owed as the limiter closes fails once Redis does not answer its flush:
    # heard of within the minute after the last line, it set the line due once the minute was
    # up, the limiter closed meanwhile (a second app in the process, a test's next loop turns).
    monkeypatch.setattr(limiter_module, "OUTAGE_LOG_EVERY", 1.0)  # the minute, shortened
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="allow"), RedisConfig(url=redis_server.url,
                                                                                     breaker_cooldown=0.05))
        await open_the_breaker(limiter, limits, redis_server, "down")
        await asyncio.sleep(limiter.reopens_in() + 0.01)
        decision = await limiter.admit(limits, "back", 10)
        assert decision.backend == "redis"
        with paused(redis_server):
            limiter.settle_soon(decision, 5)
            await limiter.close()
            await asyncio.sleep(0.05)  # the settle's failure heard of
        await asyncio.sleep(1.5)  # the minute is up

    with caplog.at_level(logging.INFO, logger="tollgate.limiter"):
        asyncio.run(run())
    said = [r.getMessage() for r in caplog.records if r.name == "tollgate.limiter"]
    assert len(said) == 2 and said[1].startswith("Redis is back"), said


def test_a_redis_that_refuses_the_limiters_scripts_is_reported_degraded(redis_server):
    # Plain writes still succeed: only a check that runs a script, as every admit does, sees it.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        assert await limiter.check() == "ok"
        redis_server.cli("ACL", "SETUSER", "default", "-@scripting")  # as a managed Redis may
        try:
            with pytest.raises(RedisUnavailable):
                await limiter.admit(limits, "refused", 10)
            assert (await limiter.check()).startswith("degraded")
        finally:
            redis_server.cli("ACL", "SETUSER", "default", "+@scripting")
        await asyncio.sleep(limiter.reopens_in())
        assert await limiter.check() == "ok"
        await limiter.close()

    asyncio.run(run())


def test_a_calls_real_usage_counts_before_the_next_admit_on_a_redis_that_just_restarted(redis_server):
    # A Redis that (re)started knows none of the limiter's scripts. The settle of the first call
    # to end there must still reach it ahead of the admit of the call its client sends next, as
    # every other settle does, not after a NOSCRIPT's round trip.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        first = await limiter.admit(limits, "first", 900)  # its estimate, 900 tokens, is held
        limiter.settle_soon(first, 10)  # it ends, having used 10 tokens: its answer goes out
        after = await limiter.admit(limits, "after", 900)  # the client's next call
        assert (after.backend, after.admitted) == ("redis", True)
        assert after.usage[0].tokens == 910
        await limiter.close()

    asyncio.run(run())


def test_a_calls_real_usage_counts_for_another_process_admitting_right_after_its_answer(redis_server):
    # Two gateways sharing the Redis behind a balancer: the client's next call, sent as soon as
    # it has the answer, may reach the other one. The call's real usage must already count there,
    # not its estimate, which would refuse a call the limit admits.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        here = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        there = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        first = await here.admit(limits, "first", 900)
        await there.admit(Limits(tag(), "key-b", team_rpm=100, team_tpm=1000), "connects", 1)
        here.settle_soon(first, 10)  # it ends, having used 10 tokens
        await asyncio.sleep(0.001)  # its answer goes out (after its record's fsync); the client sends again
        after = await there.admit(limits, "after", 900)
        assert (after.backend, after.admitted, after.usage[0].tokens) == ("redis", True, 910)
        await here.close()
        await there.close()

    asyncio.run(run())


def test_a_calls_real_usage_counts_before_the_next_admit_when_the_connection_dropped_during_the_call(redis_server):
    # Redis closed the limiter's connection while the call ran (its idle `timeout`, a network
    # blip): the settle and the next admit go on a new one, the settle first.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        first = await limiter.admit(limits, "first", 900)
        redis_server.cli("CLIENT", "KILL", "TYPE", "normal")
        await asyncio.sleep(0.1)  # the loss is seen
        limiter.settle_soon(first, 10)  # it ends, having used 10 tokens
        await asyncio.sleep(0.05)  # its answer goes out; the client's next call comes a moment later
        after = await limiter.admit(limits, "after", 900)
        assert (after.backend, after.admitted, after.usage[0].tokens) == ("redis", True, 910)
        await limiter.close()

    asyncio.run(run())


def test_closing_the_limiter_right_after_a_calls_settle_still_delivers_it(redis_server):
    # The settle leaves with its turn's write; closing the connection in that same turn
    # discarded the write, and the call's estimate counted for the rest of its window.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000)
    amounts = team_keys(limits.team_id) + ":amounts"

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        first = await limiter.admit(limits, "first", 900)
        limiter.settle_soon(first, 10)
        await limiter.close()
        assert redis_server.cli("HGET", amounts, "first") == "10"  # run before close returned

    asyncio.run(run())


def test_a_redis_behind_a_proxy_that_takes_no_script_command_still_limits(redis_server):
    # Envoy's Redis proxy and twemproxy pass EVAL and EVALSHA on but not SCRIPT: loading the
    # scripts as a connection opens must not make every connection fail.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    redis_server.cli("ACL", "SETUSER", "default", "-script")

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        try:
            decision = await limiter.admit(limits, "first", 10)
            assert (decision.backend, decision.admitted) == ("redis", True)
            assert await limiter.check() == "ok"
        finally:
            await limiter.close()

    try:
        asyncio.run(run())
    finally:
        redis_server.cli("ACL", "SETUSER", "default", "+script")


@pytest.mark.parametrize(("overwritten", "value"), [
    ("requests", "a string"), ("tokens", "a string"), ("amounts", "a string"), ("total", "no number"),
    ("total", "12 apples"),  # a number at its start is no integer still
])
def test_a_teams_limiter_key_overwritten_by_hand_is_repaired_and_the_call_decided_by_redis(
    redis_server, overwritten, value
):
    # The keys under key_prefix are Tollgate's own. One holding what Tollgate never writes there
    # (the wrong type, or a total that is no number) failed every admit of its team, and each
    # failure opened the breaker for every team.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        assert (await limiter.admit(limits, "first", 10)).admitted
        redis_server.cli("SET", f"{base}:{overwritten}", value)
        decision = await limiter.admit(limits, "second", 10)
        assert (decision.backend, decision.admitted, limiter.degraded) == ("redis", True, False)
        await limiter.close()

    asyncio.run(run())


@pytest.mark.parametrize("value", ["100.5", "1e2"])
def test_a_keys_total_overwritten_with_a_number_no_integer_leaves_the_teams_tokens_counted_once(redis_server, value):
    # A number that is no integer passes for one until the admit adds to it, after the team's
    # scope has recorded the call: the script failed there, the key's total was repaired and the
    # admit sent again, and the team's total counted the call's estimate twice for a window,
    # refusing calls its limit admits. A key's damaged keys are the key's to count afresh.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=1000, key_rpm=100)
    key_total = f"tollgate:{{team:{limits.team_id}}}:key:key-a:total"

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5))
        assert (await limiter.admit(limits, "first", 100)).admitted
        redis_server.cli("SET", key_total, value)
        second = await limiter.admit(limits, "second", 100)
        assert (second.backend, second.admitted, second.usage[0].tokens) == ("redis", True, 200)
        assert redis_server.cli("GET", team_keys(limits.team_id) + ":total") == "200"
        await limiter.close()

    asyncio.run(run())


def test_a_teams_token_amount_overwritten_by_hand_is_repaired_and_the_call_decided_by_redis(redis_server):
    # A hash of amounts holding what is no number fails every admit that adds them up (a team at
    # its TPM limit) until it is repaired; unrepaired, each failure would open the breaker for all.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        assert (await limiter.admit(limits, "first", 90)).admitted
        redis_server.cli("HSET", f"{base}:amounts", "first", "lots")
        decision = await limiter.admit(limits, "second", 20)
        assert (decision.backend, decision.admitted, limiter.degraded) == ("redis", True, False)
        await limiter.close()

    asyncio.run(run())


def test_a_repaired_limiter_key_is_named_in_the_log(redis_server, caplog):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    requests = team_keys(limits.team_id) + ":requests"
    redis_server.cli("SET", requests, "a string")

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        assert (await limiter.admit(limits, "first", 10)).backend == "redis"
        await limiter.close()

    with caplog.at_level("WARNING", logger="tollgate.limiter"):
        asyncio.run(run())
    assert requests in caplog.text and "string" in caplog.text  # the operator can find who wrote it


def test_a_calls_usage_meeting_an_overwritten_key_repairs_it_without_opening_the_breaker(redis_server):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        first = await limiter.admit(limits, "first", 10)
        redis_server.cli("SET", f"{base}:amounts", "a string")
        limiter.settle_soon(first, 5)  # not waited for: the call's answer has gone
        # Looked at once the repair is through (later on a loaded machine), not after a pause.
        repaired = lambda: redis_server.cli("HGET", f"{base}:amounts", "first") == "5"  # noqa: E731
        assert await asyncio.to_thread(wait_for, repaired, 10)
        assert not limiter.degraded
        await limiter.close()

    asyncio.run(run())


def test_a_release_meeting_an_overwritten_key_repairs_it_without_opening_the_breaker(redis_server):
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(on_redis_error="deny"), RedisConfig(url=redis_server.url))
        never_started = await limiter.admit(limits, "never-started", 10)
        redis_server.cli("SET", f"{base}:requests", "a string")
        await limiter.settle(never_started, 0, release=True)
        assert not limiter.degraded
        assert redis_server.cli("HLEN", f"{base}:amounts") == "0"  # released
        await limiter.close()

    asyncio.run(run())


def test_a_usage_correction_failing_with_no_damaged_key_is_kept_for_the_next_admit_not_blamed_on_keys(
    redis_server, caplog
):
    # A settle sent without waiting, refused by a script error no repair explains (Redis 6's out
    # of memory is worded so), was given up with a warning that a scope's keys were refused even
    # once repaired: the call's estimate stood for its window instead of its usage.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        assert limiter.redis is not None
        first = await limiter.admit(limits, "first", 900)
        working, limiter.redis._settle = limiter.redis._settle, Script("local broken = nil\nreturn broken + 1")
        limiter.settle_soon(first, 5)
        given_up = lambda: limiter.redis is not None and limiter.redis._unknown  # noqa: E731
        assert await asyncio.to_thread(wait_for, given_up, 10), "the correction was dropped"
        limiter.redis._settle = working  # Redis is well again
        assert (await limiter.admit(limits, "after", 10)).backend == "redis"
        assert redis_server.cli("HGET", f"{base}:amounts", "first") == "5"
        await limiter.close()

    with caplog.at_level("WARNING", logger="tollgate.limiter"):
        asyncio.run(run())
    assert "even once repaired" not in caplog.text


def test_readiness_leaves_a_breaker_opened_by_failing_admits_to_the_admits(redis_server):
    # Readiness writes a key of its own: Redis may take that while refusing the limiter's (an ACL
    # on keys, a key of the team's that cannot be repaired). Readiness closing the breaker made
    # the next calls pay a failed round trip each time it was probed.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    redis_server.cli("ACL", "SETUSER", "default", "resetkeys", "~tollgate:ready")

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        assert (await limiter.admit(limits, "refused", 10)).backend == "local"  # the breaker opens
        assert (await limiter.check()).startswith("degraded")
        assert limiter.degraded
        await limiter.close()

    asyncio.run(run())


def test_a_failing_readiness_check_leaves_the_calls_asking_redis(redis_server):
    # The other way round: readiness refused where the admits are not must not send every call
    # to on_redis_error.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    redis_server.cli("ACL", "SETUSER", "default", "resetkeys", "~tollgate:{*")

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        assert (await limiter.check()).startswith("degraded")
        assert (await limiter.admit(limits, "first", 10)).backend == "redis"
        await limiter.close()

    asyncio.run(run())


def test_a_script_failure_no_damaged_key_explains_opens_the_breaker(redis_server):
    # Redis words every runtime error of a script alike, a key holding the wrong thing or not (a
    # bug of the script's, a command the server lacks; Redis 6 words out of memory so too). Taken
    # for damage, each call paid a repair and a second try, and followed on_redis_error with the
    # breaker closed and readiness "ok", as if one team's keys alone were refused.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        assert limiter.redis is not None
        limiter.redis._admit = Script("local broken = nil\nreturn broken + 1")
        assert (await limiter.admit(limits, "first", 10)).backend == "local"
        assert limiter.degraded
        await limiter.close()

    asyncio.run(run())


def test_a_scope_redis_refuses_even_once_repaired_leaves_the_breaker_closed_for_the_others(redis_server):
    # Redis answers, and refuses that scope's keys alone: its calls follow on_redis_error, and the
    # other teams' calls still ask Redis.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)
    base = team_keys(limits.team_id)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url))
        assert limiter.redis is not None
        redis_server.cli("SET", f"{base}:total", "no number")
        # A script failing on every run, as on a key that something writes again as soon as it is
        # repaired: the repair finds the total damaged the first time.
        limiter.redis._admit = Script("redis.call('GET', KEYS[4])\nreturn nil + 1")
        assert (await limiter.admit(limits, "refused", 10)).backend == "local"
        assert not limiter.degraded
        await limiter.close()

    asyncio.run(run())


async def answering_every_command_with(reply: bytes, connections: list | None = None) -> asyncio.Server:
    """A server at Redis's address that reads whole commands and answers each with `reply`, well
    formed but no answer a limiter script gives: another RESP service, or replies out of step.
    Each connection it accepts is appended to `connections`."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connections is not None:
            connections.append(writer)
        buffer = b""
        with contextlib.suppress(asyncio.CancelledError):  # by the test's end, still connected
            while data := await reader.read(65536):
                buffer += data
                with contextlib.suppress(resp_module._Incomplete):
                    while buffer:
                        _, end = resp_module.parse(buffer, 0)
                        buffer = buffer[end:]
                        writer.write(reply)

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize(
    "reply",
    [
        b":1\r\n",
        b"*8\r\n" + b"$1\r\n0\r\n" * 8,
        b"*2\r\n:0\r\n:0\r\n",
        b"*8\r\n:0\r\n:1\r\n:-1\r\n" + b":0\r\n" * 5,  # refused, of a kind numbered below any
    ],
)
def test_an_admit_answered_with_what_no_admit_script_gives_is_a_failure_of_redis(reply):
    # Each call raised from the decoding (a 500), with the breaker closed and nothing logged.
    async def run() -> None:
        server = await answering_every_command_with(reply)
        url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=url))
        assert (await limiter.admit(Limits(tag(), "key-a", team_rpm=5, team_tpm=100_000), "first", 10)).backend == "local"
        assert limiter.degraded
        await limiter.close()
        server.close()

    asyncio.run(run())


def test_readiness_of_a_server_answering_what_no_readiness_script_gives_is_degraded():
    # Readiness said "ok" while every call's admit failed on the same replies.
    async def run() -> str:
        server = await answering_every_command_with(b":12\r\n")
        url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=url))
        state = await limiter.check()
        await limiter.close()
        server.close()
        return state

    assert asyncio.run(run()).startswith("degraded")


def test_a_connection_that_answered_an_admit_with_what_no_admit_script_gives_is_given_up():
    # Its replies may be out of step with their commands: kept, every later reply could be
    # another command's.
    async def run() -> int:
        connections: list = []
        server = await answering_every_command_with(b":1\r\n", connections)
        url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=url, breaker_cooldown=0))
        limits = Limits(tag(), "key-a", team_rpm=5, team_tpm=100_000)
        await limiter.admit(limits, "first", 10)
        await limiter.admit(limits, "second", 10)
        opened = len(connections)
        await limiter.close()
        server.close()
        return opened

    assert asyncio.run(run()) == 2


def test_an_admit_answered_with_what_no_admit_script_gives_is_released_as_it_may_have_run(redis_server):
    # Out of step, the reply is another command's, and this admit may have been recorded.
    limits = Limits(tag(), "key-a", team_rpm=5, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, breaker_cooldown=0))
        assert limiter.redis is not None
        admit = limiter.redis._admit
        # The admit recorded as ever, and answered as the next command would be.
        limiter.redis._admit = Script(limiter_module.ADMIT_SCRIPT.replace("\nreturn result\n", "\nreturn 1\n"))
        assert (await limiter.admit(limits, "answered-otherwise", 10)).backend == "local"
        limiter.redis._admit = admit
        await only_the_next_call_counts(limiter, limits, redis_server)

    asyncio.run(run())


def test_a_call_refused_for_tokens_on_a_busy_team_costs_redis_the_calls_in_its_way_not_the_whole_window(
    redis_server,
):
    # A team whose window holds 200,000 calls of 10 tokens, its TPM limit full: the next small call
    # waits for the oldest one to leave. Finding that out read the whole window into the script, a
    # tenth of a second of Redis's single thread on every such refusal: every team's admits waited
    # behind it (clients retrying on 429 kept Redis busy), and past the limiter's 100 ms timeout the
    # refused call was admitted by the in-process fallback and the breaker opened for every team.
    limits = Limits(tag(), "key-a", team_rpm=10**9, team_tpm=2_000_000)
    base = team_keys(limits.team_id)
    fill = """
    local now = redis.call('TIME')
    local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - 1000  -- a second ago
    for i = 1, tonumber(ARGV[1]) do
      redis.call('ZADD', KEYS[1], at, 'c' .. i)
      redis.call('HSET', KEYS[2], 'c' .. i, 10)
    end
    redis.call('SET', KEYS[3], tonumber(ARGV[1]) * 10)
    """
    redis_server.cli("EVAL", fill, "3", f"{base}:tokens", f"{base}:amounts", f"{base}:total", "200000")
    redis_server.cli("CONFIG", "SET", "slowlog-log-slower-than", "10000")  # 10 ms
    redis_server.cli("SLOWLOG", "RESET")

    async def run() -> None:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 60.0)
        refused = await limiter.admit(limits, "next", 10)
        assert (refused.admitted, refused.refused_kind) == (False, "tokens")
        assert refused.retry_after is not None and 57.0 < refused.retry_after <= 59.0  # the oldest call's leaving
        await limiter.close()

    asyncio.run(run())
    assert redis_server.cli("SLOWLOG", "GET") == ""  # no command of the limiter took 10 ms


def redis_now_ms(redis_server) -> int:
    seconds, micros = redis_server.cli("TIME").split()
    return int(seconds) * 1000 + int(micros) // 1000


def fill_a_busy_window(redis_server, limits: Limits, calls: int, tokens_each: int, over_ms: int) -> int:
    """`calls` calls of `tokens_each` tokens in the team's window, the oldest `over_ms` ago and
    the newest now, in even steps; the slow log then takes any command of 10 ms or more. Returns
    that now, on Redis's clock (ms), which the script's Retry-After counts from too."""
    base = team_keys(limits.team_id)
    fill = """
    local now = redis.call('TIME')
    local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    local calls, span = tonumber(ARGV[1]), tonumber(ARGV[3])
    for i = 1, calls do
      redis.call('ZADD', KEYS[1], at - span + span * i / calls, 'c' .. i)
      redis.call('HSET', KEYS[2], 'c' .. i, ARGV[2])
    end
    redis.call('SET', KEYS[3], calls * tonumber(ARGV[2]))
    return at
    """
    at = redis_server.cli(
        "EVAL", fill, "3", f"{base}:tokens", f"{base}:amounts", f"{base}:total", str(calls), str(tokens_each),
        str(over_ms),
    )
    redis_server.cli("CONFIG", "SET", "slowlog-log-slower-than", "10000")  # 10 ms
    redis_server.cli("SLOWLOG", "RESET")
    return int(at)


def refused_for_tokens(redis_server, limits: Limits, estimate: int) -> float:
    async def run() -> float:
        limiter = RedisLimiter(RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5), 60.0)
        refused = await limiter.admit(limits, "next", estimate)
        await limiter.close()
        assert (refused.admitted, refused.refused_kind) == (False, "tokens")
        assert refused.retry_after is not None
        return refused.retry_after

    return asyncio.run(run())


def test_a_call_needing_nearly_all_of_a_busy_teams_window_costs_redis_the_calls_that_may_stay_not_the_window(
    redis_server,
):
    # 200,000 calls of 10 tokens over the last 50 s fill a TPM limit of 2,000,000, and the next call's
    # estimate is all of it but 10: every call but the newest must leave. Read from the oldest, that
    # was the whole window, a tenth of a second of Redis's single thread; from the newest it is two.
    limits = Limits(tag(), "key-a", team_rpm=10**9, team_tpm=2_000_000)
    filled_at = fill_a_busy_window(redis_server, limits, 200_000, 10, 50_000)
    retry_after = refused_for_tokens(redis_server, limits, 1_999_990)
    since = (redis_now_ms(redis_server) - filled_at) / 1000  # the fill and the admit, on a busy machine
    assert 59.0 - since < retry_after <= 60.0  # when the second newest leaves, nearly a window after the fill
    assert redis_server.cli("SLOWLOG", "GET") == ""  # no command of the limiter took 10 ms


def test_a_call_waiting_for_half_of_a_busy_teams_window_is_told_a_bound_without_reading_it_all(redis_server):
    # Half of 200,000 calls must leave, from either end: past SCAN_AT_MOST calls read, the wait told
    # is until every call counted now has left, never sooner than the earliest (25 s from now).
    limits = Limits(tag(), "key-a", team_rpm=10**9, team_tpm=2_000_000)
    fill_a_busy_window(redis_server, limits, 200_000, 10, 50_000)
    retry_after = refused_for_tokens(redis_server, limits, 1_000_000)
    assert 34.0 <= retry_after <= 60.0
    assert redis_server.cli("SLOWLOG", "GET") == ""


def test_retry_after_for_tokens_is_the_same_read_from_either_end_of_the_window(redis_server):
    # 20 calls of 10 to 200 tokens, a second apart; for each estimate the call waits until the
    # oldest calls whose leaving frees enough have left, whichever end the script reads from.
    team_id = tag()
    limits = Limits(team_id, "key-a", team_rpm=10**9, team_tpm=2_100)
    base = team_keys(team_id)
    amounts = [10 * (i + 1) for i in range(20)]  # 2,100 in all
    fill = """
    local now = redis.call('TIME')
    local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    for i = 1, #ARGV do
      redis.call('ZADD', KEYS[1], at - 20000 + 1000 * i, 'c' .. i)
      redis.call('HSET', KEYS[2], 'c' .. i, ARGV[i])
    end
    redis.call('SET', KEYS[3], 2100)
    """
    redis_server.cli("EVAL", fill, "3", f"{base}:tokens", f"{base}:amounts", f"{base}:total", *map(str, amounts))
    filled_at = redis_now_ms(redis_server)
    for estimate in (1, 10, 11, 500, 1_049, 1_050, 1_051, 2_000, 2_090, 2_091, 2_100):
        needed = estimate  # the window is full: this much must leave
        freed, leaves = 0, 0
        while freed < needed:
            freed += amounts[leaves]
            leaves += 1
        expected = 60 - 20 + leaves  # the last of them, logged 20 - leaves seconds ago
        retry_after = refused_for_tokens(redis_server, limits, estimate)
        since = (redis_now_ms(redis_server) - filled_at) / 1000
        assert expected - since - 1 < retry_after <= expected, estimate


def test_an_admit_cut_by_the_shutdown_while_in_redis_is_released_as_the_limiter_closes(redis_server):
    # The shutdown cancels a call waiting for its admit's reply: Redis may run the admit all the
    # same, and the call, which never started, counted its request and its estimate for the rest
    # of the window after the restart.
    limits = Limits(tag(), "key-a", team_rpm=100, team_tpm=100_000)

    async def run() -> None:
        limiter = RateLimiter(RateLimitsConfig(), RedisConfig(url=redis_server.url, connect_timeout=5, timeout=5))
        assert (await limiter.admit(limits, "before", 10)).admitted
        redis_server.cli("CLIENT", "PAUSE", "300", "WRITE")  # the admit waits in Redis
        admitting = asyncio.ensure_future(limiter.admit(limits, "cut", 10))
        await asyncio.sleep(0.1)
        admitting.cancel()  # the shutdown's cut
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await limiter.close()

    asyncio.run(run())
    base = team_keys(limits.team_id)
    assert redis_server.cli("ZCARD", f"{base}:requests") == "1"  # "before" alone
    assert redis_server.cli("GET", f"{base}:total") == "10"
