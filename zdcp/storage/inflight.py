"""A window of chunk I/O in flight, bounded in bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import tensorstore as ts

__all__ = ["InflightWindow"]


class InflightWindow:
    """Chunk I/O in flight, at most ``limit`` bytes of it (None: no limit).

    All I/O in flight at once is fastest, but each write holds its source tensor (a host copy of
    a GPU tensor, or data a lazy planner just produced) and each read a decoded chunk; the
    window bounds that memory by completing the oldest operations first. ``on_done(future)``
    runs when an operation is completed through the window (default: ``future.result()``).
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.pending: deque[tuple[ts.Future, int, Callable[[ts.Future], None] | None]] = deque()
        self.bytes = 0

    def add(self, future: ts.Future, nbytes: int, on_done: Callable[[ts.Future], None] | None = None) -> None:
        self.pending.append((future, nbytes, on_done))
        self.bytes += nbytes
        while self.limit is not None and self.bytes > self.limit and len(self.pending) > 1:
            self._complete_oldest()

    def drain(self) -> None:
        while self.pending:
            self._complete_oldest()

    def settle(self) -> None:
        """Wait for every operation in flight, ignoring their outcomes (after a failure)."""
        while self.pending:
            future, _, _ = self.pending.popleft()
            try:
                future.result()
            except Exception:
                pass
        self.bytes = 0

    def _complete_oldest(self) -> None:
        future, nbytes, on_done = self.pending.popleft()
        if on_done is None:
            future.result()
        else:
            on_done(future)
        self.bytes -= nbytes
