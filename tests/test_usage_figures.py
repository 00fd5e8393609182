"""The figures a call's record takes from the upstream's usage: exact when the upstream gave
them, an estimate (and said to be one) when what it gave is no token count."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from proxy import pricing as pricing_module
from proxy.accounting import MAX_TOKENS, StreamTally, Usage, completion_chars, cost_of, estimated_usage, usage_from
from proxy.config import ModelPrice
from proxy.metrics import Metrics
from proxy.pricing import WARN_AGAIN_AFTER, Pricing
from proxy.sse import SSEEvent
from proxy.upstream import UpstreamStatusError


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def event(body: dict) -> SSEEvent:
    data = json.dumps(body).encode()
    return SSEEvent(b"data: " + data + b"\n\n", data, None)


def test_token_counts_written_as_whole_floats_are_read_exactly():
    # 12.0 is the JSON number 12: read as no tokens, the call would be recorded as nearly free.
    usage = usage_from({"prompt_tokens": 12.0, "completion_tokens": 3.0, "total_tokens": 15.0})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (12, 3, False)


@pytest.mark.parametrize("bad", [None, -5, "7", 2.5, True, float("inf")])
def test_a_usage_whose_count_is_no_token_count_is_not_taken_as_zero_tokens(bad):
    # Recorded as 0 tokens, the call would claim exact usage it never had: it is estimated instead.
    assert usage_from({"prompt_tokens": bad, "completion_tokens": 3}) is None
    assert usage_from({"prompt_tokens": 4, "completion_tokens": bad}) is None


def test_a_usage_of_no_tokens_at_all_is_none():
    # LiteLLM's stand-in for a usage its provider never sent: no call uses no tokens, its prompt's
    # included, so the call is estimated rather than recorded as free.
    assert usage_from({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}) is None
    assert usage_from({"prompt_tokens": 4, "completion_tokens": 0}).prompt_tokens == 4


def test_a_usage_of_completion_tokens_but_no_prompt_tokens_is_taken_as_given():
    # Only a usage of no tokens at all is LiteLLM's stand-in: one counting some is the provider's.
    usage = usage_from({"prompt_tokens": 0, "completion_tokens": 5})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (0, 5, False)


def test_a_stream_whose_usage_holds_no_token_count_is_estimated():
    tally = StreamTally()
    tally.observe(event({"choices": [{"index": 0, "delta": {"content": "hello"}}]}))
    usage_only = tally.observe(event({"choices": [], "usage": {"prompt_tokens": None, "completion_tokens": 2}}))
    assert tally.usage is None  # the call's record is then an estimate, and says so
    assert tally.reported == {"prompt_tokens": None, "completion_tokens": 2}  # the count it keeps
    assert usage_only is True  # still no output: a client that did not ask for usage does not get it


def test_an_estimate_keeps_a_count_given_beside_a_missing_one_but_not_a_zero():
    # Zero is LiteLLM's stand-in for a count it never had: the prompt is then estimated, not free.
    assert estimated_usage(40, 8, {"prompt_tokens": 25, "completion_tokens": None}) == Usage(25, 2, None, True)
    assert estimated_usage(40, 8, {"prompt_tokens": 0, "completion_tokens": None}) == Usage(10, 2, None, True)
    assert estimated_usage(40, 8, {"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 3}) == Usage(10, 3, None, True)


@pytest.mark.parametrize("bad", [-1e-06, True, float("nan"), float("inf"), 1e300])
def test_a_price_litellm_reports_that_config_yaml_would_refuse_is_not_used(bad):
    # A negative price made a negative cost: the tokens counter refused it with a ValueError
    # raised after the call was recorded (and, for a /v1 call, its own job charged), so the
    # client got a 500 that its SDK retries, each retry charged again.
    pricing = Pricing({})
    info = {"input_cost_per_token": bad, "output_cost_per_token": 2e-06}
    assert pricing.load_model_info({"data": [{"model_name": "m", "model_info": info}]}) == 0
    assert pricing.price("m") is None
    cost = cost_of(Usage(10, 5), "m", pricing)
    assert cost == 0.0
    Metrics().observe_call("team", "group", "m", "success", False, 10, 5, cost, 0.1, None, 1)


@pytest.mark.parametrize("tool_calls", [5, 2.5, True])
def test_an_answer_whose_tool_calls_is_no_list_is_estimated_not_left_unrecorded(tool_calls):
    # An answer without usage is estimated from its message; a TypeError here escaped before the
    # call's record was written: the call stayed running (its job uncompletable, 409) until the
    # sweeper closed it as interrupted, and the client got a bare 500.
    assert completion_chars({"role": "assistant", "content": "hello", "tool_calls": tool_calls}) == len("hello")


@pytest.mark.parametrize("huge", [1e308, "1e308", 10**400])
def test_a_reported_cost_beyond_any_real_call_is_no_cost_figure(huge):
    # Taken as the call's cost, two such calls summed to infinity: the job's total_cost_usd went
    # out as null, which the contract never allows, and the team's cost counter stayed infinite.
    pricing = Pricing({"m": ModelPrice(1e-06, 2e-06)})
    for usage in (usage_from(USAGE, huge), usage_from({**USAGE, "cost": huge})):
        assert usage is not None and usage.reported_cost is None
        assert cost_of(usage, "m", pricing) == pytest.approx(10 * 1e-06 + 5 * 2e-06)


def test_an_answer_without_usage_estimates_the_same_text_as_its_stream_would():
    # A stream's estimate counts reasoning, refusals and legacy function-call arguments; a plain
    # answer counted only content and tool calls, so the same answer cost less unstreamed.
    message = {
        "role": "assistant",
        "content": "answer",
        "reasoning_content": "thinking",
        "refusal": "no",
        "function_call": {"name": "f", "arguments": '{"a":1}'},
    }
    tally = StreamTally()
    for key in ("content", "reasoning_content", "refusal", "function_call"):
        tally.observe(event({"choices": [{"index": 0, "delta": {key: message[key]}}]}))
    assert completion_chars(message) == tally.completion_chars == len("answerthinkingno") + len('{"a":1}')


def test_an_answer_whose_content_is_a_list_of_parts_estimates_their_text():
    # The jobs API answers with the parts' text (message_content); the estimate counted none of
    # it, so such an answer without usage was recorded, priced and rate-limited as 0 tokens.
    parts = [{"type": "text", "text": "hello"}, {"type": "thinking", "text": "hmm"}, {"type": "image_url"}, "odd", 5]
    tally = StreamTally()
    tally.observe(event({"choices": [{"index": 0, "delta": {"content": parts}}]}))
    assert completion_chars({"role": "assistant", "content": parts}) == tally.completion_chars == len("hellohmm")


def test_prices_refused_by_litellm_are_logged_with_the_status(caplog):
    class Refusing:
        async def get_json(self, path: str, timeout: float) -> object:
            raise UpstreamStatusError(401)

    assert asyncio.run(Pricing({}).refresh(Refusing())) is False  # type: ignore[arg-type]
    assert "could not read model prices from LiteLLM: UpstreamStatusError (HTTP 401)" in caplog.text


def test_prices_that_cannot_be_read_are_warned_of_once_not_at_every_retry(caplog):
    # Asked again every 5 s: an upstream without /model/info logged a warning every 5 s for good.
    class Refusing:
        refuse = True

        async def get_json(self, path: str, timeout: float) -> object:
            if self.refuse:
                raise UpstreamStatusError(404)
            return {"data": []}

    async def run() -> None:
        pricing, upstream = Pricing({}), Refusing()
        for _ in range(3):
            assert await pricing.refresh(upstream) is False  # type: ignore[arg-type]
        upstream.refuse = False
        assert await pricing.refresh(upstream) is True  # type: ignore[arg-type]
        upstream.refuse = True
        assert await pricing.refresh(upstream) is False  # type: ignore[arg-type]

    caplog.set_level("INFO", logger="tollgate.pricing")
    asyncio.run(run())
    said = [record.getMessage() for record in caplog.records if record.name == "tollgate.pricing"]
    assert said == [
        "could not read model prices from LiteLLM: UpstreamStatusError (HTTP 404)",
        "model prices read from LiteLLM again",
        "could not read model prices from LiteLLM: UpstreamStatusError (HTTP 404)",
    ]


def test_a_usage_of_zero_completion_tokens_is_exact_not_estimated():
    # A call that generated nothing (a stop at once, a content filter) used no completion token:
    # taken as no usage, it would be recorded as estimated, and charged for text it never had.
    usage = usage_from({"prompt_tokens": 5, "completion_tokens": 0})
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (5, 0, False)


def test_an_estimate_counts_a_token_per_four_characters_rounded_up():
    usage = estimated_usage(9, 5)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (3, 2, True)


def test_litellms_cost_header_wins_over_a_cost_in_the_usage():
    # x-litellm-response-cost is LiteLLM's figure for the whole call (README, "Cost").
    assert usage_from({**USAGE, "cost": 2.0}, "1.5").reported_cost == 1.5


def test_a_reported_cost_of_zero_is_no_figure_and_the_tokens_are_priced():
    # LiteLLM reports 0.0 for a model it has no price for: recorded as such, the call was free.
    pricing = Pricing({"m": ModelPrice(0.5, 0.25)})
    assert cost_of(Usage(3, 4, reported_cost=0.0), "m", pricing) == 3 * 0.5 + 4 * 0.25


def test_a_cost_keeps_its_fractions_of_a_micro_dollar():
    # Costs are rounded to 1e-12 USD: a cheap model's call costs well under a micro-dollar.
    assert cost_of(Usage(3, 0, reported_cost=1.23456e-7), "m", Pricing({})) == 1.23456e-7


def test_a_token_count_beyond_any_real_call_is_no_usage_in_either_field():
    # Each count is bounded on its own: either past the bound, taken as usage, the call would be
    # recorded, priced and rate-limited on tokens no call uses (it is estimated instead).
    assert usage_from({"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 3}) is None
    assert usage_from({"prompt_tokens": 4, "completion_tokens": MAX_TOKENS + 1}) is None


@pytest.mark.parametrize("negative", [-0.5, "-0.5"], ids=["number", "text"])
def test_a_negative_reported_cost_is_no_cost_figure_and_the_tokens_are_priced(negative):
    # Taken as the call's cost it was recorded below zero, which the cost counter refuses after the
    # call is recorded (a 500 for an answered call, its own job charged).
    pricing = Pricing({"m": ModelPrice(1e-06, 2e-06)})
    for usage in (usage_from(USAGE, negative), usage_from({**USAGE, "cost": negative})):
        assert usage is not None and usage.reported_cost is None
        assert cost_of(usage, "m", pricing) == pytest.approx(10 * 1e-06 + 5 * 2e-06)


def test_a_cost_in_a_streams_usage_is_litellms_figure_for_the_call():
    # README, "Cost": `usage.cost` in a stream's final chunk, where no header can carry it.
    tally = StreamTally()
    tally.observe(event({"choices": [], "usage": {**USAGE, "cost": 0.25}}))
    assert tally.usage is not None and tally.usage.reported_cost == 0.25
    assert cost_of(tally.usage, "m", Pricing({"m": ModelPrice(1.0, 1.0)})) == 0.25


def test_equal_usage_costs_exactly_the_same_reported_or_priced_per_token():
    # 1 * 0.1 + 2 * 0.1 is 0.30000000000000004 in floats: unrounded, a call priced per token and
    # the same call whose cost LiteLLM reported (0.3) cost different amounts.
    pricing = Pricing({"m": ModelPrice(0.1, 0.1)})
    assert cost_of(Usage(1, 2), "m", pricing) == cost_of(Usage(1, 2, reported_cost=0.3), "m", pricing) == 0.3


def test_prices_in_config_yaml_win_over_the_prices_litellm_reports():
    pricing = Pricing({"m": ModelPrice(1e-06, 2e-06)})
    info = {"input_cost_per_token": 5e-06, "output_cost_per_token": 9e-06}
    assert pricing.load_model_info({"data": [{"model_name": "m", "model_info": info}]}) == 1
    assert pricing.price("m") == ModelPrice(1e-06, 2e-06)


def test_a_model_litellm_no_longer_prices_loses_the_price_it_reported_before():
    # Each refresh is LiteLLM's whole list: a price it has taken back is not kept from an older one.
    pricing = Pricing({})
    info = {"input_cost_per_token": 5e-06, "output_cost_per_token": 9e-06}
    pricing.load_model_info({"data": [{"model_name": "m", "model_info": info}, {"model_name": "n", "model_info": info}]})
    pricing.load_model_info({"data": [{"model_name": "n", "model_info": info}]})
    assert pricing.price("m") is None and pricing.price("n") == ModelPrice(5e-06, 9e-06)


class _PricesUpstream:
    """An upstream whose /model/info refuses while `refuse` is set; counts the times it is asked."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.asked = 0

    async def get_json(self, path: str, timeout: float) -> object:
        self.asked += 1
        if self.refuse:
            raise UpstreamStatusError(503)
        return {"data": []}


