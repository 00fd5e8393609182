"""Request-path JSON goes through orjson but means exactly what the json module would."""

import json
import random
import sys

import pytest

from starlette.responses import JSONResponse as StarletteJSONResponse

from proxy.json_codec import UNSURE, JSONAnswer, JSONResponse, dumps, loads, orjson_loads
from proxy.records import RawJSON
from tests.support import TOO_DEEP_FOR_JSON


@pytest.mark.parametrize(
    "text",
    [
        b'{"n": 18446744073709551616}',  # 2**64: orjson would make it a float
        b'{"n": -9223372036854775809}',  # one below -2**63
        b'{"n": 1234567890123456789012345678901234567890}',
        b'{"n": 9223372036854775807, "m": 18446744073709551615}',
        b"18446744073709551616",  # the run of digits at the text's very start
        b'{"x": NaN, "y": Infinity, "z": -Infinity}',
        b'{"x": 1e999}',
        b'{"s": "\\ud800"}',
        b'"\xed\xa0\x80"',  # a lone surrogate written as UTF-8, which json.loads lets pass
        b'\xef\xbb\xbf{"bom": true}',
        '{"utf16": "\u00e9"}'.encode("utf-16"),
        b'  {"spaced": [1, 2.5, "\xc3\xa9"]}  \n',
        b'{"same": 1, "same": 2}',
    ],
)
def test_loads_gives_the_json_modules_value(text):
    expected = json.loads(text)
    assert repr(loads(text)) == repr(expected)  # repr: NaN != NaN, and 1 == 1.0 would hide a float


@pytest.mark.parametrize("text", [b"{not json", b'{"a": [', b"", b"\xff\xfe\x00", b'{"a": 1} x'])
def test_loads_fails_where_the_json_module_fails(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        loads(text)


def test_too_deep_for_json_is_past_what_the_json_module_reads_on_this_python():
    # The tests of texts nested too deep to read rest on it: 5,000 levels were, until Python 3.13
    # read them (and those tests then tested texts that were read).
    deep = b"[" * TOO_DEEP_FOR_JSON + b"]" * TOO_DEEP_FOR_JSON
    with pytest.raises(RecursionError):
        json.loads(deep)


def test_loads_fails_with_a_value_error_on_a_text_nested_too_deep_for_the_json_module():
    with pytest.raises(ValueError, match="nested too deeply"):
        loads(b"[" * TOO_DEEP_FOR_JSON + b"]" * TOO_DEEP_FOR_JSON)


def test_dumps_writes_back_a_value_as_deep_as_loads_reads_and_leaves_the_recursion_limit_as_it_was():
    # orjson reads 1,024 levels and writes 255; the json module writes to the recursion limit,
    # about 1,000 levels on Python 3.11. Within a value, as an answer's tool call holds one.
    deep = b"[" * 1023 + b"]" * 1023
    limit = sys.getrecursionlimit()
    assert dumps({"tool_calls": [{"deep": loads(deep)}]}) == b'{"tool_calls":[{"deep":' + deep + b"}]}"
    assert sys.getrecursionlimit() == limit


def test_integers_beyond_64_bits_stay_exact():
    assert loads(b'{"seed": 123456789012345678901234567890}') == {"seed": 123456789012345678901234567890}
    assert type(loads(b"[18446744073709551616]")[0]) is int


def test_floats_read_as_the_json_module_reads_them():
    rng = random.Random(7)
    texts = [repr(rng.uniform(-1e6, 1e6)) for _ in range(2000)]
    texts += [f"{rng.randrange(10**17)}.{rng.randrange(10**17)}e{rng.randrange(-300, 300)}" for _ in range(2000)]
    data = ("[" + ",".join(texts) + "]").encode()
    assert loads(data) == json.loads(data)


def test_orjson_loads_leaves_to_the_caller_what_only_the_json_module_reads():
    assert orjson_loads(b'{"x": NaN}') is UNSURE
    assert orjson_loads(b'{"n": 12345678901234567890}') is UNSURE
    assert orjson_loads(b'{"n": 123456789012345678}') == {"n": 123456789012345678}


def test_dumps_writes_compact_utf8():
    value = {"text": "héllo ✓ 😀", "n": [1, 2.5, None, True], "nested": {"a": "\"quoted\"\n"}}
    assert dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def test_dumps_writes_integers_beyond_64_bits_exactly():
    assert dumps({"n": 2**70, "m": -(2**64)}) == b'{"n":1180591620717411303424,"m":-18446744073709551616}'


def test_dumps_writes_non_string_keys_as_the_json_module_does():
    assert dumps({1: "a", None: "b"}) == b'{"1":"a","null":"b"}'


def test_dumps_writes_non_finite_floats_as_null():
    assert dumps({"x": float("nan"), "y": float("inf")}) == b'{"x":null,"y":null}'


@pytest.mark.parametrize("other", [2**70, "smile \ud83d"], ids=["integer beyond 64 bits", "lone surrogate"])
def test_dumps_writes_non_finite_floats_as_null_beside_what_only_the_json_module_writes(other):
    # An upstream's tool call holding NaN (json.loads reads it) beside what orjson cannot write
    # went to the json module, which writes NaN: the jobs API answered a body no JSON parser takes.
    written = dumps(loads(b'{"x": NaN, "y": -Infinity, "z": [Infinity], "o": %s}' % json.dumps(other).encode()))
    assert json.loads(written, parse_constant=lambda name: pytest.fail(f"{name} written")) == {
        "x": None, "y": None, "z": [None], "o": other
    }


def test_dumps_writes_non_finite_floats_in_a_tuple_as_null_too():
    assert dumps({"t": (float("nan"), 2**70)}) == b'{"t":[null,1180591620717411303424]}'


def test_dumps_refuses_a_circular_value_as_the_json_module_does():
    circular: list[object] = [float("nan")]
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps({"c": circular})


def test_dumps_refuses_a_value_that_is_no_json_with_a_type_error_as_the_json_module_does():
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"o": object()})


