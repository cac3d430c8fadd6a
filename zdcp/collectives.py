"""Every collective zdcp runs, in one place (as DCP's ``_DistWrapper``): over one process group,
or none at all in a single process.

- **Agreement on an outcome**: a rank-local step (a ``Stateful``'s ``state_dict()``, reading the
  checkpoint, a removal) either succeeds on every rank or raises the same error on every rank
  (:meth:`Collectives.agree`); DCP's own steps report their failures gathered in a
  ``CheckpointException``, which :meth:`Collectives.dcp_call` turns into that same error. No
  rank waits in the next collective for a rank that left, nor returns as if all went well.
- **The coordinator's value on every rank** (:meth:`Collectives.from_coordinator`).
- **A vote**: whether a flag is raised on any rank (:meth:`Collectives.any`: a preemption signal).
- **The exchange of a load's shared reads**, point to point (:meth:`Collectives.exchange`).

With several ranks one rule decides which error every rank raises (:func:`agreed_error`): the
lowest failing rank's own when it is zdcp's (so every rank raises the same class with the same
message), else a :class:`~zdcp.DistributedError` naming the failed ranks. One payload carries a
rank's failure to the others and into ``DistributedError.failures``: zdcp's own errors as they
are (every rank can unpickle them), any other as a :class:`RankFailure` with its type and
message (a user's exception class may not unpickle on another rank, or not at all). In one
process a rank-local step's error is raised as it is, and DCP's as described at
:meth:`Collectives.dcp_call`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.distributed_c10d import _get_object_coll_device

from .errors import DistributedError, StorageError, ZdcpError
from .sharing import Transfer

__all__ = ["Collectives", "RankFailure", "attempt", "agreed_error", "distributed"]

T = TypeVar("T")


class RankFailure(RuntimeError):
    """An error of a rank that is not zdcp's, as it travels to the other ranks: its type's name
    and its message (the original is the cause of what the failing rank itself raises)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type[RankFailure], tuple[str, str]]:
        return type(self), (self.kind, self.message)


def distributed() -> bool:
    """Whether a default process group is initialized (zdcp then runs collectively)."""
    return dist.is_available() and dist.is_initialized()


def attempt(fn: Callable[[], T]) -> tuple[T, Exception | None]:
    """``fn()``'s result, or its exception (rank-local user code: a ``Stateful``'s methods)."""
    try:
        return fn(), None
    except Exception as e:
        return None, e  # type: ignore[return-value]


