"""zdcp against its anchors, on the same state, in the same run.

    python benchmarks/run.py                      # every workload, 3 rounds, under /tmp/zdcp-bench
    python benchmarks/run.py --workloads large,small --rounds 5 --dir /mnt/fast/bench

Anchors: DCP (``FileSystemWriter``/``FileSystemReader``, defaults: ``sync_files=True``),
``torch.save`` + fsync / ``torch.load``, and raw numpy write + fsync / read into preallocated
buffers (the storage limit of the machine). Implementations alternate within each round, and
rounds repeat, so that drift (page cache, other load) hits all of them alike; medians and ratios
are printed as markdown (docs/benchmarks.md keeps them, with the machine).

Workloads (``--workloads``, comma-separated; zdcp's two layouts, files and packed, side by side):
``large`` 16 large tensors; ``small`` 2,000 small ones; ``retention`` save, load and delete the
previous checkpoint, in a loop; ``sharded`` an FSDP2 model + Adam saved by 8 gloo ranks and
loaded at 3 and 1, with the read amplification (bytes read / bytes needed) of the loads;
``sharded4`` the same saved by 4; ``slice`` the read amplification of a 1% slice through
``zdcp.open``; ``memory`` peak memory above the state's size; ``async`` how long
``zdcp.async_save`` blocks, against copying the state to host memory; ``open`` one tensor of a
checkpoint with many keys; ``caching`` DCP's plan caching; ``s3`` objects and requests of saves
and loads on a moto server on loopback; ``latency`` S3 with 20 ms added to every request,
against DCP's ``FsspecWriter``/``FsspecReader``; ``training`` a CPU training loop's step time
with ``zdcp.CheckpointManager`` saving every 10 steps, async and sync, against none.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import zdcp
from zdcp.testing import run_ranks

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
MiB = 1 << 20


# -- timing helpers -------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    # Start from clean storage: no write-back of an earlier case's files (or of deletions)
    # left for this case to wait on in its own sync.
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

    def __init__(self, base: Path):
        self.base = base
        self.base.mkdir(parents=True)
        self.count = 0
        self.last: Path | None = None

    def __call__(self) -> Path:
        self.count += 1
        self.last = self.base / f"{self.count}"
        return self.last


def interleaved(rounds: int, cases: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every case once per round, rotating the order each round."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(cases[name]())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def rchar() -> int:
    """Bytes this process has read through read syscalls (page cache included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# -- state builders -------------------------------------------------------------------------------


def large_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(8 * MiB, generator=g).reshape(-1, 1024) for i in range(16)}  # 32 MiB


def small_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}": {
            "norm.weight": torch.randn(256 * (1 + i % 4), generator=g),
            "norm.bias": torch.randn(256 * (1 + i % 4), generator=g),
        }
        for i in range(1000)
    }


def empty_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    return {k: empty_like(v) for k, v in state.items()}


def nbytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return sum(nbytes(v) for v in state.values())


def leaves(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for v in state.values() for t in leaves(v)]


# -- anchors --------------------------------------------------------------------------------------


def torch_save_fsync(state: Any, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def raw_write(state: Any, file: Path) -> None:
    with open(file, "wb") as f:
        for t in leaves(state):
            t.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())


def raw_read(dest: Any, file: Path) -> None:
    with open(file, "rb", buffering=0) as f:
        for t in leaves(dest):
            f.readinto(memoryview(t.numpy()).cast("B"))


# -- large and small: one process -----------------------------------------------------------------


def single_process(name: str, state: Any, root: Path, rounds: int) -> list[dict[str, Any]]:
    root.mkdir(parents=True, exist_ok=True)
    dest = empty_like(state)
    dirs = {k: NewPaths(root / f"{name}-{k}") for k in ("zdcp", "packed", "dcp", "torch", "raw")}
    saves = interleaved(
        rounds,
        {
            "zdcp": lambda: timed(lambda: zdcp.save(state, dirs["zdcp"]())),
            "packed": lambda: timed(lambda: zdcp.save(state, dirs["packed"](), layout="packed")),
            "dcp": lambda: timed(lambda: dcp.save(state, checkpoint_id=dirs["dcp"](), no_dist=True)),
            "torch": lambda: timed(lambda: torch_save_fsync(state, dirs["torch"]())),
            "raw": lambda: timed(lambda: raw_write(state, dirs["raw"]())),
        },
    )
    paths = {k: d.last for k, d in dirs.items()}
    loads = interleaved(
        rounds,
        {
            "zdcp": lambda: timed(lambda: zdcp.load(dest, paths["zdcp"])),
            "packed": lambda: timed(lambda: zdcp.load(dest, paths["packed"])),
            "dcp": lambda: timed(lambda: dcp.load(dest, checkpoint_id=paths["dcp"], no_dist=True)),
            "torch": lambda: timed(lambda: torch.load(paths["torch"], weights_only=True)),
            "raw": lambda: timed(lambda: raw_read(dest, paths["raw"])),
        },
    )
    size = nbytes(state)
    rows = [_row(name, "save", saves, size), _row(name, "load", loads, size)]
    rows[0]["files"] = {k: files_in(paths[k]) for k in ("zdcp", "packed", "dcp")}
    return rows


