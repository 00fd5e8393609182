"""The SSE scanner finds every event, whatever the chunk boundaries, and keeps the bytes intact."""

import random

import pytest

from proxy.sse import MAX_EVENT_BYTES, EventTooLarge, SSEScanner

STREAM = (
    b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"choices": [{"delta": {"content": "lo"}}]}\r\n\r\n'
    b"event: message\ndata: line one\ndata: line two\n\n"
    b'data: {"usage": {"prompt_tokens": 3}}\r\r'
    b"data: [DONE]\n\n"
)
EXPECTED_DATA = [
    b'{"choices": [{"delta": {"content": "Hel"}}]}',
    None,
    b'{"choices": [{"delta": {"content": "lo"}}]}',
    b"line one\nline two",
    b'{"usage": {"prompt_tokens": 3}}',
    b"[DONE]",
]


def scan(chunks: list[bytes]) -> list:
    scanner = SSEScanner()
    events = [event for chunk in chunks for event in scanner.feed(chunk)]
    tail = scanner.flush()
    return events + ([tail] if tail else [])


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


def test_whole_stream_in_one_chunk_yields_every_event():
    assert [e.data for e in scan([STREAM])] == EXPECTED_DATA


def test_raw_bytes_of_all_events_rebuild_the_stream_exactly():
    assert b"".join(e.raw for e in scan([STREAM])) == STREAM


@pytest.mark.parametrize("seed", range(200))
def test_arbitrary_chunk_boundaries_give_the_same_events(seed):
    rng = random.Random(seed)
    chunks = split_at(STREAM, rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
    events = scan(chunks)
    assert [e.data for e in events] == EXPECTED_DATA
    assert b"".join(e.raw for e in events) == STREAM


def test_one_byte_at_a_time_gives_the_same_events():
    events = scan([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert [e.data for e in events] == EXPECTED_DATA


def test_crlf_split_between_chunks_is_one_line_end():
    events = scan([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])
    assert [e.data for e in events] == [b"a", b"b"]


def test_event_field_is_reported():
    (event,) = scan([b"event: error\ndata: {}\n\n"])
    assert event.event == "error"


def test_unterminated_last_event_is_flushed_with_its_bytes():
    events = scan([b"data: x\n\ndata: [DONE]"])
    assert [e.data for e in events] == [b"x", b"[DONE]"]
    assert events[-1].raw == b"data: [DONE]"


def test_data_without_space_after_colon():
    (event,) = scan([b"data:{}\n\n"])
    assert event.data == b"{}"


def test_nothing_is_emitted_before_an_event_is_complete():
    scanner = SSEScanner()
    assert scanner.feed(b'data: {"a": 1}\n') == []
    assert [e.data for e in scanner.feed(b"\n")] == [b'{"a": 1}']


LF_STREAM = (
    b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "lo"}}]}\n\n'
    b"data: one\n\n\n"  # a blank line too many
    b": comment\n\n"
    b"event: message\ndata: two\n\n"
    b"data:three\n\n"
    b"data: [DONE]\n\n"
)
LF_EXPECTED = [
    b'{"choices": [{"delta": {"content": "Hel"}}]}',
    b'{"choices": [{"delta": {"content": "lo"}}]}',
    b"one",
    None,
    None,
    b"two",
    b"three",
    b"[DONE]",
]


def test_several_whole_events_in_one_chunk_keep_their_bytes():
    chunk = b"data: a\n\ndata: {}\n\ndata: [DONE]\n\n"
    events = scan([chunk])
    assert [e.data for e in events] == [b"a", b"{}", b"[DONE]"]
    assert [e.raw for e in events] == [b"data: a\n\n", b"data: {}\n\n", b"data: [DONE]\n\n"]


@pytest.mark.parametrize("chunk", [
    b"data: a\ndata: b\n\ndata: [DONE]\n\n",  # an event of two data lines, then another
    b"data: a\n\ndata: b\ndata: c\n\n",  # ... the other way round
    b"data: a\n\n\ndata: [DONE]\n\n",  # a blank line more between two events
])
def test_whole_lf_events_of_several_lines_in_one_chunk_are_read_line_by_line(chunk):
    assert scan([chunk]) == scan([bytes([byte]) for byte in chunk])


@pytest.mark.parametrize("seed", range(100))
def test_lf_only_streams_cut_anywhere_give_the_same_events_as_byte_by_byte(seed):
    rng = random.Random(seed)
    chunks = split_at(LF_STREAM, rng.sample(range(1, len(LF_STREAM)), rng.randint(0, 6)))
    events = scan(chunks)
    assert [e.data for e in events] == LF_EXPECTED
    assert [e.raw for e in events] == [e.raw for e in scan([LF_STREAM[i : i + 1] for i in range(len(LF_STREAM))])]
    assert b"".join(e.raw for e in events) == LF_STREAM


