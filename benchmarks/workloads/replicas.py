"""``replicas``: what loads cost an object store when ranks need the same bytes. Four ranks load
a replicated state (DDP: every rank holds all of it, 32 MiB) and an HSDP FSDP2 + Adam state
(2 replicas x 2 shards: each shard is needed by two ranks) from S3 (a moto server behind
:class:`zdcp.testing.FaultProxy`), for zdcp and DCP's ``FsspecReader`` (s3fs): the bytes the
store sent (GET answers, counted by the proxy) over the bytes the checkpoint holds, the time
of the load on a shared 16 MiB/s link (the proxy's ``bandwidth``), and the loading ranks' peak
RSS above the state.

zdcp's load has one rank read each region that several need and send it to the others
(``zdcp.sharing``); DCP's has every rank read what it needs itself.

Where nothing but Adam's step scalars is shared (the FSDP state of ``sharded``, saved by 8 ranks
and loaded by 3, resharding), sharing should cost nothing: zdcp's load with and without
``share_reads``, interleaved, from a local directory.

Saves: four DDP ranks save a replicated state whose largest tensor is half of it (32 MiB) to a
local directory; the bytes each rank writes (its data files, DCP's ``__<rank>_0.distcp``) show
how DCP's dedup and zdcp's (``zdcp.dedup``) spread the writes, and the save's time follows the
rank that writes most.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import zdcp
from zdcp.testing import FaultProxy, moto_server, run_ranks

from ..common import (
    DCP,
    FSDP_MODEL,
    FSDP_MODEL_QUICK,
    HEADINGS,
    ZDCP_PACKED,
    MiB,
    collective_timed,
    empty_like,
    fsdp_state,
    median,
    use_s3_endpoint,
)
from ..registry import Settings
from ..tables import markdown_table

BUCKET = "replicas"
RANKS = 4
LINK = 16 * MiB  # bytes per second of the shared link, in the timed loads
IMPLS = (ZDCP_PACKED, DCP)
CASES = {"DDP, 4 replicas": 4, "HSDP, 2 replicas x 2 shards": 2}  # case -> replicas


def replicated_state(quick: bool) -> dict[str, torch.Tensor]:
    """8 fp32 tensors of 4 MiB (32 MiB), the same on every rank; of 256 KiB when ``quick``."""
    g = torch.Generator().manual_seed(0)
    rows = 64 if quick else 1024
    return {f"layer{i}.weight": torch.randn(rows, 1024, generator=g) for i in range(8)}


def state_on_rank(replicas: int, quick: bool) -> dict[str, Any]:
    if replicas == RANKS:
        return replicated_state(quick)
    return fsdp_state(RANKS, 0, FSDP_MODEL_QUICK if quick else FSDP_MODEL, replicas=replicas)


def peak_rss_above(fn: Any) -> int:
    """The peak RSS of this process while ``fn()`` runs, above its RSS before."""
    with open("/proc/self/status") as f:
        before = int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024 - before


def on_rank(rank: int, world_size: int, replicas: int, impl: str, url: str, op: str, quick: bool, out: Path) -> None:
    """``op``: "save" the case's state at ``url`` in ``impl``, or "load" it (into a fresh copy
    of the state); rank 0 writes the load's time (the slowest rank's) and the largest peak RSS
    above the state to ``out``."""
    state = state_on_rank(replicas, quick)
    if op == "save":
        if impl == DCP:
            dcp.save(state, storage_writer=FsspecWriter(url))
        else:
            zdcp.save(state, url)
        return
    dest = empty_like(state) if replicas == RANKS else state
    load = (lambda: dcp.load(dest, storage_reader=FsspecReader(url))) if impl == DCP else (lambda: zdcp.load(dest, url))
    peak: list[int] = []
    seconds = collective_timed(lambda: peak.append(peak_rss_above(load)))
    peaks = torch.tensor(peak, dtype=torch.int64)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save({"seconds": seconds, "peak": int(peaks.item())}, out)


def stored_bytes(s3: Any, prefix: str) -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


def replicas(settings: Settings) -> str:
    import boto3

    quick, rounds = settings.quick, settings.rounds
    out = settings.directory / "load.pt"
    rows = []
    with moto_server() as endpoint, FaultProxy(endpoint) as proxy:
        use_s3_endpoint(proxy.endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for case, replicas in CASES.items():
            for impl in IMPLS:
                prefix = f"{impl}-{replicas}"
                url = f"s3://{BUCKET}/{prefix}"
                run_ranks(RANKS, on_rank, replicas, impl, url, "save", quick, out, timeout=600)
                stored = stored_bytes(s3, prefix)
                proxy.bandwidth = None
                before = proxy.counts
                run_ranks(RANKS, on_rank, replicas, impl, url, "load", quick, out, timeout=600)
                fetched = (proxy.counts - before).get_bytes
                proxy.bandwidth = LINK
                times, peak = [], 0
                for _ in range(rounds):
                    run_ranks(RANKS, on_rank, replicas, impl, url, "load", quick, out, timeout=600)
                    result = torch.load(out)
                    times.append(result["seconds"])
                    peak = max(peak, result["peak"])
                rows.append((case, impl, stored, fetched, median(times), peak))
        proxy.bandwidth = None
    dcp_time = {case: t for case, impl, _, _, t, _ in rows if impl == DCP}
    table = markdown_table(
        ["4 ranks loading from S3", "implementation", "stored", "fetched / stored", "load s on 16 MiB/s",
         "/ DCP", "peak RSS above the state"],
        [[case, HEADINGS[impl], f"{stored / MiB:.1f} MiB", f"{fetched / stored:.2f}x", f"{t:.2f}",
          f"{t / dcp_time[case]:.2f}x", f"{peak / MiB:.0f} MiB"] for case, impl, stored, fetched, t, peak in rows],
    )  # fmt: skip
    link = f"Bytes fetched by one load with no limit; times: the median of {rounds} loads on the capped link."
    return "\n\n".join(
        [table, f"{link} The peak RSS is the largest rank's.", sharing_nothing(settings), spread_saves(settings)]
    )


def half_in_one_tensor(quick: bool) -> dict[str, torch.Tensor]:
    """A replicated state whose largest tensor is half of it: 16 + 8 x 2 MiB (1 MiB when ``quick``)."""
    g = torch.Generator().manual_seed(0)
    rows = 64 if quick else 1024
    state = {"embedding": torch.randn(rows * 4, 1024, generator=g)}
    state.update({f"layer{i}.weight": torch.randn(rows // 2, 1024, generator=g) for i in range(8)})
    return state


def save_on_rank(rank: int, world_size: int, impl: str, path: str, quick: bool, out: Path) -> None:
    """Save the state of :func:`half_in_one_tensor` at ``path``; rank 0 writes the time to ``out``."""
    state = half_in_one_tensor(quick)
    if impl == DCP:
        seconds = collective_timed(lambda: dcp.save(state, storage_writer=FileSystemWriter(path)))
    else:
        seconds = collective_timed(lambda: zdcp.save(state, path))
    if rank == 0:
        torch.save({"seconds": seconds}, out)


def written_by_rank(impl: str, path: str) -> list[int]:
    """The bytes of the files each rank wrote into the checkpoint at ``path``."""
    pattern = "{path}/__{rank}_*.distcp" if impl == DCP else "{path}/ocdbt.process_{rank}/d/*"
    return [sum(map(os.path.getsize, glob.glob(pattern.format(path=path, rank=r)))) for r in range(RANKS)]


def spread_saves(settings: Settings) -> str:
    out = settings.directory / "save.pt"
    rows = []
    for impl in IMPLS:
        times, written = [], []
        for attempt in range(settings.rounds):
            path = str(settings.directory / f"spread-{impl}-{attempt}")
            run_ranks(RANKS, save_on_rank, impl, path, settings.quick, out, timeout=600)
            times.append(torch.load(out)["seconds"])
            written = written_by_rank(impl, path)
        rows.append((impl, written, median(times)))
    dcp_time = next(t for impl, _, t in rows if impl == DCP)
    table = markdown_table(
        ["4 DDP ranks saving, one tensor half the state", "implementation", "MiB written per rank",
         "largest / mean", "save s", "/ DCP"],
        [["local directory", HEADINGS[impl], ", ".join(f"{w / MiB:.1f}" for w in written),
          f"{max(written) / (sum(written) / RANKS):.2f}x", f"{t:.3f}", f"{t / dcp_time:.2f}x"]
         for impl, written, t in rows],
    )  # fmt: skip
    return f"{table}\n\nSave times: the median of {settings.rounds} rounds, the slowest rank's."


def save_fsdp(rank: int, world_size: int, path: str, quick: bool) -> None:
    zdcp.save(fsdp_state(world_size, 0, FSDP_MODEL_QUICK if quick else FSDP_MODEL), path)


def load_fsdp_sharing_or_not(rank: int, world_size: int, path: str, rounds: int, quick: bool, out: Path) -> None:
    """Load the checkpoint at ``path`` with ``share_reads`` on and off in turn, ``rounds`` times
    each; rank 0 writes the medians of the slowest rank's times to ``out``."""
    state = fsdp_state(world_size, 1, FSDP_MODEL_QUICK if quick else FSDP_MODEL)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for share in (True, False):
            times[share].append(collective_timed(lambda: zdcp.load(state, path, share_reads=share)))
    if rank == 0:
        torch.save({share: median(t) for share, t in times.items()}, out)


def sharing_nothing(settings: Settings) -> str:
    path, out = str(settings.directory / "resharded"), settings.directory / "resharded.pt"
    run_ranks(8, save_fsdp, path, settings.quick, timeout=600)
    rounds = max(settings.rounds, 5)
    run_ranks(3, load_fsdp_sharing_or_not, path, rounds, settings.quick, out, timeout=600)
    seconds = torch.load(out)
    on, off = seconds[True], seconds[False]
    table = markdown_table(
        ["FSDP2 + Adam saved by 8, loaded by 3", "share_reads=True s", "share_reads=False s", "on / off"],
        [["local directory", f"{on:.3f}", f"{off:.3f}", f"{on / off:.2f}x"]],
    )
    return f"{table}\n\nMedians of {rounds} interleaved loads each, the slowest rank's."