def _row(workload: str, op: str, times: dict[str, list[float]], size: int) -> dict[str, Any]:
    med = {k: median(v) for k, v in times.items()}
    return {"workload": workload, "op": op, "bytes": size, "median": med, "rounds": len(next(iter(times.values())))}


# -- retention: save, load, delete the previous checkpoint ----------------------------------------


def retention(state: Any, root: Path, rounds: int) -> list[dict[str, Any]]:
    """A training job's pattern: each round saves a new step, loads it back and deletes the
    step before it, so every save creates its files right after a mass deletion (on ext4
    without a journal, the inode allocator then skips the recently freed inodes: see NewPaths).
    Implementations alternate within each round; each deletes only its own checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    dest = empty_like(state)
    savers = {
        "zdcp": (lambda p: zdcp.save(state, p), lambda p: zdcp.load(dest, p)),
        "packed": (lambda p: zdcp.save(state, p, layout="packed"), lambda p: zdcp.load(dest, p)),
        "dcp": (
            lambda p: dcp.save(state, checkpoint_id=p, no_dist=True),
            lambda p: dcp.load(dest, checkpoint_id=p, no_dist=True),
        ),
    }
    times: dict[str, dict[str, list[float]]] = {op: {k: [] for k in savers} for op in ("save", "load", "delete")}
    previous: dict[str, Path | None] = dict.fromkeys(savers)
    names = list(savers)
    for r in range(rounds + 1):  # round 0 only makes the first checkpoint to delete
        for name in names[r % len(names) :] + names[: r % len(names)]:
            save, load = savers[name]
            path = root / f"{name}-step{r}"
            seconds = {"save": timed(lambda: save(path)), "load": timed(lambda: load(path))}
            if previous[name] is not None:
                seconds["delete"] = timed(lambda: shutil.rmtree(previous[name]))
            previous[name] = path
            if r:
                for op, value in seconds.items():
                    times[op][name].append(value)
    size = nbytes(state)
    return [_row("retention: " + f"{len(leaves(state))} small, save/load/delete", op, times[op], size) for op in times]


# -- open: one tensor of a checkpoint with many keys ----------------------------------------------


def open_one(root: Path, sizes: tuple[int, ...] = (2_000, 20_000, 100_000)) -> list[dict[str, Any]]:
    """``zdcp.open(path)[key][:]`` on checkpoints of 2,000 to 100,000 small tensors, against
    reading and parsing the root document alone, and DCP's load of that one tensor."""
    import json

    out = []
    for n in sizes:
        state = {"model": {f"layers.{i // 10}.{_NAMES[i % 10]}": torch.full((4,), float(i)) for i in range(n)}}
        zpath, dpath = root / f"open-zdcp-{n}", root / f"open-dcp-{n}"
        zdcp.save(state, zpath, sync_files=False)
        dcp.save(state, checkpoint_id=dpath, no_dist=True)
        key = f"layers.0.{_NAMES[0]}"
        dest = {"model": {key: torch.empty(4)}}
        times = interleaved(
            3,
            {
                "root document": lambda: timed(lambda: json.loads((zpath / "zarr.json").read_bytes())),
                "zdcp.open + read": lambda: timed(lambda: zdcp.open(zpath)["model"][key][:]),
                "dcp.load of one": lambda: timed(
                    lambda: dcp.load(
                        dest,
                        checkpoint_id=dpath,
                        planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
                        no_dist=True,
                    )
                ),
            },
        )
        out.append(
            {"keys": n, "root MB": (zpath / "zarr.json").stat().st_size / 1e6}
            | {k: median(v) for k, v in times.items()}
        )
    return out


