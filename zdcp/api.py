"""``zdcp.save``, ``zdcp.async_save`` and ``zdcp.load``: DCP's with the Zarr storage and planners.

They keep DCP's programming model (in-place load, ``Stateful`` values, collective over a process
group or single-process without one) and change two things users notice: the format on disk,
and errors, which are zdcp's own ``Exception`` subclasses raised on every rank instead of DCP's
``CheckpointException`` (a ``BaseException``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.distributed_c10d import _get_object_coll_device

from . import collector
from .errors import DistributedError, StorageError, ZdcpError
from .locations import CheckpointId
from .planner import ZarrLoadPlanner, ZarrSavePlanner
from .reader import ZarrReader
from .storage.committed import open_committed
from .storage.store import Store
from .writer import ZarrWriter

__all__ = ["save", "async_save", "load", "run_save"]

T = TypeVar("T")

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
    no_dist = no_dist or not distributed()
    writer = ZarrWriter(checkpoint_id, **options)
    plain, error = attempt(lambda: _plain_state_dict(state_dict))
    agree(error, "state_dict()", no_dist=no_dist, group=process_group)
    run_save(plain, writer, no_dist=no_dist, process_group=process_group)


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
    no_dist = no_dist or not distributed()
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
        agree(error, "state_dict() and staging", no_dist=no_dist, group=process_group)
        run_save(staged, writer, no_dist=no_dist, process_group=process_group)

    return _SAVER.submit(in_background)


def run_save(
    state_dict: dict[str, Any],
    writer: ZarrWriter,
    *,
    planner: SavePlanner | None = None,
    no_dist: bool,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """The collective part of every save (``save``, ``async_save``, the conversions of
    :mod:`zdcp.format_utils`), for a state dict without ``Stateful`` values: DCP's save with
    ``writer`` and ``planner`` (zdcp's by default). A failed save deletes what it wrote."""
    if planner is None:
        planner = ZarrSavePlanner(allow_pickle=writer.options.allow_pickle)
    with dcp_call(no_dist=no_dist):
        try:
            dcp.save(
                state_dict,
                storage_writer=writer,
                planner=planner,
                process_group=process_group,
                no_dist=no_dist,
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
    """
    no_dist = no_dist or not distributed()
    # Read here rather than in DCP's planning, which would replace a missing or damaged
    # checkpoint's error by an AssertionError.
    committed, error = attempt(lambda: open_committed(Store(checkpoint_id)))
    agree(error, "reading the checkpoint", no_dist=no_dist, group=process_group)
    reader = ZarrReader(checkpoint_id, allow_cast=allow_cast, allow_pickle=allow_pickle, committed=committed)
    # DCP's load calls the Stateful methods rank by rank; here a failure on one rank reaches all.
    # In sorted key order, as DCP, so that Stateful methods running collectives match up.
    keys = sorted(state_dict)
    stateful = {k: state_dict[k] for k in keys if isinstance(state_dict[k], Stateful)}
    plain, error = attempt(lambda: _plain_state_dict({k: state_dict[k] for k in keys}))
    agree(error, "state_dict()", no_dist=no_dist, group=process_group)
    with dcp_call(no_dist=no_dist):
        dcp.load(
            plain,
            storage_reader=reader,
            planner=ZarrLoadPlanner(allow_partial_load=allow_partial_load),
            process_group=process_group,
            no_dist=no_dist,
        )

    def apply() -> None:
        for key in keys:
            if key in stateful:
                stateful[key].load_state_dict(plain[key])
            else:
                state_dict[key] = plain[key]

    _, error = attempt(apply)
    agree(error, "load_state_dict()", no_dist=no_dist, group=process_group)


def _plain_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state_dict`` with each top-level ``Stateful`` replaced by its
    ``state_dict()``, in the state dict's order (DCP's save calls them in that order, its load
    in sorted key order: :func:`load` passes them sorted). DCP's own helper logs two records
    per key, and DCP's save calls it again."""
    return {key: value.state_dict() if isinstance(value, Stateful) else value for key, value in state_dict.items()}


def attempt(fn: Callable[[], T]) -> tuple[T, Exception | None]:
    """``fn()``'s result, or its exception (rank-local user code: a ``Stateful``'s methods)."""
    try:
        return fn(), None
    except Exception as e:
        return None, e  # type: ignore[return-value]


def agree(error: Exception | None, step: str, *, no_dist: bool, group: dist.ProcessGroup | None) -> None:
    """Share the outcome of a rank-local step; raise on every rank when it failed on any.

    As for DCP's own steps (:func:`_translate_errors`): the lowest failing rank's error is
    raised on every rank when it is zdcp's own, so that every rank raises the same class with the
    same message; otherwise every rank raises a :class:`~zdcp.DistributedError` naming the failed
    ranks (a failed rank's own error is its cause). The others never wait in the checkpoint's
    next collective for a rank that left, nor return as if all went well.
    """
    if no_dist:
        if error is not None:
            raise error
        return
    # One all-reduce of a flag in the usual case; the errors are gathered only when a rank failed.
    failures = torch.tensor([error is not None], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(failures, group=group)
    if failures.item() == 0:
        return
    shared = error if isinstance(error, ZdcpError) else None if error is None else f"{type(error).__name__}: {error}"
    outcomes: list[ZdcpError | str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, shared, group=group)
    failed = {rank: outcome for rank, outcome in enumerate(outcomes) if outcome is not None}
    rank = min(failed)
    first = failed[rank]
    if isinstance(first, ZdcpError):
        raise first from error
    causes = {r: f if isinstance(f, ZdcpError) else RuntimeError(f) for r, f in failed.items()}
    raise DistributedError(f"{step} failed on rank(s) {sorted(failed)}; rank {rank}: {first}", causes) from error


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a tensor for a collective over ``group`` lives: the device that torch's own object
    collectives use (the CPU when the group has a CPU backend, else its accelerator's current
    device, as for NCCL alone)."""
    return torch.device(_get_object_coll_device(group))


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def dcp_call(*, no_dist: bool) -> Iterator[None]:
    """Around a call into DCP: zdcp's errors out, and no warning for a single-process call
    (DCP warns on each one; for zdcp, no process group means one process by contract).

    The warning filters are process-wide and ``catch_warnings`` is not thread-safe, so they are
    only touched on the main thread; a background ``async_save`` leaves them alone.
    """
    quiet = no_dist and threading.current_thread() is threading.main_thread()
    with _translate_errors(no_dist=no_dist), warnings.catch_warnings() if quiet else nullcontext():
        if quiet:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextmanager
def _translate_errors(*, no_dist: bool) -> Iterator[None]:
    """Turn DCP's ``CheckpointException`` (gathered from all ranks) into the error that
    describes the fault.

    The lowest failing rank's error is raised when it is zdcp's own, so every rank raises the
    same class with the same message. Anything else: in a single process, an ``OSError`` becomes
    a :class:`~zdcp.StorageError` and any other error a :class:`~zdcp.ZdcpError` carrying its
    type and message (and the error itself as its cause); with several ranks, a
    :class:`~zdcp.DistributedError` naming the failed ranks.
    """
    try:
        yield
    except CheckpointException as e:
        failures = {rank: exc for rank, (exc, _) in sorted(e.failures.items())}
        rank, first = next(iter(failures.items()))
        if isinstance(first, ZdcpError):
            raise first from e
        if no_dist:
            if isinstance(first, OSError):
                raise StorageError(str(first)) from first
            raise ZdcpError(f"checkpoint failed: {type(first).__name__}: {first}") from first
        raise DistributedError(
            f"checkpoint failed on rank(s) {sorted(failures)}; rank {rank}: {type(first).__name__}: {first}",
            failures,
        ) from e
