"""Writing a packed checkpoint (:mod:`zdcp.storage.layouts`): each rank's database, and the
coordinator's root database that refers to them all.

Each rank writes its chunks into a database of its own under the save's location, in one
atomic transaction, so that it is whole or absent; no data passes between ranks. At the commit
the coordinator, in one atomic transaction of the root database, copies the ranks' key ranges
(B-tree entries that refer to the ranks' data files, which are not copied) and writes every
node's ``zarr.json`` and the root one; the root manifest, which OCDBT writes last, makes them
visible together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import tensorstore as ts

from ..errors import StorageError
from .layouts import PACKED, database_spec, rank_database
from .store import Store

__all__ = ["rank_store", "merge", "value_locations"]


def rank_store(location: dict[str, Any], rank: int) -> Store:
    """The database into which rank ``rank`` of a save to ``location`` writes."""
    return Store(_rank_location(location, rank), PACKED, write=True)


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
    database = root.wait(ts.KvStore.open(database_spec(location, write=True, root=True), context=root.context))
    # The root manifest (absent, or the replaced checkpoint's), read while the ranks' databases
    # are: the commit needs it.
    reading_manifest = database.read("")
    target = database.with_transaction(transaction)
    # Every rank's database at once, listed and copied together: a few round trips to an object
    # store, however many ranks. The same context as the root's: OCDBT copies references only
    # within one.
    ranks = list(ranks)
    specs = [database_spec(_rank_location(location, rank), write=False) for rank in ranks]
    opening = [ts.KvStore.open(spec, context=root.context) for spec in specs]
    sources = [root.wait(future) for future in opening]
    listings = [source.list() for source in sources]
    copies = [source.experimental_copy_range_to(target) for source in sources]
    for rank, listing in zip(ranks, listings):
        if not root.wait(listing):
            raise StorageError(f"{root.url}: rank {rank}'s database ({rank_database(rank)}) is missing or empty")
    for copy in copies:
        root.wait(copy)
    root.wait(reading_manifest)
    for key, value in documents.items():
        root.wait(target.write(key, value))
    confirm()
    root.wait(transaction.commit_async())


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