_NAMES = ("q.weight", "k.weight", "v.weight", "o.weight", "up.weight", "down.weight", "gate.weight",
          "norm.weight", "norm.bias", "ln.weight")  # fmt: skip


# -- FSDP2 + Adam on 8 (or 4) gloo ranks, loaded at 3 and 1 ---------------------------------------


def _fsdp_state(world_size: int, seed: int):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    # 96 parameters (25 MiB), and Adam's exp_avg, exp_avg_sq and step for each: 384 arrays
    model = torch.nn.Sequential(*[m for _ in range(24) for m in (torch.nn.Linear(512, 512), torch.nn.LayerNorm(512))])
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(4, 512)).sum().backward()
    optim.step()
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd}


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _collective_timed(fn: Callable[[], Any]) -> float:
    os.sync()
    dist.barrier()
    return _max_over_ranks(timed(fn))


def sharded_save(rank: int, world_size: int, root: Path, rounds: int, out: Path) -> None:
    state = _fsdp_state(world_size, 0)
    count = {"zdcp": 0, "packed": 0, "dcp": 0}

    def into_new(name: str, save: Callable[[Path], Any]) -> float:
        # A new directory every round, as in NewPaths; the last one stays for the loads.
        count[name] += 1
        path = root / f"{name}-{count[name]}"
        return _collective_timed(lambda: save(path))

    times = interleaved(
        rounds,
        {
            "zdcp": lambda: into_new("zdcp", lambda p: zdcp.save(state, p)),
            "packed": lambda: into_new("packed", lambda p: zdcp.save(state, p, layout="packed")),
            "dcp": lambda: into_new("dcp", lambda p: dcp.save(state, checkpoint_id=p)),
        },
    )
    if rank == 0:
        for name, n in count.items():
            (root / f"{name}-{n}").rename(root / name)
        torch.save(times, out)


def sharded_load(rank: int, world_size: int, root: Path, rounds: int, out: Path) -> None:
    state = _fsdp_state(world_size, 1)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in _tensors(state)]
    needed = sum(t.numel() * t.element_size() for t in local)

    def load(fn: Callable[[], Any], reads: list[int]) -> float:
        dist.barrier()
        before = rchar()
        seconds = timed(fn)
        reads.append(rchar() - before)
        return _max_over_ranks(seconds)

    reads: dict[str, list[int]] = {"zdcp": [], "packed": [], "dcp": []}
    times = interleaved(
        rounds,
        {
            "zdcp": lambda: load(lambda: zdcp.load(state, root / "zdcp"), reads["zdcp"]),
            "packed": lambda: load(lambda: zdcp.load(state, root / "packed"), reads["packed"]),
            "dcp": lambda: load(lambda: dcp.load(state, checkpoint_id=root / "dcp"), reads["dcp"]),
        },
    )
    totals = torch.tensor([needed] + [median(reads[k]) for k in ("zdcp", "packed", "dcp")], dtype=torch.float64)
    dist.all_reduce(totals)
    if rank == 0:
        read = {"zdcp": totals[1].item(), "packed": totals[2].item(), "dcp": totals[3].item()}
        torch.save({"times": times, "needed": totals[0].item(), "read": read}, out)


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list):
        return [t for v in state for t in _tensors(v)]
    return []


