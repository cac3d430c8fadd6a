"""The packed layout: the hierarchy's keys in tensorstore's OCDBT key-value store, a B-tree
database at the checkpoint's root (``manifest.ocdbt`` and data files under ``d/``), so that a
checkpoint is a few files per rank instead of one per chunk (docs/format.md, section 9).

**Writing.** Each rank writes its chunks into a database of its own, ``ocdbt.process_<rank>/``
under the save's location, in atomic transactions (the writer has it commit one whenever it
holds a window's worth: :meth:`_DatabaseSink.release`); no data passes between ranks. At the
commit the coordinator, in one atomic transaction of the root
database, copies the ranks' key ranges (B-tree entries that refer to the ranks' data files,
which are not copied) and writes every node's ``zarr.json`` and the root one; the root
manifest, which OCDBT writes last, makes them visible together. A save by a single process
needs no merge: it writes its chunks into the root database itself, and its last
transaction takes the documents and commits at the end. The root's guard ``zarr.json``
(:data:`GUARD`) is written just before that commit.

**Reading.** A database records its configuration in its manifest, so readers need none of the
configurations below. Locally, plain chunks stored out of line are read straight from the data
files (:func:`value_extents`); on an object store, nearby reads are coalesced.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import tensorstore as ts

from ..errors import CorruptCheckpointError, StorageError
from ..format.constants import ZARR_JSON
from ..format.documents import guard_document
from .failures import short_message, storage_access
from .hierarchy import Hierarchy
from .keyvalue import encode_json
from .layout import ChunkSink, Documents, Layout
from .localfiles import DirectReader
from .location import Location

__all__ = ["PackedLayout", "OCDBT_MANIFEST", "data_file_bytes", "rank_database", "value_extents"]

#: The file (or object) that holds an OCDBT database's root; its presence at a checkpoint's
#: root marks the packed layout.
OCDBT_MANIFEST = "manifest.ocdbt"
#: The configuration a rank's database is written with: values of up to 1 KiB (small chunks)
#: are kept in the B-tree nodes rather than in data files, large nodes (so that even a large
#: checkpoint's tree is one or two levels), one manifest file.
RANK_CONFIG: dict[str, Any] = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100_000_000,
    "manifest_kind": "single",
}
#: The root database keeps values of up to 1 MiB inline, OCDBT's largest: the documents, the
#: root one included, then come with the B-tree node a reader reads first, one round trip less
#: on an object store. (Its limit must not be below its ranks', or a merge would re-encode
#: their inline values.)
ROOT_CONFIG: dict[str, Any] = RANK_CONFIG | {"max_inline_value_bytes": 1 << 20}
#: The database of a save by one process on an object store holds its chunks and its documents
#: alike: values of up to 1 MiB inline, so that the first B-tree node a reader reads brings the
#: documents and the small chunks, one round trip; nodes of at most 8 MiB, so that reading the
#: documents never reads much more. Locally such a save uses the rank configuration: chunks in
#: data files are what a local load reads straight into its destination.
SOLE_REMOTE_CONFIG: dict[str, Any] = {
    "max_inline_value_bytes": 1 << 20,
    "max_decoded_node_bytes": 8 << 20,
    "manifest_kind": "single",
}
#: On an object store, a reader's reads of nearby data (a B-tree node, several chunks of one
#: data file) are coalesced into one request; locally this only reads more. Reads issued
#: within 10 ms of each other are merged across gaps of up to 64 KiB, which the request then
#: fetches too: a wider bridge (it was 1 MB) fetched chunks that the same reader's earlier
#: requests were fetching already, 1.17x the stored bytes for an HSDP load (now 1.00x).
_REMOTE_READS: dict[str, Any] = {
    "experimental_read_coalescing_threshold_bytes": 64 << 10,
    "experimental_read_coalescing_merged_bytes": 500_000_000_000,
    "experimental_read_coalescing_interval": "10ms",
}
#: What the location of a packed checkpoint holds at ``zarr.json``, where Zarr readers look for
#: the root: a document they refuse, which names :func:`zdcp.zarr_store`. Without it,
#: ``zarr.open_group(path)`` would open an empty group, or in its default mode create one and
#: so leave a root ``zarr.json`` that is not the checkpoint's.
GUARD = encode_json(guard_document("packed"))
#: A database's B-tree nodes, cached while it is read or written: they are decoded once. The
#: arrays' chunks are not cached (the default cache pool holds nothing), so reads cost no
#: memory beyond their destination.
_NODE_CACHE = "cache_pool#ocdbt_nodes"
_NODE_CACHE_BYTES = 64 << 20


class PackedLayout(Layout):
    name = "packed"
    description = "an OCDBT database: a few files (or objects) per rank"
    commit_record = OCDBT_MANIFEST
    nodes_are_entries = False  # they are keys of the database

    def hierarchy(self, location: Location) -> Hierarchy:
        return self._database(location)

    def owns(self, name: str, nodes: Collection[str]) -> bool:
        # The guard, the root database (its manifest and data files) and the ranks' databases,
        # whose data files the root's B-tree refers to.
        return name in (ZARR_JSON, OCDBT_MANIFEST, _DATA_FILES) or name.startswith(_RANK_DATABASE)

    def read_root(self, location: Location) -> Callable[[], tuple[Hierarchy, bytes | None]]:
        # The root document is the database's manifest and then its root B-tree node: read
        # from the start, with no look at the manifest first.
        hierarchy = self.hierarchy(location)
        reading = hierarchy.kv.read(ZARR_JSON)

        def result() -> tuple[Hierarchy, bytes | None]:
            try:
                with storage_access(location.url):
                    found = reading.result()
            except ValueError as e:  # not a refused or failed request: a damaged database
                raise CorruptCheckpointError(
                    f"{location.url}: the packed database's B-tree cannot be read: {short_message(e)}"
                ) from None
            return hierarchy, found.value if found.state == "value" else None

        return result

    def sink(
        self, location: Location, *, rank: int, sole: bool, nbytes: int, direct: bool, start_writeback: bool
    ) -> ChunkSink:
        files = data_file_bytes(nbytes)
        if sole:
            config = RANK_CONFIG if location.is_local else SOLE_REMOTE_CONFIG
            return _SoleSink(self._database(location, config, files), direct)
        return _RankSink(self._database(location.child(rank_database(rank)), RANK_CONFIG, files), direct, location)

    def direct_reader(self, hierarchy: Hierarchy) -> DirectReader | None:
        root = hierarchy.location.local_dir
        return DirectReader(lambda: value_extents(hierarchy, root).get) if root is not None else None

    def storage_order(self, hierarchy: Hierarchy) -> Callable[[str], tuple[str, int]] | None:
        # Only reads of a remote database coalesce (_REMOTE_READS); locally the walk of the
        # B-tree would cost the coordinator time and save no reads.
        if hierarchy.location.is_local:
            return None
        extents = value_extents(hierarchy)
        return lambda key: extents.get(key, ("", 0, 0))[:2]

    def _database(
        self, location: Location, config: dict[str, Any] | None = None, data_file_bytes: int | None = None
    ) -> Hierarchy:
        """The database at ``location``; to write a new one, with ``config`` (an existing one
        is written under the configuration its manifest records) and data files of about
        ``data_file_bytes``. Reads of a remote one coalesce; a writer's do not: each would
        wait out the interval."""
        spec = _database_spec(location, config)
        if data_file_bytes is not None:
            spec["target_data_file_size"] = data_file_bytes
        if config is None and location.spec["driver"] not in ("file", "memory"):
            spec |= _REMOTE_READS
        nodes = ts.Context({_NODE_CACHE: {"total_bytes_limit": _NODE_CACHE_BYTES}}, location.context)
        return Hierarchy(location, self, spec, nodes)


#: A rank's chunks go into about this many data files, written at once as each fills: one data
#: file, written by one thread once the whole state is in it, made a large save 3x slower than
#: the files layout's one file per chunk (512 MiB by one process: 1.6 s against 0.46 s with 16).
DATA_FILES_PER_RANK = 16
#: ... each of at least this many bytes, so that a small state is one or a few files.
MIN_DATA_FILE_BYTES = 8 << 20


def data_file_bytes(nbytes: int) -> int:
    """The size of the data files of a rank that writes ``nbytes``: a sixteenth of them, at
    least 8 MiB (OCDBT's ``target_data_file_size``: a data file is written once it holds that
    much)."""
    return max(MIN_DATA_FILE_BYTES, -(-nbytes // DATA_FILES_PER_RANK))


#: The directory (prefix) of an OCDBT database's data files.
_DATA_FILES = "d"
#: What the name of each rank's database under a packed checkpoint's root starts with.
_RANK_DATABASE = "ocdbt.process_"


def rank_database(rank: int) -> str:
    """Where, under a packed checkpoint's root, rank ``rank`` writes its database."""
    return f"{_RANK_DATABASE}{rank}/"


