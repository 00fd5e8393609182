"""Forwarding a call to LiteLLM, trying a model group's models in order.

The next model is tried while nothing has reached the client: on a connect
error, a timeout (ours, or LiteLLM's 408), a 5xx, a 429, any other status but
200 and 4xx (a redirect, say), a model's provider refusing LiteLLM's
credentials for it or the call (a 401 or 403), an unusable answer, or (for
streams) an error arriving as the very first event, or LiteLLM or the model's
provider not knowing the model's name, or LiteLLM not granting it to Tollgate's
key or to the request's tags (the group's mistake, not the caller's), or LiteLLM
failing to read the model's answer.
Any other 4xx is the caller's problem and is returned as such, and so is LiteLLM
refusing the request body itself, whatever status it gives that; LiteLLM refusing
Tollgate's own key is Tollgate's misconfiguration.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Sequence, overload

from .accounting import error_text, json_object
from .json_codec import dumps, loads
from .sse import MAX_EVENT_BYTES, EventTooLarge, SSEEvent, SSEScanner, ends_stream
from .upstream import (
    AnswerTooLarge,
    ConnectTimeout,
    PoolExhausted,
    RemoteProtocolError,
    TransportError,
    Upstream,
    UpstreamResponse,
    UpstreamTimeout,
)

_ERROR_BODY_LIMIT = 64 * 1024
# LiteLLM answers 408 when a deployment's own `timeout` ran out: the model timed out.
_TIMEOUT = 408
# The error types LiteLLM gives a provider's 401/403 (litellm.AuthenticationError and
# PermissionDeniedError carry no type of their own, so the proxy names them after the
# status). Its own refusals of Tollgate's key are typed by its auth layer instead:
# auth_error, token_not_found_in_db, expired_key, no_db_connection (a 400) and the like.
_PROVIDER_REFUSALS = ("authentication_error", "permission_error")
# A model's failure LiteLLM's route handler passes on opens with its exception's name
# (`litellm.BadRequestError: ...`). A provider's 401/403 it maps to another exception than those
# two comes so, typed invalid_request_error (OpenAI's, whose error names that type); LiteLLM's own
# refusals of Tollgate's key never do.
_MODEL_FAILURE_PREFIX = "litellm."
# LiteLLM's words for a model name it does not serve (its ProxyModelNotFoundError, a 400).
_UNKNOWN_MODEL = "Invalid model name passed in model="
# A provider's answer for a model it does not serve (OpenAI's model_not_found, a deployment that is
# not there), which LiteLLM passes on as its NotFoundError: a chat completion names nothing else
# that could be missing.
_NOT_SERVED = 404
# The end of the type LiteLLM gives its refusal of a model the key it was sent may not use (a
# 403: key_, team_, user_, org_ or project_model_access_denied, by whose list lacks it). That
# key is Tollgate's, and accepted: the model is not granted to it, which another may be.
_MODEL_NOT_GRANTED = "_model_access_denied"
# LiteLLM's refusal of a model whose deployments its tag routing (`enable_tag_filtering`) keeps from
# the request's tags, Tollgate's own included: a 401 of its router, not of its auth layer (typed
# internal_server_error). Tollgate's key is accepted; only that model is not for those tags.
_TAGS_REFUSE = "Not allowed to access model due to tags configuration"
# LiteLLM's 400 for a model's answer it could not read (a choice whose message is null or no
# object, tool_calls that are no list): its route handler calls any failure with an AttributeError
# in its chain "Invalid request format", the caller's or the answer's. The answer's comes as the
# InternalServerError LiteLLM makes of it, "Invalid response object" and a traceback of LiteLLM's
# (its file paths, not the client's to read); a request LiteLLM cannot read (messages of strings)
# comes as an APIConnectionError, and stays the caller's.
_UNREADABLE_ANSWER = "Invalid request format: litellm.InternalServerError:"
_UNREADABLE_MARK = "Invalid response object"
_TRACEBACK = " Traceback (most recent call last)"
# LiteLLM's 400 for a prompt longer than the model's context window (its ContextWindowExceededError,
# made of a provider's `context_length_exceeded` and its kin): another model of the group may take
# it. Its message wraps the provider's words in the names of LiteLLM's exceptions, and ends in
# advice to LiteLLM's operator (its own context_window_fallbacks), none of it the client's.
_TOO_LONG = "litellm.ContextWindowExceededError:"
_TOO_LONG_WRAPPING = re.compile(r"^(?:\s*(?:litellm\.)?\w+(?:Error:|Exception -))*\s*")
_LITELLM_ADVICE = "\nmodel="
# The header a Retry-After reaches Tollgate in when LiteLLM passes on the headers of the exception
# it failed on (a provider's, or its router's "No deployments available" for a deployment over its
# rpm/tpm): every header of those is renamed so.
_PASSED_ON_RETRY_AFTER = "llm_provider-retry-after"
# LiteLLM refusing a request body before any model (auth_utils.is_request_body_safe: a credential,
# an endpoint, an observability or pricing field, at the top or inside metadata or extra_body).
# Its ValueError says "Rejected Request: <field> is not allowed in request body. <advice to the
# operator>". With prisma importable (its Docker image) that comes as a 401 typed auth_error,
# "Authentication Error, " in front; without (pip's litellm[proxy], which Tollgate installs), its
# auth error handler fails importing prisma and the catch-all answers a bare 500 that hides it:
# the body below, with no `code`. A model's failure passes through the route's own handler, which
# gives each a code, but an answer LiteLLM got and then failed to send (one quoting half of a
# UTF-16 pair) reaches the catch-all too: so that bare 500 fails only its model, and is the
# client's 400 once every model got it, as a refused body does. (Nor is it Tollgate's key, which
# it always presents, LiteLLM answering a wrong one with a 400 or 401 of its own.)
_REQUEST_REFUSED = "Rejected Request:"
_AUTH_ERROR_PREFIX = "Authentication Error, "
_UNHANDLED = {"message": "Internal server error", "type": "internal_server_error"}
_UNHANDLED_REFUSAL = (
    "LiteLLM refused the request before trying any model, without giving its reason (HTTP 500 "
    "'Internal server error', for every model of the group): it answers so for a field it does not take "
    "in a request body, such as a credential, an endpoint, or an observability or pricing setting "
    "(LiteLLM's log names it)"
)


@dataclass(frozen=True)
class Attempt:
    model: str
    error: str
    status: int | None = None
    retry_after: int | None = None
    unhandled: bool = False  # LiteLLM's bare 500 (see _UNHANDLED)
    unreachable: bool = False  # no answer from LiteLLM at all: its connection failed or was dropped
    not_served: bool = False  # LiteLLM (or the model's provider) serves no model of this name, or not to Tollgate
    too_long: bool = False  # the prompt is longer than this model's context window
    pool_full: bool = False  # not asked: no connection of upstream.max_connections came free in time
    # Why, for the operator's log alone ("Connection refused"): `error` is the client's and the
    # call record's, which need not learn how Tollgate reaches LiteLLM.
    cause: str = ""


class UpstreamFailed(Exception):
    """Every model tried failed before anything reached the client."""

    def __init__(self, attempts: list[Attempt], untried: int = 0) -> None:
        summary = "; ".join(f"{a.model}: {a.error}" for a in attempts)
        if untried:
            summary += f"; {untried} more not tried: the call's time ran out"
        super().__init__(summary)
        self.attempts = attempts  # only the models actually tried
        self.untried = untried

    @property
    def all_rate_limited(self) -> bool:
        # A model the prompt is too long for never answers it, now or later: the others' limits
        # say when to ask again.
        others = [a for a in self.attempts if not a.too_long]
        return bool(others) and all(a.status == 429 for a in others)

    @property
    def all_too_long(self) -> bool:
        """Whether the prompt is longer than every model tried takes: the request's fault."""
        return bool(self.attempts) and not self.untried and all(a.too_long for a in self.attempts)

    @property
    def pool_full(self) -> bool:
        """Whether no model was asked, no connection to LiteLLM coming free in time."""
        return bool(self.attempts) and all(a.pool_full for a in self.attempts)

    @property
    def unreachable(self) -> bool:
        """Whether LiteLLM itself, rather than any model behind it, failed every attempt: those
        that asked nobody, no pooled connection coming free, say nothing of the models."""
        return any(a.unreachable for a in self.attempts) and all(a.unreachable or a.pool_full for a in self.attempts)

    @property
    def unreachable_error(self) -> str:
        """How LiteLLM failed last to be reached (if `unreachable`)."""
        return next((a.cause or a.error for a in reversed(self.attempts) if a.unreachable), "")

    @property
    def retry_after(self) -> int:
        hints = [a.retry_after for a in self.attempts if a.retry_after]
        return max(hints) if hints else 1