def _keep_fresh_sleeps(
    monkeypatch, upstream: _PricesUpstream, interval: float, fresh: bool | None, sleeps: int
) -> list[float]:
    """The sleeps `keep_fresh` takes between its first `sleeps` turns (asyncio.sleep replaced)."""
    taken: list[float] = []

    async def sleep(seconds: float) -> None:
        taken.append(seconds)
        if len(taken) == sleeps:
            raise asyncio.CancelledError

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def run() -> None:
        with pytest.raises(asyncio.CancelledError):
            await Pricing({}).keep_fresh(upstream, interval, fresh)  # type: ignore[arg-type]

    asyncio.run(run())
    return taken


def test_prices_that_could_not_be_read_are_asked_for_again_soon_not_an_interval_later(monkeypatch):
    # LiteLLM may still be starting: an hour's wait would record its calls unpriced for an hour.
    upstream = _PricesUpstream(refuse=True)
    assert _keep_fresh_sleeps(monkeypatch, upstream, 3600.0, False, 2) == [5.0, 5.0]
    assert upstream.asked == 1
    upstream.refuse = False
    assert _keep_fresh_sleeps(monkeypatch, upstream, 3600.0, None, 2) == [3600.0, 3600.0]


def test_prices_are_read_again_at_every_interval_after_the_start_read_them(monkeypatch):
    upstream = _PricesUpstream(refuse=False)
    assert _keep_fresh_sleeps(monkeypatch, upstream, 60.0, True, 3) == [60.0, 60.0, 60.0]
    assert upstream.asked == 2  # not at the start (the start's own read), then before each later sleep


