"""What the workloads measure with: the implementations' names, timing, the states saved, the
anchors zdcp is compared with, multi-rank timing, file and object counts, and the machine.

Every workload times its cases with :func:`timed` (a sync first, so that no earlier case's
write-back lands in this one), alternates implementations within a round with
:func:`interleaved` (drift, from the page cache or other load, hits all of them alike) and
reports medians. Anchors: DCP with its defaults (``FileSystemWriter(sync_files=True)``),
``torch.save`` + fsync / ``torch.load``, and raw numpy writes + fsync / reads into preallocated
tensors, the storage limit of the machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import zdcp

# Imported by every workload module, so this holds in the ranks' processes too.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

MiB = 1 << 20

# -- implementations: one key each, in the order tables list them ---------------------------------

ZDCP_FILES = "zdcp-files"  # zdcp.save(..., layout="files"): a file (object) per chunk and per node
ZDCP_PACKED = "zdcp-packed"  # zdcp.save(..., layout="packed"): tensorstore's OCDBT, a few files per rank
DCP = "dcp"  # torch.distributed.checkpoint with its defaults
TORCH = "torch"  # torch.save into a file + fsync / torch.load
RAW = "raw"  # numpy tofile + fsync / readinto preallocated tensors

IMPLEMENTATIONS = (ZDCP_FILES, ZDCP_PACKED, DCP, TORCH, RAW)
HEADINGS = {ZDCP_FILES: "zdcp files", ZDCP_PACKED: "zdcp packed", DCP: "DCP", TORCH: "torch", RAW: "raw"}
LAYOUTS = {ZDCP_FILES: "files", ZDCP_PACKED: "packed"}  # zdcp's implementations: their layout=


# -- timing ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes, started on clean storage."""
    # No write-back of an earlier case's files (or of deletions) left for this case to wait on
    # in its own sync.
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh(path: Path) -> Path:
    """``path``, with whatever was there (a file or a directory tree) removed."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return path


class NewPaths:
    """A new path (directory or file) for every save; nothing is deleted before the run ends.

    Deleting checkpoints right before a save slows the save down on ext4 without a journal
    (this VM's root filesystem): for up to 5 minutes, the inode allocator skips recently
    deleted inodes one by one, which made a save of 2,000 small arrays (about 10,000 inodes)
    2-5x slower depending on what was deleted before, and penalises whoever creates the most
    files. A training job saves into a new step directory and deletes old ones minutes apart;
    the benchmark saves into new directories and deletes them all when the run is done.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True)
        self.count = 0

    def __call__(self) -> Path:
        self.count += 1
        return self.last

    @property
    def last(self) -> Path:
        """The path handed out last."""
        assert self.count, "no path handed out yet"
        return self.base / f"{self.count}"


