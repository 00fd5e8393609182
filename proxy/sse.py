"""An incremental Server-Sent Events scanner.

It cuts a byte stream into events whatever the chunk boundaries (LF, CRLF or
CR line ends, multi-line `data:` fields) and hands back each event's exact raw
bytes, so the relay can forward the upstream's bytes unchanged while reading
what they say. Only the tail of an unfinished event is ever held back, and
no more than MAX_EVENT_BYTES of it; and an event whose CRLF blank line is cut
after its CR, until the LF arrives, so that its bytes go out whole.
"""

from __future__ import annotations

from typing import NamedTuple

_LF = 10  # ord("\n")
_CR = 13  # ord("\r")
_BOM = b"\xef\xbb\xbf"  # a stream may start with one; it is no part of the first field's name
# The most bytes an unfinished event may take. Everything of it is held until it ends, so an
# upstream that never ended one would fill the memory; LiteLLM's chunks are a few hundred bytes
# each, and even an image in one (base64) stays well below this.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(ValueError):
    """An event grew past MAX_EVENT_BYTES before it ended."""


class SSEEvent(NamedTuple):
    raw: bytes  # the event's bytes exactly as received, terminator included
    data: bytes | None  # its data field (lines joined by LF), None if it had none
    event: str | None  # its event field, if any


def ends_stream(data: bytes) -> bool:
    """Whether an event's data is OpenAI's end of a stream, as the openai SDK reads it (`[DONE] `
    too): the gateway's reading must be the client's."""
    return data.startswith(b"[DONE]")


