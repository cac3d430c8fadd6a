"""``training``: what checkpointing costs a training loop. A CPU loop (an MLP of 4 Linear(2048,
2048) layers with Adam: a 192 MiB state) runs 40 steps without checkpointing, and with a
``zdcp.CheckpointManager`` saving every 10 steps and keeping 2, asynchronously and
synchronously: the mean step time (including the wait for the last save), and how long each
saving ``save()`` call blocks the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import zdcp

from ..common import fresh, median, mib
from ..registry import Settings
from ..tables import markdown_table

CASES = {"none": "no checkpointing", "async": "async_save=True", "sync": "async_save=False"}


@dataclass(frozen=True)
class Loop:
    """``layers`` Linear(width, width) trained on batches of ``batch`` for ``steps`` steps, a save every ``every``."""

    layers: int
    width: int
    batch: int
    steps: int
    every: int

    @property
    def state_bytes(self) -> int:
        """The parameters and Adam's two moments (its step counters aside)."""
        return 3 * self.layers * (self.width * self.width + self.width) * 4


LOOP = Loop(layers=4, width=2048, batch=64, steps=40, every=10)
LOOP_QUICK = Loop(layers=4, width=256, batch=8, steps=4, every=2)


@dataclass(frozen=True)
class Case:
    step: float  # median over rounds of the mean step time, seconds
    overhead: float  # step / the step without checkpointing - 1
    blocks: float | None  # median seconds a saving save() call blocks; None without checkpointing


def measure(directory: Path, rounds: int, loop: Loop) -> dict[str, Case]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(loop.width, loop.width) for _ in range(loop.layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randn(loop.batch, loop.width)

    def run(manager: zdcp.CheckpointManager | None) -> tuple[float, list[float]]:
        blocked, start = [], time.perf_counter()
        for step in range(1, loop.steps + 1):
            model(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if manager is not None:
                t = time.perf_counter()
                if manager.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict()}):
                    blocked.append(time.perf_counter() - t)
        if manager is not None:
            manager.close()  # the last save in flight is part of the loop's cost
        return (time.perf_counter() - start) / loop.steps, blocked

    results: dict[str, list[tuple[float, list[float]]]] = {case: [] for case in CASES}
    for round_ in range(rounds):
        for case in results:
            checkpoints = fresh(directory / f"{case}{round_}")
            manager = None if case == "none" else zdcp.CheckpointManager(
                checkpoints, save_interval_steps=loop.every, max_to_keep=2, async_save=case == "async")  # fmt: skip
            results[case].append(run(manager))
    base = median([step for step, _ in results["none"]])
    out = {}
    for case, runs in results.items():
        step = median([s for s, _ in runs])
        blocks = [b for _, blocked in runs for b in blocked]
        out[case] = Case(step, step / base - 1, median(blocks) if blocks else None)
    return out


def training(settings: Settings) -> str:
    loop = settings.sized(LOOP, LOOP_QUICK)
    cases = measure(settings.directory, settings.rounds, loop)
    rows = []
    for name, c in cases.items():
        blocks = "" if c.blocks is None else f"{c.blocks * 1000:.0f}"
        rows.append([CASES[name], f"{c.step * 1000:.1f}", f"{c.overhead:+.1%}", blocks])
    title = f"training loop, {mib(loop.state_bytes)} state, saves every {loop.every} of {loop.steps} steps"
    return markdown_table([title, "step ms", "overhead", "save() blocks ms"], rows)
