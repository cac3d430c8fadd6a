"""Plain chunk files in a local directory, written and read without tensorstore.

**Reads.** tensorstore decodes every chunk into a buffer of its own and then copies it into the
destination: two passes over the data, plus the buffers. For the common case this module makes
it one: a local file, plain chunks (:func:`zdcp.format.codecs.plain_encoding`), chunks and inner
chunks cut along the first dimension only (FSDP's ``Shard(0)``, replicated and single-process
tensors), and a contiguous CPU destination of the stored dtype for a slab of whole rows. Each
(inner) chunk's bytes are read with ``preadv`` straight into the destination rows and checked
there against their crc32c; a chunk only partly needed is read into a small buffer first.

**Writes.** A save of thousands of small tensors is thousands of small files; through
tensorstore each costs an array open, a lock file and a rename, several times the file write
itself. :class:`LocalFiles` writes plain chunks (shards included, encoded here byte for byte as
tensorstore does) and the nodes' ``zarr.json`` as plain files instead. No rename is needed for
atomicity: every file of a save is new (it goes into the save's own pending directory), and the
checkpoint only counts once that directory is committed, renamed into place (docs/format.md,
section 5).

Anything else goes through tensorstore. Both write and read the files docs/format.md specifies.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from ..errors import CorruptCheckpointError
from ..format.codecs import crc32c, plain_encoding
from ..format.documents import chunk_key, chunk_key_separator
from ..format.dtypes import from_zarr
from .oscalls import start_writeback

__all__ = ["DirectReader", "RowSlabs", "row_slabs", "LocalFiles", "FindExtent", "in_directory"]

#: Where a chunk's bytes are: ``find(key)`` gives the file, the offset of the chunk's first byte
#: in it and its size (None: the whole file), or None when no file holds the chunk.
FindExtent = Callable[[str], "tuple[str, int, int | None] | None"]


def in_directory(root: str) -> FindExtent:
    """The chunks of a files-layout checkpoint at ``root``: a file each."""
    return lambda key: (os.path.join(root, key), 0, None)


_MISSING = 2**64 - 1  # index entry of an inner chunk that was never written
#: The most inner chunks one ``preadv`` reads: two buffers each, within Linux's IOV_MAX (1024).
_RUN_MAX = 512


class DirectReader:
    """Reads of whole rows of plain chunks straight from local files into their destination,
    for one checkpoint, whose layout knows where its chunks lie (``extents``: called once, when
    first needed, as working that out may cost reads of its own)."""

    def __init__(self, extents: Callable[[], FindExtent]):
        self._extents = extents
        self._find: FindExtent | None = None
        self._slabs: dict[str, RowSlabs | None] = {}

    def read_rows(
        self, node: str, document: dict[str, Any], where: str, start: int, stop: int, dest: np.ndarray
    ) -> bool:
        """Read rows ``[start, stop)`` of the array at ``node`` (``document`` is its
        ``zarr.json``, ``where`` names it in errors) into ``dest``, the destination's bytes as a
        flat uint8 array; False, with nothing read, when its chunks are no row slabs in files."""
        if node not in self._slabs:
            self._slabs[node] = row_slabs(document)
        slabs = self._slabs[node]
        if slabs is None:
            return False
        if self._find is None:
            self._find = self._extents()
        if not all(self._find(key) for key in slabs.keys(node, start, stop).values()):
            return False  # a chunk kept elsewhere (inside a database's B-tree node)
        slabs.read(self._find, node, where, start, stop, dest.reshape(stop - start, slabs.row_bytes))
        return True


@dataclass(frozen=True)
class RowSlabs:
    """How an array's rows lie in its chunk files: ``chunk_rows`` rows per chunk (file), split
    into inner chunks of ``inner_rows`` rows (equal when the array has no inner chunks)."""

    rows: int
    row_bytes: int
    chunk_rows: int
    inner_rows: int
    trailing_chunks: int  # dimensions after the first, all in chunk 0
    sharded: bool
    separator: str  # of the chunk keys

    def keys(self, node: str, start: int, stop: int) -> dict[int, str]:
        """The chunks holding rows ``[start, stop)``: their indices along the rows, and keys."""
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        return {c: chunk_key(node, (c,) + (0,) * self.trailing_chunks, self.separator) for c in range(first, last + 1)}

    def read(self, find: FindExtent, node: str, where: str, start: int, stop: int, dest: np.ndarray) -> None:
        """Read rows ``[start, stop)`` into ``dest`` (a ``(stop - start, row_bytes)`` uint8 view),
        finding each chunk's bytes with ``find`` (:func:`in_directory`, or where a database
        keeps its values)."""
        for chunk, key in self.keys(node, start, stop).items():
            found = find(key)
            try:
                if found is None:
                    raise FileNotFoundError(key)
                path, base, size = found
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"array {where!r}: chunk {chunk} is missing ({key})") from None
            try:
                size = os.fstat(fd).st_size if size is None else size
                self._read_chunk(fd, base, size, chunk, where, start, stop, dest)
            finally:
                os.close(fd)

    def _read_chunk(
        self, fd: int, base: int, size: int, chunk: int, where: str, start: int, stop: int, dest: np.ndarray
    ) -> None:
        """Read rows of the chunk whose bytes are ``[base, base + size)`` of the file ``fd``."""
        first = chunk * self.chunk_rows
        run: list[tuple[int, np.ndarray]] = []  # whole inner chunks, one after another in the file
        for inner, (offset, nbytes) in enumerate(self._index(fd, base, size, chunk, where)):
            lo = first + inner * self.inner_rows
            hi = lo + self.inner_rows
            if hi <= start or lo >= stop or lo >= self.rows:
                continue
            if offset == _MISSING or nbytes != self.inner_rows * self.row_bytes + 4:
                raise CorruptCheckpointError(f"array {where!r}: chunk {chunk}, inner chunk {inner}: missing or damaged")
            if start <= lo and hi <= stop:  # the whole inner chunk lands in the destination
                if run and (run[-1][0] + run[-1][1].nbytes + 4 != offset or len(run) == _RUN_MAX):
                    _read_checked(fd, base, run, where, chunk)
                    run = []
                run.append((offset, dest[lo - start : hi - start]))
            else:  # partly needed, or padded past the array's end: through a small buffer
                buffer = np.empty((self.inner_rows, self.row_bytes), dtype=np.uint8)
                _read_checked(fd, base, [(offset, buffer)], where, chunk)
                a, b = max(lo, start), min(hi, stop, self.rows)
                dest[a - start : b - start] = buffer[a - lo : b - lo]
        if run:
            _read_checked(fd, base, run, where, chunk)

    def _index(self, fd: int, base: int, size: int, chunk: int, where: str) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` of each inner chunk, relative to the chunk's first byte, from
        the checksummed index at its end."""
        if not self.sharded:
            return [(0, size)]
        count = self.chunk_rows // self.inner_rows
        length = count * 16 + 4
        raw = os.pread(fd, length, base + size - length) if size >= length else b""
        if len(raw) != length or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise CorruptCheckpointError(f"array {where!r}: chunk {chunk} has a damaged shard index")
        table = np.frombuffer(raw[:-4], dtype="<u8").reshape(count, 2)
        return [(int(o), int(n)) for o, n in table]


