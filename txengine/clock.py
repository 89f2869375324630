"""Hybrid logical clock: physical milliseconds plus a counter.

A revision's hlc is greater than that of each parent and dependency, so the
sort by hlc is a topological order of the graph. The clock never goes back:
it starts above the greatest hlc the ledger holds (that is how it persists
across restarts) and, when the wall clock steps back, keeps counting from the
last value it issued.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

Hlc = tuple[int, int]


def wall_ms() -> int:
    """Return the wall clock in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class Clock:
    """A hybrid logical clock that only moves forward."""

    def __init__(self, last: Hlc = (0, 0), wall: Callable[[], int] = wall_ms) -> None:
        self.last: Hlc = tuple(last)  # type: ignore[assignment]
        self._wall = wall

    def absorb(self, seen: Hlc) -> None:
        """Move the clock past an hlc this peer has integrated."""
        seen = (int(seen[0]), int(seen[1]))
        if seen > self.last:
            self.last = seen

    def tick(self, above: Iterable[Hlc] = ()) -> Hlc:
        """Issue a new hlc greater than the last one issued and than each of ``above``."""
        for hlc in above:
            self.absorb(hlc)
        physical = self._wall()
        ms, counter = self.last
        self.last = (physical, 0) if physical > ms else (ms, counter + 1)
        return self.last
