"""The two ways a checkpoint's Zarr hierarchy is stored (docs/format.md, section 9).

- ``"files"``: every key of the hierarchy (``zarr.json`` documents, chunks) is a file under the
  checkpoint's directory, or an object under its prefix.
- ``"packed"``: the same keys in tensorstore's OCDBT key-value store, a B-tree database at the
  checkpoint's root (``manifest.ocdbt`` and data files under ``d/``). Each rank writes its
  chunks into a database of its own, ``ocdbt.process_<rank>/`` under the root, and the
  coordinator makes the root database refer to them (their data is not copied), so a
  checkpoint is a few files per rank instead of one per chunk.

Readers tell the layouts apart by what is at the root: ``zarr.json`` (files) or
``manifest.ocdbt`` (packed).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FILES",
    "PACKED",
    "LAYOUTS",
    "default_layout",
    "OCDBT_MANIFEST",
    "hierarchy_spec",
    "rank_database",
    "database_spec",
    "OCDBT_WRITE_CONFIG",
    "OCDBT_ROOT_CONFIG",
    "OCDBT_SOLE_REMOTE_CONFIG",
]

FILES, PACKED = "files", "packed"
LAYOUTS = (FILES, PACKED)
#: The file (or object) that holds an OCDBT database's root; its presence at a checkpoint's
#: root marks the packed layout.
OCDBT_MANIFEST = "manifest.ocdbt"
#: The configuration a rank's database of a packed checkpoint is written with: values of up to
#: 1 KiB (small chunks) are kept in the B-tree nodes rather than in data files, large nodes (so
#: that even a large checkpoint's tree is one or two levels), one manifest file. Readers need
#: none of it: a database records its configuration in its manifest.
OCDBT_WRITE_CONFIG: dict[str, Any] = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100_000_000,
    "manifest_kind": "single",
}
#: The root database keeps values of up to 1 MiB inline, OCDBT's largest: the documents, the
#: root one included, then come with the B-tree node a reader reads first, one round trip less
#: on an object store. (Its limit must not be below its ranks', or a merge would re-encode
#: their inline values.)
OCDBT_ROOT_CONFIG: dict[str, Any] = OCDBT_WRITE_CONFIG | {"max_inline_value_bytes": 1 << 20}
#: The database of a packed save by one process on an object store holds its chunks and its
#: documents alike (:func:`zdcp.storage.packed.sole_store`): values of up to 1 MiB inline, so
#: that the first B-tree node a reader reads brings the documents and the small chunks, one
#: round trip; nodes of at most 8 MiB, so that reading the documents never reads much more.
#: Locally such a save uses the rank configuration: chunks in data files are what a local load
#: reads straight into its destination.
OCDBT_SOLE_REMOTE_CONFIG: dict[str, Any] = {
    "max_inline_value_bytes": 1 << 20,
    "max_decoded_node_bytes": 8 << 20,
    "manifest_kind": "single",
}
#: On an object store, a reader's reads of nearby data (a B-tree node, several chunks of one
#: data file) are coalesced into one request; locally this only reads more.
_REMOTE_READS: dict[str, Any] = {
    "experimental_read_coalescing_threshold_bytes": 1_000_000,
    "experimental_read_coalescing_merged_bytes": 500_000_000_000,
    "experimental_read_coalescing_interval": "10ms",
}


def default_layout(location: dict[str, Any]) -> str:
    """The layout a save to ``location`` (a kvstore spec) uses unless told otherwise: files
    on a local filesystem, where any Zarr reader opens the directory as it is and large
    tensors save fastest; packed elsewhere (object stores), where every file is a request."""
    return FILES if location["driver"] == "file" else PACKED


def rank_database(rank: int) -> str:
    """Where, under a packed checkpoint's root, rank ``rank`` writes its database."""
    return f"ocdbt.process_{rank}/"


def database_spec(location: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kvstore spec of the OCDBT database at ``location`` (a kvstore spec); to write a new
    one, with ``config`` (an existing one is written under the one its manifest records)."""
    spec: dict[str, Any] = {"driver": "ocdbt", "base": location, "cache_pool": "cache_pool#ocdbt_nodes"}
    if config is not None:
        spec |= {"config": config, "assume_config": True}
    return spec


def hierarchy_spec(location: dict[str, Any], layout: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kvstore spec under which a checkpoint's Zarr hierarchy is, for a checkpoint at
    ``location`` (a kvstore spec) stored in ``layout``; ``config`` as for
    :func:`database_spec`. Reads of a remote packed checkpoint coalesce (a merge's reads of
    B-tree nodes do not: each would wait out the interval)."""
    if layout == FILES:
        return location
    spec = database_spec(location, config)
    if config is None and location["driver"] not in ("file", "memory"):
        spec |= _REMOTE_READS
    return spec