class Collectives:
    """zdcp's collectives over ``group`` (the default group when None), or none with
    ``no_dist`` or when no process group is initialized (one process)."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, no_dist: bool = False):
        self.group = group
        self.no_dist = no_dist or not distributed()

    @property
    def is_coordinator(self) -> bool:
        """Whether this process is rank 0 of the group (or alone)."""
        return self.no_dist or dist.get_rank(self.group) == 0

    @property
    def device(self) -> torch.device:
        """Where a tensor for a collective over the group lives: the device torch's own object
        collectives use (the CPU when the group has a CPU backend, else its accelerator's
        current device, as for NCCL alone)."""
        return torch.device(_get_object_coll_device(self.group))

    def agree(self, error: Exception | None, step: str) -> None:
        """Share the outcome of a rank-local ``step``; raise on every rank when it failed on any
        (:func:`agreed_error`). In one process the error is raised as it is."""
        if self.no_dist:
            if error is not None:
                raise error
            return
        # One all-reduce of a flag in the usual case; the errors are gathered only when a rank failed.
        if not self.any(error is not None):
            return
        failures: list[ZdcpError | RankFailure | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(failures, None if error is None else _payload(error), group=self.group)
        raise agreed_error({r: f for r, f in enumerate(failures) if f is not None}, step) from error

    def run(self, step: str, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, its outcome agreed (:meth:`agree`)."""
        result, error = attempt(fn)
        self.agree(error, step)
        return result

    def exchange(
        self,
        transfers: Sequence[Transfer],
        source: Callable[[Transfer], torch.Tensor],
        buffer: Callable[[Transfer, torch.device], torch.Tensor],
        first_tag: int,
    ) -> Callable[[], list[tuple[Transfer, torch.Tensor]]]:
        """Post one batch of a load's shared reads (:mod:`zdcp.sharing`) over the group: for
        each transfer this rank reads, send ``source(transfer)`` to its receivers; for each it
        receives, receive into ``buffer(transfer, device)``. Point to point, on the device the
        group's backend sends from (the CPU for gloo, the GPU for NCCL), transfer ``i`` of the
        batch under tag ``first_tag + i``. Returns a function that waits for the batch and
        gives what this rank received, per transfer. Every rank posts the same batches in the
        same order; each takes part in its own transfers."""
        rank, device = dist.get_rank(self.group), self.device
        ops, landing = [], []
        for tag, transfer in enumerate(transfers, first_tag):
            if transfer.reader == rank:
                data = source(transfer).to(device).contiguous()
                for peer in transfer.receivers:
                    ops.append(dist.P2POp(dist.isend, data, group=self.group, group_peer=peer, tag=tag))
            elif rank in transfer.receivers:
                into = buffer(transfer, device)
                ops.append(dist.P2POp(dist.irecv, into, group=self.group, group_peer=transfer.reader, tag=tag))
                landing.append((transfer, into))
        works = dist.batch_isend_irecv(ops) if ops else []

        def wait() -> list[tuple[Transfer, torch.Tensor]]:
            for work in works:
                work.wait()
            ops.clear()  # the tensors sent stay referenced until here
            return landing

        return wait

    def from_coordinator(self, value: T) -> T:
        """The coordinator's ``value``, on every rank."""
        if self.no_dist:
            return value
        box = [value]
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=source, group=self.group, device=self.device)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank (one all-reduce)."""
        if self.no_dist:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return bool(tensor.item())

    @contextmanager
    def dcp_call(self) -> Iterator[None]:
        """Around a call into DCP: its ``CheckpointException`` (gathered from all ranks) raised
        as the error every rank agrees on, and no warning for a single-process call (DCP warns
        on each one; for zdcp, no process group means one process by contract).

        In one process, an error that is not zdcp's becomes a :class:`~zdcp.StorageError` when
        it is an ``OSError``, else a :class:`~zdcp.ZdcpError` carrying its type and message
        (and the error itself as its cause). The warning filters are process-wide and
        ``catch_warnings`` is not thread-safe, so they are only touched on the main thread; a
        background ``async_save`` leaves them alone.
        """
        quiet = self.no_dist and threading.current_thread() is threading.main_thread()
        with warnings.catch_warnings() if quiet else nullcontext():
            if quiet:
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                yield
            except CheckpointException as e:
                failures = {rank: exc for rank, (exc, _) in e.failures.items()}
                first = failures[min(failures)]
                if self.no_dist and not isinstance(first, ZdcpError):
                    if isinstance(first, OSError):
                        raise StorageError(str(first)) from first
                    raise ZdcpError(f"checkpoint failed: {type(first).__name__}: {first}") from first
                raise agreed_error({rank: _payload(exc) for rank, exc in failures.items()}, "checkpoint") from e


def agreed_error(failures: dict[int, ZdcpError | RankFailure], step: str) -> ZdcpError:
    """The error every rank raises when ``step`` failed on the ranks of ``failures`` (rank ->
    its failure, as :func:`_payload` carries it): the lowest failing rank's when it is zdcp's
    own, else a :class:`~zdcp.DistributedError` naming the failed ranks, with each rank's."""
    rank = min(failures)
    first = failures[rank]
    if isinstance(first, ZdcpError):
        return first
    message = f"{step} failed on rank(s) {sorted(failures)}; rank {rank}: {first}"
    return DistributedError(message, dict(sorted(failures.items())))


def _payload(error: BaseException) -> ZdcpError | RankFailure:
    """A rank's failure as it travels to the other ranks."""
    return error if isinstance(error, ZdcpError) else RankFailure(type(error).__name__, str(error))
