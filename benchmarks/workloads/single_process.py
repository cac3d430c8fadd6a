"""``large`` and ``small``: one process saves a state into a new directory each round, then loads
the last ones back, for zdcp's two layouts, DCP, ``torch.save`` + fsync and raw I/O; and the files
each checkpoint is made of.

Large tensors measure throughput against the raw anchor (what the disk allows); many small ones
measure the cost per tensor and per file, where a layout with a file per chunk pays most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import zdcp

from ..common import (
    DCP,
    RAW,
    TORCH,
    ZDCP_FILES,
    ZDCP_PACKED,
    NewPaths,
    empty_like,
    files_in,
    interleaved,
    large_state,
    mib,
    nbytes,
    raw_read,
    raw_write,
    sizes,
    small_state,
    timed,
    torch_save_fsync,
)
from ..registry import Settings
from ..tables import TimedOp, count_table, timing_table


def measure(state: Any, directory: Path, rounds: int) -> tuple[list[TimedOp], dict[str, int]]:
    """Saves, then loads of the last saves; and the files in one checkpoint of each zdcp layout and DCP."""
    dest = empty_like(state)
    new = {k: NewPaths(directory / k) for k in (ZDCP_FILES, ZDCP_PACKED, DCP, TORCH, RAW)}
    saves = interleaved(
        rounds,
        {
            ZDCP_FILES: lambda: timed(lambda: zdcp.save(state, new[ZDCP_FILES](), layout="files")),
            ZDCP_PACKED: lambda: timed(lambda: zdcp.save(state, new[ZDCP_PACKED](), layout="packed")),
            DCP: lambda: timed(lambda: dcp.save(state, checkpoint_id=new[DCP](), no_dist=True)),
            TORCH: lambda: timed(lambda: torch_save_fsync(state, new[TORCH]())),
            RAW: lambda: timed(lambda: raw_write(state, new[RAW]())),
        },
    )
    last = {k: paths.last for k, paths in new.items()}
    loads = interleaved(
        rounds,
        {
            ZDCP_FILES: lambda: timed(lambda: zdcp.load(dest, last[ZDCP_FILES])),
            ZDCP_PACKED: lambda: timed(lambda: zdcp.load(dest, last[ZDCP_PACKED])),
            DCP: lambda: timed(lambda: dcp.load(dest, checkpoint_id=last[DCP], no_dist=True)),
            TORCH: lambda: timed(lambda: torch.load(last[TORCH], weights_only=True)),
            RAW: lambda: timed(lambda: raw_read(dest, last[RAW])),
        },
    )
    file_count = {k: files_in(last[k]) for k in (ZDCP_FILES, ZDCP_PACKED, DCP)}
    return [TimedOp("save", saves), TimedOp("load", loads)], file_count


def render(state: Any, ops: list[TimedOp], file_count: dict[str, int]) -> str:
    described = f"{sizes(state)} fp32"
    return "\n\n".join([
        f"{described} ({mib(nbytes(state))}), one process.",
        timing_table(ops),
        count_table("files", [(described, file_count)]),
    ])  # fmt: skip


def large(settings: Settings) -> str:
    state = large_state(settings.quick)
    return render(state, *measure(state, settings.directory, settings.rounds))


def small(settings: Settings) -> str:
    state = small_state(settings.quick)
    return render(state, *measure(state, settings.directory, settings.rounds))