class UpstreamRejected(Exception):
    """The upstream refused the request itself (a 4xx): no fallback helps."""

    def __init__(self, status: int, message: str, model: str, attempts: int, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.model = model
        self.attempts = attempts
        self.param = param  # the request field the upstream's error names, as LiteLLM passes it on


class UpstreamMisconfigured(UpstreamRejected):
    """LiteLLM refused Tollgate's own credentials."""


@dataclass
class Answer:
    """A complete non-streaming answer."""

    model: str
    attempts: int
    body: bytes
    data: dict[str, Any]
    headers: dict[str, str]


@dataclass
class OpenStream:
    """A stream whose first event arrived: from here on there is no fallback."""

    model: str
    attempts: int
    response: UpstreamResponse
    chunks: AsyncIterator[bytes]
    scanner: SSEScanner
    first_events: list[SSEEvent] = field(default_factory=list)


@overload
async def forward(
    upstream: Upstream, models: Sequence[str], payload: dict[str, Any], stream: Literal[False], deadline: float,
    asked: list[str] | None = None, failed: list[Attempt] | None = None,
) -> Answer: ...
@overload
async def forward(
    upstream: Upstream, models: Sequence[str], payload: dict[str, Any], stream: Literal[True], deadline: float,
    asked: list[str] | None = None, failed: list[Attempt] | None = None,
) -> OpenStream: ...
@overload
async def forward(
    upstream: Upstream, models: Sequence[str], payload: dict[str, Any], stream: bool, deadline: float,
    asked: list[str] | None = None, failed: list[Attempt] | None = None,
) -> Answer | OpenStream: ...
async def forward(
    upstream: Upstream, models: Sequence[str], payload: dict[str, Any], stream: bool, deadline: float,
    asked: list[str] | None = None, failed: list[Attempt] | None = None,
) -> Answer | OpenStream:
    """`asked`, if given, has each model appended as it is asked: a caller cut short while
    forwarding learns from it how many models were tried and which was asked last (a model may
    be listed twice in a group, so its place in the list does not say). `failed`, if given, has
    each model's failure appended, those a fallback answered after included."""
    attempts: list[Attempt] = failed if failed is not None else []
    loop = asyncio.get_running_loop()
    for number, model in enumerate(models, start=1):
        if loop.time() >= deadline:
            raise UpstreamFailed(attempts, untried=len(models) - number + 1)
        payload["model"] = model
        if asked is not None:
            asked.append(model)
        body = dumps(payload)
        try:
            result = await _attempt(upstream, model, number, body, stream, deadline)
        except ConnectTimeout:  # as a connection refused: no answer from LiteLLM at all
            attempts.append(Attempt(model, "timed out connecting", unreachable=True))
            continue
        except PoolExhausted:  # asked nobody: every connection of Tollgate's own was in use
            attempts.append(Attempt(model, "no free connection to LiteLLM in time", pool_full=True))
            continue
        except UpstreamTimeout:  # DeadlineExceeded too
            attempts.append(Attempt(model, "timed out"))
            continue
        except AnswerTooLarge as exc:
            attempts.append(Attempt(model, str(exc), 200))
            continue
        except RemoteProtocolError as exc:  # something answered, if not in HTTP: LiteLLM is up
            attempts.append(Attempt(model, str(exc)))
            continue
        except TransportError as exc:
            attempts.append(
                Attempt(model, f"connection failed: {type(exc).__name__}", unreachable=True, cause=str(exc))
            )
            continue
        if isinstance(result, Attempt):
            attempts.append(result)
            continue
        return result
    if attempts and all(a.unhandled for a in attempts):
        raise UpstreamRejected(500, _UNHANDLED_REFUSAL, attempts[-1].model, len(attempts))
    raise UpstreamFailed(attempts)


async def _attempt(
    upstream: Upstream, model: str, number: int, body: bytes, stream: bool, deadline: float
) -> Answer | OpenStream | Attempt:
    response = await upstream.open_chat(body, deadline, stream)
    handed_over = False
    try:
        if response.status_code != 200:
            # The wait for the head's bound holds for the error's body too: one dripping without end
            # held the call to its total deadline, and the group's next model was never tried.
            response.expect_by(response.head_due, "no whole error answer from the upstream in time")
            return await _refusal(response, model, number)
        if not stream:
            content = await response.aread()
            try:
                data = loads(content)
            except ValueError:
                return Attempt(model, "malformed JSON answer", 200)
            if not _usable(data):
                return Attempt(model, "answer without a choice holding a message", 200)
            return Answer(model, number, content, data, response.headers)
        opened = await _first_event(response, model, number)
        handed_over = isinstance(opened, OpenStream)  # the relay owns the response from here
        return opened
    finally:
        if not handed_over:
            await response.aclose()


# The most events without data (comments, keep-alives) held before a stream's first event: far
# more than a keep-alive sends in `first_byte`.
MAX_HELD_EVENTS = 10_000
_TOO_MUCH_BEFORE_THE_FIRST_EVENT = (
    f"more than {MAX_HELD_EVENTS:,} events or {MAX_EVENT_BYTES // (1024 * 1024)} MiB without data before the first event"
)


async def _first_event(response: UpstreamResponse, model: str, number: int) -> OpenStream | Attempt:
    # `first_byte` bounds the wait for the first event, as it does the wait for the head: each
    # silence's own timeout never runs out on an upstream keeping its stream alive with comments,
    # which would hold the call to its total deadline, with no time left for the next model.
    response.expect_by(response.head_due, "no first event from the upstream in time")
    scanner = SSEScanner()
    chunks = response.aiter_raw()
    events: list[SSEEvent] = []
    held = 0  # bytes of the events without data held so far, relayed with the first event
    async for chunk in chunks:
        try:
            read = scanner.feed(chunk)
        except EventTooLarge as exc:
            return Attempt(model, str(exc), 200)
        events.extend(read)
        # An event without data is none to an SSE client, `event: error` or not; those held
        # from earlier reads are all such.
        first = next((e for e in read if e.data is not None), None)
        if first is None:
            # Comments and events without data are held until the first event, bounded as one
            # event is, and in number: an upstream sending them without end would otherwise
            # fill the memory, and take the loop's CPU, for as long as `first_byte` lets it.
            held += sum(len(event.raw) for event in read)
            if held > MAX_EVENT_BYTES or len(events) > MAX_HELD_EVENTS:
                return Attempt(model, _TOO_MUCH_BEFORE_THE_FIRST_EVENT, 200)
            continue
        error = _error_of(first)
        if error is not None:
            return Attempt(model, f"error event: {error}", 200)
        if ends_stream(first.data or b""):  # it has data (picked so), which mypy cannot tell
            # Nothing but its end: no more usable than an answer without choices.
            return Attempt(model, "stream ended before its first event", 200)
        response.expect_by(math.inf, "")  # from here only each silence is bounded
        return OpenStream(model, number, response, chunks, scanner, events)
    return Attempt(model, "stream ended before its first event", 200)


def _error_of(event: SSEEvent) -> str | None:
    if event.data is None:
        return None
    if event.event == "error":
        return event.data.decode("utf-8", "replace")[:500]
    data = json_object(event.data)  # as StreamTally reads it, or an error it fails the call on could not fall back
    if data is not None and data.get("error"):
        return error_text(data["error"])
    return None


async def _refusal(response: UpstreamResponse, model: str, number: int) -> Attempt:
    status = response.status_code
    content = b""
    async for chunk in response.aiter_raw():
        content += chunk
        if len(content) > _ERROR_BODY_LIMIT:
            break
    message, error_type, unhandled, param = _error_details(content, status)
    refused = _refused_body(message)
    if refused is not None:
        raise UpstreamRejected(status, refused, model, number)
    if status == 500 and unhandled:
        return Attempt(model, f"{status}: LiteLLM's unexplained 'Internal server error'", status, unhandled=True)
    if status == 429 or status >= 500 or status == _TIMEOUT or status < 400:
        # Below 400: neither the answer (a 200) nor a refusal of the request (a redirect, a
        # 204): a fault of the upstream's for this model, not the caller's.
        hint = response.headers.get("retry-after") or response.headers.get(_PASSED_ON_RETRY_AFTER)
        return Attempt(model, f"{status}: {message}", status, _retry_after(hint))
    if status == 400 and message.startswith(_UNREADABLE_ANSWER) and _UNREADABLE_MARK in message:
        # The model's answer, not the request: another model may answer it.
        return Attempt(model, f"{status}: {message.split(_TRACEBACK, 1)[0]}", status)
    if status == 400 and message.startswith(_TOO_LONG):
        return Attempt(model, f"{status}: {_provider_words(message)}", status, too_long=True)
    if (status == 400 and _UNKNOWN_MODEL in message) or status == _NOT_SERVED:
        # LiteLLM, or the model's provider, serves no model of that name: the group names it, not
        # the client's request.
        return Attempt(model, f"{status}: {message}", status, not_served=True)
    if status in (401, 403) and (error_type in _PROVIDER_REFUSALS or message.startswith(_MODEL_FAILURE_PREFIX)):
        # This model's provider refused the key LiteLLM holds for it, or the call: another model may work.
        return Attempt(model, f"{status}: {message}", status)
    if (status == 403 and isinstance(error_type, str) and error_type.endswith(_MODEL_NOT_GRANTED)) or (
        status == 401 and message.startswith(_TAGS_REFUSE)
    ):
        # As a model LiteLLM does not serve: the group's mistake, for this model only.
        return Attempt(model, f"{status}: {message}", status, not_served=True)
    if status in (401, 403) or error_type in ("auth_error", "no_db_connection"):
        raise UpstreamMisconfigured(status, message, model, number)
    raise UpstreamRejected(status, message, model, number, param)


def _provider_words(message: str) -> str:
    """What the provider said of a prompt too long, out of LiteLLM's wrapping of it."""
    said = message.split(_LITELLM_ADVICE, 1)[0]
    return _TOO_LONG_WRAPPING.sub("", said, count=1).strip() or said


def _error_details(content: bytes, status: int) -> tuple[str, str | None, bool, str | None]:
    """The error's message and type, whether it is LiteLLM's catch-all answer, and the request
    field it names (`param`: LiteLLM writes a provider's that way, or None, or "None")."""
    try:
        data = loads(content)
    except ValueError:
        return (content.decode("utf-8", "replace")[:500] or f"HTTP {status}"), None, False, None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail"))
        error_type = error.get("type") if isinstance(error, dict) else None
        param = error.get("param") if isinstance(error, dict) else None
        if not isinstance(param, str) or param in ("", "None") or len(param) > 256:
            param = None
        # An empty message says nothing to the client: its status does, as for an empty body.
        message = error_text(error if error is not None else data).strip() or f"HTTP {status}"
        return message, error_type, error == _UNHANDLED, param
    return f"HTTP {status}", None, False, None


def _refused_body(message: str) -> str | None:
    """LiteLLM's refusal of the request body, up to the advice meant for its operator; None
    when the message is another. It must open the message: a provider's error never does,
    LiteLLM puts its own exception name in front of those."""
    message = message.removeprefix(_AUTH_ERROR_PREFIX)
    if not message.startswith(_REQUEST_REFUSED):
        return None
    end = message.find(". ")
    return message if end < 0 else message[: end + 1]


def _retry_after(value: str | None) -> int | None:
    # ASCII digits only: str.isdigit() also takes '²' (a Latin-1 byte of a header), which int()
    # refuses; and not too many of them: int() refuses past 4,300 digits (no hint is that long).
    text = (value or "").strip()
    if text.isascii() and text.isdigit() and len(text) <= 12:
        return max(1, int(text))
    return None


def _usable(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    choices = data.get("choices")
    # A first choice with no message object is no answer: read as one, its text was lost.
    return (isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict)
            and isinstance(choices[0].get("message"), dict))
