"""The on-disk layout: chunk grids and the ``zarr.json`` documents zdcp writes.

docs/format.md is the contract; this module is its implementation on the write side, and
:mod:`zdcp.catalog` on the read side. Keep the three in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .dtypes import DType

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ATTR",
    "COMPRESSIONS",
    "chunk_shape",
    "codecs",
    "inner_chunk_shape",
    "INNER_CHUNK_BYTES",
    "chunk_key",
    "chunk_key_separator",
    "CHUNK_KEY_SEPARATOR",
    "array_document",
    "group_document",
    "zdcp_attrs",
]

FORMAT_NAME = "zdcp"
#: Bumped on any change that an older reader would misread (docs/format.md, section 5, lists
#: the versions). Readers read every version up to this one.
FORMAT_VERSION = 2
#: Chunk keys use the default encoding with this separator: chunk ``(i, j)`` of array ``a/b``
#: is ``a/b/c.i.j``, a file in the array's own directory. With ``/`` (format version 1) each
#: chunk also needed one or two directories of its own (``a/b/c/i/j``): a save of 2,000 small
#: tensors ran 13% faster on a journaled ext4 without them (docs/benchmarks.md).
CHUNK_KEY_SEPARATOR = "."
#: The one attribute key under which zdcp keeps its own metadata in every node.
ATTR = "zdcp"
#: Chunks larger than this are stored with inner chunks of about this size (sharding codec).
#: Measured here (docs/benchmarks.md): inner chunks read a 512 MiB state faster than whole
#: 32 MiB chunks; a resharded load or a slice reads whole inner chunks where its bounds cut
#: them, so smaller ones waste less (a 1% row slice: 1.08x what it needs with 64 KiB, 1.17x
#: with 128 KiB, 1.6x with 256 KiB). tensorstore wrote 64 KiB ones 3x slower, but shards up to
#: 4 MiB are now encoded by zdcp.direct, and the 512 MiB save of 32 MiB chunks measured the same.
INNER_CHUNK_BYTES = 64 << 10
#: Optional compressors, as Zarr v3 codec documents (between ``bytes`` and ``crc32c``).
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "zstd": {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
    "gzip": {"name": "gzip", "configuration": {"level": 5}},
}


def chunk_shape(shape: Sequence[int], shards: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[int, ...]:
    """The regular chunk grid for a tensor saved as ``shards`` (``(offsets, sizes)`` pairs).

    Along each dimension the chunk length is the greatest common divisor of every shard
    boundary strictly inside the dimension (the whole length when there is none). For the usual
    ``Shard(d)`` layouts this is exactly the shard length ``ceil(n / W)``, so chunks are the
    shards; for layouts that are no regular grid (``_StridedShard``, two mesh dimensions on one
    tensor dimension) it is the coarsest regular grid in which every chunk lies inside a single
    shard, so each chunk still has exactly one writer and concurrent writes never share a chunk.
    """
    out = []
    for dim, n in enumerate(shape):
        step = 0
        for offsets, sizes in shards:
            if math.prod(sizes) == 0:
                continue
            for bound in (offsets[dim], offsets[dim] + sizes[dim]):
                if 0 < bound < n:
                    step = math.gcd(step, bound)
        out.append(step or max(n, 1))
    return tuple(out)


def codecs(dtype: DType, chunks: Sequence[int], compression: str | None) -> list[dict[str, Any]]:
    """The codec chain of an array whose (outer) chunks have shape ``chunks``.

    Each chunk is ``bytes`` (little endian), an optional compressor, then a ``crc32c`` checksum.
    A chunk larger than :data:`INNER_CHUNK_BYTES` is stored with the ``sharding_indexed`` codec
    instead: still one object per chunk (one rank's shard), holding inner chunks of about that
    size, each checksummed, plus a checksummed index. A reader then fetches only the inner chunks
    a slice touches (resharded loads, ``zdcp.open`` slices), and decodes a whole chunk in
    parallel.
    """
    chain: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression is not None:
        chain.append(COMPRESSIONS[compression])
    chain.append({"name": "crc32c"})
    inner = inner_chunk_shape(chunks, dtype.numpy.itemsize)
    if inner == tuple(chunks):
        return chain
    index = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    configuration = {"chunk_shape": list(inner), "codecs": chain, "index_codecs": index, "index_location": "end"}
    return [{"name": "sharding_indexed", "configuration": configuration}]


def inner_chunk_shape(chunks: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Inner chunks of at most about :data:`INNER_CHUNK_BYTES`, cut along the leading dimensions.

    Each inner length divides its chunk length (Zarr requires whole inner chunks per shard). A
    chunk that already fits, or whose lengths have no divisor near the wanted size, is returned
    unchanged (no inner chunks).
    """
    inner = list(chunks)
    for dim in range(len(inner)):
        rest = itemsize * math.prod(inner[dim + 1 :])
        if rest * inner[dim] <= INNER_CHUNK_BYTES:
            break
        wanted = max(1, INNER_CHUNK_BYTES // rest)
        best = max(d for d in range(1, min(wanted, inner[dim]) + 1) if inner[dim] % d == 0)
        if best < wanted // 8:  # e.g. a prime length: tiny inner chunks would cost more than they save
            return tuple(chunks)
        inner[dim] = best
    return tuple(inner)


def fill_value(dtype: DType) -> Any:
    """Zero in the JSON form Zarr v3 uses for the type (never read back: every chunk is written)."""
    kind = dtype.numpy.kind
    if dtype.zarr == "bool":
        return False
    if kind == "c":
        return [0.0, 0.0]
    if kind in "iu":
        return 0
    return 0.0


def array_document(
    shape: Sequence[int],
    dtype: DType,
    chunks: Sequence[int],
    zdcp_attrs: dict[str, Any],
    compression: str | None = None,
) -> dict[str, Any]:
    """The ``zarr.json`` of one array."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": dtype.zarr,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": CHUNK_KEY_SEPARATOR}},
        "fill_value": fill_value(dtype),
        "codecs": codecs(dtype, chunks, compression),
        "attributes": {ATTR: zdcp_attrs},
    }


def group_document(values: dict[str, Any], zdcp_attrs: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of one group: plain values as attributes, zdcp's own under ``ATTR``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {**values, ATTR: zdcp_attrs}}


def zdcp_attrs(document: Any) -> dict[str, Any] | None:
    """zdcp's attributes of a node's ``zarr.json``, or None when zdcp did not write it."""
    if not isinstance(document, dict):
        return None
    attrs = document.get("attributes")
    found = attrs.get(ATTR) if isinstance(attrs, dict) else None
    return found if isinstance(found, dict) else None


def chunk_key(node: str, index: Sequence[int], separator: str = CHUNK_KEY_SEPARATOR) -> str:
    """The storage key of chunk ``index`` of the array at ``node`` (Zarr's default chunk key
    encoding with ``separator``)."""
    return f"{node}/c{separator}{separator.join(map(str, index))}" if index else f"{node}/c"


def chunk_key_separator(document: dict[str, Any]) -> str:
    """The separator of an array's chunk keys, from its ``zarr.json``: the default encoding with
    ``/`` (format version 1) or ``.``; raises ValueError on anything else."""
    encoding = document.get("chunk_key_encoding", {"name": "default"})
    separator = encoding.get("configuration", {}).get("separator", "/")
    if encoding.get("name") != "default" or separator not in ("/", "."):
        raise ValueError(f"unsupported chunk key encoding {encoding!r}")
    return separator
