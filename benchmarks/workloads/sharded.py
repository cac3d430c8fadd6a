"""``sharded`` and ``sharded4``: an FSDP2 model + Adam saved by 8 (or 4) gloo ranks, then loaded
at 3 ranks and at 1, for zdcp's two layouts and DCP; the files of each checkpoint; and the loads'
read amplification (bytes the loading processes read, metadata and page cache included, over
the bytes their destination shards hold).

Loading at another world size is resharding: a rank needs parts of stored chunks, and how much
more than that it reads depends on how the layout cuts chunks (zdcp's inner chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import zdcp
from zdcp.testing import run_ranks

from ..common import (
    DCP,
    FSDP_MODEL,
    FSDP_MODEL_QUICK,
    ZDCP_FILES,
    ZDCP_PACKED,
    FsdpModel,
    bytes_in,
    collective_timed,
    files_in,
    fsdp_state,
    interleaved,
    max_over_ranks,
    median,
    mib,
    rchar,
    tensors,
    timed,
)
from ..registry import Settings
from ..tables import Amplification, TimedOp, amplification_table, count_table, timing_table

IMPLS = (ZDCP_FILES, ZDCP_PACKED, DCP)
LOADED_AT = (3, 1)


def save_on_rank(rank: int, world_size: int, directory: Path, rounds: int, model: FsdpModel, out: Path) -> None:
    """Saves into a new directory each round (as :class:`benchmarks.common.NewPaths`); the
    last one of each implementation stays, as ``directory / implementation``, for the loads."""
    state = fsdp_state(world_size, 0, model)
    count = dict.fromkeys(IMPLS, 0)

    def into_new(impl: str, save: Callable[[Path], Any]) -> float:
        count[impl] += 1
        path = directory / f"{impl}-{count[impl]}"
        return collective_timed(lambda: save(path))

    times = interleaved(
        rounds,
        {
            ZDCP_FILES: lambda: into_new(ZDCP_FILES, lambda p: zdcp.save(state, p, layout="files")),
            ZDCP_PACKED: lambda: into_new(ZDCP_PACKED, lambda p: zdcp.save(state, p, layout="packed")),
            DCP: lambda: into_new(DCP, lambda p: dcp.save(state, checkpoint_id=p)),
        },
    )
    if rank == 0:
        for impl, n in count.items():
            (directory / f"{impl}-{n}").rename(directory / impl)
        torch.save(times, out)


def load_on_rank(rank: int, world_size: int, directory: Path, rounds: int, model: FsdpModel, out: Path) -> None:
    """Loads of what :func:`save_on_rank` left; the bytes read, summed over ranks."""
    state = fsdp_state(world_size, 1, model)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors(state)]
    needed = sum(t.numel() * t.element_size() for t in local)

    def load(fn: Callable[[], Any], reads: list[int]) -> float:
        dist.barrier()
        before = rchar()
        seconds = timed(fn)
        reads.append(rchar() - before)
        return max_over_ranks(seconds)

    reads: dict[str, list[int]] = {k: [] for k in IMPLS}
    times = interleaved(
        rounds,
        {
            ZDCP_FILES: lambda: load(lambda: zdcp.load(state, directory / ZDCP_FILES), reads[ZDCP_FILES]),
            ZDCP_PACKED: lambda: load(lambda: zdcp.load(state, directory / ZDCP_PACKED), reads[ZDCP_PACKED]),
            DCP: lambda: load(lambda: dcp.load(state, checkpoint_id=directory / DCP), reads[DCP]),
        },
    )
    totals = torch.tensor([needed] + [median(reads[k]) for k in IMPLS], dtype=torch.float64)
    dist.all_reduce(totals)
    if rank == 0:
        read = {k: totals[1 + i].item() for i, k in enumerate(IMPLS)}
        torch.save({"times": times, "needed": totals[0].item(), "read": read}, out)


@dataclass(frozen=True)
class Measured:
    ops: list[TimedOp]  # the save at saved_by ranks, the loads at 3 and 1
    amplification: list[Amplification]  # of the loads
    file_count: dict[str, int]  # files of each checkpoint
    files_bytes: int  # bytes of the files-layout checkpoint


def measure(directory: Path, rounds: int, saved_by: int, model: FsdpModel) -> Measured:
    run_ranks(saved_by, save_on_rank, directory, rounds, model, directory / "save.pt", timeout=1800)
    ops = [TimedOp(f"save at {saved_by}", torch.load(directory / "save.pt"))]
    files_bytes = bytes_in(directory / ZDCP_FILES)
    file_count = {k: files_in(directory / k) for k in IMPLS}
    amplification = []
    for world_size in LOADED_AT:
        result_file = directory / f"load{world_size}.pt"
        run_ranks(world_size, load_on_rank, directory, rounds, model, result_file, timeout=1800)
        result = torch.load(result_file)
        ops.append(TimedOp(f"load at {world_size}", result["times"]))
        case = f"{saved_by} -> {world_size} ranks, whole state"
        amplification.append(Amplification(case, result["needed"], result["read"]))
    return Measured(ops, amplification, file_count, files_bytes)


def render(saved_by: int, model: FsdpModel, measured: Measured) -> str:
    described = f"FSDP2 + Adam, {model.arrays} arrays, saved by {saved_by}"
    return "\n\n".join([
        f"{described} ({mib(measured.files_bytes)} as files); time = the slowest rank's.",
        timing_table(measured.ops),
        count_table("files", [(described, measured.file_count)]),
        amplification_table(measured.amplification),
    ])  # fmt: skip


def run(settings: Settings, saved_by: int) -> str:
    model = settings.sized(FSDP_MODEL, FSDP_MODEL_QUICK)
    return render(saved_by, model, measure(settings.directory, settings.rounds, saved_by, model))


def sharded(settings: Settings) -> str:
    return run(settings, saved_by=8)


def sharded4(settings: Settings) -> str:
    return run(settings, saved_by=4)