@pytest.mark.parametrize(
    "fields",
    [
        {"content": [{"type": "text", "text": 5}, {"type": "text", "text": "hello"}]},
        {"content": "hello", "refusal": True, "reasoning_content": 5},
        {"content": "hello", "tool_calls": [5, {"function": {"arguments": {"city": "Paris"}}}]},
        {"content": "hello", "function_call": {"arguments": 7}},
    ],
    ids=["part text", "refusal and reasoning", "tool call arguments", "function call arguments"],
)
def test_an_answer_whose_text_fields_hold_no_text_is_estimated_on_its_text_alone(fields):
    # As for tool_calls that is no list: an error here escaped before the call's record was written.
    assert completion_chars({"role": "assistant", **fields}) == len("hello")


def test_an_entry_of_model_info_that_prices_nothing_costs_the_others_nothing() -> None:
    # Prices are read whole: one odd entry (a model without info, say) failing the read would leave
    # every model unpriced for as long as LiteLLM listed it.
    info = {"input_cost_per_token": 5e-06, "output_cost_per_token": 9e-06}
    entries = [5, {"model_name": "none", "model_info": None}, {"model_name": ["x"], "model_info": info},
               {"model_name": "m", "model_info": info}]
    pricing = Pricing({})
    assert pricing.load_model_info({"data": entries}) == 1
    assert pricing.price("m") == ModelPrice(5e-06, 9e-06)


