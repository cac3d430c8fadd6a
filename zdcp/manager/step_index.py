"""What a :class:`~zdcp.CheckpointManager` knows of its directory: the committed steps and the
metrics each was saved with. Every rank holds the same index and updates it alike, so that
queries are local and agree across ranks; a background save updates it from another thread,
hence the lock."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from .policies import PreservationPolicy, ranked_by

__all__ = ["StepIndex"]


class StepIndex:
    """The committed steps (step -> metrics, None when saved without)."""

    def __init__(self, steps: Mapping[int, Mapping[str, Any] | None]):
        self._lock = threading.Lock()
        self._steps: dict[int, Mapping[str, Any] | None] = dict(steps)

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        with self._lock:
            return sorted(self._steps)

    def latest(self) -> int | None:
        with self._lock:
            return max(self._steps, default=None)

    def __contains__(self, step: object) -> bool:
        with self._lock:
            return step in self._steps

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics ``step`` was saved with; None when saved without, or not committed."""
        with self._lock:
            found = self._steps.get(step)
        return dict(found) if found is not None else None

    def best(self, metric: str, mode: str) -> int | None:
        """The step with the best ``metric`` (the newest among equals); None when none has it."""
        with self._lock:
            ranked = ranked_by(self._steps, metric, mode)
        return ranked[0] if ranked else None

    def forget(self, step: int) -> None:
        with self._lock:
            self._steps.pop(step, None)

    def record(self, step: int, metrics: Mapping[str, Any] | None, policy: PreservationPolicy) -> list[int]:
        """Record ``step`` as committed, and forget the steps ``policy`` no longer keeps (a step
        saved out of order is kept this once); those steps, oldest first, for the caller to
        remove."""
        with self._lock:
            self._steps[step] = metrics
            removed = sorted(set(self._steps) - policy.preserved(self._steps) - {step})
            for old in removed:
                del self._steps[old]
        return removed
