"""Rate-limited warnings: a recurring error said once per period, with how often it recurred.

Used wherever a peer (or the machine) can make the same error happen
thousands of times a second: upstream connect failures and failed accepts
(``proxy.py``, ``listeners.AcceptPause``), bad HTTP requests (``http.py``).
"""

from __future__ import annotations

import logging
import time


class RepeatFilter:
    """Say a recurring error once, then how often it recurred, at most every ``period`` s."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        self.logger = logger
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        again = self._suppressed.pop(key, 0)
        self._last[key] = now
        self.logger.warning("%s%s", message, " (and %d more times)" % again if again else "")