def _database_spec(location: Location, config: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "ocdbt", "base": location.spec, "cache_pool": _NODE_CACHE}
    if config is not None:
        spec |= {"config": config, "assume_config": True}
    return spec


class _DatabaseSink(ChunkSink):
    """A rank's writes into a database, in one atomic transaction; encoded chunks (``direct``)
    as values of the database.

    The transaction holds what it is given until the commit writes the data files; the writer
    has it :meth:`release` what it holds as that grows."""

    holds_writes = True

    def __init__(self, hierarchy: Hierarchy, direct: bool, *, releasable: bool):
        super().__init__(hierarchy)
        self.supports_encoded_writes = direct
        self._releasable = releasable
        self._begin()

    def _begin(self) -> None:
        self.transaction = ts.Transaction(atomic=True)
        self._values = self.hierarchy.kv.with_transaction(self.transaction) if self.supports_encoded_writes else None

    def release(self) -> bool:
        """Commit the transaction so far (its data files, a version of the database that no
        reader sees: the save commits later) and go on in a new one."""
        if not self._releasable:
            return False
        self.hierarchy.wait(self.transaction.commit_async(), "writing data files")
        self._begin()
        return True

    def write_encoded(self, key: str, parts: Sequence[bytes | memoryview]) -> ts.Future | None:
        assert self._values is not None
        return self._values.write(key, b"".join(parts))

    def open_array(self, node: str, document: dict[str, Any]) -> ts.Future:
        return self.hierarchy.open_array(node, document, write=True, transaction=self.transaction)

    def abort(self) -> None:
        self.transaction.abort()  # a no-op once committed