def interleaved(rounds: int, cases: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every case once per round, rotating the order each round; each case's results."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(cases[name]())
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rchar() -> int:
    """Bytes this process has read through read syscalls (page cache included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# -- states ---------------------------------------------------------------------------------------


def large_state(quick: bool = False) -> dict[str, torch.Tensor]:
    """16 fp32 tensors of 32 MiB (8192 x 1024); of 1 MiB when ``quick``."""
    g = torch.Generator().manual_seed(0)
    elements = (256 * 1024) if quick else (8 * MiB)
    return {f"layer{i}.weight": torch.randn(elements, generator=g).reshape(-1, 1024) for i in range(16)}


def small_state(quick: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """2,000 fp32 tensors of 1-4 KiB (norm weights and biases) in 1,000 groups; 200 when ``quick``."""
    g = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}": {
            "norm.weight": torch.randn(256 * (1 + i % 4), generator=g),
            "norm.bias": torch.randn(256 * (1 + i % 4), generator=g),
        }
        for i in range(100 if quick else 1000)
    }


@dataclass(frozen=True)
class FsdpModel:
    """A stack of ``pairs`` (Linear(width, width), LayerNorm(width)), fully sharded, with Adam."""

    pairs: int
    width: int

    @property
    def arrays(self) -> int:
        """Arrays in its state: 4 parameters per pair, and Adam's exp_avg, exp_avg_sq and step for each."""
        return 16 * self.pairs


FSDP_MODEL = FsdpModel(pairs=24, width=512)  # 96 parameters (25 MiB) and their Adam state: 384 arrays
FSDP_MODEL_QUICK = FsdpModel(pairs=2, width=64)


def fsdp_state(world_size: int, seed: int, model: FsdpModel, replicas: int = 1) -> dict[str, Any]:
    """On a rank of a gloo group: the state dict of ``model`` sharded over the group, after a
    step; with ``replicas`` > 1, HSDP: replicated over that many groups, sharded within each."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    layers = [m for _ in range(model.pairs) for m in (torch.nn.Linear(model.width, model.width),
                                                       torch.nn.LayerNorm(model.width))]  # fmt: skip
    net = torch.nn.Sequential(*layers)
    if replicas == 1:
        mesh = init_device_mesh("cpu", (world_size,))
    else:
        mesh = init_device_mesh("cpu", (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))
    fully_shard(net, mesh=mesh)
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(4, model.width)).sum().backward()
    optim.step()
    model_sd, optim_sd = get_state_dict(net, optim)
    return {"model": model_sd, "optim": optim_sd}


def empty_like(state: Any) -> Any:
    """A destination for ``state`` (nested dicts of tensors): the same keys, uninitialised tensors."""
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    return {k: empty_like(v) for k, v in state.items()}


def tensors(state: Any) -> list[torch.Tensor]:
    """The tensors in ``state`` (nested dicts and lists), in order; other values are skipped."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors(v)]
    if isinstance(state, list):
        return [t for v in state for t in tensors(v)]
    return []


def nbytes(state: Any) -> int:
    """Bytes of the tensors in ``state``."""
    return sum(t.numel() * t.element_size() for t in tensors(state))


def mib(n: float) -> str:
    """``n`` bytes in MiB, to 3 significant digits: "512 MiB", "4.88 MiB"."""
    return f"{n / MiB:.3g} MiB"


def sizes(state: Any) -> str:
    """``state``'s tensors in words: "16 x 32 MiB", "2,000 x 1-4 KiB"."""
    each = [t.numel() * t.element_size() for t in tensors(state)]
    unit, name = (MiB, "MiB") if max(each) >= MiB else (1024, "KiB")
    low, high = min(each) / unit, max(each) / unit
    span = f"{low:g}" if low == high else f"{low:g}-{high:g}"
    return f"{len(each):,} x {span} {name}"


# -- anchors --------------------------------------------------------------------------------------


def torch_save_fsync(state: Any, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def raw_write(state: Any, file: Path) -> None:
    with open(file, "wb") as f:
        for t in tensors(state):
            t.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())


def raw_read(dest: Any, file: Path) -> None:
    with open(file, "rb", buffering=0) as f:
        for t in tensors(dest):
            f.readinto(memoryview(t.numpy()).cast("B"))


# -- on a rank of a gloo group --------------------------------------------------------------------


def max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def collective_timed(fn: Callable[[], Any]) -> float:
    """Seconds of a collective ``fn()``, started together after a sync: the slowest rank's."""
    os.sync()
    dist.barrier()
    return max_over_ranks(timed(fn))


# -- what a checkpoint is made of -----------------------------------------------------------------


def files_in(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def bytes_in(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def use_s3_endpoint(endpoint: str) -> None:
    """Point this process, and the ranks it starts, at the S3 server at ``endpoint``."""
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1",
                      AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")  # fmt: skip


def objects_in(client: Any, bucket: str, prefix: str) -> int:
    """Objects under ``prefix/`` in ``bucket``, through the boto3 S3 ``client``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sum(len(page.get("Contents", [])) for page in pages)


# -- the machine ----------------------------------------------------------------------------------


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem = next((int(line.split()[1]) >> 20 for line in f if line.startswith("MemTotal")), 0)
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, zdcp {zdcp.__version__}"
    )
