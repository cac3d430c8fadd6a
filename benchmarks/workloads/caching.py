"""``caching``: DCP's plan caching. Saves of 2,000 small DTensors on 4 and 8 gloo ranks with
DCP's ``DefaultSavePlanner``, caching off and on, through DCP's ``FileSystemWriter`` and zdcp's
``ZarrWriter`` (files layout): the whole save and its planning phase, the slowest rank's.

With many small tensors on several ranks, DCP's gather-plan-scatter is most of a save; caching
skips it after the first save, which is why zdcp's writer must work with it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import zdcp
from zdcp.testing import run_ranks

from ..common import DCP, ZDCP_FILES, collective_timed, max_over_ranks, median
from ..registry import Settings
from ..tables import markdown_table

WORLD_SIZES = (4, 8)
TENSORS, TENSORS_QUICK = 2000, 50
WRITER_NAMES = {DCP: "DCP's FileSystemWriter", ZDCP_FILES: "zdcp's ZarrWriter (files)"}


def forget_cached_plans() -> None:
    """Empty DCP's plan caches. Every ``DefaultSavePlanner`` of a process shares them (keyed by
    the planner's class name), so without this a writer's first save with caching on would be
    handed the plans cached for the writer before it (zdcp's writer refuses plans it did not
    make); with it, each writer's first save fills the caches with its own plans."""
    from torch.distributed.checkpoint.planner import SavePlanner

    for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_final_save_plan, SavePlanner._cached_all_plans,
                  SavePlanner._cached_global_plan, SavePlanner._cached_metadata):  # fmt: skip
        cache.clear()


def save_on_rank(rank: int, world_size: int, directory: Path, rounds: int, count: int, out: Path) -> None:
    """``rounds`` + 1 saves per writer and caching setting (the first fills the caches, which
    start empty, and warms up); planning is timed around DCP's reduce_scatter, the
    gather-plan-scatter step."""
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint import state_dict_saver as saver
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {f"layers.{i}.w": distribute_tensor(torch.randn(64, 8), mesh, [Shard(0)]) for i in range(count)}
    writers: dict[str, Callable[[Path], Any]] = {
        DCP: FileSystemWriter,
        ZDCP_FILES: functools.partial(zdcp.ZarrWriter, layout="files"),
    }
    real = saver._DistWrapper.reduce_scatter
    planning: list[float] = []

    def timed_planning(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(self, *args, **kwargs)
        finally:
            planning.append(time.perf_counter() - start)

    saver._DistWrapper.reduce_scatter = timed_planning
    times: dict[str, list[tuple[float, float]]] = {}
    saves = 0
    for caching in (False, True):
        for impl, writer in writers.items():
            planner = DefaultSavePlanner(enable_plan_caching=caching)
            forget_cached_plans()
            for r in range(rounds + 1):
                saves += 1
                path = directory / f"{impl}-{caching}-{saves}"
                total = collective_timed(lambda: dcp.save(state, storage_writer=writer(path), planner=planner))
                if r:
                    case = f"{WRITER_NAMES[impl]}, caching {'on' if caching else 'off'}"
                    times.setdefault(case, []).append((total, max_over_ranks(planning[-1])))
    saver._DistWrapper.reduce_scatter = real
    if rank == 0:
        torch.save(times, out)


def measure(directory: Path, rounds: int, count: int) -> list[tuple[str, int, float, float]]:
    """(case, ranks, median save seconds, median planning seconds) per case and world size."""
    out = []
    for world_size in WORLD_SIZES:
        saves = directory / f"ranks{world_size}"  # its own: each world size numbers its saves from 1
        saves.mkdir()
        result = directory / f"caching{world_size}.pt"
        run_ranks(world_size, save_on_rank, saves, rounds, count, result, timeout=1800)
        for case, pairs in torch.load(result).items():
            out.append((case, world_size, median([p[0] for p in pairs]), median([p[1] for p in pairs])))
    return out


def caching(settings: Settings) -> str:
    count = settings.sized(TENSORS, TENSORS_QUICK)
    rows = [[case, str(ranks), f"{save:.3f}", f"{planning:.3f}"]
            for case, ranks, save, planning in measure(settings.directory, settings.rounds, count)]  # fmt: skip
    return markdown_table([f"{count:,} DTensors, DCP's planner", "ranks", "save s", "planning s"], rows)