def sharded(root: Path, rounds: int, saved_by: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """FSDP2 + Adam (384 arrays) saved by ``saved_by`` gloo ranks, loaded at 3 and at 1."""
    root.mkdir(parents=True)
    rows, amplification = [], []
    run_ranks(saved_by, sharded_save, root, rounds, root / "save.pt", timeout=1800)
    saved = torch.load(root / "save.pt")
    size = nbytes_of_dir(root / "zdcp")
    name = f"sharded (FSDP2+Adam, 384 arrays, saved by {saved_by})"
    rows.append(_row(name, f"save at {saved_by}", saved, size))
    rows[-1]["files"] = {k: files_in(root / k) for k in ("zdcp", "packed", "dcp")}
    for world_size in (3, 1):
        run_ranks(world_size, sharded_load, root, rounds, root / f"load{world_size}.pt", timeout=1800)
        result = torch.load(root / f"load{world_size}.pt")
        rows.append(_row(name, f"load at {world_size}", result["times"], size))
        amplification.append(
            {
                "case": f"{saved_by} -> {world_size} ranks, whole state",
                "needed": result["needed"],
                "zdcp": result["read"]["zdcp"] / result["needed"],
                "packed": result["read"]["packed"] / result["needed"],
                "dcp": result["read"]["dcp"] / result["needed"],
            }
        )
    return rows, amplification


# -- DCP's plan caching: 2,000 DTensors on 4 and 8 gloo ranks -------------------------------------


def _cached_saves(rank: int, world_size: int, root: Path, rounds: int, out: Path) -> None:
    """Saves of 2,000 small DTensors with DCP's planner, plan caching off and on, through DCP's
    FileSystemWriter and zdcp's ZarrWriter: the whole save and its planning phase (DCP's
    gather-plan-scatter, timed around its reduce_scatter), maxima over ranks."""
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint import state_dict_saver as saver
    from torch.distributed.checkpoint.planner import SavePlanner
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {f"layers.{i}.w": distribute_tensor(torch.randn(64, 8), mesh, [Shard(0)]) for i in range(2000)}
    writers = {"dcp": FileSystemWriter, "zdcp": zdcp.ZarrWriter}
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
    count = 0
    for caching in (False, True):
        for name, writer in writers.items():
            planner = DefaultSavePlanner(enable_plan_caching=caching)
            # DCP's plan caches are shared by every DefaultSavePlanner of the process (keyed by
            # class name): emptied, so that each writer's first save fills them with its own
            # plans instead of being handed the other writer's (zdcp's writer refuses those).
            for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_final_save_plan,
                          SavePlanner._cached_all_plans, SavePlanner._cached_global_plan, SavePlanner._cached_metadata):
                cache.clear()
            for r in range(rounds + 1):  # round 0 fills the cache (and warms up)
                count += 1
                path = root / f"{name}-{caching}-{count}"
                total = _collective_timed(
                    lambda: dcp.save(state, storage_writer=writer(path), planner=planner)  # noqa: B023
                )
                if r:
                    times.setdefault(f"{name}, caching {'on' if caching else 'off'}", []).append(
                        (total, _max_over_ranks(planning[-1]))
                    )
    saver._DistWrapper.reduce_scatter = real
    if rank == 0:
        torch.save(times, out)


def plan_caching(root: Path, rounds: int) -> list[dict[str, Any]]:
    out = []
    for world_size in (4, 8):
        saves = root / f"ranks{world_size}"  # its own: each world size numbers its saves from 1
        saves.mkdir(parents=True)
        result = root / f"caching{world_size}.pt"
        run_ranks(world_size, _cached_saves, saves, rounds, result, timeout=1800)
        for case, pairs in torch.load(result).items():
            out.append(
                {
                    "ranks": world_size,
                    "case": case,
                    "save": median([p[0] for p in pairs]),
                    "planning": median([p[1] for p in pairs]),
                }
            )
    return out


