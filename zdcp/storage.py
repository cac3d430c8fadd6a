"""Where a checkpoint lives: a tensorstore key-value store and the JSON documents in it.

Everything zdcp reads or writes goes through a tensorstore kvstore spec rooted at the checkpoint
(:mod:`zdcp.locations`), so the same code serves local directories and object stores. Array
data goes through tensorstore's ``zarr3`` driver over ``node_spec(node)`` (or, for local files,
:mod:`zdcp.direct`); the ``zarr.json`` documents are written and read here, as whole JSON
values. A request the storage refuses or fails becomes a :class:`~zdcp.StorageError`.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import tensorstore as ts

from .errors import CorruptCheckpointError, StorageError, UsageError
from .locations import CheckpointId, kvstore_spec, url_of

__all__ = [
    "Store",
    "StoreClient",
    "InflightWindow",
    "encode_json",
    "FilesystemSync",
    "start_writeback",
    "reading",
    "storage_access",
    "METADATA_KEY",
    "SAVING_MARKER",
]

METADATA_KEY = "zarr.json"
#: Written where a save writes when it starts (a local staging directory, an object store
#: prefix) and deleted at its commit: it labels an unfinished save, and on object stores its
#: conditional creation decides which of two concurrent saves proceeds. A key starting with
#: "__" can never be a node name (docs/format.md, section 2).
SAVING_MARKER = "__zdcp_saving__"

_MEMORY = ts.Context()


class Store:
    """One checkpoint's key-value store, with a shared tensorstore context.

    The context is shared by every array opened through this store so that all chunk I/O of a
    save or load draws on one pool of file-I/O and copy threads.

    Writes are not synced one by one (tensorstore's ``file_io_sync`` is off): a writer that
    needs them on disk syncs the filesystem once its writes are done (:meth:`filesystem_sync`).
    One sync of the filesystem costs about what a single ``fsync`` does, where a per-file
    ``fsync`` of thousands of small chunk files and ``zarr.json`` documents made small-array
    saves 2x slower (docs/benchmarks.md).
    """

    def __init__(self, checkpoint_id: CheckpointId):
        self.checkpoint_id = checkpoint_id
        self.spec = kvstore_spec(checkpoint_id)
        # memory:// stores live in a context: one for the process, so that they outlive a call
        self.context = _MEMORY if self.spec["driver"] == "memory" else ts.Context({"file_io_sync": False})
        self._kv: ts.KvStore | None = None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def url(self) -> str:
        """A human-readable name for messages: the local path, or the URL."""
        return url_of(self.spec)

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
            raise StorageError(f"{self.url}: {_short(e)}") from None

    @property
    def local_root(self) -> str | None:
        """The root directory when the checkpoint is in the local filesystem, else None."""
        return self.spec["path"] if self.spec["driver"] == "file" else None

    def node_spec(self, node: str) -> dict[str, Any]:
        """The kvstore spec of a node's directory (``node`` is a "/"-joined node path)."""
        return {**self.spec, "path": self.spec["path"] + (node + "/" if node else "")}

    def open_array(self, node: str, metadata: dict[str, Any], *, write: bool = False) -> ts.Future:
        """Open the array at ``node`` from metadata already known, without touching storage.

        Writing stores every chunk, all-zero ones included, so that a missing chunk file always
        means damage; reading treats a missing chunk file as an error, never as zeros.
        """
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": self.node_spec(node), "metadata": metadata}
        if write:
            spec["store_data_equal_to_fill_value"] = True
        else:
            spec["fill_missing_data_reads"] = False
        return ts.open(spec, open=True, assume_metadata=True, read=not write, write=write, context=self.context)

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
        return FilesystemSync(self.local_root) if self.local_root is not None else None


def encode_json(doc: Any) -> bytes:
    """A JSON document as stored: compact (json's C encoder only runs without indent, and the
    root document of a checkpoint with thousands of arrays is large), strict (no NaN)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class StoreClient:
    """The checkpoint location of a DCP storage plugin (ZarrWriter, ZarrReader).

    DCP hands the location over late, in ``reset(checkpoint_id)``, or the user gives it to the
    constructor; either way the plugin ends up with one :class:`Store`.
    """

    def __init__(self, path: CheckpointId | None):
        self.store: Store | None = Store(path) if path is not None else None

    @property
    def checkpoint_id(self) -> CheckpointId | None:
        return self.store.checkpoint_id if self.store else None

    def _use(self, checkpoint_id: CheckpointId | None) -> Store:
        if checkpoint_id is not None:
            self.store = Store(checkpoint_id)
        if self.store is None:
            name = type(self).__name__
            raise UsageError(f"{name} needs a path: pass it to {name}(...) or as checkpoint_id")
        return self.store


class InflightWindow:
    """Chunk I/O in flight, at most ``limit`` bytes of it (None: no limit).

    All I/O in flight at once is fastest, but each write holds its source tensor (a host copy of
    a GPU tensor, or data a lazy planner just produced) and each read a decoded chunk; the
    window bounds that memory by completing the oldest operations first. ``on_done(future)``
    runs when an operation is completed through the window (default: ``future.result()``).
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.pending: deque[tuple[ts.Future, int, Callable[[ts.Future], None] | None]] = deque()
        self.bytes = 0

    def add(self, future: ts.Future, nbytes: int, on_done: Callable[[ts.Future], None] | None = None) -> None:
        self.pending.append((future, nbytes, on_done))
        self.bytes += nbytes
        while self.limit is not None and self.bytes > self.limit and len(self.pending) > 1:
            self._complete_oldest()

    def drain(self) -> None:
        while self.pending:
            self._complete_oldest()

    def settle(self) -> None:
        """Wait for every operation in flight, ignoring their outcomes (after a failure)."""
        while self.pending:
            future, _, _ = self.pending.popleft()
            try:
                future.result()
            except Exception:
                pass
        self.bytes = 0

    def _complete_oldest(self) -> None:
        future, nbytes, on_done = self.pending.popleft()
        if on_done is None:
            future.result()
        else:
            on_done(future)
        self.bytes -= nbytes


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
    """Turn tensorstore's error for a request the storage refused or failed (no such bucket,
    bad credentials, no access, unreachable) into a :class:`~zdcp.StorageError` naming ``url``.
    Other errors pass through."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        if text.startswith(_ACCESS_CODES) or "NoSuchBucket" in text or "http_response_code=" in text:
            raise StorageError(f"{url}: {_short(e)}") from None
        raise


def _short(error: Exception) -> str:
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


class FilesystemSync:
    """Makes every completed write and delete on the filesystem holding ``path`` durable:
    ``syncfs`` on Linux (data and metadata), ``sync`` elsewhere.

    Open it before the writes it is to cover: since Linux 5.8, ``syncfs`` reports a write-back
    error to every handle opened before the error happened, so a handle opened first learns of
    a failed write-back of these writes even when another process's sync saw it first.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY) if _SYNCFS is not None else None

    def sync(self) -> None:
        if self.fd is None:
            os.sync()
        elif _SYNCFS(self.fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting for them
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux only): a hint that lets the disk work
    while the writer creates its next files. Never a substitute for :class:`FilesystemSync`,
    which reports any write-back error, so this one's result is ignored."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def linux_libc(name: str) -> Callable[..., int] | None:
    """The C library function ``name`` (setting ``errno``) on Linux; None elsewhere or when
    this libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_SYNCFS = linux_libc("syncfs")
_SYNC_FILE_RANGE = linux_libc("sync_file_range")
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
