"""Which rank of a save writes each replicated tensor: DCP's dedup, spread by bytes
(docs/format.md, "Chunk grid", says how a tensor cut into pieces is chunked).

Several ranks hold the same data when a state is replicated: every DDP rank the whole model,
every HSDP replica group each shard, every TP rank the replicated norms. DCP's dedup keeps each
such write item in one rank's plan, whole, choosing ranks greedily in the order it meets the
items; one large tensor then makes one rank write far more than the others, and the save
waits for that rank. Here the coordinator:

- counts what each rank writes alone (items no other rank holds);
- cuts each replicated tensor larger than its fair share (the replicated bytes over the number
  of ranks) into pieces of about half that share (and at least 1 MiB), along its first
  dimension, so that several ranks write it, each piece a chunk of the stored array;
- hands the pieces and the other replicated items out largest first, each to the holder that
  writes least so far.

Every rank then writes its pieces as it writes a shard: :meth:`ZarrSavePlanner.resolve_data
<zdcp.planner.ZarrSavePlanner.resolve_data>` narrows the rank's local tensor to the piece.
Items that are not tensors are left to DCP's dedup.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

__all__ = ["spread_replicated", "PIECES_PER_SHARE", "MIN_PIECE_BYTES"]

#: A replicated tensor larger than its fair share is cut into pieces of about the share over
#: this: with pieces that small, handing out largest first leaves the rank that writes most
#: within about half a share of the mean.
PIECES_PER_SHARE = 2
#: ... and of no fewer bytes than this: each piece is a chunk (a request on an object store, a
#: key of a packed database, a file of the files layout), and for small tensors those cost
#: more than an even spread saves. A replicated tensor under twice this is written whole.
MIN_PIECE_BYTES = 1 << 20


def spread_replicated(plans: Sequence[SavePlan]) -> list[SavePlan]:
    """``plans`` (one per rank, in rank order) with each tensor item that several plans hold
    kept in one of them, or cut into pieces kept in several (see the module's docstring).
    Items that are not tensors, and those of one plan only, stay as they are."""
    holders: dict[MetadataIndex, list[int]] = {}
    items: dict[MetadataIndex, WriteItem] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            if item.tensor_data is not None:
                holders.setdefault(item.index, []).append(rank)
                items.setdefault(item.index, item)
    replicated = [index for index, ranks in holders.items() if len(ranks) > 1]
    if not replicated:
        return list(plans)
    writes = [0] * len(plans)  # bytes each rank writes, so far
    for index, ranks in holders.items():
        if len(ranks) == 1:
            writes[ranks[0]] += _nbytes(items[index])
    share = sum(_nbytes(items[index]) for index in replicated) / len(plans)
    pieces = [(piece, holders[index]) for index in replicated for piece in _pieces(items[index], share)]
    pieces.sort(key=lambda found: -_nbytes(found[0]))  # stable: equal sizes keep the plans' order
    kept: list[list[WriteItem]] = [[] for _ in plans]
    for piece, ranks in pieces:
        writer = min(ranks, key=lambda rank: (writes[rank], rank))
        writes[writer] += _nbytes(piece)
        kept[writer].append(piece)
    spread = []
    for rank, plan in enumerate(plans):
        own = [item for item in plan.items if item.tensor_data is None or len(holders[item.index]) == 1]
        spread.append(dataclasses.replace(plan, items=own + kept[rank]))
    return spread


def _pieces(item: WriteItem, share: float) -> list[WriteItem]:
    """``item`` cut along its first dimension into pieces of about ``share /
    PIECES_PER_SHARE`` bytes, and at least :data:`MIN_PIECE_BYTES`, when it is larger than
    ``share``; else ``[item]``."""
    assert item.tensor_data is not None
    chunk = item.tensor_data.chunk
    nbytes = _nbytes(item)
    count = math.floor(nbytes / max(share / PIECES_PER_SHARE, MIN_PIECE_BYTES))  # none smaller
    if nbytes <= share or not chunk.sizes or chunk.sizes[0] < 2 or count < 2:
        return [item]
    step = _rows_per_piece(chunk, item.tensor_data.size[0], count)
    if step is None:
        return [item]
    pieces = []
    for start in range(0, chunk.sizes[0], step):
        offsets = torch.Size([chunk.offsets[0] + start, *chunk.offsets[1:]])
        sizes = torch.Size([min(step, chunk.sizes[0] - start), *chunk.sizes[1:]])
        piece = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
        tensor_data = TensorWriteData(chunk=piece, properties=item.tensor_data.properties, size=item.tensor_data.size)
        index = MetadataIndex(item.index.fqn, offsets)
        # A piece is a shard, as DCP's metadata knows them (a TENSOR item is a whole tensor).
        pieces.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=tensor_data))
    return pieces


def _rows_per_piece(chunk: ChunkStorageMetadata, length: int, count: int) -> int | None:
    """The rows of each of at most ``count`` pieces of ``chunk`` (of a tensor ``length`` rows
    long), such that the pieces keep the array's chunk grid regular and coarse: the grid's
    chunk length is the greatest common divisor of all shard boundaries
    (:func:`~zdcp.format.documents.chunk_shape`). A chunk that spans the whole first dimension
    is cut into equal pieces and a shorter last one; a shard of it only into equal pieces
    whose length its offset is a multiple of, as many as there can be (None: not even two)."""
    rows, start = chunk.sizes[0], chunk.offsets[0]
    count = min(count, rows)
    if start == 0 and rows == length:
        return math.ceil(rows / count)
    counts = range(count, 1, -1)
    return next((rows // n for n in counts if rows % n == 0 and start % (rows // n) == 0), None)


def _nbytes(item: WriteItem) -> int:
    assert item.tensor_data is not None
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