class SSEScanner:
    def __init__(self) -> None:
        self._buffer = b""
        self._scanned = 0  # bytes of _buffer already split into lines
        self._data: list[bytes] = []
        self._event: str | None = None
        # An event ended by a CR at the very end of a read: an LF that comes next completes that
        # CRLF, and must not be read as a blank line of its own.
        self._lf_ends_crlf = False
        # Reads that end no line, kept aside until one does: joined to the buffer on every read,
        # a line of megabytes would be copied and searched again and again.
        self._tail: list[bytes] = []
        self._tail_bytes = 0
        # The unfinished event's lines already read, kept aside likewise: an event of many lines
        # (`data:` lines without the blank one) would otherwise be copied whole on every read.
        self._lines: list[bytes] = []
        self._lines_bytes = 0
        self._bom_checked = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not self._bom_checked:
            head = self._buffer + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._buffer = head  # maybe a BOM cut short: wait for the rest
                return []
            self._bom_checked = True
            if head.startswith(_BOM):
                # Kept in the first event's bytes, passed over when its lines are read.
                self._buffer, self._scanned, chunk = _BOM, len(_BOM), head[len(_BOM) :]
            else:
                self._buffer, chunk = b"", head
        skip = 0
        if self._lf_ends_crlf:
            self._lf_ends_crlf = False
            skip = 1 if chunk.startswith(b"\n") else 0
        elif not self._buffer and not self._lines:
            # The common case: whole `data: ...\n\n` events, one per chunk or several
            # (all that arrived while the relay was busy).
            simple = self._simple_events(chunk)
            if simple is not None:
                return simple
        elif chunk.find(b"\n") < 0 and chunk.find(b"\r") < 0 and (self._tail or not self._buffer.endswith(b"\r")):
            self._tail.append(chunk)  # the unfinished line goes on: nothing to scan yet
            self._tail_bytes += len(chunk)
            self._check_size(len(self._buffer) + self._lines_bytes + self._tail_bytes)
            return []
        if self._tail:
            buffer = b"".join([self._buffer, *self._tail, chunk])
            self._tail = []
            self._tail_bytes = 0
        else:
            buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SSEEvent] = []
        event_start = 0
        pos = self._scanned + skip  # the skipped LF stays in the next event's bytes
        size = len(buffer)
        lf = buffer.find(b"\n", pos)
        while pos < size:
            if 0 <= lf < pos:
                # Looked for again only once passed: none found stays none, and a read of CR-only
                # lines searched to its end for each of them.
                lf = buffer.find(b"\n", pos)
            cr = buffer.find(b"\r", pos, lf if lf >= 0 else size)
            if cr >= 0:
                if cr + 1 < size:
                    end, pos_next = cr, (cr + 2 if buffer[cr + 1] == _LF else cr + 1)
                elif (
                    cr == pos
                    and (self._data or self._event is not None or pos > event_start or self._lines)
                    and not self._crlf_before(buffer, pos, event_start)
                ):
                    # A blank line: the event is complete now, whether or not an LF follows.
                    end, pos_next = cr, cr + 1
                    self._lf_ends_crlf = True
                else:
                    # A line's CR at the very end may be the first half of a CRLF; so may a blank
                    # line's after a CRLF, and then an LF is all but sure to follow. Sent without
                    # it, the event's LF went out only with the next event, and a client that
                    # takes CRLF CRLF (not CRLF CR) for an event's end, as openai-python 1.x and
                    # sseclient-py do, saw each such event one event late; a [DONE] lost its LF.
                    break
            elif lf >= 0:
                end, pos_next = lf, lf + 1
            else:
                break
            line = buffer[pos:end]
            pos = pos_next
            if line:
                self._field(line)
                continue
            raw = buffer[event_start:pos]
            if self._lines:
                raw = b"".join([*self._lines, raw])
                self._lines = []
                self._lines_bytes = 0
            events.append(SSEEvent(raw, self._joined_data(), self._event))
            self._data, self._event = [], None
            event_start = pos
        if pos - event_start > len(buffer) - pos:
            # More of the unfinished event is read than not: its lines read go aside.
            self._lines.append(buffer[event_start:pos])
            self._lines_bytes += pos - event_start
            event_start = pos
        self._buffer = buffer[event_start:]
        self._scanned = pos - event_start
        self._check_size(len(self._buffer) + self._lines_bytes)
        return events

    def flush(self) -> SSEEvent | None:
        """The unterminated event left at the end of the stream, if any."""
        if self._tail:
            self._buffer = b"".join([self._buffer, *self._tail])
            self._tail = []
            self._tail_bytes = 0
        if self._lines:
            self._scanned += self._lines_bytes
            self._buffer = b"".join([*self._lines, self._buffer])
            self._lines = []
            self._lines_bytes = 0
        if not self._buffer:
            return None
        tail = self._buffer[self._scanned :].rstrip(b"\r\n")
        if tail:
            self._field(tail)
        event = SSEEvent(self._buffer, self._joined_data(), self._event)
        self._buffer, self._scanned, self._data, self._event = b"", 0, [], None
        return event

    def _crlf_before(self, buffer: bytes, pos: int, event_start: int) -> bool:
        """Whether the event's line before `pos` ended with CRLF."""
        if pos - event_start >= 2:
            return buffer[pos - 2] == _CR and buffer[pos - 1] == _LF
        # A CRLF is never split between the lines set aside and the buffer.
        return pos == event_start and bool(self._lines) and self._lines[-1].endswith(b"\r\n")

    @staticmethod
    def _check_size(unfinished: int) -> None:
        if unfinished > MAX_EVENT_BYTES:
            raise EventTooLarge(f"an upstream event grew past {MAX_EVENT_BYTES // (1024 * 1024)} MiB without ending")

    @staticmethod
    def _simple_events(chunk: bytes) -> list[SSEEvent] | None:
        """The events of a chunk made only of whole one-line `data: ` events with LF ends;
        None for anything else, which the general scanner takes."""
        # find() and count(), not `in`: see StreamTally.observe.
        if not chunk.endswith(b"\n\n") or chunk.find(b"\r") >= 0:
            return None
        if chunk.find(b"\n") == len(chunk) - 2:  # a single event, as most chunks are
            return [SSEEvent(chunk, chunk[6:-2], None)] if chunk.startswith(b"data: ") else None
        lines = chunk[:-2].split(b"\n\n")
        if chunk.count(b"\n") != 2 * len(lines):
            return None  # an event of more than one line
        for line in lines:
            if not line.startswith(b"data: "):
                return None
        return [SSEEvent(line + b"\n\n", line[6:], None) for line in lines]

    def _joined_data(self) -> bytes | None:
        if not self._data:
            return None
        return self._data[0] if len(self._data) == 1 else b"\n".join(self._data)

    def _field(self, line: bytes) -> None:
        name, colon, value = line.partition(b":")
        if not colon:
            value = b""
        elif value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
