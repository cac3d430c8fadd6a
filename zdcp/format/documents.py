"""Chunk grids, chunk keys and the ``zarr.json`` documents zdcp writes (docs/format.md,
sections 3-5); :mod:`zdcp.format.catalog` reads them back."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import UnsupportedValueError
from .codecs import codec_chain
from .constants import ATTR, CHUNK_KEY_SEPARATOR
from .dtypes import DType
from .values import from_json, to_json

__all__ = [
    "chunk_shape",
    "chunk_key",
    "chunk_key_separator",
    "array_document",
    "group_document",
    "zdcp_attrs",
    "GUARD_FIELD",
    "guard_document",
    "is_guard",
    "user_metadata_attrs",
    "user_metadata",
]


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
        "codecs": codec_chain(dtype, chunks, compression),
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


#: The field that makes a :func:`guard_document` one that Zarr readers refuse (an extension
#: field with ``"must_understand": true``, Zarr v3 core spec). zarr-python names the field in its
#: error and shows nothing else, so its name says what to do.
GUARD_FIELD = "zdcp checkpoint in the packed layout: open it with zdcp.zarr_store(path)"


def guard_document(layout: str) -> dict[str, Any]:
    """The ``zarr.json`` a layout that keeps the hierarchy somewhere other than at its keys'
    paths (``layout``, e.g. packed: in a database) writes at the checkpoint's location, where
    a Zarr reader looks for the root: a group document that readers must refuse, so that
    ``zarr.open_group(path)`` fails instead of opening (or, in its default mode, creating) an
    empty group where the checkpoint is (docs/format.md, section 9)."""
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {},
        GUARD_FIELD: {
            "must_understand": True,
            "layout": layout,
            "read_with": "zdcp.zarr_store(path) for zarr-python; tensorstore: docs/format.md, section 9",
        },
    }


def is_guard(document: Any) -> bool:
    """Whether ``document`` (a parsed ``zarr.json``) is a :func:`guard_document`."""
    return isinstance(document, dict) and GUARD_FIELD in document


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


def user_metadata_attrs(metadata: Any) -> dict[str, Any]:
    """The root's ``attributes.zdcp`` entries that hold the user's ``metadata`` of a save
    (:attr:`zdcp.SaveOptions.metadata`; docs/format.md,
    section 5): the value as a plain value is stored (section 6), and its type descriptor
    when it needs one. Raises :class:`~zdcp.UnsupportedValueError` for what a plain value
    cannot be."""
    try:
        value, desc = to_json(metadata, "metadata")
    except UnsupportedValueError as e:
        raise UnsupportedValueError(
            f"metadata must be a plain value (numbers, strings, lists, tuples, dicts): {e.args[0].split(',')[0]}"
        ) from None
    return {"metadata": value} if desc is None else {"metadata": value, "metadata_type": desc}


def user_metadata(info: dict[str, Any]) -> Any:
    """The user's ``metadata`` a checkpoint was saved with, from its root's
    ``attributes.zdcp`` (``info``); None when it was saved without."""
    return from_json(info.get("metadata"), info.get("metadata_type"))