def test_a_price_per_token_charges_input_and_output_tokens_each_at_their_own_price() -> None:
    assert Pricing({"m": ModelPrice(1e-06, 3e-06)}).cost("m", 10, 1) == pytest.approx(13e-06)


def test_prices_that_cannot_be_read_name_no_more_than_the_errors_class(caplog: pytest.LogCaptureFixture) -> None:
    # An error's text may quote what LiteLLM said, keys included.
    class Failing:
        async def get_json(self, path: str, timeout: float) -> object:
            raise ConnectionError("sk-upstream-secret refused")

    assert asyncio.run(Pricing({}).refresh(Failing())) is False  # type: ignore[arg-type]
    assert "could not read model prices from LiteLLM: ConnectionError" in caplog.text
    assert "sk-upstream-secret" not in caplog.text


def test_prices_that_still_cannot_be_read_are_warned_of_again_every_five_minutes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = 1000.0
    monkeypatch.setattr(pricing_module, "time", SimpleNamespace(monotonic=lambda: now))
    pricing, upstream, warned = Pricing({}), _PricesUpstream(refuse=True), []
    for now in (1000.0, 1000.0 + WARN_AGAIN_AFTER - 1, 1000.0 + WARN_AGAIN_AFTER, 1000.0 + WARN_AGAIN_AFTER + 1):
        caplog.clear()
        assert asyncio.run(pricing.refresh(upstream)) is False  # type: ignore[arg-type]
        warned.append("could not read model prices" in caplog.text)
    assert warned == [True, False, True, False]


