"""``latency``: saves and loads on S3 with the round-trip time of a real object store. A proxy
in front of a moto server on loopback (:class:`zdcp.testing.FaultProxy`, with ``latency`` and no
faults) holds every request for 20 ms; zdcp's two layouts and DCP's ``FsspecWriter``/
``FsspecReader`` (s3fs) save 500 small tensors and 64 MiB of large ones, each round under a new
prefix, and load the last; and the objects each checkpoint is.

moto answers in about a millisecond, where an object store takes tens: the proxy puts that
cost back, as real stores charge it, on whoever makes the most requests in sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import zdcp
from zdcp.testing import FaultProxy, moto_server

from ..common import (
    DCP,
    ZDCP_FILES,
    ZDCP_PACKED,
    empty_like,
    interleaved,
    mib,
    nbytes,
    objects_in,
    timed,
    use_s3_endpoint,
)
from ..registry import Settings
from ..tables import TimedOp, count_table, timing_table

BUCKET = "latency"
DELAY = 0.020  # seconds added to every request
IMPLS = (ZDCP_FILES, ZDCP_PACKED, DCP)


def states(quick: bool) -> dict[str, dict[str, torch.Tensor]]:
    """500 fp32 tensors of 1-4 KiB, and 16 of 4 MiB (64 MiB); 50 and 16 x 256 KiB when ``quick``."""
    g = torch.Generator().manual_seed(0)
    small = {f"layers.{i}.norm": torch.randn(256 * (1 + i % 4), generator=g) for i in range(50 if quick else 500)}
    rows = 64 if quick else 1024
    large = {f"layer{i}.weight": torch.randn(rows, 1024, generator=g) for i in range(16)}
    return {f"{len(small)} small": small, f"{mib(nbytes(large))} in 16 tensors": large}


def measure_state(
    state: dict[str, torch.Tensor], under: str, rounds: int, fs: dict[str, Any]
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str]]:
    """Saves of ``state``, each under a new prefix below ``under``, then loads of the last
    ones; and the prefix of each implementation's last checkpoint. ``fs``: s3fs's options."""
    dest = empty_like(state)
    count = dict.fromkeys(IMPLS, 0)

    def prefix(impl: str, new: bool = False) -> str:
        count[impl] += new
        return f"{under}-{impl}-{count[impl]}"

    def url(impl: str, new: bool = False) -> str:
        return f"s3://{BUCKET}/{prefix(impl, new)}"

    saves = interleaved(
        rounds,
        {
            ZDCP_FILES: lambda: timed(lambda: zdcp.save(state, url(ZDCP_FILES, True), layout="files")),
            ZDCP_PACKED: lambda: timed(lambda: zdcp.save(state, url(ZDCP_PACKED, True), layout="packed")),
            DCP: lambda: timed(
                lambda: dcp.save(state, storage_writer=FsspecWriter(url(DCP, True), **fs), no_dist=True)
            ),
        },
    )
    loads = interleaved(
        rounds,
        {
            ZDCP_FILES: lambda: timed(lambda: zdcp.load(dest, url(ZDCP_FILES))),
            ZDCP_PACKED: lambda: timed(lambda: zdcp.load(dest, url(ZDCP_PACKED))),
            DCP: lambda: timed(lambda: dcp.load(dest, storage_reader=FsspecReader(url(DCP), **fs), no_dist=True)),
        },
    )
    return saves, loads, {k: prefix(k) for k in IMPLS}


def measure(rounds: int, quick: bool) -> tuple[list[TimedOp], list[tuple[str, dict[str, int]]]]:
    """Saves and loads of each state, and the objects of its checkpoints."""
    import boto3

    ops: list[TimedOp] = []
    objects: list[tuple[str, dict[str, int]]] = []
    with moto_server() as endpoint, FaultProxy(endpoint, latency=DELAY) as proxy:
        use_s3_endpoint(proxy.endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        fs = {"endpoint_url": proxy.endpoint, "key": "bench", "secret": "bench"}
        for index, (name, state) in enumerate(states(quick).items()):
            saves, loads, last = measure_state(state, f"state{index}", rounds, fs)
            ops += [TimedOp(f"{name}: save", saves), TimedOp(f"{name}: load", loads)]
            objects.append((name, {k: objects_in(s3, BUCKET, last[k]) for k in IMPLS}))
    return ops, objects


def latency(settings: Settings) -> str:
    ops, objects = measure(settings.rounds, settings.quick)
    return "\n\n".join([
        f"S3 (moto) with {DELAY * 1000:.0f} ms added to every request.",
        timing_table(ops),
        count_table("objects", objects),
    ])  # fmt: skip
