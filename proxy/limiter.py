"""Per-team and per-key RPM/TPM limits over an exact sliding window.

The algorithm is a sliding log: every admitted call is kept, with its token
estimate, for one window (60 s by default). A call is admitted when, for every
scope that applies (team, and key if it has limits), the calls of the last
window number fewer than the RPM limit and their tokens plus this call's
estimate fit the TPM limit. There are no window edges to burst across, and a
caller is admitted again the moment the oldest call in its way leaves the
window. When the call ends, its estimate gives way to the tokens it really used,
counted for a window from then: a call as long as the window would otherwise
spend tokens no window ever counted.

With Redis, one Lua script checks and records every scope in one atomic round
trip on Redis's own clock, so all processes sharing the Redis share the limit
exactly; keys carry the team as a hash tag (one team's keys would share a
Redis Cluster slot, though the client talks to one node: Cluster is not
supported). A rejected call records nothing. If Redis fails, a circuit
breaker stops asking it for a while and `rate_limits.on_redis_error` decides:
`local` (a per-process limiter of the same semantics), `allow`, or `deny`. An
admit given up on may still run in Redis once it recovers: it is released then.
A key of one scope holding what the limiter never writes there is no failure of
Redis: it is repaired (REPAIR_SCRIPT) and the script sent again.

Limits are checked before the call is admitted into its job: a call to a closed
job that is also over its limit gets the 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .config import RateLimitsConfig, RedisConfig
from .occasional import EVERY, Occasional
from .resp import Keys, Redis, RedisError, ReplyError, Script

log = logging.getLogger("tollgate.limiter")

Scope = Literal["team", "key"]
Kind = Literal["requests", "tokens"]


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Limits:
    """The limits that apply to one call."""

    team_id: str
    key_id: str
    team_rpm: int
    team_tpm: int
    key_rpm: int | None = None
    key_tpm: int | None = None

    def scopes(self) -> list[tuple[Scope, str, int, int]]:
        scopes: list[tuple[Scope, str, int, int]] = [("team", self.team_id, self.team_rpm, self.team_tpm)]
        if self.key_rpm is not None or self.key_tpm is not None:
            scopes.append(("key", self.key_id, self.key_rpm or 2**53, self.key_tpm or 2**53))
        return scopes


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Usage:
    """Where one scope stands after the decision."""

    scope: Scope
    rpm: int
    requests: int  # admitted in the current window
    requests_reset: float  # seconds until the oldest of them leaves the window
    tpm: int
    tokens: int
    tokens_reset: float


# What a call that can never fit is told to change, when its caller names nothing better.
NEVER_FITS_ADVICE = "lower max_tokens or the prompt"


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class Decision:
    admitted: bool
    call_id: str
    limits: Limits
    estimate: int
    backend: Literal["redis", "local", "none"]
    usage: tuple[Usage, ...] = ()
    refused_scope: Scope | None = None
    refused_kind: Kind | None = None
    never_fits: bool = False
    retry_after: float | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the scope closest to each of its limits."""
        return {name.decode(): value.decode() for name, value in self.raw_headers()}

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as ASGI carries them: what every call's answer sends."""
        usage = self.usage
        if not usage:
            return []
        if len(usage) == 1:  # the team alone: no key limits
            requests = tokens = usage[0]
        else:
            requests = min(usage, key=lambda u: u.rpm - u.requests)
            tokens = min(usage, key=lambda u: u.tpm - u.tokens)
        return [
            (b"x-ratelimit-limit-requests", b"%d" % requests.rpm),
            (b"x-ratelimit-remaining-requests", b"%d" % max(0, requests.rpm - requests.requests)),
            (b"x-ratelimit-reset-requests", openai_duration(requests.requests_reset)),
            (b"x-ratelimit-limit-tokens", b"%d" % tokens.tpm),
            (b"x-ratelimit-remaining-tokens", b"%d" % max(0, tokens.tpm - tokens.tokens)),
            (b"x-ratelimit-reset-tokens", openai_duration(tokens.tokens_reset)),
        ]

    def released(self) -> Decision:
        """Where the scopes stand once this admitted call is forgotten again (its start was
        refused after its admission): the headers of that refusal do not count it."""
        # The call is the newest: the oldest it leaves behind resets as before, and a scope it
        # leaves empty resets in 0s, as both limiters answer for a scope that holds nothing.
        usage = []
        for u in self.usage:
            requests, tokens = max(0, u.requests - 1), max(0, u.tokens - self.estimate)
            usage.append(Usage(u.scope, u.rpm, requests, u.requests_reset if requests else 0.0, u.tpm, tokens,
                               u.tokens_reset if tokens else 0.0))
        return Decision(self.admitted, self.call_id, self.limits, self.estimate, self.backend, tuple(usage))

    def refusal(self, window: float = 60.0, advice: str = NEVER_FITS_ADVICE) -> tuple[str, dict[str, str]]:
        """The 429's message and headers; `window`: the limits' (rate_limits.window); `advice`:
        what a call that can never fit should change (the field its estimate counted)."""
        per = "per minute" if window == 60.0 else f"per {window:g} s"
        scope = self.refused_scope or "team"
        who = f"team '{self.limits.team_id}'" if scope == "team" else f"key '{self.limits.key_id}'"
        usage = next(u for u in self.usage if u.scope == scope)
        headers = self.headers()
        if self.never_fits:
            headers["x-should-retry"] = "false"
            return (
                f"Rate limit: this call's token estimate ({self.estimate}) exceeds the {who} limit of "
                f"{usage.tpm} tokens {per}, so it can never fit; {advice}",
                headers,
            )
        retry = max(1, math.ceil(self.retry_after or 0))
        headers["retry-after"] = str(retry)
        if self.refused_kind == "requests":
            what = f"{usage.rpm} requests {per}"
        else:
            what = f"{usage.tpm} tokens {per} (this call needs about {self.estimate})"
        return f"Rate limit exceeded: {who} allows {what}; retry in {retry} s", headers


