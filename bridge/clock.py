"""The one clock: made by the application and passed to every service.

The pure cores never read the time; each service reads it here and passes it to
its core as plain arguments, so a test can hand a service a clock of its own.
"""

from __future__ import annotations

import time


class Clock:
    """Wall-clock milliseconds, steady milliseconds and monotonic seconds.

    - ``wall_ms``: the system's wall clock (message timestamps, expiry times on disk);
    - ``steady_ms``: wall-clock milliseconds that never go backwards: the wall time
      at start plus monotonic time since. Presence uses it: its windows and
      coalescing need a clock that does not jump, ``last_seen`` needs wall time;
      this is both, to within the drift of the monotonic clock;
    - ``monotonic``: seconds for delays and deadlines in memory.
    """

    def __init__(self) -> None:
        self._wall0 = time.time() * 1000
        self._mono0 = time.monotonic()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def steady_ms(self) -> int:
        return int(self._wall0 + (time.monotonic() - self._mono0) * 1000)

    def monotonic(self) -> float:
        return time.monotonic()
