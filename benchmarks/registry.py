"""The workloads by name: what ``--workloads`` accepts, in the order a run measures them.

As in fsspec's registry of filesystems, each name maps to where its code lives
(``"module:function"``) and is imported only when chosen, so that ``--help`` lists every
workload without importing torch; the one-line descriptions are that help. A workload is a
function of :class:`Settings` that measures and returns its own markdown.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """What a workload is told: where to write, how many rounds, and whether to run small."""

    #: An empty directory of the workload's own, deleted when the run ends.
    directory: Path
    #: Rounds of every case (some workloads take more, or a fixed number: their docstrings say).
    rounds: int
    #: ``--quick``: small states and 1 round, to check that the workload runs; not comparable.
    quick: bool = False

    def sized(self, full: T, quick: T) -> T:
        """``full`` in a real run, ``quick`` in a ``--quick`` one."""
        return quick if self.quick else full


class Workload(Protocol):
    """Measures under ``settings.directory`` and returns the workload's markdown tables."""

    def __call__(self, settings: Settings) -> str: ...


@dataclass(frozen=True)
class Entry:
    target: str  # "module:function", a Workload
    description: str  # one line, for --help


#: Every workload, in the order a run measures them.
KNOWN_WORKLOADS: dict[str, Entry] = {
    "large": Entry(
        "benchmarks.workloads.single_process:large",
        "16 fp32 tensors of 32 MiB saved and loaded by one process, against DCP, torch.save and raw I/O",
    ),
    "huge": Entry(
        "benchmarks.workloads.memory:huge",
        "16 fp32 tensors of 256 MiB (4 GiB) saved and loaded by one process, against DCP: time and peak RSS",
    ),
    "small": Entry(
        "benchmarks.workloads.single_process:small",
        "2,000 tensors of 1-4 KiB saved and loaded by one process, against DCP, torch.save and raw I/O",
    ),
    "retention": Entry(
        "benchmarks.workloads.retention:retention",
        "the small state saved, loaded and the previous checkpoint deleted, in a loop (at least 5 rounds)",
    ),
    "sharded": Entry(
        "benchmarks.workloads.sharded:sharded",
        "FSDP2 + Adam (384 arrays) saved by 8 gloo ranks, loaded at 3 and 1; the loads' read amplification",
    ),
    "sharded4": Entry(
        "benchmarks.workloads.sharded:sharded4",
        "the same state saved by 4 gloo ranks, loaded at 3 and 1",
    ),
    "slice": Entry(
        "benchmarks.workloads.slice_read:slice_read",
        "read amplification of a 1% row slice of a tensor saved by 8 ranks, through zdcp.open",
    ),
    "memory": Entry(
        "benchmarks.workloads.memory:memory",
        "peak memory above a 128 MiB state while saving and loading it, one fresh process per case",
    ),
    "latency": Entry(
        "benchmarks.workloads.latency:latency",
        "saves and loads on S3 (moto) with 20 ms added to every request, against DCP's fsspec writer",
    ),
    "faults": Entry(
        "benchmarks.workloads.faults:faults",
        "saves, loads and verifies on S3 (moto) with 10% of requests throttled or 5% dropped, and an outage",
    ),
    "replicas": Entry(
        "benchmarks.workloads.replicas:replicas",
        "4 ranks loading a DDP (replicated) and an HSDP 2 x 2 state from S3: bytes fetched, time on a shared link",
    ),
    "async": Entry(
        "benchmarks.workloads.async_save:async_save",
        "how long zdcp.async_save blocks, against copying the state to host memory",
    ),
    "s3": Entry(
        "benchmarks.workloads.s3:s3",
        "objects and S3 requests of saves and loads on a moto server, both layouts, 1 and 4/3 ranks",
    ),
    "open": Entry(
        "benchmarks.workloads.open_one:open_one",
        "zdcp.open of one tensor of checkpoints of 2,000 to 100,000 keys, against DCP's load of it",
    ),
    "caching": Entry(
        "benchmarks.workloads.caching:caching",
        "DCP's plan caching off and on, 2,000 DTensors on 4 and 8 ranks, DCP's writer and zdcp's",
    ),
    "training": Entry(
        "benchmarks.workloads.training:training",
        "a CPU training loop's step time with CheckpointManager saving every 10 steps, async and sync",
    ),
    "frameworks": Entry(
        "benchmarks.workloads.frameworks:frameworks",
        "FSDP2 on 4 ranks re-saved to one path and loaded through dcp.save/dcp.load(checkpoint_id=...), "
        "as Lightning does: DCP against zdcp.as_dcp_backend()",
    ),
}


def get_workload(name: str) -> Workload:
    """The workload registered as ``name``, its module imported now."""
    try:
        entry = KNOWN_WORKLOADS[name]
    except KeyError:
        raise ValueError(f"no workload {name!r}; known: {', '.join(KNOWN_WORKLOADS)}") from None
    module, function = entry.target.split(":")
    workload: Workload = getattr(importlib.import_module(module), function)
    return workload
