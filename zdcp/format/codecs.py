"""The codec chains zdcp writes, and recognising the plain ones (docs/format.md, section 3).

Every chunk is ``bytes`` (little endian), an optional compressor, then ``crc32c``; a chunk
larger than :data:`~zdcp.format.constants.INNER_CHUNK_BYTES` holds that chain inside the
``sharding_indexed`` codec instead. :func:`plain_encoding` tells when an array's chunks are
*plain* (uncompressed, sharded or not), the case zdcp encodes and decodes itself in local
files (:mod:`zdcp.storage.localfiles`) instead of going through tensorstore.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from .constants import INNER_CHUNK_BYTES, MIN_INNER_CHUNKS
from .dtypes import DType

__all__ = [
    "COMPRESSIONS",
    "PLAIN_CODECS",
    "codec_chain",
    "inner_chunk_shape",
    "PlainEncoding",
    "plain_encoding",
    "encode_chunk",
    "crc32c",
]

#: Optional compressors, as Zarr v3 codec documents (between ``bytes`` and ``crc32c``).
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "zstd": {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
    "gzip": {"name": "gzip", "configuration": {"level": 5}},
}
#: The codec chain of an uncompressed (inner) chunk, and of a shard's index: the bytes, then
#: their crc32c.
PLAIN_CODECS: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def codec_chain(dtype: DType, chunks: Sequence[int], compression: str | None) -> list[dict[str, Any]]:
    """The codec chain of an array whose (outer) chunks have shape ``chunks``.

    A chunk larger than :data:`INNER_CHUNK_BYTES` is stored with the ``sharding_indexed`` codec:
    still one object per chunk (one rank's shard), holding inner chunks of about that size,
    each checksummed, plus a checksummed index. A reader then fetches only the inner chunks a
    slice touches (resharded loads, ``zdcp.open`` slices), and decodes a whole chunk in parallel.
    """
    chain: list[dict[str, Any]] = [PLAIN_CODECS[0]]
    if compression is not None:
        chain.append(COMPRESSIONS[compression])
    chain.append(PLAIN_CODECS[1])
    inner = inner_chunk_shape(chunks, dtype.numpy.itemsize)
    if inner == tuple(chunks):
        return chain
    configuration = {"chunk_shape": list(inner), "codecs": chain, "index_codecs": PLAIN_CODECS, "index_location": "end"}
    return [{"name": "sharding_indexed", "configuration": configuration}]


def inner_chunk_shape(chunks: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Inner chunks of at most :data:`INNER_CHUNK_BYTES` and at most a
    :data:`MIN_INNER_CHUNKS`-th of the chunk, cut along the leading dimensions.

    Each inner length divides its chunk length (Zarr requires whole inner chunks per shard). A
    chunk that already fits, or whose lengths have no divisor near the wanted size, is returned
    unchanged (no inner chunks).
    """
    nbytes = itemsize * math.prod(chunks)
    if nbytes <= INNER_CHUNK_BYTES:
        return tuple(chunks)
    target = min(INNER_CHUNK_BYTES, nbytes // MIN_INNER_CHUNKS)
    inner = list(chunks)
    for dim in range(len(inner)):
        rest = itemsize * math.prod(inner[dim + 1 :])
        if rest * inner[dim] <= target:
            break
        wanted = max(1, target // rest)
        best = max(d for d in range(1, min(wanted, inner[dim]) + 1) if inner[dim] % d == 0)
        if best < wanted // 8:  # e.g. a prime length: tiny inner chunks would cost more than they save
            return tuple(chunks)
        inner[dim] = best
    return tuple(inner)


@dataclass(frozen=True)
class PlainEncoding:
    """An array whose chunks are plain: each (inner) chunk is its elements' bytes in C order,
    little endian, followed by their crc32c. ``inner`` is the inner chunk shape of a sharded
    array (its index, plain too, at the end of each chunk), None for an unsharded one."""

    inner: tuple[int, ...] | None


def plain_encoding(document: dict[str, Any]) -> PlainEncoding | None:
    """The plain encoding of an array's chunks, from its ``zarr.json``; None when its chunks
    are encoded otherwise (compressed, another index placement), or when this host is big
    endian (plain bytes are then not the stored bytes)."""
    if sys.byteorder != "little":
        return None
    codecs = document["codecs"]
    if codecs == PLAIN_CODECS:
        return PlainEncoding(None)
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0].get("configuration", {})
    plain = config.get("codecs") == PLAIN_CODECS and config.get("index_codecs") == PLAIN_CODECS
    if not plain or config.get("index_location", "end") != "end":
        return None
    return PlainEncoding(tuple(config["chunk_shape"]))


def encode_chunk(data: np.ndarray, encoding: PlainEncoding) -> list[memoryview | bytes]:
    """The stored bytes of one whole chunk of a plain-encoded array, as parts to write one
    after another (the host must be little endian, see :func:`plain_encoding`): byte for byte
    what tensorstore writes.

    Unsharded: ``data``'s bytes in C order, then their crc32c. Sharded: its inner chunks of
    shape ``encoding.inner`` in C order, each as its bytes and their crc32c, then the index of
    ``(offset, nbytes)`` pairs (little-endian uint64, C order) and its crc32c.
    """
    if encoding.inner is None:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        return [memoryview(raw), crc32c(raw).to_bytes(4, "little")]
    inner = encoding.inner
    grid = [n // i for n, i in zip(data.shape, inner)]
    parts: list[memoryview | bytes] = []
    index = np.empty((*grid, 2), dtype="<u8")
    offset = 0
    for position in np.ndindex(*grid):
        block = data[tuple(slice(p * i, (p + 1) * i) for p, i in zip(position, inner))]
        raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        parts += [memoryview(raw), crc32c(raw).to_bytes(4, "little")]
        index[position] = (offset, raw.size + 4)
        offset += raw.size + 4
    table = index.reshape(-1).view(np.uint8)
    return [*parts, memoryview(table), crc32c(table).to_bytes(4, "little")]


def crc32c(data: np.ndarray) -> int:
    """The crc32c checksum of an array's bytes (the ``crc32c`` codec's)."""
    view = data.view()
    view.flags.writeable = False  # google_crc32c reads read-only buffers without copying
    return google_crc32c.value(view)
