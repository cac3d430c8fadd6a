"""``retention``: a training job's pattern on the small state. Each round saves a new step, loads
it back and deletes the step before it, for zdcp's two layouts and DCP.

Every save then creates its files right after a mass deletion, which on ext4 without a journal
slows file creation for minutes (see :class:`benchmarks.common.NewPaths`): this workload
measures that cost, and the deletion's own, where the other workloads avoid them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

import zdcp

from ..common import DCP, ZDCP_FILES, ZDCP_PACKED, empty_like, mib, nbytes, sizes, small_state, timed
from ..registry import Settings
from ..tables import TimedOp, timing_table

MIN_ROUNDS = 5


def measure(state: Any, directory: Path, rounds: int) -> list[TimedOp]:
    """Times of the save, the load and the deletion of the previous step, per implementation;
    implementations alternate within each round, each deletes only its own checkpoints."""
    dest = empty_like(state)
    steps: dict[str, tuple[Callable[[Path], Any], Callable[[Path], Any]]] = {
        ZDCP_FILES: (lambda p: zdcp.save(state, p, layout="files"), lambda p: zdcp.load(dest, p)),
        ZDCP_PACKED: (lambda p: zdcp.save(state, p, layout="packed"), lambda p: zdcp.load(dest, p)),
        DCP: (
            lambda p: dcp.save(state, checkpoint_id=p, no_dist=True),
            lambda p: dcp.load(dest, checkpoint_id=p, no_dist=True),
        ),
    }
    times: dict[str, dict[str, list[float]]] = {op: {k: [] for k in steps} for op in ("save", "load", "delete")}
    previous: dict[str, Path | None] = dict.fromkeys(steps)
    names = list(steps)
    for r in range(rounds + 1):  # round 0 only makes the first checkpoint to delete
        for name in names[r % len(names) :] + names[: r % len(names)]:
            save, load = steps[name]
            path = directory / f"{name}-step{r}"
            seconds = {"save": timed(lambda: save(path)), "load": timed(lambda: load(path))}
            old = previous[name]
            if old is not None:
                seconds["delete"] = timed(lambda: shutil.rmtree(old))
            previous[name] = path
            if r:
                for op, value in seconds.items():
                    times[op][name].append(value)
    return [TimedOp(op, by_impl) for op, by_impl in times.items()]


def retention(settings: Settings) -> str:
    """At least :data:`MIN_ROUNDS` rounds (``settings.rounds`` in a quick run)."""
    state = small_state(settings.quick)
    rounds = settings.sized(max(settings.rounds, MIN_ROUNDS), settings.rounds)
    ops = measure(state, settings.directory, rounds)
    intro = f"{sizes(state)} fp32 ({mib(nbytes(state))}): save, load, delete the previous step."
    return f"{intro}\n\n{timing_table(ops)}"