def nbytes_of_dir(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def files_in(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


# -- a 1% slice through zdcp.open -----------------------------------------------------------------


def slice_amplification(root: Path) -> dict[str, Any]:
    """A 1% row slice of a 64 MiB tensor saved as 8 shards (one chunk per 'rank')."""
    full = torch.randn(16384, 1024)
    rows = slice(5000, 5000 + 164)  # ~1% of the rows
    needed = 164 * 1024 * 4
    result: dict[str, Any] = {"case": "1% row slice via zdcp.open (8 chunks)", "needed": needed, "dcp": None}
    for layout, key in (("files", "zdcp"), ("packed", "packed")):
        path = root / f"slice-{layout}"
        run_ranks(8, _save_sharded_tensor, path, full, layout)
        array = zdcp.open(path)["w"]
        before = rchar()
        out = array[rows]
        result[key] = (rchar() - before) / needed
        assert torch.equal(out, full[rows])
    return result


def _save_sharded_tensor(rank: int, world_size: int, path: Path, full: torch.Tensor, layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    zdcp.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, path, layout=layout)


# -- memory ---------------------------------------------------------------------------------------


MEMORY_PROBE = r"""
import os, resource, sys, time, warnings, torch
warnings.filterwarnings("ignore")
import torch.distributed.checkpoint as dcp, zdcp
op, path = sys.argv[1], sys.argv[2]
state = {f"layer{i}.weight": torch.randn(2 * 1024 * 1024) for i in range(16)}  # 128 MiB
def rss():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) * 1024
if op.endswith("load"):
    if op == "zdcp-load": zdcp.save(state, path + "-z", overwrite=True)
    if op == "packed-load": zdcp.save(state, path + "-p", overwrite=True, layout="packed")
    if op == "dcp-load": dcp.save(state, checkpoint_id=path + "-d", no_dist=True)
    if op == "torch-load": torch.save(state, path + "-t")
before = rss()
# peak RSS from here on: reset the high-water mark
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
{"zdcp-save": lambda: zdcp.save(state, path + "-z", overwrite=True),
 "packed-save": lambda: zdcp.save(state, path + "-p", overwrite=True, layout="packed"),
 "packed-load": lambda: zdcp.load(state, path + "-p"),
 "dcp-save": lambda: dcp.save(state, checkpoint_id=path + "-d", no_dist=True),
 "torch-save": lambda: torch.save(state, path + "-t"),
 "zdcp-load": lambda: zdcp.load(state, path + "-z"),
 "dcp-load": lambda: dcp.load(state, checkpoint_id=path + "-d", no_dist=True),
 "torch-load": lambda: torch.load(path + "-t", weights_only=True)}[op]()
with open("/proc/self/status") as f:
    peak = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024
print(peak - before)
"""


def memory(root: Path) -> list[dict[str, Any]]:
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    state_bytes = 128 * MiB
    for op in ("save", "load"):
        extra = {}
        for impl in ("zdcp", "packed", "dcp", "torch"):
            run = subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, f"{impl}-{op}", str(root / "mem")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            extra[impl] = int(run.stdout.strip().splitlines()[-1])
        rows.append({"op": op, "state": state_bytes, **extra})
    return rows


# -- async save -----------------------------------------------------------------------------------


def async_blocking(root: Path, rounds: int) -> dict[str, Any]:
    """How long zdcp.async_save blocks the caller, against a copy of the state to host memory
    (the staging anchor) and a full synchronous save."""
    state = large_state()
    path = root / "async"

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
            "copy to host": lambda: timed(lambda: {k: v.clone() for k, v in state.items()}),
            "sync save": lambda: timed(lambda: zdcp.save(state, path, overwrite=True)),
        },
    )
    return {k: median(v) for k, v in times.items()}


# -- a training loop with CheckpointManager -------------------------------------------------------