class _RankSink(_DatabaseSink):
    """One of several ranks: its own database, committed when its writes are done; the
    coordinator's commit merges every rank's into the root database at ``save_location``."""

    def __init__(self, hierarchy: Hierarchy, direct: bool, save_location: Location):
        super().__init__(hierarchy, direct, releasable=True)
        self.save_location = save_location

    def complete(self) -> None:
        # The rank's database is whole.
        self.hierarchy.wait(self.transaction.commit_async(), "committing the rank's database")

    def commit(self, documents: Documents, ranks: Sequence[int], confirm: Callable[[], None]) -> None:
        _merge(self.hierarchy.layout.hierarchy(self.save_location), ranks, _encoded(documents), confirm)


class _SoleSink(_DatabaseSink):
    """The only process of a save: it writes into the root database itself, and the same
    transaction takes the documents and commits: no rank database, no merge.

    Locally the root database is in the save's pending directory, so that a release, which
    commits a version without documents, is seen by no reader; on an object store it would
    be the location's manifest, written before the save confirms that the location is still
    its own: there this sink holds every write until the commit."""

    def __init__(self, hierarchy: Hierarchy, direct: bool):
        super().__init__(hierarchy, direct, releasable=hierarchy.location.is_local)

    def commit(self, documents: Documents, ranks: Sequence[int], confirm: Callable[[], None]) -> None:
        _commit_with_documents(self.hierarchy, self.hierarchy.kv, self.transaction, _encoded(documents), confirm)


def _encoded(documents: Documents) -> dict[str, bytes]:
    """Every document under its key, the root's last."""
    encoded = {f"{node}/{ZARR_JSON}": encode_json(doc) for node, doc in documents.items() if node}
    encoded[ZARR_JSON] = encode_json(documents[""])
    return encoded