def test_an_event_ended_by_cr_cr_is_emitted_at_once_not_when_the_next_bytes_come():
    # Holding it back would delay every event of a CR-only stream by one event.
    scanner = SSEScanner()
    assert [e.data for e in scanner.feed(b"data: a\r\r")] == [b"a"]
    assert [e.data for e in scanner.feed(b": ping\r\r")] == [None]


def test_an_lf_after_an_event_ended_by_cr_completes_its_crlf_and_stays_in_the_bytes():
    chunks = [b"data: a\r\n\r", b"\n", b"data: b\r\n\r", b"\ndata: c\n\n"]
    events = scan(chunks)
    assert [e.data for e in events] == [b"a", b"b", b"c"]
    assert b"".join(e.raw for e in events) == b"".join(chunks)


def test_a_long_event_in_many_reads_that_end_no_line_is_one_event_with_its_bytes():
    event = b'data: {"content": "' + b"x" * 300_000 + b'"}\r\n\r\n'
    for size in (1000, 4096, 65536):
        chunks = [b"data: a\n\n" + event[:size], *(event[i : i + size] for i in range(size, len(event), size))]
        events = scan([*chunks, b"data: [DONE]\r"])
        assert [e.data for e in events] == [b"a", event[6:-4], b"[DONE]"]
        assert b"".join(e.raw for e in events) == b"".join(chunks) + b"data: [DONE]\r"


@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_a_byte_order_mark_at_the_start_of_the_stream_is_not_part_of_the_first_field(cut):
    # The first event is often the one with the role, or an error to fall back on: a BOM read as
    # part of its field's name would make it an event without data.
    stream = b'\xef\xbb\xbfdata: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n'
    events = scan([stream[:cut], stream[cut:]])
    assert [e.data for e in events] == [b'{"error": {"message": "x"}}', b"[DONE]"]
    assert b"".join(e.raw for e in events) == stream


def test_an_event_of_many_lines_in_many_reads_is_not_held_whole_between_them():
    # Each read of an unfinished event copied all of it read so far: an upstream event of many
    # `data:` lines cost the event loop time growing with the square of its size.
    scanner = SSEScanner()
    line = b"data: " + b"x" * 90 + b"\n"
    for _ in range(1_000):
        assert scanner.feed(line * 40) == []
        assert len(scanner._buffer) <= len(line) * 40
    (event,) = scanner.feed(b"\n")
    assert event.raw == line * 40_000 + b"\n"
    assert event.data == b"\n".join([b"x" * 90] * 40_000)


@pytest.mark.parametrize("seed", range(100))
def test_events_of_many_lines_cut_anywhere_give_the_same_events(seed):
    rng = random.Random(seed)
    lines = [b"event: big\n", b": comment\r\n", *(b"data: %d\r" % n for n in range(30)), b"data: end\n"]
    stream = b"".join(lines) + b"\r\n" + STREAM + b"".join(lines) + b"\n"
    expected = [b"\n".join([*(b"%d" % n for n in range(30)), b"end"]), *EXPECTED_DATA]
    expected.append(expected[0])
    events = scan(split_at(stream, rng.sample(range(1, len(stream)), rng.randint(1, 80))))
    assert [e.data for e in events] == expected
    assert b"".join(e.raw for e in events) == stream