def test_raw_json_is_equal_to_raw_json_of_the_same_text_only():
    # A page's jobs hold it as metadata: jobs compare by their fields.
    assert RawJSON('{"a": 1}') == RawJSON('{"a": 1}') and hash(RawJSON("[1]")) == hash(RawJSON("[1]"))
    assert RawJSON('{"a": 1}') != RawJSON('{"a":1}') and RawJSON("[1]") != "[1]"


def test_dumps_writes_raw_json_text_as_it_is():
    assert dumps({"metadata": RawJSON('{"a": [1, 2]} ')}) == b'{"metadata":{"a": [1, 2]} }'


def test_dumps_writes_raw_json_as_json_beside_what_only_the_json_module_writes():
    value = {"metadata": RawJSON('{"a": [1, 2]}'), "n": 2**70}
    assert dumps(value) == b'{"metadata":{"a":[1,2]},"n":1180591620717411303424}'


def test_json_response_is_rendered_by_dumps_non_finite_floats_included():
    # Starlette's own rendering refuses NaN: a 500 instead of the answer.
    assert JSONResponse({"x": float("nan")}).body == b'{"x":null}'


def test_a_calls_answer_is_a_200_with_a_json_responses_headers_then_the_calls_own():
    answer = JSONAnswer(b'{"a":1}', [(b"x-call-id", b"c1")])
    assert answer.status_code == 200 and answer.body == b'{"a":1}'
    assert answer.raw_headers == [*StarletteJSONResponse({"a": 1}).raw_headers, (b"x-call-id", b"c1")]


def test_json_response_is_rendered_compact_utf8():
    response = JSONResponse({"detail": "café", "n": 2**64})
    assert response.body == '{"detail":"café","n":18446744073709551616}'.encode()
    assert response.headers["content-type"] == "application/json"


def test_dumps_writes_what_loads_read_back_a_lone_surrogate_included():
    # json.loads takes "\ud800" (loads above gives its value); UTF-8 cannot carry it, JSON's escape can.
    value = loads(b'{"s": "smile \\ud83d", "t": "\xc3\xa9"}')
    assert json.loads(dumps(value)) == value
