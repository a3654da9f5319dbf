"""How often a streamed answer goes out: the page's frames and the HTTP
API's chunks alike."""

from __future__ import annotations

from django.conf import settings


class Pace:
    """How often an answer sends a frame: every CHAT_DELTA_INTERVAL, and
    less often while this process's event loop is late (its frame timers
    fire late). Each frame costs the same whatever it holds, so a saturated
    worker sends fewer, fuller frames instead of falling further behind:
    the wait between two frames stays short, and the first token of a new
    answer (always sent at once) is not queued behind a flood of small ones."""

    SMOOTHING = 0.05  # of each timer's lateness, into the running average
    MAX_INTERVAL = 0.08  # s

    def __init__(self) -> None:
        self.lateness = 0.0  # s, running average

    def observe(self, late: float) -> None:
        self.lateness += (max(0.0, late) - self.lateness) * self.SMOOTHING

    def interval(self) -> float:
        base = float(settings.CHAT_DELTA_INTERVAL)
        return min(max(base, self.MAX_INTERVAL), base + 2 * self.lateness)


pace = Pace()  # this process's: every answer's frames and every API stream's chunks