@pytest.mark.parametrize(
    "piece",
    [b"x" * 65536, (b"data: " + b"x" * 90 + b"\n") * 700, (b"data: " + b"x" * 90 + b"\r") * 700],
    ids=["one line without end", "data lines without the blank line", "lines ended by CR"],
)
def test_an_unfinished_event_that_outgrows_the_bound_is_refused_rather_than_held(piece):
    # An upstream that never ends its event would otherwise have all of it held, without limit.
    scanner = SSEScanner()
    scanner.feed(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: ')
    fed = 0
    with pytest.raises(EventTooLarge):
        while fed <= MAX_EVENT_BYTES + len(piece):
            scanner.feed(piece)
            fed += len(piece)
    assert fed <= MAX_EVENT_BYTES + len(piece)


def test_an_event_just_within_the_bound_is_one_event_with_its_bytes():
    event = b"data: " + b"x" * (MAX_EVENT_BYTES - 8) + b"\n\n"
    events = scan([event[i : i + 65536] for i in range(0, len(event), 65536)])
    assert [e.raw for e in events] == [event]


def test_an_event_whose_crlf_blank_line_is_cut_after_its_cr_keeps_its_lf_in_its_own_bytes():
    # Sent with the next event instead, the LF reached the client only when that one ended: a
    # client that takes CRLF CRLF (not CRLF CR) for an event's end, as openai-python 1.x and
    # sseclient-py do, got every such event one event late, and a stream's last one never whole.
    events = scan([b"data: a\r\n\r", b"\ndata: b\r\n\r", b"\n"])
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_crlf_events_cut_anywhere_each_come_out_with_their_whole_blank_line():
    stream = b'data: {"a": 1}\r\n\r\n: ping\r\n\r\nevent: message\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\r\n\r\n'
    for cuts in [(i,) for i in range(1, len(stream))] + [(i, i + 1) for i in range(1, len(stream) - 1)]:
        events = scan(split_at(stream, list(cuts)))
        assert [e.data for e in events] == [b'{"a": 1}', None, b"x\ny", b"[DONE]"], cuts
        assert all(e.raw.endswith(b"\r\n\r\n") for e in events), cuts
        assert b"".join(e.raw for e in events) == stream, cuts


def test_the_data_lines_of_one_event_in_reads_of_their_own_make_one_event():
    # The first read's line is set aside whole; the second read, a whole `data: ...\n\n` on its
    # own, is still the rest of that event, not an event of its own.
    scanner = SSEScanner()
    assert scanner.feed(b"data: a\n") == []
    (event,) = scanner.feed(b"data: b\n\n")
    assert (event.data, event.raw) == (b"a\nb", b"data: a\ndata: b\n\n")


def test_an_event_whose_blank_line_is_a_lone_cr_after_a_crlf_goes_out_when_the_next_read_brings_no_lf():
    # The CR is held as the possible first half of a CRLF; a next read that starts with anything
    # but an LF ends the event then, not once a later read brings a line end.
    scanner = SSEScanner()
    assert scanner.feed(b"data: a\r\n\r") == []
    assert [(e.data, e.raw) for e in scanner.feed(b"data: b")] == [(b"a", b"data: a\r\n\r")]
    assert [e.data for e in scanner.feed(b"\n\n")] == [b"b"]


def test_an_unterminated_last_event_whose_lines_were_read_apart_is_flushed_with_each_line_once():
    # The stream ends without the event's blank line (an upstream cut short): its data is what an
    # SSE client makes of those lines, none of them read twice.
    scanner = SSEScanner()
    assert scanner.feed(b"data: a\n") == [] and scanner.feed(b"data: b") == []
    event = scanner.flush()
    assert event is not None and (event.data, event.raw) == (b"a\nb", b"data: a\ndata: b")


def test_events_of_mixed_line_ends_cut_at_any_two_points_each_come_out_with_their_whole_blank_line():
    # A line ended by CR at the very end of a read waits for the next read: taken at once, its LF
    # to come was skipped as half of a CRLF, and the event's own blank line (CRLF) was cut after
    # its CR, its LF sent with the next event.
    stream = b"data: a\ndata: b\r\n\r\n: ping\r\n\r\nevent: m\rdata: x\r\n\r\ndata: [DONE]\r\n\r\n"
    for i in range(1, len(stream)):
        for j in range(i + 1, len(stream)):
            events = scan(split_at(stream, [i, j]))
            assert [e.data for e in events] == [b"a\nb", None, b"x", b"[DONE]"], (i, j)
            assert all(e.raw.endswith(b"\r\n\r\n") for e in events), (i, j)


def test_only_the_one_space_after_the_colon_is_dropped_from_a_fields_value():
    # As every SSE client reads it: `data:  [DONE]` is no [DONE] to the openai SDK, whose reading
    # the gateway's must be.
    (event,) = scan([b"data:  [DONE]\r\n\r\n"])
    assert event.data == b" [DONE]"


def test_a_line_whose_field_name_is_not_exactly_data_carries_no_data():
    # A client ignores a field it does not know, ` data` included: read as data by the gateway,
    # a usage there would be counted though no client ever saw it.
    (event,) = scan([b' data: {"usage": {}}\ndata: x\n\n'])
    assert event.data == b"x"


def test_an_unfinished_event_of_exactly_the_bound_is_still_held():
    # The bound is the most an unfinished event may take: reaching it is not outgrowing it.
    head = b"data: " + b"x" * (MAX_EVENT_BYTES - 6)
    events = scan([head[i : i + 65536] for i in range(0, len(head), 65536)] + [b"\n\n"])
    assert [e.raw for e in events] == [head + b"\n\n"]