def test_prices_that_could_not_be_read_are_asked_for_again_within_a_shorter_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A retry comes no later than the refresh it stands in for would have.
    assert _keep_fresh_sleeps(monkeypatch, _PricesUpstream(refuse=True), 1.0, False, 2) == [1.0, 1.0]


def test_prices_read_as_usual_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # "Read again" is news only after a warning: said at every refresh, it would fill the log.
    caplog.set_level("INFO", logger="tollgate.pricing")
    pricing = Pricing({})
    for _ in range(2):
        assert asyncio.run(pricing.refresh(_PricesUpstream(refuse=False))) is True  # type: ignore[arg-type]
    assert caplog.records == []


@pytest.mark.parametrize("bad", [None, -1e-06, "free"])
def test_a_model_litellm_prices_only_its_input_tokens_for_is_not_priced(bad) -> None:
    # Taken with half a price, every call of the model failed to be costed (None is no number).
    pricing = Pricing({})
    info = {"input_cost_per_token": 1e-06, "output_cost_per_token": bad}
    assert pricing.load_model_info({"data": [{"model_name": "m", "model_info": info}]}) == 0
    assert cost_of(Usage(10, 5), "m", pricing) == 0.0


@pytest.mark.parametrize("usage", ["15", [10, 5], 15])
def test_an_answers_usage_that_is_no_object_is_no_usage(usage) -> None:
    # What an odd upstream puts there: the call is then estimated, not failed after it was answered.
    assert usage_from(usage, "0.001") is None


def test_a_reported_cost_that_is_a_boolean_is_no_cost_figure():
    # JSON's true is no number of dollars: taken as 1, the call would cost a dollar.
    usage = usage_from({**USAGE, "cost": True})
    assert usage is not None and usage.reported_cost is None


def test_a_token_count_of_exactly_the_bound_is_still_usage():
    # Only a count past the bound is no usage: the bound itself is the most a call is taken to use.
    usage = usage_from({"prompt_tokens": MAX_TOKENS, "completion_tokens": MAX_TOKENS})
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (MAX_TOKENS, MAX_TOKENS)
