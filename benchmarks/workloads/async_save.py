"""``async``: how long ``zdcp.async_save`` (zdcp's default layout for the path: files on a local
disk) blocks its caller with the ``large`` state, against copying the state to host memory (the
staging it must do before returning) and against a whole synchronous save.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import zdcp

from ..common import interleaved, large_state, median, mib, nbytes, timed
from ..registry import Settings
from ..tables import markdown_table

COPY = "copy to host"


def measure(state: dict[str, torch.Tensor], path: Path, rounds: int) -> dict[str, float]:
    """Median seconds of each case."""

    def blocking() -> float:
        start = time.perf_counter()
        future = zdcp.async_save(state, path, overwrite=True)
        seconds = time.perf_counter() - start
        future.result()
        return seconds

    times = interleaved(
        rounds,
        {
            "async_save returns": blocking,
            COPY: lambda: timed(lambda: {k: v.clone() for k, v in state.items()}),
            "sync save": lambda: timed(lambda: zdcp.save(state, path, overwrite=True)),
        },
    )
    return {k: median(v) for k, v in times.items()}


def async_save(settings: Settings) -> str:
    state = large_state(settings.quick)
    seconds = measure(state, settings.directory / "checkpoint", settings.rounds)
    copy = seconds[COPY]
    rows = [[case, f"{s:.3f}", f"{s / copy:.2f}x"] for case, s in seconds.items()]
    return markdown_table([f"async save, {mib(nbytes(state))} (`large`)", "s", f"/ {COPY}"], rows)