def row_slabs(document: dict[str, Any]) -> RowSlabs | None:
    """The row-slab layout of an array from its ``zarr.json``, or None when it has another."""
    shape = document["shape"]
    chunks = document["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = plain_encoding(document)
    if encoding is None or not shape or math.prod(shape) == 0 or list(chunks[1:]) != list(shape[1:]):
        return None
    inner = encoding.inner
    if inner is not None and list(inner[1:]) != list(shape[1:]):
        return None
    itemsize = from_zarr(document["data_type"]).numpy.itemsize
    row_bytes = itemsize * math.prod(shape[1:])
    inner_rows = chunks[0] if inner is None else inner[0]
    separator = chunk_key_separator(document)
    return RowSlabs(shape[0], row_bytes, chunks[0], inner_rows, len(shape) - 1, inner is not None, separator)


def _read_checked(fd: int, base: int, run: list[tuple[int, np.ndarray]], where: str, chunk: int) -> None:
    """Read (inner) chunks that lie one after another in the file, each as its bytes and then
    their 4-byte crc32c, in one ``preadv``: each ``(offset, dest)`` of ``run`` fills ``dest``
    from ``base + offset``, and is checked against its crc32c there."""
    tails = [bytearray(4) for _ in run]
    buffers = [b for (_, dest), tail in zip(run, tails) for b in (memoryview(dest).cast("B"), tail)]
    got = os.preadv(fd, buffers, base + run[0][0])
    if got != sum(dest.nbytes + 4 for _, dest in run):
        raise CorruptCheckpointError(f"array {where!r}: chunk {chunk} is truncated")
    for (_, dest), tail in zip(run, tails):
        if crc32c(dest) != int.from_bytes(tail, "little"):
            raise CorruptCheckpointError(f"array {where!r}: chunk {chunk} fails its crc32c checksum")


#: Files at least this large start their write-back as soon as they are written (when the save
#: syncs): the disk then writes one rank's shards while the rank creates its next files, instead
#: of all of them in the final sync. Smaller files are left to that sync, which writes them in
#: larger batches.
WRITEBACK_BYTES = 256 << 10


class LocalFiles:
    """Writes files under a local checkpoint root, creating each directory once.

    With ``start_writeback`` (for a save that syncs once its files are written), files of at
    least :data:`WRITEBACK_BYTES` begin their write-back right away.
    """

    def __init__(self, root: str, *, start_writeback: bool = False):
        self.root = os.path.normpath(root)
        self._dirs = {self.root}  # known to exist
        self.start_writeback = start_writeback

    def write(self, key: str, *parts: bytes | memoryview) -> None:
        """Write the file ``key`` (relative to the root) holding ``parts`` one after another."""
        path = os.path.join(self.root, key)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:  # a new directory; tried second, as most files go into existing ones
            self._make_dirs(os.path.dirname(path))
            fd = os.open(path, flags, 0o666)
        try:
            views = [memoryview(part).cast("B") for part in parts]
            size = sum(view.nbytes for view in views)
            _write_all(fd, views)
            if self.start_writeback and size >= WRITEBACK_BYTES:
                start_writeback(fd)
        finally:
            os.close(fd)

    def _make_dirs(self, directory: str) -> None:
        """Create ``directory`` and its missing ancestors below the root, top down (where
        ``os.makedirs`` tries each one bottom up, and stats it, first)."""
        missing = []
        while directory not in self._dirs and directory != os.path.dirname(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:  # made by another rank, or another writer of this save
                pass
            self._dirs.add(directory)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` in order with as few ``writev`` calls as the kernel allows."""
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch)
        if written == 0 and any(view.nbytes for view in batch):
            raise OSError(errno.EIO, "writev wrote nothing")
        rest = views[len(batch) :]
        for i, view in enumerate(batch):
            if written < view.nbytes:
                rest = [view[written:], *batch[i + 1 :], *rest]
                break
            written -= view.nbytes
        views = rest


_IOV_MAX = os.sysconf("SC_IOV_MAX")
if _IOV_MAX < 1:  # no limit
    _IOV_MAX = 1024
