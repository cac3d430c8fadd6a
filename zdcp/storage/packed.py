"""Writing a packed checkpoint (:mod:`zdcp.storage.layouts`): each rank's database, and the
coordinator's root database that refers to them all.

Each rank writes its chunks into a database of its own under the save's location, in one
atomic transaction, so that it is whole or absent; no data passes between ranks. At the commit
the coordinator, in one atomic transaction of the root database, copies the ranks' key ranges
(B-tree entries that refer to the ranks' data files, which are not copied) and writes every
node's ``zarr.json`` and the root one; the root manifest, which OCDBT writes last, makes them
visible together.

A save by a single process needs no merge: it writes its chunks into the root database, and the
same transaction takes the documents and commits at the end (:func:`sole_store`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import tensorstore as ts

from ..errors import StorageError
from .layouts import (
    OCDBT_ROOT_CONFIG,
    OCDBT_SOLE_REMOTE_CONFIG,
    OCDBT_WRITE_CONFIG,
    PACKED,
    database_spec,
    rank_database,
)
from .store import Store

__all__ = ["rank_store", "sole_store", "merge", "commit_with_documents", "value_locations"]


def rank_store(location: dict[str, Any], rank: int) -> Store:
    """The database into which rank ``rank`` of a save to ``location`` writes."""
    return Store(_rank_location(location, rank), PACKED, config=OCDBT_WRITE_CONFIG)


def sole_store(location: dict[str, Any]) -> Store:
    """The database into which the only process of a save to ``location`` writes: the root
    database itself, whose transaction then also takes the documents
    (:func:`commit_with_documents`), so that there is no rank database and no merge."""
    local = location["driver"] == "file"
    return Store(location, PACKED, config=OCDBT_WRITE_CONFIG if local else OCDBT_SOLE_REMOTE_CONFIG)


def merge(
    location: dict[str, Any], ranks: Iterable[int], documents: dict[str, bytes], confirm: Callable[[], None]
) -> None:
    """Make the database at ``location`` hold every key of the databases of ``ranks``, and
    ``documents`` (key -> bytes), in one atomic commit, made once ``confirm()`` returns.

    A rank's database that is missing (its transaction never committed) fails the merge
    instead of merging as empty, which OCDBT would do.
    """
    root = Store(location, PACKED)
    transaction = ts.Transaction(atomic=True)
    database = root.wait(ts.KvStore.open(database_spec(location, OCDBT_ROOT_CONFIG), context=root.context))
    manifest = read_manifest(database)  # while the ranks' databases are read
    target = database.with_transaction(transaction)
    # Every rank's database at once, listed and copied together: a few round trips to an object
    # store, however many ranks. The same context as the root's: OCDBT copies references only
    # within one.
    ranks = list(ranks)
    specs = [database_spec(_rank_location(location, rank)) for rank in ranks]
    opening = [ts.KvStore.open(spec, context=root.context) for spec in specs]
    sources = [root.wait(future) for future in opening]
    listings = [source.list() for source in sources]
    copies = [source.experimental_copy_range_to(target) for source in sources]
    for rank, listing in zip(ranks, listings):
        if not root.wait(listing):
            raise StorageError(f"{root.url}: rank {rank}'s database ({rank_database(rank)}) is missing or empty")
    for copy in copies:
        root.wait(copy)
    commit_with_documents(root, database, transaction, documents, confirm, manifest)


def commit_with_documents(
    store: Store,
    database: ts.KvStore,
    transaction: ts.Transaction,
    documents: dict[str, bytes],
    confirm: Callable[[], None],
    manifest: ts.Future | None = None,
) -> None:
    """Add ``documents`` (key -> bytes) to ``transaction`` of ``database`` (the hierarchy of
    ``store``, as written), and commit it once ``confirm()`` returns: what it holds becomes
    visible at once, its manifest last. ``manifest``: :func:`read_manifest` of ``database``,
    issued earlier (else it is read alongside ``confirm()``)."""
    reading_manifest = manifest if manifest is not None else read_manifest(database)
    database = database.with_transaction(transaction)
    try:
        for key, value in documents.items():
            store.wait(database.write(key, value))
        confirm()
        store.wait(reading_manifest)
    except BaseException:
        transaction.abort()  # what it holds (a whole checkpoint, for one process) is let go
        raise
    store.wait(transaction.commit_async())


def read_manifest(database: ts.KvStore) -> ts.Future:
    """Read ``database``'s manifest, which a commit needs (absent, or the replaced
    checkpoint's), so that its round trip overlaps others (a read of no key reads only it)."""
    return database.read("")


def _rank_location(location: dict[str, Any], rank: int) -> dict[str, Any]:
    return {**location, "path": location["path"] + rank_database(rank)}


def value_locations(store: Store) -> dict[str, tuple[str, int, int]]:
    """Where the values stored out of line in the local packed checkpoint ``store`` lie: per
    key, the data file, the offset of the value's first byte in it and its length, from the
    root database's B-tree (values kept inside the B-tree nodes are left out). With them a
    reader reads plain chunks straight into their destination, as from the files layout."""
    assert store.local_dir is not None
    base = store.wait(ts.KvStore.open(store.location, context=store.context))
    manifest = store.wait(ts.ocdbt.dump(base, context=store.context))
    root = manifest["versions"][-1]["root"].get("location") if manifest["versions"] else None
    found: dict[str, tuple[str, int, int]] = {}
    pending = [(root, b"")] if root else []
    while pending:
        node_location, prefix = pending.pop()
        node = store.wait(ts.ocdbt.dump(base, node_location, context=store.context))
        for entry in node["entries"]:
            if "location" in entry:  # an interior node: its children's keys follow its prefix
                pending.append((entry["location"], prefix + entry["subtree_common_prefix"]))
            elif "indirect_value" in entry:
                # "value:<database path>:<data file>:<offset>:<length>", paths relative to the root
                _, database, data_file, offset, length = entry["indirect_value"].split(":")
                path = f"{store.local_dir}{database}{data_file}"
                found[(prefix + entry["key"]).decode()] = (path, int(offset), int(length))
    return found