def openai_duration(seconds: float) -> bytes:
    """Durations as OpenAI writes them in x-ratelimit-reset-*: 20ms, 1s, 6m0s, 1h0m0s; as a header's
    bytes, which is all they are made for."""
    if seconds <= 0:
        return b"0s"
    if seconds < 1:
        ms = math.ceil(seconds * 1000)
        if ms < 1000:  # 0.9995 s is rounded up to a whole second, written as one
            return b"%dms" % ms
    whole = math.ceil(seconds)
    if whole < 60:
        return b"%ds" % whole
    if whole < 3600:
        return b"%dm%ds" % (whole // 60, whole % 60)
    return b"%dh%dm%ds" % (whole // 3600, whole % 3600 // 60, whole % 60)  # a window above an hour


# --- the in-process limiter ----------------------------------------------------------------


@dataclass
class _Window:
    requests: deque = field(default_factory=deque)  # (admitted_at, call_id), oldest first
    # call_id -> (counted_from, amount), oldest first: from its admission, from its end once settled
    tokens: OrderedDict = field(default_factory=OrderedDict)
    total: int = 0
    used_at: float = 0.0  # the last admit or settle that touched it: nothing in it is younger

    def trim(self, cutoff: float) -> None:
        while self.requests and self.requests[0][0] <= cutoff:
            self.requests.popleft()
        while self.tokens:
            call_id, (counted_from, amount) = next(iter(self.tokens.items()))
            if counted_from > cutoff:
                break
            self.tokens.popitem(last=False)
            self.total -= amount


class LocalLimiter:
    """The same sliding log, for one process (no Redis, or Redis down under `local`)."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        # Least recently used first: a window unused for a whole window holds nothing that still
        # counts, and is let go (teams and keys come and go; each window held up to its RPM in
        # calls), so the windows kept are those of the last window's callers.
        self._windows: OrderedDict[tuple[Scope, str], _Window] = OrderedDict()

    def admit(self, limits: Limits, call_id: str, estimate: int) -> Decision:
        now = self._clock()
        cutoff = now - self._window
        windows = []
        refused: tuple[Scope, Kind] | None = None
        never = False
        retry_after = None
        self._forget_idle(cutoff)
        for scope, name, rpm, tpm in limits.scopes():
            window = self._used((scope, name), now)
            window.trim(cutoff)
            windows.append((scope, window, rpm, tpm))
            if estimate > tpm:
                # Whatever else refused it, waiting would not help: the caller is told so.
                if not never:
                    refused, never, retry_after = (scope, "tokens"), True, None
                continue
            if never:
                continue
            # Every full limit is looked at, and the call told to come back when the last of
            # them has room: sooner, it would be refused again.
            if len(window.requests) >= rpm:
                wait = window.requests[len(window.requests) - rpm][0] + self._window - now
                if retry_after is None or wait > retry_after:
                    refused, retry_after = (scope, "requests"), wait
            if window.total + estimate > tpm:
                wait = self._tokens_free_at(window, window.total + estimate - tpm) - now
                if retry_after is None or wait > retry_after:
                    refused, retry_after = (scope, "tokens"), wait
        if refused is None:
            for _, window, _, _ in windows:
                window.requests.append((now, call_id))
                window.tokens[call_id] = (now, estimate)
                window.total += estimate
        usage = tuple([  # a list made first: a generator is resumed once for each scope
            Usage(
                scope,
                rpm,
                len(window.requests),
                (window.requests[0][0] + self._window - now) if window.requests else 0.0,
                tpm,
                window.total,
                # As Redis answers: no token counting (entries of 0 included), nothing to reset.
                (next(iter(window.tokens.values()))[0] + self._window - now) if window.total else 0.0,
            )
            for scope, window, rpm, tpm in windows
        ])
        return Decision(  # positional, as every per-call record is made (calls.py)
            refused is None,  # admitted
            call_id,
            limits,
            estimate,
            "local",  # backend
            usage,
            refused[0] if refused else None,  # refused_scope
            refused[1] if refused else None,  # refused_kind
            never,  # never_fits
            retry_after,
        )

    def _used(self, key: tuple[Scope, str], now: float) -> _Window:
        """The scope's window, made if it has none, marked as the one most recently used."""
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        else:
            self._windows.move_to_end(key)
        window.used_at = now
        return window

    def _forget_idle(self, cutoff: float) -> None:
        windows = self._windows
        while windows:
            oldest = next(iter(windows.values()))
            if oldest.used_at > cutoff:
                return
            windows.popitem(last=False)

    def _tokens_free_at(self, window: _Window, needed: int) -> float:
        freed = 0
        for counted_from, amount in window.tokens.values():
            freed += amount
            if freed >= needed:
                return counted_from + self._window
        return self._clock() + self._window

    def settle(self, decision: Decision, tokens: int, release: bool = False) -> None:
        """The call's estimate gives way to its real usage, counted for a window from now (see
        SETTLE_SCRIPT); or, on `release`, the call is forgotten."""
        call_id = decision.call_id
        now = self._clock()
        for scope, name, _, _ in decision.limits.scopes():
            if release:
                window = self._windows.get((scope, name))
                if window is None or call_id not in window.tokens:
                    continue
                _, amount = window.tokens.pop(call_id)
                window.total -= amount
                window.requests = deque(r for r in window.requests if r[1] != call_id)
                continue
            window = self._used((scope, name), now)
            # Put back last: nothing in the window is younger, so its tokens stay in time order.
            _, amount = window.tokens.pop(call_id, (now, 0))
            window.tokens[call_id] = (now, tokens)
            window.total += tokens - amount


# --- Redis -----------------------------------------------------------------------------------

# Both scripts run this on each scope before anything else touches it (a write would make a
# missing total again). An evicting maxmemory policy (volatile-* too: all these keys expire) takes
# keys one at a time, and what it leaves of a scope would count wrongly for as long as calls keep
# it alive: tokens whose log entry or amount went never leave the total, and a total made again
# from nothing goes below zero as the calls it held leave the window. A scope's tokens log and
# amounts hold the same calls, and its total is 0 when they hold none: when not, the scope's
# tokens count afresh, as if all of it had been evicted. (A requests log evicted alone forgets its
# calls for what is left of their window: nothing tells it.)
EVICTION_CHECK = """
local function count_afresh_if_evicted(tokens, amounts, total)
  local held, counted = redis.call('HLEN', amounts), redis.call('GET', total)
  if held ~= redis.call('ZCARD', tokens) or (held > 0 and not counted)
      or (held == 0 and counted and counted ~= '0') then
    redis.call('DEL', tokens, amounts, total)
  end
end
"""

# Calls of a scope's window an admit refused for tokens reads at most, to find when enough have
# left: about half a millisecond of Redis's single thread.
SCAN_AT_MOST = 1024

# KEYS, four per scope: the requests log, the tokens log, the token amounts, their total.
# ARGV: window (ms), call id, estimate, then per scope its RPM and TPM limits.
# Returns integers only, which the client reads fastest: now (ms), refused scope (0 =
# admitted), refused kind (0 none, 1 requests, 2 tokens, 3 tokens that can never fit), retry
# (ms), then per scope: requests, oldest request (ms), tokens, oldest token entry (ms).
ADMIT_SCRIPT = EVICTION_CHECK + f"local SCAN_AT_MOST = {SCAN_AT_MOST}\n" + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window = tonumber(ARGV[1])
local call = ARGV[2]
local estimate = tonumber(ARGV[3])
local cutoff = now - window
local scopes = #KEYS / 4
local refused, kind, retry = 0, 0, 0
-- Out of memory (maxmemory under noeviction), Redis refuses a script's first write if it adds
-- data, and lets the rest through once one was made: the trims below would let every admit be
-- recorded while the settles, adding first, were refused. This write adds nothing (XX: only a
-- member already there, and the call is new), but is refused as one that adds would be.
redis.call('ZADD', KEYS[1], 'XX', 0, call)

for s = 1, scopes do
  local requests, tokens, amounts, total = KEYS[s*4-3], KEYS[s*4-2], KEYS[s*4-1], KEYS[s*4]
  count_afresh_if_evicted(tokens, amounts, total)
  -- Entries ahead of now were logged on a clock since set back (a step of the wall clock of
  -- Redis's host): counted from now, for one window, not until the clock catches up.
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', requests, now + 1, '+inf')) do
    redis.call('ZADD', requests, now, member)
  end
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', tokens, now + 1, '+inf')) do
    redis.call('ZADD', tokens, now, member)
  end
  redis.call('ZREMRANGEBYSCORE', requests, '-inf', cutoff)
  local expired = redis.call('ZRANGEBYSCORE', tokens, '-inf', cutoff)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + tonumber(redis.call('HGET', amounts, member) or '0')
      redis.call('HDEL', amounts, member)
    end
    redis.call('ZREMRANGEBYSCORE', tokens, '-inf', cutoff)
    redis.call('DECRBY', total, freed)
  end
  local rpm, tpm = tonumber(ARGV[2 + s*2]), tonumber(ARGV[3 + s*2])
  if estimate > tpm then
    -- Whatever else refused it, waiting would not help: the caller is told so.
    if kind ~= 3 then
      refused, kind, retry = s, 3, 0
    end
  elseif kind ~= 3 then
    -- Every full limit is looked at, and the call told to come back when the last of them
    -- has room: sooner, it would be refused again.
    local count = redis.call('ZCARD', requests)
    local counted = redis.call('GET', total) or '0'
    -- INCRBY below takes integers alone: a total holding another number ('1.5', set by hand) failed
    -- there, after the scopes before it had recorded the call, and the admit sent again once it
    -- was repaired recorded their estimates twice. Refused here, before anything is recorded.
    if not string.match(counted, '^%-?%d+$') then
      error('a total that is no integer: ' .. total)
    end
    local used = tonumber(counted)
    if count >= rpm then
      local entry = redis.call('ZRANGE', requests, count - rpm, count - rpm, 'WITHSCORES')
      local wait = tonumber(entry[2]) + window - now
      if refused == 0 or wait > retry then
        refused, kind, retry = s, 1, wait
      end
    end
    if used + estimate > tpm then
      -- The call waits for the oldest call whose leaving frees enough: found from whichever end
      -- of the window holds less in the way (from the oldest, the tokens that must leave; from
      -- the newest, those that may stay, the room left beside the estimate), in growing batches
      -- and at most SCAN_AT_MOST calls. A busy team's window holds many: reading them all took
      -- Redis a tenth of a second per 200,000, every team's admits waiting behind it. Past that
      -- many, the wait told is a bound, later than the earliest: until the last call read has
      -- left (from the newest), or every call now counted (from the oldest). Read from the
      -- newest, the total is taken for the sum of the amounts, as the scripts keep it: a total
      -- set otherwise by hand may have the call told a wait after which it is refused again.
      local needed, stay = used + estimate - tpm, tpm - estimate
      local newest_first = stay < needed
      local wait, summed, score = nil, 0, nil
      local first, batch, capped = 0, 16, false
      while not wait do
        if first >= SCAN_AT_MOST then
          capped = true
          break
        end
        local n = math.min(batch, SCAN_AT_MOST - first)
        local entries
        if newest_first then
          entries = redis.call('ZRANGE', tokens, -(first + n), -(first + 1), 'WITHSCORES')
        else
          entries = redis.call('ZRANGE', tokens, first, first + n - 1, 'WITHSCORES')
        end
        local read = #entries / 2
        for k = 1, read do
          local i = newest_first and (read - k) * 2 + 1 or k * 2 - 1
          summed = summed + tonumber(redis.call('HGET', amounts, entries[i]) or '0')
          score = tonumber(entries[i + 1])
          if (newest_first and summed > stay) or (not newest_first and summed >= needed) then
            wait = score + window - now
            break
          end
        end
        if read < n then
          break  -- all read: the amounts fall short of the total, which the window then frees
        end
        first, batch = first + n, batch * 2
      end
      if capped and newest_first then
        wait = score + window - now
      elseif capped then
        wait = tonumber(redis.call('ZRANGE', tokens, -1, -1, 'WITHSCORES')[2]) + window - now
      elseif not wait then
        wait = window
      end
      if refused == 0 or wait > retry then
        refused, kind, retry = s, 2, wait
      end
    end
  end
end

local result = {now, refused, kind, retry}
for s = 1, scopes do
  local requests, tokens, amounts, total = KEYS[s*4-3], KEYS[s*4-2], KEYS[s*4-1], KEYS[s*4]
  if refused == 0 then
    redis.call('ZADD', requests, now, call)
    redis.call('ZADD', tokens, now, call)
    redis.call('HSET', amounts, call, estimate)
    redis.call('INCRBY', total, estimate)
    for _, key in ipairs({requests, tokens, amounts, total}) do
      redis.call('PEXPIRE', key, window + 1000)
    end
  end
  local oldest_request = redis.call('ZRANGE', requests, 0, 0, 'WITHSCORES')
  local oldest_tokens = redis.call('ZRANGE', tokens, 0, 0, 'WITHSCORES')
  table.insert(result, redis.call('ZCARD', requests))
  table.insert(result, tonumber(oldest_request[2] or now))
  table.insert(result, tonumber(redis.call('GET', total) or '0'))
  table.insert(result, tonumber(oldest_tokens[2] or now))
end
return result
"""

# KEYS, four per scope as above. ARGV: call id, real tokens, release (1: forget the call), window
# (ms), and for a settle that waited for Redis how long ago the call ended (ms; none: now). A
# call's real usage counts for a window from when it is known, the call's end, whatever is left
# of its admission's: a call longer than the window would otherwise never count it, and one
# nearly as long would count it for a moment. One that ended a window ago or more counts no more.
SETTLE_SCRIPT = EVICTION_CHECK + """
local call, actual, release, window = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[4])
local ago = tonumber(ARGV[5] or '0')
local now
for s = 1, #KEYS / 4 do
  local requests, tokens, amounts, total = KEYS[s*4-3], KEYS[s*4-2], KEYS[s*4-1], KEYS[s*4]
  count_afresh_if_evicted(tokens, amounts, total)
  local old = redis.call('HGET', amounts, call)
  if release or ago >= window then
    -- Its tokens are forgotten: released, it never started; or it ended a window ago or more
    -- (the settle waited for Redis), its usage has had its window and its estimate's began before.
    if old then
      if release then
        redis.call('ZREM', requests, call)
      end
      redis.call('ZREM', tokens, call)
      redis.call('HDEL', amounts, call)
      redis.call('DECRBY', total, tonumber(old))
    end
  else
    if not now then
      local clock = redis.call('TIME')
      now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    end
    redis.call('ZADD', tokens, now - ago, call)
    redis.call('HSET', amounts, call, actual)
    redis.call('INCRBY', total, actual - tonumber(old or '0'))
    for _, key in ipairs({tokens, amounts, total}) do
      redis.call('PEXPIRE', key, window + 1000)
    end
  end
end
return 1
"""


# KEYS: the readiness key. The limiter runs only scripts, and a Redis that takes writes may still
# refuse those (scripting denied by an ACL, or switched off by a managed service).
READY_SCRIPT = """
redis.call('SET', KEYS[1], '1', 'PX', 60000)
return 1
"""


# KEYS, four per scope as above; sent only after a script failed on what a key holds. The keys
# under key_prefix are Tollgate's own, and one holding what the limiter never writes there (a
# string SET by hand, another program's data under the same prefix) failed every admit and settle
# of its scope, on every process. Such a key is deleted: the scope then counts its tokens afresh,
# or its requests from none, as after an eviction (see EVICTION_CHECK). Returns what it deleted.
REPAIR_SCRIPT = """
local kinds = {'zset', 'zset', 'hash', 'string'}
local integer = '^%-?%d+$'
local deleted = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local wrong = nil
  if kind ~= 'none' and kind ~= kinds[(i - 1) % 4 + 1] then
    wrong = 'a ' .. kind
  elseif kind == 'string' and not string.match(redis.call('GET', key), integer) then
    wrong = 'a string that is no integer'
  elseif kind == 'hash' then
    for _, amount in ipairs(redis.call('HVALS', key)) do
      if not string.match(amount, integer) then
        wrong = 'a hash with a value that is no integer'
        break
      end
    end
  end
  if wrong then
    redis.call('DEL', key)
    table.insert(deleted, key .. ' (' .. wrong .. ')')
  end
end
return deleted
"""


class RedisUnavailable(Exception):
    pass


class DamagedKeys(RedisUnavailable):
    """Redis refused a scope's keys for what they hold, even once repaired. Redis itself answers:
    only the calls of that scope are concerned, not every team's."""


def _unavailable(error: BaseException) -> RedisUnavailable:
    """What a Redis client error means to the limiter, naming the error."""
    return RedisUnavailable(f"{type(error).__name__}: {error}")


def _damage(error: BaseException | None) -> bool:
    """Whether a script's error may come from what one of its keys holds (the wrong type, a value
    that is no number) rather than from Redis: it answered, and other keys are not concerned."""
    if not isinstance(error, ReplyError):
        return False
    text = str(error)
    return text.startswith("WRONGTYPE") or (text.startswith("ERR") and "user_script" in text)


def _found_damage(repair: asyncio.Future[Any]) -> bool:
    """Whether the repair deleted a key: only then was a script's failure the keys' doing."""
    return repair.done() and not repair.cancelled() and repair.exception() is None and bool(repair.result())


def _log_repair(reply: asyncio.Future[Any]) -> None:
    if reply.cancelled() or reply.exception() is not None:
        return  # the command sent again behind it tells how Redis fares
    for deleted in reply.result():
        log.warning(
            "Redis key %s held what Tollgate never writes there: deleted, so its scope's limits count afresh "
            "(something else writes under redis.key_prefix)",
            deleted.decode(errors="replace"),
        )


MAX_KEYSETS = 10_000
# Admits of unknown outcome kept for release. Their releases go ahead of one call's admit, which
# a bound keeps well within Redis's timeout. So many pile up only when that many admits were in
# flight as Redis failed; those dropped count until their window ends, as before.
MAX_UNKNOWN = 1_000


class RedisLimiter:
    def __init__(self, config: RedisConfig, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        assert config.url is not None
        self._clock = clock
        self._prefix = config.key_prefix
        self._window_ms = round(window * 1000)
        self._admit = Script(ADMIT_SCRIPT)
        self._settle = Script(SETTLE_SCRIPT)
        self._ready = Script(READY_SCRIPT)
        # No retries: a dead Redis must cost one short timeout, then the breaker. The scripts are
        # loaded as each connection opens, so that after a restart a settle is not run after the
        # admit sent behind it (see `Redis`).
        scripts = (self._admit, self._settle, self._ready)
        self._redis = Redis(config.url, config.connect_timeout, config.timeout, scripts)
        self.address = self._redis.address
        self._ready_keys = Keys([f"{self._prefix}ready"])
        self._keysets: dict[tuple[str, str | None], Keys] = {}  # by team, and key if it has limits
        # Admits given up on (a timeout, a lost connection): Redis may have run them, or may run
        # them yet (a command written waits in its socket while Redis is stalled), counting a
        # call that was answered otherwise: refused, or admitted by the local limiter. Each is
        # released once Redis answers again; a release finds nothing if it never ran, and also
        # if the window has since let it go. A call's real usage that could not be sent (the
        # breaker open, or Redis failing as it was sent) waits here too, sent the same way: a
        # settle sent twice counts the usage once, for a window from the call's end (when it was
        # queued, `clock`). Call id -> the keys, SETTLE_SCRIPT arguments and that time, oldest first.
        self._unknown: dict[str, tuple[Keys, list[Any], float]] = {}
        self._unrepaired_logged: str | None = None

    async def close(self) -> None:
        await self._redis.close()

    async def flush(self) -> None:
        """Send what waits for the next admit (releases, real usage kept while Redis was not
        asked) and wait for Redis to have run it and whatever was sent before, within its
        timeout: as the process stops no admit will carry it, and the estimates and the calls
        that never started would count for the rest of their window."""
        if self._unknown:
            await self._release_unknown()
        elif not self._redis.owes_replies:
            return
        # Answered after the scripts sent before it, among them settles of calls that ended in
        # this turn of the loop, whose write closing the connection would otherwise discard.
        await self._redis.call("PING")

    def _keys(self, limits: Limits) -> Keys:
        # Whether the key has a scope of its own, as `Limits.scopes` decides, without making them.
        keyed = limits.key_rpm is not None or limits.key_tpm is not None
        which = (limits.team_id, limits.key_id if keyed else None)
        keys = self._keysets.get(which)
        if keys is None:
            scopes = limits.scopes()
            names = []
            for scope, name, _, _ in scopes:
                base = f"{self._prefix}{{team:{limits.team_id}}}:{scope}:{name}"
                names += [f"{base}:requests", f"{base}:tokens", f"{base}:amounts", f"{base}:total"]
            if len(self._keysets) >= MAX_KEYSETS:
                self._keysets.clear()  # a bound, not a cache policy: sets are cheap to build again
            keys = self._keysets[which] = Keys(names)
        return keys

    async def _run(self, script: Script, keys: Keys, args: list[Any]) -> Any:
        try:
            return await self._redis.evalsha(script, keys, args)
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def ping(self) -> None:
        """Whether Redis runs the limiter's scripts and takes their writes: one that answers
        PING may still refuse them all (a read-only replica after a failover, out of memory,
        scripting denied)."""
        reply = await self._run(self._ready, self._ready_keys, [])
        if reply != 1:  # a reply the script never gives: see `admit`
            self._redis.drop("a reply the readiness script never gives")
            raise RedisUnavailable(f"unexpected reply to the readiness script: {reply!r:.100}")

    async def admit(self, limits: Limits, call_id: str, estimate: int) -> Decision:
        scopes = limits.scopes()
        keys = self._keys(limits)
        args: list[Any] = [self._window_ms, call_id, estimate]
        for _, _, rpm, tpm in scopes:
            args += [rpm, tpm]
        try:
            if self._unknown:
                await self._release_unknown()
            try:  # as `_run`, without a coroutine more on every call's way
                result = await self._redis.evalsha(self._admit, keys, args)
            except RedisError as exc:
                result = await self._again_repaired(exc, self._admit, keys, args)
        except DamagedKeys:
            raise  # refused before it recorded anything: nothing to release
        except (RedisUnavailable, asyncio.CancelledError):
            # It may have run (a shutdown's cut, Redis slow to answer): released with the next
            # admit, or as the limiter closes, so that a call that never started counts for nothing.
            self._release_later(call_id, keys)
            raise
        try:
            return self._decision(result, limits, scopes, call_id, estimate)
        except (TypeError, ValueError, IndexError) as exc:
            # Well formed, but no reply the script gives: another service at Redis's address, or
            # replies out of step with their commands. Each call raised, a 500 with the breaker
            # closed; the connection is given up as after a timeout, and the call may have run.
            self._redis.drop(f"a reply the admit script never gives ({type(exc).__name__}: {exc})")
            self._release_later(call_id, keys)
            raise RedisUnavailable(f"unexpected reply to the admit script: {result!r:.100}") from None

    def _decision(
        self, result: Any, limits: Limits, scopes: list[tuple[Scope, str, int, int]], call_id: str, estimate: int
    ) -> Decision:
        now, refused, kind, retry = result[0], result[1], _KINDS[result[2]], result[3]
        if result[2] < 0 or not 0 <= refused <= len(scopes):  # a negative index would still pick one
            raise ValueError(f"refused scope {refused} or kind {result[2]} out of range")
        usage = []
        for i, (scope, _, rpm, tpm) in enumerate(scopes):
            requests, oldest_request, tokens, oldest_tokens = result[4 + 4 * i : 8 + 4 * i]
            usage.append(
                Usage(
                    scope,
                    rpm,
                    requests,
                    max(0, oldest_request + self._window_ms - now) / 1000 if requests else 0.0,
                    tpm,
                    tokens,
                    max(0, oldest_tokens + self._window_ms - now) / 1000 if tokens else 0.0,
                )
            )
        return Decision(  # positional, as every per-call record is made (calls.py)
            refused == 0,  # admitted
            call_id,
            limits,
            estimate,
            "redis",  # backend
            tuple(usage),
            scopes[refused - 1][0] if refused else None,  # refused_scope
            ("tokens" if kind == "never" else kind) if refused else None,  # type: ignore[arg-type]  # refused_kind
            kind == "never",  # never_fits
            retry / 1000 if refused and kind != "never" else None,  # retry_after
        )

    def settle_later(self, decision: Decision, tokens: int, release: bool = False, ended: float | None = None) -> None:
        """`settle`, sent with the next admit that reaches Redis; its usage counted from `ended`
        (the clock's time when the call ended; none: now)."""
        args = self._settle_args(decision.call_id, tokens, release)
        self._later(decision.call_id, self._keys(decision.limits), args, ended)

    def _release_later(self, call_id: str, keys: Keys) -> None:
        self._later(call_id, keys, self._settle_args(call_id, 0, True))

    def _settle_args(self, call_id: str, tokens: int, release: bool) -> list[Any]:
        return [call_id, tokens, 1 if release else 0, self._window_ms]

    def _later(self, call_id: str, keys: Keys, args: list[Any], queued_at: float | None = None) -> None:
        queued = self._unknown.get(call_id)
        if queued is not None and queued[1][2] and not args[2]:
            # A release waiting stands: the call never started, and the settle of its record's
            # end (no usage) would count its request for the rest of the window.
            return
        if queued is None and len(self._unknown) >= MAX_UNKNOWN:
            del self._unknown[next(iter(self._unknown))]
        self._unknown[call_id] = (keys, args, self._clock() if queued_at is None else queued_at)

    def _aged(self, args: list[Any], queued_at: float | None) -> list[Any]:
        """A settle's arguments as sent after waiting since `queued_at`, when its call ended: its
        usage counts for a window from then, not from when Redis is back (after an outage longer
        than the window, a whole window more)."""
        if queued_at is None or args[2]:  # a release forgets the call whenever it comes
            return args
        return [*args, max(0, round((self._clock() - queued_at) * 1000))]

    async def _release_unknown(self) -> None:
        """Send the releases ahead of the admit that called, in the same write: that admit is
        decided without the calls released. Redis reads a connection from the turn of its loop
        after the one that accepted it, by when it has read what an older connection had
        waiting, so an admit given up on runs before its release (unless the network held its
        bytes back even longer; then the release finds nothing, and the call counts as before)."""
        try:
            await self._redis.connect()
        except RedisError as exc:
            raise _unavailable(exc) from None
        unknown, self._unknown = self._unknown, {}
        # Loaded first: a release that found the script unknown would be sent again after the admit.
        self._redis.call_soon("SCRIPT", "LOAD", self._settle.source).add_done_callback(_outcome_told_elsewhere)
        for call_id, (keys, args, queued_at) in unknown.items():
            reply = self._redis.evalsha_soon(self._settle, keys, self._aged(args, queued_at))
            reply.add_done_callback(functools.partial(self._released, call_id, keys, args, queued_at))

    def _released(
        self, call_id: str, keys: Keys, args: list[Any], queued_at: float, reply: asyncio.Future[Any]
    ) -> None:
        error = None if reply.cancelled() else reply.exception()
        if _damage(error):
            self._resend_repaired(call_id, keys, args, queued_at)
        elif (reply.cancelled() or error is not None) and call_id not in self._unknown:
            self._later(call_id, keys, args, queued_at)  # to be tried again: sent twice, it still counts once

    async def settle(self, decision: Decision, tokens: int, release: bool = False) -> None:
        args = self._settle_args(decision.call_id, tokens, release)
        keys = self._keys(decision.limits)
        try:
            await self._redis.evalsha(self._settle, keys, args)
        except RedisError as exc:
            await self._again_repaired(exc, self._settle, keys, args)

    async def _again_repaired(self, error: RedisError, script: Script, keys: Keys, args: list[Any]) -> Any:
        """`script`, which Redis refused with `error`, run again once its keys are repaired, if
        what they hold may be why; only on that error's way. Both leave in one write, the repair
        first (Redis runs a connection's commands in order): one round trip more. A script sent
        twice counts once (the admit refused recorded nothing, a settle counts its usage once)."""
        if not _damage(error):
            raise _unavailable(error) from None
        repair = self._repair_soon(keys)
        try:
            return await self._redis.evalsha(script, keys, args)
        except RedisError as exc:
            # Answered in order, the repair has its reply by now. A script's runtime errors are
            # worded alike whatever their cause (a bug of ours, a command the server lacks, and
            # on Redis 6 out of memory too): unless a key was found damaged, the failure is
            # Redis's, for every team, and opens the breaker.
            if _damage(exc) and _found_damage(repair):
                self._unrepaired(exc)
                raise DamagedKeys(f"{type(exc).__name__}: {exc}") from None
            raise _unavailable(exc) from None

    def _repair_soon(self, keys: Keys) -> asyncio.Future[Any]:
        # Sent whole: rare, and one round trip, where a script unknown would cost two.
        reply = self._redis.call_soon("EVAL", REPAIR_SCRIPT, len(keys.names), *keys.names)
        reply.add_done_callback(_log_repair)
        return reply

    def settle_repaired(self, decision: Decision, tokens: int, ended: float | None = None) -> None:
        """`settle_soon` again, behind the repair of its keys: Redis refused it for what they hold."""
        args = self._settle_args(decision.call_id, tokens, False)
        self._resend_repaired(decision.call_id, self._keys(decision.limits), args, ended)

    def _resend_repaired(self, call_id: str, keys: Keys, args: list[Any], queued_at: float | None = None) -> None:
        repair = self._repair_soon(keys)
        reply = self._redis.evalsha_soon(self._settle, keys, self._aged(args, queued_at))
        reply.add_done_callback(functools.partial(self._resent, call_id, keys, args, queued_at, repair))

    def _resent(
        self,
        call_id: str,
        keys: Keys,
        args: list[Any],
        queued_at: float | None,
        repair: asyncio.Future[Any],
        reply: asyncio.Future[Any],
    ) -> None:
        error = None if reply.cancelled() else reply.exception()
        if _damage(error) and _found_damage(repair):
            self._unrepaired(error)  # type: ignore[arg-type]  # given up: its scope was counted afresh anyway
        elif (reply.cancelled() or error is not None) and call_id not in self._unknown:
            # Redis failed as a whole (a script error no damaged key explains is Redis's, as in
            # `_again_repaired`): sent with the next admit, as any.
            self._later(call_id, keys, args, queued_at)

    def _unrepaired(self, error: BaseException) -> None:
        # Once per distinct error: a scope refused for good would otherwise log on every call.
        if str(error) != self._unrepaired_logged:
            self._unrepaired_logged = str(error)
            log.warning("Redis refuses a scope's limiter keys even once repaired (%s): its calls follow "
                        "on_redis_error", error)

    def settle_soon(self, decision: Decision, tokens: int) -> asyncio.Future[Any]:
        args = self._settle_args(decision.call_id, tokens, False)
        return self._redis.evalsha_soon(self._settle, self._keys(decision.limits), args)


_KINDS = ("", "requests", "tokens", "never")  # ADMIT_SCRIPT's refused kinds, by number


def _outcome_told_elsewhere(reply: asyncio.Future[Any]) -> None:
    if not reply.cancelled():
        reply.exception()  # retrieved, so that asyncio does not log it: the replies after it tell


# --- the limiter the gateway uses --------------------------------------------------------------

# Seconds between two lines about Redis being unavailable, at least (a name of its own: the
# tests shorten it).
OUTAGE_LOG_EVERY = EVERY
UNAVAILABLE = "Redis at %s unavailable (%s): rate limits now follow on_redis_error=%s"


class RateLimiter:
    """Redis when configured and healthy; otherwise what `on_redis_error` says."""

    def __init__(
        self,
        limits: RateLimitsConfig,
        redis: RedisConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = limits.on_redis_error
        self.local = LocalLimiter(limits.window, clock)
        self.redis = RedisLimiter(redis, limits.window, clock) if redis.url else None
        self._clock = clock
        self._cooldown = redis.breaker_cooldown
        self._open_until = 0.0  # the breaker: while open, Redis is not asked
        self._probing = False
        self.last_error: str | None = None
        self._check_failure: str | None = None  # readiness's, as last logged
        # Each cooldown's probe finding Redis still down is due to say so again: once a minute.
        self._unavailable = Occasional(log, logging.WARNING, every=OUTAGE_LOG_EVERY, clock=clock)

    async def close(self) -> None:
        try:
            if self.redis is not None:
                # Whatever the breaker says: one short try costs the shutdown Redis's timeout at most.
                with contextlib.suppress(RedisUnavailable, RedisError):
                    await self.redis.flush()
                await self.redis.close()
        finally:
            # Last: the settles the flush or the close failed tell of it later (their replies'
            # callbacks), and a line set due then came after the limiter closed.
            self._unavailable.close()

    @property
    def degraded(self) -> bool:
        return self.redis is not None and self._open_until > self._clock()

    def _may_ask_redis(self) -> bool:
        return self._open_until <= self._clock()

    def reopens_in(self) -> float:
        """Seconds until the breaker lets a request ask Redis again (0 when it is closed)."""
        return max(0.0, self._open_until - self._clock())

    def _failed(self, error: RedisUnavailable) -> None:
        if not self.degraded:
            self._unavailable(UNAVAILABLE, self.redis.address if self.redis else "", error, self.policy)
        self.last_error = str(error)
        self._open_until = self._clock() + self._cooldown

    def _recovered(self) -> None:
        if self._open_until:
            self._unavailable.over("Redis is back: rate limits are shared again")
        self._open_until = 0.0
        self.last_error = None

    async def admit(self, limits: Limits, call_id: str, estimate: int) -> Decision:
        if self.redis is None:
            return self.local.admit(limits, call_id, estimate)
        if self._may_ask_redis() and not self._probing:
            # After the breaker opened, one request at a time finds out whether Redis is back.
            probing = self._open_until > 0
            self._probing = probing
            try:
                decision = await self.redis.admit(limits, call_id, estimate)
                self._recovered()
                return decision
            except DamagedKeys:
                pass  # this call alone follows on_redis_error: Redis answers, and other teams' keys are sound
            except RedisUnavailable as error:
                self._failed(error)
            finally:
                if probing:
                    self._probing = False
        if self.policy == "local":
            return self.local.admit(limits, call_id, estimate)
        if self.policy == "allow":
            # Admitted whatever the count; this process's own view still fills the headers.
            return dataclasses.replace(self.local.admit(limits, call_id, estimate), admitted=True)
        raise RedisUnavailable(self.last_error or "Redis is unavailable")

    async def settle(self, decision: Decision, tokens: int, release: bool = False) -> None:
        if decision.backend == "local":
            self.local.settle(decision, tokens, release)
        elif decision.backend == "redis" and self.redis is not None:
            if not self._may_ask_redis():
                # A call that never started must not count until the window ends, nor one that
                # ended count its estimate rather than what it used: sent once Redis answers.
                self.redis.settle_later(decision, tokens, release)
                return
            ended = self._clock()  # not the failure's time, up to Redis's timeout later
            try:
                await self.redis.settle(decision, tokens, release)
            except DamagedKeys:
                pass  # given up: its scope was counted afresh anyway
            except RedisUnavailable as error:
                self.redis.settle_later(decision, tokens, release, ended)
                self._failed(error)

    def settle_soon(self, decision: Decision, tokens: int) -> None:
        """`settle` without waiting for Redis to answer: the command is on its way before this
        returns, so an admit sent later is counted with the real usage, not the estimate."""
        if decision.backend == "local":
            self.local.settle(decision, tokens)
        elif decision.backend == "redis" and self.redis is not None:
            if not self._may_ask_redis():
                self.redis.settle_later(decision, tokens)
                return
            reply = self.redis.settle_soon(decision, tokens)
            ended = self._clock()  # its usage counts from now, however late a failure is heard of
            reply.add_done_callback(functools.partial(self._settled, self.redis, decision, tokens, ended))

    def _settled(
        self, redis: RedisLimiter, decision: Decision, tokens: int, ended: float, reply: asyncio.Future[Any]
    ) -> None:
        error = None if reply.cancelled() else reply.exception()
        if error is None:
            return
        if _damage(error):  # Redis answers: its other keys are sound
            redis.settle_repaired(decision, tokens, ended)
        else:
            redis.settle_later(decision, tokens, ended=ended)  # it may have run, or not: sent again, it counts once
            self._failed(_unavailable(error))

    async def check(self) -> str:
        """For readiness: 'ok', 'not configured', or 'degraded: ...'. It looks and steers nothing:
        the breaker opens and closes on the limiter's own commands, for which readiness's script
        stands in only so far (Redis may take the one while refusing the other: an ACL on keys,
        a team's key it cannot repair), and a breaker closed by readiness had the next calls pay
        a failed round trip each time readiness was asked, one opened by it sent every call to
        on_redis_error while the limiter's commands succeeded."""
        if self.redis is None:
            return "not configured"
        if self.degraded:  # Redis is left alone for the cooldown, by readiness too
            return f"degraded: the limiter's commands failed (on_redis_error: {self.policy})"
        try:
            await self.redis.ping()
        except RedisUnavailable as error:
            if str(error) != self._check_failure:  # the details go to the log; readiness is public
                log.warning("Readiness: Redis refuses the limiter's check (%s)", error)
            self._check_failure = str(error)
            return f"degraded: unreachable or refusing writes (on_redis_error: {self.policy})"
        self._check_failure = None
        return "ok"
