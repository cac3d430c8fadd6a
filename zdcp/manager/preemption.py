"""A preemption, as every rank of a training run agrees on it: a signal (``SIGTERM`` from a
scheduler) on any rank becomes, at the next check, a preemption every rank knows of, after one
all-reduce of a flag (:meth:`~zdcp.collectives.Collectives.any`), so that every rank saves at
the same step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

from ..collectives import Collectives
from ..errors import UsageError

__all__ = ["PreemptionWatcher"]


class PreemptionWatcher:
    """Installs a handler for each of ``signals`` in place of the current one, until
    :meth:`close`; only from the main thread. Without signals it watches nothing, and its
    checks run no collective."""

    def __init__(self, signals: Iterable[int], collectives: Collectives):
        self._collectives = collectives
        self._signalled = False
        self.preempted_at: int | None = None
        self._previous: dict[int, Any] = {}
        try:
            for signum in signals:
                if threading.current_thread() is not threading.main_thread():
                    raise UsageError("preemption_signals can only be installed from the main thread")
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except BaseException:
            self.close()  # the handlers installed so far
            raise

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def check(self, step: int) -> bool:
        """Collective when watching: whether the ranks now agree on a preemption, first known
        at ``step``; True once, at that step."""
        if not self._previous or self.preempted_at is not None:
            return False
        if self._collectives.any(self._signalled):
            self.preempted_at = step
            return True
        return False

    def reached(self, step: int) -> bool:
        """Whether the ranks agreed on a preemption at ``step`` or before."""
        return self.preempted_at is not None and step >= self.preempted_at

    def close(self) -> None:
        """Put back the handlers this watcher replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
