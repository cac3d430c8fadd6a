"""A window of chunk I/O in flight, bounded in bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import tensorstore as ts

__all__ = ["InflightWindow"]


class InflightWindow:
    """Chunk I/O in flight, at most ``limit`` bytes of it (None: no limit), and at most
    ``operations`` operations (None: no limit).

    All I/O in flight at once is fastest, but each write holds its source tensor (a host copy of
    a GPU tensor, or data a lazy planner just produced) and each read a decoded chunk; the
    window bounds that memory by completing the oldest operations first. On an object store
    the count matters too: after a failure the caller waits for every operation in flight
    (:meth:`settle`), and in an outage each fails only once its retries ran out, a wave of
    tensorstore's request concurrency at a time (:data:`~zdcp.storage.retries.REQUESTS_IN_FLIGHT`).
    ``on_done(future)`` runs when an operation is completed through the window (default:
    ``future.result()``).
    """

    def __init__(self, limit: int | None, *, operations: int | None = None):
        self.limit = limit
        self.operations = operations
        self.pending: deque[tuple[ts.Future, int, Callable[[ts.Future], None] | None]] = deque()
        self.bytes = 0

    def add(self, future: ts.Future, nbytes: int, on_done: Callable[[ts.Future], None] | None = None) -> None:
        self.pending.append((future, nbytes, on_done))
        self.bytes += nbytes
        while len(self.pending) > 1 and (
            (self.limit is not None and self.bytes > self.limit)
            or (self.operations is not None and len(self.pending) > self.operations)
        ):
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