def _merge(root: Hierarchy, ranks: Sequence[int], documents: dict[str, bytes], confirm: Callable[[], None]) -> None:
    """Make the root database (``root``) hold every key of the databases of ``ranks``, and
    ``documents`` (key -> bytes), in one atomic commit, made once ``confirm()`` returns.

    A rank's database that is missing (its transaction never committed) fails the merge
    instead of merging as empty, which OCDBT would do.
    """
    location = root.location
    transaction = ts.Transaction(atomic=True)
    database = root.wait(ts.KvStore.open(_database_spec(location, ROOT_CONFIG), context=root.context))
    manifest = _read_manifest(database)  # while the ranks' databases are read
    target = database.with_transaction(transaction)
    # Every rank's database at once, listed and copied together: a few round trips to an object
    # store, however many ranks. The same context as the root's: OCDBT copies references only
    # within one.
    specs = [_database_spec(location.child(rank_database(rank))) for rank in ranks]
    opening = [ts.KvStore.open(spec, context=root.context) for spec in specs]
    merging = "merging the ranks' databases"
    sources = [root.wait(future, merging) for future in opening]
    listings = [source.list() for source in sources]
    copies = [source.experimental_copy_range_to(target) for source in sources]
    for rank, listing in zip(ranks, listings):
        if not root.wait(listing, merging):
            raise StorageError(f"{root.url}: rank {rank}'s database ({rank_database(rank)}) is missing or empty")
    for copy in copies:
        root.wait(copy, merging)
    _commit_with_documents(root, database, transaction, documents, confirm, manifest)


def _commit_with_documents(
    hierarchy: Hierarchy,
    database: ts.KvStore,
    transaction: ts.Transaction,
    documents: dict[str, bytes],
    confirm: Callable[[], None],
    manifest: ts.Future | None = None,
) -> None:
    """Add ``documents`` (key -> bytes) to ``transaction`` of ``database`` (that of
    ``hierarchy``, as written), and commit it once ``confirm()`` returns: what it holds becomes
    visible at once, its manifest last. Before, the location gets its guard ``zarr.json``
    (:data:`GUARD`). ``manifest``: :func:`_read_manifest` of ``database``, issued earlier (else
    it is read alongside ``confirm()``)."""
    reading_manifest = manifest if manifest is not None else _read_manifest(database)
    database = database.with_transaction(transaction)
    try:
        for key, value in documents.items():
            hierarchy.wait(database.write(key, value))
        confirm()  # first: a zarr.json written before could replace the root of a save that took the place
        guarding = hierarchy.location.kv.write(ZARR_JSON, GUARD)
        hierarchy.wait(reading_manifest, "reading the database's manifest")
        hierarchy.wait(guarding, "writing the guard zarr.json")
    except BaseException:
        transaction.abort()  # what it holds (a whole checkpoint, for one process) is let go
        raise
    hierarchy.wait(transaction.commit_async(), "committing the database")


def _read_manifest(database: ts.KvStore) -> ts.Future:
    """Read ``database``'s manifest, which a commit needs (absent, or the replaced
    checkpoint's), so that its round trip overlaps others (a read of no key reads only it)."""
    return database.read("")


def value_extents(hierarchy: Hierarchy, directory: str = "") -> dict[str, tuple[str, int, int]]:
    """Where the values stored out of line in the packed checkpoint ``hierarchy`` lie: per key,
    the data file (its path under the location, after ``directory``), the offset of the
    value's first byte in it and its length, from the root database's B-tree (values kept
    inside the B-tree nodes are left out). With them a reader reads plain chunks of a local
    checkpoint (``directory``: its local directory) straight into their destination, as from
    the files layout, and a load orders its reads by where they lie."""
    location = hierarchy.location
    base = hierarchy.wait(ts.KvStore.open(location.spec, context=hierarchy.context))
    manifest = hierarchy.wait(ts.ocdbt.dump(base, context=hierarchy.context))
    root = manifest["versions"][-1]["root"].get("location") if manifest["versions"] else None
    found: dict[str, tuple[str, int, int]] = {}
    pending = [(root, b"")] if root else []
    while pending:
        node_location, prefix = pending.pop()
        node = hierarchy.wait(ts.ocdbt.dump(base, node_location, context=hierarchy.context))
        for entry in node["entries"]:
            if "location" in entry:  # an interior node: its children's keys follow its prefix
                pending.append((entry["location"], prefix + entry["subtree_common_prefix"]))
            elif "indirect_value" in entry:
                # "value:<database path>:<data file>:<offset>:<length>", paths relative to the root
                _, database, data_file, offset, length = entry["indirect_value"].split(":")
                path = f"{directory}{database}{data_file}"
                found[(prefix + entry["key"]).decode()] = (path, int(offset), int(length))
    return found
