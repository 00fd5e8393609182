"""The stream tally reads what a call's record needs from the relayed events: usage and errors at
once, the generated text (for an estimate when no usage comes) whenever it is asked for."""

import json

import pytest

from proxy.accounting import UNREAD_TEXT_BYTES, StreamTally, json_object
from proxy.sse import SSEEvent
from tests.support import TOO_DEEP_FOR_JSON


def event(body: object | bytes, kind: str | None = None) -> SSEEvent:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return SSEEvent(b"data: " + data + b"\n\n", data, kind)


def content(text: str, **delta: object) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text, **delta}}]}


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_generated_text_is_counted_when_no_usage_arrives():
    tally = StreamTally()
    for text in ("Hel", "lo ", "wörld"):
        assert tally.observe(event(content(text))) is False
    assert tally.usage is None
    assert tally.completion_chars == len("Hello wörld")


def test_text_of_a_long_stream_is_counted_exactly_however_much_waits_unread():
    tally = StreamTally()
    texts = [f"word{i} " for i in range(3 * UNREAD_TEXT_BYTES // 50)]
    for text in texts:
        tally.observe(event(content(text)))
    assert tally.completion_chars == sum(map(len, texts))
    tally.observe(event(content("more")))
    assert tally.completion_chars == sum(map(len, texts)) + 4


def test_text_of_reasoning_refusals_and_tool_call_arguments_counts_too():
    tally = StreamTally()
    tally.observe(event({"choices": [{"delta": {"reasoning_content": "think"}}]}))
    tally.observe(event({"choices": [{"delta": {"refusal": "no"}}]}))
    tally.observe(event({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": '{"a":1}'}}]}}]}))
    assert tally.completion_chars == len("think") + len("no") + len('{"a":1}')


def test_usage_is_read_the_moment_its_chunk_arrives():
    tally = StreamTally()
    tally.observe(event(content("hi")))
    assert tally.observe(event({"choices": [], "usage": USAGE})) is True
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (7, 3)


def test_usage_under_an_escaped_key_is_still_read():
    tally = StreamTally()
    tally.observe(event(b'{"choices": [], "\\u0075sage": {"prompt_tokens": 2, "completion_tokens": 5}}'))
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (2, 5)


def test_a_usage_chunk_that_carries_text_is_not_usage_only_and_its_text_counts():
    tally = StreamTally()
    assert tally.observe(event({**content("last"), "usage": USAGE})) is False
    assert tally.completion_chars == 4


def test_an_error_in_a_chunk_is_seen_at_once():
    tally = StreamTally()
    tally.observe(event({"error": {"message": "overloaded", "type": "server_error"}}))
    assert tally.error == "overloaded"


def test_an_error_event_is_seen_at_once():
    tally = StreamTally()
    tally.observe(event(b"upstream went away", "error"))
    assert tally.error == "upstream went away"


def test_done_ends_the_stream():
    tally = StreamTally()
    tally.observe(event(b"[DONE]"))
    assert tally.done


@pytest.mark.parametrize(
    "data",
    [b"not json", b'{"choices": "many"}', b'{"choices": [{"delta": {"tool_calls": 5}}]}', b"[1, 2]", b'"text"'],
)
def test_malformed_chunks_count_no_text_and_break_nothing(data):
    tally = StreamTally()
    tally.observe(event(data))
    tally.observe(event(content("ok")))
    assert tally.completion_chars == 2 and tally.error is None and tally.usage is None


@pytest.mark.parametrize(
    "data",
    [b'{"a": 1}', b' {"a": 1} ', b'\xef\xbb\xbf{"a": 1}', b'{"a": "\xc3\xa9"}', b"[1]", b"1", b"{", b'{"a": 1}x', b"\xff"],
)
def test_json_object_reads_what_json_loads_reads(data):
    try:
        expected = json.loads(data)
    except ValueError:
        expected = None
    assert json_object(data) == (expected if isinstance(expected, dict) else None)


def test_a_chunk_carrying_a_legacy_function_call_delta_is_not_usage_only_even_with_usage():
    # The relay drops usage-only chunks for /v1 clients that did not ask for usage: a chunk
    # with function_call arguments in it is output, and dropping it loses them.
    tally = StreamTally()
    chunk = {"choices": [{"index": 0, "delta": {"function_call": {"arguments": '{"a": 1}'}}}], "usage": USAGE}
    assert tally.observe(event(chunk)) is False


def test_legacy_function_call_arguments_count_as_generated_text():
    tally = StreamTally()
    tally.observe(event({"choices": [{"delta": {"function_call": {"name": "f", "arguments": '{"a":1}'}}}]}))
    assert tally.completion_chars == len('{"a":1}')


def test_a_chunk_nested_too_deep_for_the_json_module_counts_nothing_and_breaks_nothing():
    tally = StreamTally()
    assert tally.observe(event(b'{"usage":' + b"[" * TOO_DEEP_FOR_JSON + b"]" * TOO_DEEP_FOR_JSON + b"}")) is False
    assert tally.observe(event(b'{"error":' + b"[" * TOO_DEEP_FOR_JSON + b"]" * TOO_DEEP_FOR_JSON + b"}")) is False
    assert tally.usage is None and tally.error is None and tally.completion_chars == 0
    assert json_object(b"[" * TOO_DEEP_FOR_JSON + b"]" * TOO_DEEP_FOR_JSON) is None


def test_an_error_nested_as_deep_as_a_chunk_can_be_read_is_recorded_as_text():
    # orjson reads 1,024 levels; str() of such a value stops at the recursion limit on 3.11,
    # and its RecursionError broke the relay mid-stream.
    deep = b"[" * 1000 + b"]" * 1000
    tally = StreamTally()
    assert tally.observe(event(b'{"error":{"message":' + deep + b"}}")) is False
    assert tally.error == "[" * 1000 + "]" * 1000


def test_a_usage_chunk_whose_cost_is_an_integer_no_float_can_hold_is_read_without_its_cost():
    # json.loads reads a 400-digit cost as an int that float() cannot take: the OverflowError
    # escaped the tally and broke the relay mid-stream (and, for a plain answer, left the call
    # running, its job uncompletable, and the client with a 500).
    tally = StreamTally()
    data = b'{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "cost": 1' + b"0" * 400 + b"}}"
    assert tally.observe(event(data)) is True
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens, tally.usage.reported_cost) == (7, 3, None)


def test_an_error_event_without_data_is_no_event_and_fails_nothing():
    # An SSE client dispatches no event without data (WHATWG: an empty data buffer is no event),
    # so the client reads on: taken for an error, the stream was cut there and the call recorded
    # as failed while the upstream went on answering.
    tally = StreamTally()
    tally.observe(SSEEvent(b"event: error\n\n", None, "error"))
    tally.observe(event({"choices": [], "usage": USAGE}))
    assert tally.error is None and tally.usage is not None


@pytest.mark.parametrize("data", [b"[DONE] ", b"[DONE]\t"])
def test_a_done_with_trailing_blanks_ends_the_stream_as_clients_read_it(data):
    # The openai SDK stops at any data starting with [DONE], the bundled client at [DONE] once
    # stripped: taken for an unfinished stream, the call was recorded as failed (a /v1 call's own
    # job failed, uncharged) after the client had its whole answer.
    tally = StreamTally()
    tally.observe(event(data))
    assert tally.done


def test_a_usage_chunk_with_bytes_that_are_not_utf8_is_still_read():
    # An SSE client decodes the stream as UTF-8 with replacement characters: the upstream's usage
    # is there for it, and was lost here (the call estimated) because json.loads refuses the bytes.
    tally = StreamTally()
    data = b'{"choices": [{"delta": {"content": "a\xe2\x82"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}'
    tally.observe(event(data))
    assert (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (7, 3)
    tally = StreamTally()
    tally.observe(event(b'{"choices": [{"delta": {"content": "\xff\xfeab"}}]}'))
    assert tally.completion_chars == len("\ufffd\ufffdab")


@pytest.mark.parametrize(
    "choice",
    [
        {"index": 0, "delta": {"audio": {"id": "a", "data": "UklGRg==", "transcript": ""}}},
        {"index": 0, "delta": {}, "logprobs": {"content": [{"token": "a", "logprob": -0.1}]}},
        {"index": 0, "delta": {}, "finish_reason": "stop"},  # as providers that end with usage send it
    ],
    ids=["audio", "logprobs", "finish reason"],
)
def test_a_usage_chunk_that_carries_other_output_is_not_usage_only(choice):
    # Taken for usage-only, it was dropped for a /v1 client that did not ask for usage, and the
    # output in it (audio, logprobs) with it.
    tally = StreamTally()
    assert tally.observe(event({"choices": [choice], "usage": USAGE})) is False


def test_a_usage_chunk_whose_choice_holds_only_nulls_is_usage_only():
    # LiteLLM's own usage chunk, as its proxy writes it when it keeps the nulls.
    delta = {"provider_specific_fields": None, "content": None, "role": None, "function_call": None, "tool_calls": None, "audio": None}
    chunk = {"choices": [{"finish_reason": None, "index": 0, "delta": delta, "logprobs": None}], "usage": USAGE}
    assert StreamTally().observe(event(chunk)) is True
    assert StreamTally().observe(event({"choices": [{"index": 0, "delta": {}}], "usage": USAGE})) is True


def test_a_chunk_whose_usage_is_null_is_not_usage_only():
    # OpenAI writes `"usage": null` in every chunk but the last when usage is asked for: such a
    # chunk is no usage chunk, and one with nothing in its delta is still relayed to every client.
    for chunk in ({"choices": [{"index": 0, "delta": {"content": ""}}], "usage": None}, {"choices": [], "usage": None}):
        assert StreamTally().observe(event(chunk)) is False


def test_a_usage_chunk_whose_output_follows_a_choice_of_another_shape_is_not_usage_only():
    tally = StreamTally()
    assert tally.observe(event({"choices": ["odd", {"index": 0, "delta": {"content": "hi"}}], "usage": USAGE})) is False
    assert tally.completion_chars == 2


def test_a_chunk_whose_error_is_null_is_read_as_output_not_as_an_error():
    # The openai SDK raises on a chunk's error only when it is set: taken for one, the stream was cut
    # there and the call recorded as failed while the client read on.
    tally = StreamTally()
    tally.observe(event({**content("hi"), "error": None}))
    assert tally.error is None and tally.completion_chars == 2


def test_an_error_event_whose_data_is_empty_is_recorded_with_a_message():
    # `data:` with nothing after it is an event with empty data, dispatched as any other: the call
    # ends as failed, and its record says so rather than carry an empty error.
    tally = StreamTally()
    tally.observe(SSEEvent(b"event: error\ndata:\n\n", b"", "error"))
    assert tally.error == "error event"


def test_a_later_usage_that_holds_no_token_count_keeps_the_usage_read_before():
    tally = StreamTally()
    tally.observe(event({"choices": [], "usage": USAGE}))
    tally.observe(event({"choices": [], "usage": {"prompt_tokens": None, "completion_tokens": 1}}))
    assert tally.usage is not None and (tally.usage.prompt_tokens, tally.usage.completion_tokens) == (7, 3)


def test_an_error_events_text_is_recorded_to_at_most_2000_characters():
    # As an error chunk's: an upstream's error event of megabytes is no record's error message.
    tally = StreamTally()
    tally.observe(event(b"x" * 5000, "error"))
    assert tally.error == "x" * 2000


def test_a_long_streams_text_is_not_held_unread_past_its_bound():
    # Its chunks wait unread only until they make UNREAD_TEXT_BYTES: held to the end, a long
    # answer's every chunk stayed in memory for an estimate that a usage chunk makes needless.
    tally = StreamTally()
    for i in range(3 * UNREAD_TEXT_BYTES // 50):
        tally.observe(event(content(f"word{i} ")))
    assert sum(map(len, tally._unread)) <= UNREAD_TEXT_BYTES
