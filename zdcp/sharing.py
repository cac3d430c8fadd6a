"""Reading once and sharing: which rank of a load reads the stored regions that several ranks
need, and which ranks it sends them to (issue 20; docs/reading.md, "Loads that share reads").

When ranks need the same stored bytes (every DDP replica the whole state, every HSDP replica
group each shard, every TP rank the replicated norms), each would read them from storage. At
planning the coordinator sees every rank's read items (DCP's global plan): an item whose stored
region (array, offsets, lengths) several ranks read is a :class:`Transfer`, assigned to one of
those ranks in runs of neighbouring regions, each run to the rank with the fewest bytes to
read so far; the reader reads it and sends it to the others over the load's process group
(:meth:`zdcp.collectives.Collectives.exchange`). Regions that overlap without being equal (a load
that reshards) are read by each rank, as before: only equal regions are shared.

Every rank gets the whole list of transfers in one order, so that all post their sends and
receives in the same order and in the same batches (:func:`batches`), whatever the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

__all__ = ["Region", "Transfer", "Sharing", "plan_sharing", "region_of", "batches"]

#: A stored region: the array's FQN (as the load plan names it), its offsets and its lengths.
Region = tuple[str, tuple[int, ...], tuple[int, ...]]


def region_of(item: ReadItem) -> Region:
    return item.storage_index.fqn, tuple(item.storage_offsets), tuple(item.lengths)


@dataclass(frozen=True)
class Transfer:
    """One stored region several ranks need: ``reader`` reads it and sends it to ``receivers``
    (ranks of the load's group); ``nbytes``, its size."""

    region: Region
    reader: int
    receivers: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Sharing:
    """What every rank's plan carries (``LoadPlan.storage_data``): the load's transfers, in the
    order every rank exchanges them."""

    transfers: tuple[Transfer, ...]

    def received_by(self, rank: int) -> dict[Region, Transfer]:
        """The transfers ``rank`` receives, by region: it reads none of them itself."""
        return {t.region: t for t in self.transfers if rank in t.receivers}


def plan_sharing(
    plans: Sequence[LoadPlan],
    itemsize: Callable[[str], int],
    position: Callable[[Region], Any] | None = None,
) -> list[LoadPlan]:
    """``plans`` (one per rank of the load's group, in rank order) with a :class:`Sharing` as
    their ``storage_data`` when ranks read equal regions, else as they are. ``itemsize(fqn)``:
    the bytes of one element of the array ``fqn``; ``position(region)``: where the region lies
    in storage, comparable between regions (None: in the order of names and offsets). Called
    only when some region is shared, once per region."""
    needed_by: dict[Region, list[int]] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            if item.type != LoadItemType.BYTE_IO:
                ranks = needed_by.setdefault(region_of(item), [])
                if not ranks or ranks[-1] != rank:  # a rank that reads a region twice reads it once
                    ranks.append(rank)
    shared = {region: tuple(ranks) for region, ranks in needed_by.items() if len(ranks) > 1}
    if not shared:
        return list(plans)
    # Every rank's own reads count towards its load. The regions a set of ranks shares are cut,
    # in the order they lie in storage, into one run per rank of about equal bytes, and the
    # runs go to the ranks that have read least so far: a reader's request for one region may
    # bring its neighbours (a packed layout coalesces reads of one data file), so that
    # neighbours given to different readers would be fetched twice. Name order is not enough:
    # the ranks of the save that wrote the regions interleave them.
    load = [0] * len(plans)
    for region, ranks in needed_by.items():
        if len(ranks) == 1:
            load[ranks[0]] += _nbytes(region, itemsize)
    by_ranks: dict[tuple[int, ...], list[Region]] = {}
    for region, ranks in shared.items():
        by_ranks.setdefault(ranks, []).append(region)
    where = {region: position(region) for region in shared} if position is not None else None
    transfers = []
    for ranks, regions in sorted(by_ranks.items()):
        regions.sort(key=(lambda r: (where[r], r)) if where is not None else None)
        runs = _runs(regions, [_nbytes(r, itemsize) for r in regions], len(ranks))
        for run in sorted(runs, key=lambda run: -sum(_nbytes(r, itemsize) for r in run)):
            reader = min(ranks, key=lambda r: (load[r], r))
            for region in run:
                nbytes = _nbytes(region, itemsize)
                load[reader] += nbytes
                transfers.append(Transfer(region, reader, tuple(r for r in ranks if r != reader), nbytes))
    sharing = Sharing(tuple(transfers))
    return [LoadPlan(plan.items, sharing, plan.planner_data) for plan in plans]


def batches(transfers: Sequence[Transfer], limit: int | None) -> Iterator[Sequence[Transfer]]:
    """``transfers`` in consecutive batches of about ``limit`` bytes (None: one batch): what a
    rank exchanges before it waits. Every rank cuts the same batches, so that what one waits for
    is what the others have posted."""
    start, size = 0, 0
    for i, transfer in enumerate(transfers):
        size += transfer.nbytes
        if limit is not None and size >= limit:
            yield transfers[start : i + 1]
            start, size = i + 1, 0
    if start < len(transfers):
        yield transfers[start:]


def _runs(regions: list[Region], sizes: list[int], count: int) -> list[list[Region]]:
    """``regions`` cut, in order, into at most ``count`` runs of about equal total size."""
    share = sum(sizes) / count
    runs: list[list[Region]] = [[]]
    filled = 0
    for region, size in zip(regions, sizes):
        if runs[-1] and filled + size / 2 > share * len(runs) and len(runs) < count:
            runs.append([])
        runs[-1].append(region)
        filled += size
    return runs


def _nbytes(region: Region, itemsize: Callable[[str], int]) -> int:
    return math.prod(region[2]) * itemsize(region[0])
