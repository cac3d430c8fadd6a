"""When a training run saves, and which of its checkpoints it keeps: small, pure, composable
policies, as Orbax's ``save_decision_policy`` and ``preservation_policy``.

A :class:`SavePolicy` decides from the step alone (and whether the ranks agreed on a
preemption); a :class:`PreservationPolicy` picks, from the committed steps and their metrics,
those it keeps. Composites keep what any of their parts keep (:class:`AnyPreservation`) or save
when any part says so (:class:`AnySave`). :func:`preservation_policy` builds what a
:class:`~zdcp.CheckpointManager`'s settings ask for, and :func:`retained_steps` applies it.
Nothing here touches storage or runs a collective: every rank that holds the same steps
decides alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import UsageError

__all__ = [
    "Steps",
    "SavePolicy",
    "FixedInterval",
    "OnPreemption",
    "AnySave",
    "PreservationPolicy",
    "KeepAll",
    "LatestN",
    "EveryNSteps",
    "BestN",
    "AnyPreservation",
    "preservation_policy",
    "retained_steps",
    "ranked_by",
]

#: The committed steps and the metrics each was saved with (None: saved without).
Steps = Mapping[int, Mapping[str, Any] | None]

MODES = ("min", "max")


# -- when to save ---------------------------------------------------------------------------------


class SavePolicy(Protocol):
    def should_save(self, step: int, *, preempted: bool) -> bool:
        """Whether ``step`` is saved (``preempted``: the ranks agreed on a preemption)."""
        ...


@dataclass(frozen=True)
class FixedInterval:
    """Every step that is a multiple of ``interval``."""

    interval: int

    def __post_init__(self) -> None:
        _check_positive("interval", self.interval)

    def should_save(self, step: int, *, preempted: bool) -> bool:
        return step % self.interval == 0


@dataclass(frozen=True)
class OnPreemption:
    """The first step at which the ranks know of a preemption, whatever the interval."""

    def should_save(self, step: int, *, preempted: bool) -> bool:
        return preempted


@dataclass(frozen=True)
class AnySave:
    """A step any of ``policies`` saves."""

    policies: tuple[SavePolicy, ...]

    def should_save(self, step: int, *, preempted: bool) -> bool:
        return any(policy.should_save(step, preempted=preempted) for policy in self.policies)


# -- which checkpoints to keep --------------------------------------------------------------------


class PreservationPolicy(Protocol):
    def preserved(self, steps: Steps) -> set[int]:
        """The steps of ``steps`` this policy keeps."""
        ...


@dataclass(frozen=True)
class KeepAll:
    """Every step."""

    def preserved(self, steps: Steps) -> set[int]:
        return set(steps)


@dataclass(frozen=True)
class _CountPolicy:
    """A policy of one count, ``n``, a positive int."""

    n: int

    def __post_init__(self) -> None:
        _check_positive("n", self.n)


@dataclass(frozen=True)
class LatestN(_CountPolicy):
    """The ``n`` newest steps."""

    def preserved(self, steps: Steps) -> set[int]:
        return set(sorted(steps)[-self.n :])


@dataclass(frozen=True)
class EveryNSteps(_CountPolicy):
    """Every step that is a multiple of ``n``, forever."""

    def preserved(self, steps: Steps) -> set[int]:
        return {step for step in steps if step % self.n == 0}


@dataclass(frozen=True)
class BestN:
    """The ``n`` best steps by ``metric`` (``mode`` ``"min"``: lower is better; the newer wins
    a tie). A step saved without the metric (or with a non-number, or NaN) cannot be ranked:
    it is kept by recency only, while it is among the ``n`` newest."""

    metric: str
    n: int
    mode: str = "min"

    def __post_init__(self) -> None:
        _check_positive("n", self.n)
        if self.mode not in MODES:
            raise UsageError(f"best_mode must be 'min' or 'max', got {self.mode!r}")

    def preserved(self, steps: Steps) -> set[int]:
        best = set(ranked_by(steps, self.metric, self.mode)[: self.n])
        newest = sorted(steps)[-self.n :]
        return best | {step for step in newest if _score(steps[step], self.metric) is None}


@dataclass(frozen=True)
class AnyPreservation:
    """A step any of ``policies`` keeps."""

    policies: tuple[PreservationPolicy, ...]

    def preserved(self, steps: Steps) -> set[int]:
        return set().union(*(policy.preserved(steps) for policy in self.policies))


def preservation_policy(
    *,
    max_to_keep: int | None,
    keep_every_n_steps: int | None = None,
    best_metric: str | None = None,
    best_mode: str = "min",
) -> PreservationPolicy:
    """What a :class:`~zdcp.CheckpointManager` with these settings keeps: the newest step
    always; every multiple of ``keep_every_n_steps``; and the ``max_to_keep`` newest (all when
    None), or with ``best_metric`` the ``max_to_keep`` best (:class:`BestN`)."""
    if max_to_keep is None:
        return KeepAll()
    kept: list[PreservationPolicy] = [LatestN(1)]
    if keep_every_n_steps is not None:
        kept.append(EveryNSteps(keep_every_n_steps))
    kept.append(LatestN(max_to_keep) if best_metric is None else BestN(best_metric, max_to_keep, best_mode))
    return AnyPreservation(tuple(kept))


def retained_steps(
    steps: Steps,
    *,
    max_to_keep: int | None,
    keep_every_n_steps: int | None = None,
    best_metric: str | None = None,
    best_mode: str = "min",
) -> set[int]:
    """Which of ``steps`` a manager with these settings keeps (:func:`preservation_policy`)."""
    policy = preservation_policy(
        max_to_keep=max_to_keep, keep_every_n_steps=keep_every_n_steps, best_metric=best_metric, best_mode=best_mode
    )
    return policy.preserved(steps)


def ranked_by(steps: Steps, metric: str, mode: str) -> list[int]:
    """The steps that have ``metric``, best first (the newest first among equals)."""
    scored = [(score, step) for step, metrics in steps.items() if (score := _score(metrics, metric)) is not None]
    sign = 1 if mode == "min" else -1
    return [step for score, step in sorted(scored, key=lambda pair: (sign * pair[0], -pair[1]))]


def _score(metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    value = metrics.get(metric) if metrics is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _check_positive(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise UsageError(f"{name} must be a positive int, got {value!r}")
