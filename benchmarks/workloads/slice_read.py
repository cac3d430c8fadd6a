"""``slice``: the read amplification of a 1% row slice, through ``zdcp.open``, of a tensor saved
by 8 ranks (one chunk per rank), in both layouts.

A reader checks every stored piece it reads against its checksum, so it reads whole pieces:
what a slice costs beyond what it needs is set by the size of zdcp's inner chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import zdcp
from zdcp.testing import run_ranks

from ..common import DCP, LAYOUTS, ZDCP_FILES, ZDCP_PACKED, rchar
from ..registry import Settings
from ..tables import Amplification, amplification_table

SAVED_BY = 8


@dataclass(frozen=True)
class Sliced:
    """A ``rows`` x ``columns`` fp32 tensor, and the ``count`` rows from ``start`` that are read."""

    rows: int
    columns: int
    start: int
    count: int


SLICE = Sliced(rows=16384, columns=1024, start=5000, count=164)  # 64 MiB, ~1% of the rows
SLICE_QUICK = Sliced(rows=2048, columns=64, start=625, count=20)


def save_on_rank(rank: int, world_size: int, path: Path, full: torch.Tensor, layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    zdcp.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, path, layout=layout)


def measure(directory: Path, sliced: Sliced) -> Amplification:
    full = torch.randn(sliced.rows, sliced.columns)
    rows = slice(sliced.start, sliced.start + sliced.count)
    needed = sliced.count * sliced.columns * 4
    read: dict[str, float | None] = {DCP: None}  # DCP has no reader of slices
    for impl in (ZDCP_FILES, ZDCP_PACKED):
        path = directory / impl
        run_ranks(SAVED_BY, save_on_rank, path, full, LAYOUTS[impl])
        array = zdcp.open(path)["w"]
        before = rchar()
        out = array[rows]
        read[impl] = rchar() - before
        assert torch.equal(out, full[rows])
    return Amplification(f"1% row slice via zdcp.open ({SAVED_BY} chunks)", needed, read)


def slice_read(settings: Settings) -> str:
    sliced = settings.sized(SLICE, SLICE_QUICK)
    intro = f"Rows {sliced.start}-{sliced.start + sliced.count - 1} of a {sliced.rows} x {sliced.columns} fp32 tensor."
    return f"{intro}\n\n{amplification_table([measure(settings.directory, sliced)])}"
