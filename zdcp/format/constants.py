"""The format's name, version, reserved keys and sizes (docs/format.md)."""

from __future__ import annotations

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ATTR",
    "ZARR_JSON",
    "SAVING_MARKER",
    "PENDING_INFIX",
    "CHUNK_KEY_SEPARATOR",
    "INNER_CHUNK_BYTES",
    "MIN_INNER_CHUNKS",
    "MAX_INLINE_BYTES",
]

#: ``attributes.zdcp.format`` of every root document.
FORMAT_NAME = "zdcp"
#: Bumped on any change that an older reader would misread (docs/format.md, section 5, lists
#: the versions). Readers read every version up to this one.
FORMAT_VERSION = 3
#: The one attribute key under which zdcp keeps its own metadata in every node.
ATTR = "zdcp"
#: Every node's metadata document, Zarr v3's name for it.
ZARR_JSON = "zarr.json"
#: Written where a save writes when it starts (a local pending directory, an object store
#: prefix) and deleted at its commit: it labels an unfinished save, and on object stores its
#: conditional creation decides which of two concurrent saves proceeds. A key starting with
#: "__" can never be a node name (section 2).
SAVING_MARKER = "__zdcp_saving__"
#: A local save is written into the hidden sibling directory ``.<name>`` + this + 32 hex
#: digits, then renamed into place (section 5).
PENDING_INFIX = ".zdcp-"
#: Chunk keys use the default encoding with this separator: chunk ``(i, j)`` of array ``a/b``
#: is ``a/b/c.i.j``, a file in the array's own directory. Format version 1 used ``/``, which
#: cost one or two directories per chunk.
CHUNK_KEY_SEPARATOR = "."
#: Chunks larger than this are stored with inner chunks of at most this size (sharding codec):
#: a resharded load or a slice reads whole inner chunks where its bounds cut them, so smaller
#: ones waste less, and larger ones cost more per read (docs/benchmarks.md has the trade-off).
#: A chunk up to this size is read whole, in one request.
INNER_CHUNK_BYTES = 64 << 10
#: ... and into at least about this many: a loader whose rows start or end inside a shard then
#: reads at most this fraction of the shard beyond what it needs, however small the shards of
#: a large world size are.
MIN_INNER_CHUNKS = 8
#: A byte string (``bytes``, ``io.BytesIO``) up to this size is stored as base64 JSON in its
#: group's attributes; a larger one that is a leaf of the state dict gets an array of its own,
#: so that the root document, which every reader reads whole, stays small.
MAX_INLINE_BYTES = 16 << 10
