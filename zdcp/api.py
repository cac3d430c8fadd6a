"""``zdcp.save``, ``zdcp.async_save`` and ``zdcp.load``: DCP's with the Zarr storage and planners.

They keep DCP's programming model (in-place load, ``Stateful`` values, collective over a process
group or single-process without one) and change two things users notice: the format on disk,
and errors, which are zdcp's own ``Exception`` subclasses raised on every rank instead of DCP's
``CheckpointException`` (a ``BaseException``).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from . import collector
from .collectives import Collectives, attempt
from .planner import ZarrLoadPlanner, ZarrSavePlanner
from .reader import ZarrReader
from .storage.contents import Committed, open_committed
from .storage.layout import layout_named
from .storage.location import CheckpointId, Location
from .writer import ZarrWriter

__all__ = ["save", "async_save", "load", "run_save"]

# One background saver: successive async saves of a process run in the order they were started.
_SAVER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdcp-async-save")


@collector.paused()
def save(
    state_dict: dict[str, Any],
    checkpoint_id: CheckpointId,
    *,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    **options: Any,
) -> None:
    """Save ``state_dict`` as a zdcp checkpoint at ``checkpoint_id``.

    Collective over ``process_group`` (the default group when None) when one is initialized;
    single-process when ``no_dist`` or when no group is initialized. Every rank writes its own
    shards; replicated tensors are written once. Top-level ``Stateful`` values are saved through
    their ``state_dict()``. The checkpoint counts only once the coordinator has committed it.
    Python's garbage collector is paused meanwhile (:mod:`zdcp.collector`); ``async_save``
    leaves it alone on its background thread, where pausing it would pause the training's too.

    Args:
        **options: the fields of :class:`~zdcp.SaveOptions`: ``overwrite`` (replace a committed
            checkpoint), ``allow_pickle``, ``compression`` (``None``, ``"zstd"``, ``"gzip"``),
            ``sync_files`` (default True: durable before the commit, as DCP).
    """
    collectives = Collectives(process_group, no_dist=no_dist)
    writer = ZarrWriter(checkpoint_id, **options)
    plain = collectives.run("state_dict()", lambda: _plain_state_dict(state_dict))
    run_save(plain, writer, collectives=collectives)


def async_save(
    state_dict: dict[str, Any],
    checkpoint_id: CheckpointId,
    *,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    **options: Any,
) -> concurrent.futures.Future[None]:
    """Stage ``state_dict`` on the host, then save it in the background like :func:`save`
    (same arguments).

    Returns once the state is copied to host memory (pinned when a GPU is present), so training
    may change its tensors right away. The returned future completes when every rank's writes
    are done and the checkpoint is committed, or raises the save's zdcp error. Collective
    like :func:`save`, from a background thread: give it a process group of its own
    (``dist.new_group(backend="gloo")``) when training runs collectives meanwhile.
    """
    collectives = Collectives(process_group, no_dist=no_dist)
    writer = ZarrWriter(checkpoint_id, **options)
    # Pinned host memory when a GPU is present; blocking copies, so the staged state is complete
    # when this returns (non-blocking ones would need a stream synchronisation first).
    stager = DefaultStager(StagingOptions(torch.cuda.is_available(), False, False, False))
    try:
        staged, error = attempt(lambda: stager.stage(_plain_state_dict(state_dict)))
    finally:
        stager.close()

    def in_background() -> None:
        # Every collective of an async save runs on the saver thread, in the order the saves
        # were started, so that two saves in flight never interleave their collectives.
        collectives.agree(error, "state_dict() and staging")
        run_save(staged, writer, collectives=collectives)

    return _SAVER.submit(in_background)


def run_save(
    state_dict: dict[str, Any],
    writer: ZarrWriter,
    *,
    planner: SavePlanner | None = None,
    collectives: Collectives,
) -> None:
    """The collective part of every save (``save``, ``async_save``, the conversions of
    :mod:`zdcp.format_utils`), for a state dict without ``Stateful`` values: DCP's save with
    ``writer`` and ``planner`` (zdcp's by default) over ``collectives``' group. A failed save
    deletes what it wrote."""
    if planner is None:
        planner = ZarrSavePlanner(allow_pickle=writer.options.allow_pickle)
    with collectives.dcp_call():
        try:
            dcp.save(
                state_dict,
                storage_writer=writer,
                planner=planner,
                process_group=collectives.group,
                no_dist=collectives.no_dist,
            )
        except BaseException:  # DCP's CheckpointException is one
            writer.abandon()
            raise


@collector.paused()
def load(
    state_dict: dict[str, Any],
    checkpoint_id: CheckpointId,
    *,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    allow_partial_load: bool = False,
    allow_cast: bool = False,
    allow_pickle: bool = False,
    share_reads: bool = True,
) -> None:
    """Load a zdcp checkpoint into ``state_dict``, in place.

    Tensors (plain, ``DTensor``, ``ShardedTensor``) are filled where they are, in any placement
    and at any world size: each rank reads only the slices its shards need. Other values are
    replaced in ``state_dict``. Top-level ``Stateful`` values get ``state_dict()`` before and
    ``load_state_dict()`` after. The destination may ask for a subset of the checkpoint.

    Args:
        allow_partial_load: skip destination keys the checkpoint lacks instead of raising
            :class:`~zdcp.MissingKeysError`.
        allow_cast: cast tensors whose stored dtype differs from the destination's.
        allow_pickle: unpickle values saved with ``allow_pickle=True`` (trusted checkpoints only).
        share_reads: a stored region that several ranks need (replicas) is read by one of them
            and sent to the others over ``process_group``; ``False``: each reads it from
            storage (:class:`~zdcp.ZarrReader`).
    """
    collectives = Collectives(process_group, no_dist=no_dist)
    # Read here rather than in DCP's planning, which would replace a missing or damaged
    # checkpoint's error by an AssertionError.
    committed = _open_once(collectives, Location(checkpoint_id))
    reader = ZarrReader(
        allow_cast=allow_cast,
        allow_pickle=allow_pickle,
        committed=committed,
        share_reads=share_reads,
        process_group=collectives.group,
    )
    # DCP's load calls the Stateful methods rank by rank; here a failure on one rank reaches all.
    # In sorted key order, as DCP, so that Stateful methods running collectives match up.
    keys = sorted(state_dict)
    stateful = {k: state_dict[k] for k in keys if isinstance(state_dict[k], Stateful)}
    plain = collectives.run("state_dict()", lambda: _plain_state_dict({k: state_dict[k] for k in keys}))
    with collectives.dcp_call():
        dcp.load(
            plain,
            storage_reader=reader,
            planner=ZarrLoadPlanner(allow_partial_load=allow_partial_load),
            process_group=collectives.group,
            no_dist=collectives.no_dist,
        )

    def apply() -> None:
        for key in keys:
            if key in stateful:
                stateful[key].load_state_dict(plain[key])
            else:
                state_dict[key] = plain[key]

    collectives.run("load_state_dict()", apply)


def _plain_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state_dict`` with each top-level ``Stateful`` replaced by its
    ``state_dict()``, in the state dict's order (DCP's save calls them in that order, its load
    in sorted key order: :func:`load` passes them sorted). DCP's own helper logs two records
    per key, and DCP's save calls it again."""
    return {key: value.state_dict() if isinstance(value, Stateful) else value for key, value in state_dict.items()}


def _open_once(collectives: Collectives, location: Location) -> Committed:
    """The committed checkpoint at ``location``, its root document (the catalog, with every
    plain value) read by the coordinator alone and sent to the other ranks, which open its
    hierarchy in the layout the coordinator found without reading anything."""
    committed = collectives.run(
        "reading the checkpoint", lambda: open_committed(location) if collectives.is_coordinator else None
    )
    if collectives.no_dist:
        return committed
    found = (committed.hierarchy.layout.name, committed.catalog) if committed is not None else None
    name, catalog = collectives.from_coordinator(found)
    return committed or Committed(layout_named(name).hierarchy(location), catalog)
