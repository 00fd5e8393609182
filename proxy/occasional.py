"""Log lines for a fault that fails every request while it lasts.

A wrong upstream key or a full disk fails each call alike: a line each, at a few hundred calls
a second, buries the log and whatever else it says. Such a line is said at most once per
interval, with how many times it was due since it was last said; and its end once, after a
line said of it, at the same level (warning at most: an end is no error to alert on), so that an
operator whose logging.level shows the fault shows its end.
"""

from __future__ import annotations

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
        # The line was said since the fault was last over: `over` has something to say. Public,
        # for a hot path to test before it calls `over` on every success.
        self.said = False
        per = "a minute" if every == 60 else f"every {every:g} s"
        self._suffix = f" (times since last logged: %d; logged at most once {per})"

    def __call__(self, message: str, *args: Any) -> None:
        self._due += 1
        now = self._clock()
        if now - self._said_at < self._every:
            return
        self._say(now, message, args)

    def tell_untold(self, message: str, *args: Any) -> bool:
        """Say `message` for the times the line was due and not said, if any and the interval is
        up: a fault that came and went within the interval is otherwise told only if it comes again."""
        now = self._clock()
        if not self._due or now - self._said_at < self._every:
            return False
        self._say(now, message, args)
        return True

    @property
    def untold(self) -> int:
        """Times the line was due since it was last said."""
        return self._due

    def wait(self) -> float:
        """Seconds until the line may be said again."""
        return max(0.0, self._said_at + self._every - self._clock())

    def _say(self, now: float, message: str, args: tuple[Any, ...]) -> None:
        self._said_at = now
        self._log.log(self._level, message + self._suffix, *args, self._due)
        self._due = 0
        self.said = True

    def over(self, message: str, *args: Any) -> None:
        """The fault is over: said once, at the fault's level (WARNING at most), if its line was
        said since it was last over (at INFO, below a level of WARNING, the end of a fault said was
        never seen).
        The interval still runs: a fault that comes and goes with every other request (one
        replica of several down) says its line and its end once an interval at most."""
        if self.said:
            self.said = False
            self._log.log(min(self._level, logging.WARNING), message, *args)
