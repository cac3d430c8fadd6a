"""Where a checkpoint lives: a tensorstore key-value store and the JSON documents in it.

Everything zdcp reads or writes goes through a tensorstore kvstore spec rooted at the checkpoint
(:mod:`zdcp.locations`), so the same code serves local directories and object stores. Array
data goes through tensorstore's ``zarr3`` driver over ``node_spec(node)`` (or, for local files,
:mod:`zdcp.storage.localfiles`); the ``zarr.json`` documents are written and read here, as
whole JSON values. A request the storage refuses or fails becomes a :class:`~zdcp.StorageError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tensorstore as ts

from ..errors import CorruptCheckpointError, StorageError, UsageError, ZdcpError
from ..locations import CheckpointId, kvstore_spec, url_of
from .layouts import FILES, PACKED, hierarchy_spec
from .oscalls import FilesystemSync

__all__ = ["Store", "store_for", "encode_json", "reading", "storage_access", "short_message"]

#: A packed checkpoint's B-tree nodes, cached while it is read: they are decoded once.
_NODE_CACHE_BYTES = 64 << 20
_NODES = "ocdbt_nodes"
_MEMORY = ts.Context({f"cache_pool#{_NODES}": {"total_bytes_limit": _NODE_CACHE_BYTES}})
_PATH_MAX = 4095  # Linux's PATH_MAX, less its terminating NUL
_OBJECT_KEY_MAX = 1024


class Store:
    """One checkpoint's Zarr hierarchy, stored in ``layout`` (:mod:`zdcp.storage.layouts`) at
    the location ``checkpoint_id`` names, with a shared tensorstore context.

    ``location`` is the kvstore spec of the place itself (a directory, an object-store prefix),
    ``spec`` that of the hierarchy's keys: the same place for the files layout, the OCDBT
    database there for the packed one (with ``config``, a new database written with that OCDBT
    configuration; an existing database is written under the one its manifest records).

    The context is shared by every array opened through this store so that all chunk I/O of a
    save or load draws on one pool of file-I/O and copy threads (and, packed, one cache of the
    database's B-tree nodes).

    Writes are not synced one by one (tensorstore's ``file_io_sync`` is off): a writer that
    needs them on disk syncs the filesystem once its writes are done (:meth:`filesystem_sync`),
    which costs about what a single ``fsync`` does, where a save of thousands of small chunk
    files and ``zarr.json`` documents would otherwise ``fsync`` each one.
    """

    def __init__(self, checkpoint_id: CheckpointId, layout: str = FILES, *, config: dict[str, Any] | None = None):
        self.checkpoint_id = checkpoint_id
        self.location = kvstore_spec(checkpoint_id)
        self.layout = layout
        self.spec = hierarchy_spec(self.location, layout, config)
        if self.location["driver"] == "memory":
            # memory:// stores live in a context: one for the process, so that they outlive a call
            self.context = _MEMORY
        elif layout == PACKED:
            # The database's B-tree nodes are cached; the arrays' chunks are not (the default
            # cache pool holds nothing), so reads cost no memory beyond their destination.
            nodes = {"total_bytes_limit": _NODE_CACHE_BYTES}
            self.context = ts.Context({"file_io_sync": False, f"cache_pool#{_NODES}": nodes})
        else:
            self.context = ts.Context({"file_io_sync": False})
        self._kv: ts.KvStore | None = None

    def __repr__(self) -> str:
        return f"Store({self.url!r}, {self.layout!r})"

    @property
    def url(self) -> str:
        """A human-readable name for messages: the local path, or the URL."""
        return url_of(self.location)

    @property
    def kv(self) -> ts.KvStore:
        if self._kv is None:
            self._kv = self.wait(ts.KvStore.open(self.spec, context=self.context))
        return self._kv

    def wait(self, future: ts.Future) -> Any:
        """``future.result()`` of a key-value operation (or an open), with any failure raised
        as a StorageError: these carry no checkpoint data whose damage could be the cause."""
        try:
            return future.result()
        except ValueError as e:
            raise StorageError(f"{self.url}: {short_message(e)}") from None

    @property
    def local_dir(self) -> str | None:
        """The checkpoint's directory when it is in the local filesystem, else None."""
        return self.location["path"] if self.location["driver"] == "file" else None

    @property
    def file_root(self) -> str | None:
        """The directory whose files are the hierarchy's keys (a local checkpoint in the files
        layout), where chunks may be read and written as plain files; else None."""
        return self.local_dir if self.layout == FILES else None

    def max_key_bytes(self) -> int | None:
        """The longest key a save may write into the hierarchy, None when there is no limit
        (the packed layout's keys are no paths): a local path (with the pending directory a
        save writes into, 40 bytes longer than the checkpoint's own, and the ``.__lock`` suffix
        of tensorstore's temporary files) within ``PATH_MAX``; an object key within the 1,024
        bytes S3 and GCS allow."""
        driver, prefix = self.location["driver"], os.fsencode(self.location["path"])
        if self.layout != FILES:
            return None
        if driver == "file":
            return _PATH_MAX - len(prefix) - len(".zdcp-") - 34 - len(".__lock")
        if driver in ("s3", "gcs"):
            return _OBJECT_KEY_MAX - len(prefix)
        return None

    def node_spec(self, node: str) -> dict[str, Any]:
        """The kvstore spec of a node's directory (``node`` is a "/"-joined node path)."""
        return {**self.spec, "path": self.spec.get("path", "") + (node + "/" if node else "")}

    def open_array(
        self, node: str, metadata: dict[str, Any], *, write: bool = False, transaction: ts.Transaction | None = None
    ) -> ts.Future:
        """Open the array at ``node`` from metadata already known, without touching storage
        (writes within ``transaction``, when given).

        Writing stores every chunk, all-zero ones included, so that a missing chunk file always
        means damage; reading treats a missing chunk file as an error, never as zeros.
        """
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": self.node_spec(node), "metadata": metadata}
        if write:
            spec["store_data_equal_to_fill_value"] = True
        else:
            # A committed checkpoint does not change: what the database's manifest and B-tree
            # nodes were when opened still holds, and need not be fetched again per array.
            spec |= {"fill_missing_data_reads": False, "recheck_cached_data": False}
        return ts.open(
            spec,
            open=True,
            assume_metadata=True,
            read=not write,
            write=write,
            context=self.context,
            transaction=transaction,
        )

    def read_json(self, key: str) -> Any | None:
        """The parsed JSON document at ``key``, or None when there is none."""
        result = self.wait(self.kv.read(key))
        if result.state != "value":
            return None
        return json.loads(result.value)

    def write_json_async(self, key: str, doc: Any) -> ts.Future:
        """Write one JSON document (atomically replacing any old one)."""
        return self.kv.write(key, encode_json(doc))

    def write_json(self, key: str, doc: Any) -> None:
        self.wait(self.write_json_async(key, doc))

    def delete(self, key: str) -> None:
        self.wait(self.kv.write(key, None))

    def is_empty(self) -> bool:
        return not self.wait(self.kv.list())

    def filesystem_sync(self) -> FilesystemSync | None:
        """For a local checkpoint, a handle that makes writes under the root durable; open it
        before writing (see :class:`FilesystemSync`). None for an object store, which has made
        a write durable when it acknowledges it."""
        return FilesystemSync(self.local_dir) if self.local_dir is not None else None


def store_for(checkpoint_id: CheckpointId | None, current: Store | None, owner: str) -> Store:
    """The store of a DCP storage plugin (``owner`` names it): DCP hands the location over in
    ``reset(checkpoint_id)``, or the user gave it to the constructor (``current``)."""
    if checkpoint_id is not None:
        return Store(checkpoint_id)
    if current is None:
        raise UsageError(f"{owner} needs a path: pass it to {owner}(...) or as checkpoint_id")
    return current


def encode_json(doc: Any) -> bytes:
    """A JSON document as stored: compact (json's C encoder only runs without indent, and the
    root document of a checkpoint with thousands of arrays is large), strict (no NaN)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


@contextmanager
def reading(array: str, url: str) -> Iterator[None]:
    """Turn tensorstore's error for bad or missing data (a ``ValueError``: checksum mismatch,
    missing or truncated chunk) into a :class:`~zdcp.CorruptCheckpointError` naming the array;
    a refused or failed request is a :class:`~zdcp.StorageError` instead."""
    try:
        with storage_access(url):
            yield
    except ValueError as e:
        raise CorruptCheckpointError(f"array {array!r}: {e}") from None


@contextmanager
def storage_access(url: str) -> Iterator[None]:
    """Turn a request the storage refused or failed into a :class:`~zdcp.StorageError` naming
    the file or ``url``: an ``OSError`` of a local file (no space, no access, a name too long),
    or tensorstore's error for one (no such bucket, bad credentials, no access, unreachable).
    Other errors, zdcp's own included, pass through."""
    try:
        yield
    except ZdcpError:
        raise
    except OSError as e:
        raise StorageError(f"{e.filename or url}: {e.strerror or e}") from e
    except ValueError as e:
        text = str(e)
        if text.startswith(_ACCESS_CODES) or "NoSuchBucket" in text or "http_response_code=" in text:
            raise StorageError(f"{url}: {short_message(e)}") from None
        raise


def short_message(error: Exception) -> str:
    """tensorstore's message without the HTTP response it quotes."""
    return str(error).split(" [", 1)[0]


# tensorstore status codes of requests that failed for reasons outside the checkpoint (NOT_FOUND
# also means a missing chunk, DATA_LOSS a checksum mismatch: those are damage); any error that
# quotes an HTTP response is a failed request too.
_ACCESS_CODES = (
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
)
