"""Log lines for a fault that fails every request while it lasts.

A wrong upstream key or a full disk fails each call alike: a line each, at a few hundred calls
a second, buries the log and whatever else it says. Such a line is said at most once per
interval, with how many times it was due since it was last said; and its end once, after a
line said of it, at the same level (warning at most: an end is no error to alert on), so that an
operator whose logging.level shows the fault shows its end. A fault that begins again within the
interval after its last line, its end said meanwhile, is said once the interval is up (with its
end, if it came), rather than only if it is still failing requests then.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable

EVERY = 60.0  # seconds between two lines about the same fault, at least


class Occasional:
    """One fault's log line, said at most once per `every` seconds."""

    def __init__(
        self, log: logging.Logger, level: int, every: float = EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self._level = level
        self._every = every
        self._clock = clock
        self._said_at = -math.inf
        self._due = 0  # times the line was due since it was last said
        # The line was said (or is to be, late) since the fault was last over: `over` has something
        # to say. Public, for a hot path to test before it calls `over` on every success.
        self.said = False
        per = "a minute" if every == 60 else f"every {every:g} s"
        self._suffix = f" (times since last logged: %d; logged at most once {per})"
        self._late_suffix = f" (times since last logged: %d; logged at most once {per}: said late, first due %d s ago)"
        # A fault begun again within the interval after its end was said: said once the interval
        # is up, by a timer on the running loop. What to say of it, when it began, how it ended.
        self._late: tuple[str, tuple[Any, ...]] | None = None
        self._late_since = 0.0
        self._late_end: tuple[str, tuple[Any, ...], float] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def __call__(self, message: str, *args: Any) -> None:
        self._due += 1
        now = self._clock()
        if now - self._said_at >= self._every:
            self._say(now, message, args)
        elif not self.said:
            # Not told of otherwise until it fails a request past the interval: it may end before.
            self._say_late(now, message, args)

    def close(self) -> None:
        """Its owner is done: nothing more is said later (a line would outlive what it is about)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _say(self, now: float, message: str, args: tuple[Any, ...], late_since: float | None = None) -> None:
        """Say the line; `late_since`: when it was first due, if it is said late."""
        self._said_at = now
        if late_since is None:
            self._log.log(self._level, message + self._suffix, *args, self._due)
        else:
            self._log.log(self._level, message + self._late_suffix, *args, self._due, round(now - late_since))
        self._due = 0
        self.said = True
        self._late = self._late_end = None

    def _say_late(self, now: float, message: str, args: tuple[Any, ...]) -> None:
        if self._late is None:
            self._late_since = now
        self._late, self._late_end = (message, args), None
        self.said = True
        if self._timer is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # said from outside a loop: as the next request past the interval does
                return
            self._timer = loop.call_later(self._said_at + self._every - now, self._said_late)

    def _said_late(self) -> None:
        self._timer = None
        if self._late is None:
            return  # said meanwhile, by a request past the interval
        now = self._clock()
        if now - self._said_at < self._every:  # a loop's timer may fire a clock tick early
            self._timer = asyncio.get_running_loop().call_later(self._said_at + self._every - now, self._said_late)
            return
        (message, args), end = self._late, self._late_end
        self._say(now, message, args, self._late_since)
        if end is not None:
            message, args, ended_at = end
            self._log.log(min(self._level, logging.WARNING), message + " (%d s ago)", *args, round(now - ended_at))
            self.said = False

    def over(self, message: str, *args: Any) -> None:
        """The fault is over: said once, at the fault's level (WARNING at most), if its line was
        said since it was last over (at INFO, below a level of WARNING, the end of a fault said was
        never seen).
        The interval still runs: a fault that comes and goes with every other request (one
        replica of several down) says its line and its end once an interval at most."""
        if not self.said:
            return
        self.said = False
        if self._late is not None:
            self._late_end = (message, args, self._clock())  # said after the fault's late line
        else:
            self._log.log(min(self._level, logging.WARNING), message, *args)