def training_loop(root: Path, rounds: int, steps: int = 40, every: int = 10) -> list[dict[str, Any]]:
    """A CPU training loop (an MLP of 4 x 2048 x 2048 fp32 with Adam: a 192 MiB state) run for
    ``steps`` steps with no checkpointing, and with a CheckpointManager saving every ``every``
    steps (keeping 2), asynchronously and synchronously: the mean step time, and how long each
    saving ``save()`` call blocks the loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = torch.randn(64, 2048)

    def loop(manager: zdcp.CheckpointManager | None) -> tuple[float, list[float]]:
        blocked, start = [], time.perf_counter()
        for step in range(1, steps + 1):
            model(batch).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if manager is not None:
                t = time.perf_counter()
                if manager.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict()}):
                    blocked.append(time.perf_counter() - t)
        if manager is not None:
            manager.close()  # the last save in flight is part of the loop's cost
        return (time.perf_counter() - start) / steps, blocked

    results: dict[str, list[tuple[float, list[float]]]] = {"none": [], "async": [], "sync": []}
    for round_ in range(rounds):
        for case in results:
            directory = fresh(root / f"{case}{round_}")
            manager = None if case == "none" else zdcp.CheckpointManager(
                directory, save_interval_steps=every, max_to_keep=2, async_save=case == "async")  # fmt: skip
            results[case].append(loop(manager))
    base = median([step for step, _ in results["none"]])
    rows = []
    for case, runs in results.items():
        step_time = median([step for step, _ in runs])
        blocks = [b for _, blocked in runs for b in blocked]
        rows.append({"case": case, "step": step_time, "overhead": step_time / base - 1,
                     "blocks": median(blocks) if blocks else None})  # fmt: skip
    return rows


# -- object stores: objects and requests on S3 (moto on loopback) ---------------------------------


def s3_counts() -> dict[str, int]:
    """This process's S3 requests so far, by kind, from tensorstore's metrics."""
    import tensorstore as ts

    counts = {}
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/s3/"):
        kind = metric["name"].rsplit("/", 1)[1]
        if kind in ("read", "write", "list", "delete_range") and "value" in metric["values"][0]:
            counts[kind] = int(metric["values"][0]["value"])
    return counts


def _requests_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("read", "write", "list", "delete_range")}


def _sharded_s3(rank: int, world_size: int, url: str, op: str, layout: str, out: Path) -> None:
    state = _fsdp_state(world_size, 0)
    before = s3_counts()
    if op == "save":
        zdcp.save(state, url, layout=layout)
    elif op == "load":
        zdcp.load(state, url)
    else:  # DCP's save through s3fs, for its object count
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dcp.save(state, storage_writer=FsspecWriter(url))
    counts = _requests_between(before, s3_counts())
    totals = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.int64)
    dist.all_reduce(totals)
    if rank == 0:
        torch.save(dict(zip(sorted(counts), totals.tolist())), out)


def s3_requests(root: Path) -> list[dict[str, Any]]:
    """Objects and S3 requests of a save and a load of the benchmark states on a moto server,
    in both layouts, and the objects DCP writes through its fsspec writer (s3fs) for the same
    states."""
    import boto3
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    from zdcp.testing import moto_server

    rows = []
    root.mkdir(parents=True, exist_ok=True)
    with moto_server() as endpoint:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1",
                          AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")

        def objects(prefix: str) -> int:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix + "/")
            return sum(len(page.get("Contents", [])) for page in pages)

        for name, state in (("large: 16 x 32 MiB fp32", large_state()), ("many small: 2000 x 1-4 KiB", small_state())):
            dcp.save(state, storage_writer=FsspecWriter(f"s3://bench/dcp-{name[:5]}"), no_dist=True)
            for layout in ("files", "packed"):
                prefix = f"{layout}-{name[:5]}"
                before = s3_counts()
                zdcp.save(state, f"s3://bench/{prefix}", layout=layout)
                saved = _requests_between(before, s3_counts())
                before = s3_counts()
                zdcp.load(empty_like(state), f"s3://bench/{prefix}")
                loaded = _requests_between(before, s3_counts())
                rows.append({"workload": name, "layout": layout, "ranks": "1 / 1", "objects": objects(prefix),
                             "dcp_objects": objects(f"dcp-{name[:5]}"), "save": saved, "load": loaded})  # fmt: skip
        name = "sharded (FSDP2+Adam, 384 arrays)"
        run_ranks(4, _sharded_s3, "s3://bench/dcp-sharded", "dcp", "", root / "dcp.pt", timeout=600)
        for layout in ("files", "packed"):
            url = f"s3://bench/{layout}-sharded"
            run_ranks(4, _sharded_s3, url, "save", layout, root / "save.pt", timeout=600)
            run_ranks(3, _sharded_s3, url, "load", layout, root / "load.pt", timeout=600)
            rows.append({"workload": name, "layout": layout, "ranks": "4 / 3", "objects": objects(f"{layout}-sharded"),
                         "dcp_objects": objects("dcp-sharded"), "save": torch.load(root / "save.pt"),
                         "load": torch.load(root / "load.pt")})  # fmt: skip
    return rows


# -- S3 with the round-trip time of an object store -----------------------------------------------


class LatencyProxy:
    """A TCP proxy on loopback that holds every HTTP request for ``delay`` seconds before
    passing it on to ``upstream`` (host:port). moto answers in about a millisecond on loopback,
    where an object store takes tens: this puts that cost back, as real stores charge it, to
    whoever makes the most requests. It serves only this process's benchmark, and stops with it."""

    def __init__(self, upstream: str, delay: float = 0.020):
        import asyncio
        import threading

        self.upstream, self.delay = upstream, delay
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _serve(self, client_reader: Any, client_writer: Any) -> None:
        import asyncio

        host, port = self.upstream.rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))

        async def pipe(reader: Any, writer: Any, hold: bool) -> None:
            try:
                while data := await reader.read(1 << 16):
                    if hold and data[:4] in (b"GET ", b"PUT ", b"POST", b"HEAD", b"DELE"):
                        await asyncio.sleep(self.delay)
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer, True), pipe(upstream_reader, client_writer, False))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def s3_latency(rounds: int) -> list[dict[str, Any]]:
    """500 small tensors and 64 MiB of large ones saved and loaded through a 20 ms proxy in
    front of moto: zdcp's two layouts and DCP's FsspecWriter/FsspecReader (s3fs), each round
    under a new prefix; and the objects each checkpoint is."""
    import boto3
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from zdcp.testing import moto_server

    g = torch.Generator().manual_seed(0)
    states = {
        "500 small": {f"layers.{i}.norm": torch.randn(256 * (1 + i % 4), generator=g) for i in range(500)},
        "64 MiB large": {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(16)},
    }
    rows = []
    with moto_server() as endpoint:
        proxy = LatencyProxy(endpoint.removeprefix("http://"))
        os.environ.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_REGION="us-east-1",
                          AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="latency")
        fs = {"endpoint_url": proxy.endpoint, "key": "bench", "secret": "bench"}
        try:
            for name, state in states.items():
                dest = empty_like(state)
                count = {"zdcp": 0, "packed": 0, "dcp": 0}

                def url(impl: str, new: bool = False) -> str:
                    count[impl] += new
                    return f"s3://latency/{name[:3]}-{impl}-{count[impl]}"

                saves = interleaved(
                    rounds,
                    {
                        "zdcp": lambda: timed(lambda: zdcp.save(state, url("zdcp", True), layout="files")),
                        "packed": lambda: timed(lambda: zdcp.save(state, url("packed", True), layout="packed")),
                        "dcp": lambda: timed(
                            lambda: dcp.save(state, storage_writer=FsspecWriter(url("dcp", True), **fs), no_dist=True)
                        ),
                    },
                )
                loads = interleaved(
                    rounds,
                    {
                        "zdcp": lambda: timed(lambda: zdcp.load(dest, url("zdcp"))),
                        "packed": lambda: timed(lambda: zdcp.load(dest, url("packed"))),
                        "dcp": lambda: timed(
                            lambda: dcp.load(dest, storage_reader=FsspecReader(url("dcp"), **fs), no_dist=True)
                        ),
                    },
                )
                size = nbytes(state)
                rows += [
                    _row(f"S3 + 20 ms: {name}", "save", saves, size),
                    _row(f"S3 + 20 ms: {name}", "load", loads, size),
                ]
                pages = s3.get_paginator("list_objects_v2")

                def objects(prefix: str) -> int:
                    return sum(
                        len(p.get("Contents", [])) for p in pages.paginate(Bucket="latency", Prefix=prefix + "/")
                    )

                rows[-2]["files"] = {k: objects(url(k).removeprefix("s3://latency/")) for k in count}
        finally:
            proxy.close()
    return rows


