"""Rate-limited logging for what peers can trigger at will (malformed messages, registrations)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

DEFAULT_INTERVAL = 10.0  # seconds per window
DEFAULT_BURST = 5  # lines per key and window before the rest are only counted
_MAX_KEYS = 256


class LogLimiter:
    """At most ``burst`` lines per key per ``interval``; the rest are counted and the count is logged
    when the window ends (``flush``, called from the broker's tick) or with the next line.

    Keys are kinds of event ("malformed client message"), not peers: a flood from many identities
    must not get one line each.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = DEFAULT_INTERVAL, burst: int = DEFAULT_BURST,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.now = now
        self._keys: dict[str, list] = {}  # key -> [window end, lines logged, suppressed, level]

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: bool = False, burst: int | None = None) -> None:
        """Log ``msg`` unless ``key`` has had its share of lines in this window."""
        if not self.logger.isEnabledFor(level):
            return
        now = self.now()
        slot = self._keys.get(key)
        if slot is not None and now >= slot[0]:
            self._report(key, slot)
            slot = None
        if slot is None:
            if len(self._keys) >= _MAX_KEYS:
                self.flush(force=True)
            slot = self._keys[key] = [now + self.interval, 0, 0, level]
        if slot[1] >= (self.burst if burst is None else burst):
            slot[2] += 1
            return
        slot[1] += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def warning(self, key: str, msg: str, *args: Any, burst: int | None = None) -> None:
        self.log(logging.WARNING, key, msg, *args, burst=burst)

    def info(self, key: str, msg: str, *args: Any, burst: int | None = None) -> None:
        self.log(logging.INFO, key, msg, *args, burst=burst)

    def flush(self, force: bool = False) -> None:
        """Log the suppressed counts of windows that have ended, and forget those windows."""
        if not self._keys:
            return
        now = self.now()
        for key, slot in list(self._keys.items()):
            if force or now >= slot[0]:
                del self._keys[key]
                self._report(key, slot)

    def _report(self, key: str, slot: list) -> None:
        if slot[2]:
            self.logger.log(slot[3], "%s: %d more not logged in the last %.0fs", key, slot[2], self.interval)
