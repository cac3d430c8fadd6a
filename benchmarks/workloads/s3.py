"""``s3``: what a checkpoint costs an object store. The ``large``, ``small`` and FSDP2 + Adam
states saved and loaded in both layouts on a moto S3 server on loopback: the objects each
checkpoint is, and the requests of its save and of its load, counted by tensorstore's own
metrics (``/tensorstore/kvstore/s3/*``, summed over ranks); and the objects DCP writes for the
same states through its fsspec writer (s3fs).

On an object store every object is at least one request, and a request costs a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

import zdcp
from zdcp.testing import moto_server, run_ranks

from ..common import (
    FSDP_MODEL,
    FSDP_MODEL_QUICK,
    HEADINGS,
    LAYOUTS,
    ZDCP_FILES,
    ZDCP_PACKED,
    FsdpModel,
    empty_like,
    fsdp_state,
    large_state,
    objects_in,
    sizes,
    small_state,
    use_s3_endpoint,
)
from ..registry import Settings
from ..tables import markdown_table

BUCKET = "bench"
KINDS = ("read", "write", "list", "delete_range")  # of tensorstore's S3 requests
SAVED_BY, LOADED_AT = 4, 3


def request_counts() -> dict[str, int]:
    """This process's S3 requests so far, by kind, from tensorstore's metrics."""
    import tensorstore as ts

    counts = {}
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/s3/"):
        kind = metric["name"].rsplit("/", 1)[1]
        if kind in KINDS and "value" in metric["values"][0]:
            counts[kind] = int(metric["values"][0]["value"])
    return counts


def requests_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in KINDS}


def on_rank(rank: int, world_size: int, url: str, op: str, layout: str, model: FsdpModel, out: Path) -> None:
    """``op``: "save" or "load" the FSDP2 state in ``layout``, or "dcp", DCP's save of it
    through s3fs (for its objects); rank 0 writes the requests, summed over ranks, to ``out``."""
    state = fsdp_state(world_size, 0, model)
    before = request_counts()
    if op == "save":
        zdcp.save(state, url, layout=layout)
    elif op == "load":
        zdcp.load(state, url)
    else:
        dcp.save(state, storage_writer=FsspecWriter(url))
    counts = requests_between(before, request_counts())
    totals = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.int64)
    dist.all_reduce(totals)
    if rank == 0:
        torch.save(dict(zip(sorted(counts), totals.tolist())), out)


@dataclass(frozen=True)
class Requests:
    """One state in one implementation on S3."""

    state: str
    impl: str
    ranks: str  # "save / load"
    objects: int
    dcp_objects: int
    save: dict[str, int]  # requests by kind
    load: dict[str, int]


def measure(settings: Settings) -> list[Requests]:
    import boto3

    directory, quick = settings.directory, settings.quick
    model = settings.sized(FSDP_MODEL, FSDP_MODEL_QUICK)
    rows = []
    with moto_server() as endpoint:
        use_s3_endpoint(endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for name, state in (("large", large_state(quick)), ("small", small_state(quick))):
            described = f"{name}: {sizes(state)} fp32"
            dcp.save(state, storage_writer=FsspecWriter(f"s3://{BUCKET}/dcp-{name}"), no_dist=True)
            for impl in (ZDCP_FILES, ZDCP_PACKED):
                prefix = f"{impl}-{name}"
                before = request_counts()
                zdcp.save(state, f"s3://{BUCKET}/{prefix}", layout=LAYOUTS[impl])
                saved = requests_between(before, request_counts())
                before = request_counts()
                zdcp.load(empty_like(state), f"s3://{BUCKET}/{prefix}")
                loaded = requests_between(before, request_counts())
                rows.append(Requests(described, impl, "1 / 1", objects_in(s3, BUCKET, prefix),
                                     objects_in(s3, BUCKET, f"dcp-{name}"), saved, loaded))  # fmt: skip
        described = f"FSDP2 + Adam, {model.arrays} arrays"
        dcp_url = f"s3://{BUCKET}/dcp-sharded"
        run_ranks(SAVED_BY, on_rank, dcp_url, "dcp", "", model, directory / "dcp.pt", timeout=600)
        for impl in (ZDCP_FILES, ZDCP_PACKED):
            url = f"s3://{BUCKET}/{impl}-sharded"
            run_ranks(SAVED_BY, on_rank, url, "save", LAYOUTS[impl], model, directory / "save.pt", timeout=600)
            run_ranks(LOADED_AT, on_rank, url, "load", LAYOUTS[impl], model, directory / "load.pt", timeout=600)
            objects = objects_in(s3, BUCKET, f"{impl}-sharded")
            saved, loaded = torch.load(directory / "save.pt"), torch.load(directory / "load.pt")
            ranks = f"{SAVED_BY} / {LOADED_AT}"
            rows.append(Requests(described, impl, ranks, objects, objects_in(s3, BUCKET, "dcp-sharded"), saved, loaded))
    return rows


def render(rows: list[Requests]) -> str:
    def cells(r: Requests) -> list[str]:
        save = " / ".join(str(r.save[k]) for k in ("write", "read", "list", "delete_range"))
        return [r.state, HEADINGS[r.impl], r.ranks, f"{r.objects:,}", f"{r.dcp_objects:,}", save,
                f"{r.load['read']} / {r.load['list']}"]  # fmt: skip

    header = ["on S3 (moto)", "implementation", "ranks save / load", "objects", "DCP objects",
              "save: writes / reads / lists / range deletes", "load: reads / lists"]  # fmt: skip
    return markdown_table(header, [cells(r) for r in rows])


def s3(settings: Settings) -> str:
    return render(measure(settings))