# -- report ---------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) >> 20 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, zdcp {zdcp.__version__}"
    )


def report(
    rows: list[dict[str, Any]],
    amplification: list[dict[str, Any]],
    mem: list[dict[str, Any]],
    asynchronous: dict[str, float] | None,
    root: Path,
    s3: list[dict[str, Any]] | None = None,
    opened: list[dict[str, Any]] | None = None,
    caching: list[dict[str, Any]] | None = None,
    training: list[dict[str, Any]] | None = None,
) -> str:
    out = [f"Machine: {machine()}. Storage: the filesystem under `{root}`; page cache warm.", ""]
    if rows:
        out += [
            "| workload | op | size | files s | packed s | DCP s | torch.save s | raw s | files/DCP | packed/DCP |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            m = r["median"]
            cells = [f"{m[k]:.3f}" if k in m else "" for k in ("zdcp", "packed", "dcp", "torch", "raw")]
            ratios = [f"{m[k] / m['dcp']:.2f}x" if k in m else "" for k in ("zdcp", "packed")]
            out.append(
                f"| {r['workload']} | {r['op']} | {r['bytes'] / MiB:.0f} MiB | {' | '.join(cells)} | "
                f"{' | '.join(ratios)} |"
            )
        out.append(f"\nMedians of {rows[0]['rounds']} interleaved rounds; files and packed are zdcp's two layouts.")
        counted = [r for r in rows if "files" in r]
        if counted:
            out += ["", "| files in one checkpoint | zdcp files | zdcp packed | DCP |", "| --- | --- | --- | --- |"]
            out += [
                f"| {r['workload']} | {r['files']['zdcp']} | {r['files']['packed']} | {r['files']['dcp']} |"
                for r in counted
            ]
    if amplification:
        out += [
            "",
            "| read amplification (bytes read / bytes needed) | files | packed | DCP |",
            "| --- | --- | --- | --- |",
        ]
        for a in amplification:
            cells = [f"{a[k]:.2f}" if a.get(k) is not None else "n/a" for k in ("zdcp", "packed", "dcp")]
            out.append(f"| {a['case']} ({a['needed'] / MiB:.1f} MiB needed) | {' | '.join(cells)} |")
    if mem:
        out += [
            "",
            "| peak RSS above the state (128 MiB state) | files | packed | DCP | torch |",
            "| --- | --- | --- | --- | --- |",
        ]
        for m in mem:
            impls = ("zdcp", "packed", "dcp", "torch")
            cells = " | ".join(f"{m[k] / MiB:.0f} MiB ({m[k] / m['state']:.0%})" for k in impls)
            out.append(f"| {m['op']} | {cells} |")
    if asynchronous:
        copy = asynchronous["copy to host"]
        out += ["", "| async save, 512 MiB (`large`) | s | / copy to host |", "| --- | --- | --- |"]
        out += [f"| {k} | {v:.3f} | {v / copy:.2f}x |" for k, v in asynchronous.items()]
    if opened:
        cases = [k for k in opened[0] if k not in ("keys", "root MB")]
        out += [
            "",
            f"| keys | root zarr.json | {' | '.join(f'{c} s' for c in cases)} |",
            "| --- " * (len(cases) + 2) + "|",
        ]
        for o in opened:
            out.append(f"| {o['keys']:,} | {o['root MB']:.1f} MB | {' | '.join(f'{o[c]:.3f}' for c in cases)} |")
    if caching:
        out += ["", "| 2,000 DTensors, DCP's planner | ranks | save s | planning s |", "| --- | --- | --- | --- |"]
        out += [f"| {c['case']} | {c['ranks']} | {c['save']:.3f} | {c['planning']:.3f} |" for c in caching]
    if training:
        out += ["", "| training loop, 192 MiB state, saves every 10 of 40 steps | step ms | overhead | "
                "save() blocks ms |", "| --- | --- | --- | --- |"]  # fmt: skip
        for t in training:
            blocks = f"{t['blocks'] * 1000:.0f}" if t["blocks"] is not None else ""
            out.append(f"| {t['case']} | {t['step'] * 1000:.1f} | {t['overhead']:+.1%} | {blocks} |")
    if s3:
        out += [
            "",
            "| on S3 (moto) | layout | ranks save / load | objects | DCP objects | save: writes / reads / "
            "lists / range deletes | load: reads / lists |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in s3:
            sv, ld = r["save"], r["load"]
            save = f"{sv['write']} / {sv['read']} / {sv['list']} / {sv['delete_range']}"
            out.append(
                f"| {r['workload']} | {r['layout']} | {r['ranks']} | {r['objects']} | {r['dcp_objects']} | {save} "
                f"| {ld['read']} / {ld['list']} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/zdcp-bench"), help="runs go into a new directory here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workloads",
        default="large,small,retention,sharded,sharded4,slice,memory,async,open,caching,s3,latency,training",
    )
    args = parser.parse_args()
    chosen = set(args.workloads.split(","))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    run_dir = args.dir / time.strftime("run-%Y%m%d-%H%M%S")  # see NewPaths
    try:
        print(run_workloads(chosen, run_dir, args.rounds))
    finally:
        fresh(run_dir)


def run_workloads(chosen: set[str], root: Path, rounds: int) -> str:
    """Run the chosen workloads, all their files under ``root``; the report."""
    rows: list[dict[str, Any]] = []
    amplification: list[dict[str, Any]] = []
    mem: list[dict[str, Any]] = []
    if "large" in chosen:
        rows += single_process("large: 16 x 32 MiB fp32", large_state(), root, rounds)
    if "small" in chosen:
        rows += single_process("many small: 2000 x 1-4 KiB", small_state(), root, rounds)
    if "retention" in chosen:
        rows += retention(small_state(), root / "retention", max(rounds, 5))
    for name, saved_by in (("sharded", 8), ("sharded4", 4)):
        if name in chosen:
            more_rows, more_amp = sharded(root / name, rounds, saved_by=saved_by)
            rows += more_rows
            amplification += more_amp
    if "slice" in chosen:
        amplification.append(slice_amplification(root))
    if "memory" in chosen:
        mem = memory(root)
    if "latency" in chosen:
        rows += s3_latency(rounds)
    asynchronous = async_blocking(root, rounds) if "async" in chosen else None
    s3 = s3_requests(root / "s3") if "s3" in chosen else None
    opened = open_one(root / "open") if "open" in chosen else None
    caching = plan_caching(root / "caching", rounds) if "caching" in chosen else None
    training = training_loop(root / "training", rounds) if "training" in chosen else None
    return report(rows, amplification, mem, asynchronous, root.parent, s3, opened, caching, training)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
