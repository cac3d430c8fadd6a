"""``zdcp.verify``: read a whole checkpoint and report everything wrong with it.

Checks, in order: the commit record (root ``zarr.json``) and format version; that every node's
own ``zarr.json`` exists and matches the copy consolidated in the root; every chunk of every
array (present, checksum correct, right size); and files that belong to no node. Entries at the
top of the checkpoint's directory that are not the checkpoint's (a framework's files beside it,
:mod:`zdcp.storage.foreign`) are listed apart, and are no fault. Each fault
names the node and, for chunks, the chunk index, so a damaged checkpoint can be judged (and an
older one chosen) without guessing.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import tensorstore as ts

from .errors import CorruptCheckpointError, StorageError, ZdcpError
from .format.catalog import ArrayNode
from .format.constants import ZARR_JSON
from .storage.contents import Committed, open_committed
from .storage.failures import short_message, storage_access
from .storage.foreign import foreign_names
from .storage.hierarchy import Hierarchy
from .storage.inflight import InflightWindow
from .storage.location import CheckpointId, Location

__all__ = ["verify", "verify_location", "Fault", "Report"]


@dataclass(frozen=True)
class Fault:
    """One thing wrong: where (node path, and chunk index for chunk faults) and what."""

    node: str
    message: str
    chunk: tuple[int, ...] | None = None

    def __str__(self) -> str:
        where = self.node or "<root>"
        if self.chunk is not None:
            where += f" chunk {'.'.join(map(str, self.chunk)) or '(scalar)'}"
        return f"{where}: {self.message}"


@dataclass
class Report:
    """What :func:`verify` found: ``ok`` when no fault."""

    checkpoint: str
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0
    faults: list[Fault] = field(default_factory=list)
    #: Entries at the top of the checkpoint's directory (or prefix) that are not part of it:
    #: files a framework put beside the checkpoint. Ignored: they are no fault.
    foreign: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def verify(checkpoint_id: CheckpointId, *, progress: Callable[[int], None] | None = None) -> Report:
    """Read every chunk and document of a checkpoint; return a :class:`Report` of the faults."""
    return verify_location(Location(checkpoint_id), progress=progress)


def verify_location(
    location: Location, *, committed: Committed | None = None, progress: Callable[[int], None] | None = None
) -> Report:
    """:func:`verify` of the checkpoint at ``location`` (``committed``: already opened)."""
    report = Report(location.url)
    if committed is None:
        try:
            committed = open_committed(location)
        except StorageError:  # the storage failed, not the checkpoint
            raise
        except ZdcpError as e:
            report.faults.append(Fault("", str(e)))
            return report
    hierarchy, catalog = committed.hierarchy, committed.catalog
    consolidated = catalog.documents
    # Everything is read at once (chunks within a window of bytes): on an object store a
    # request costs a round trip, and one retried after throttling waits a backoff.
    documents = {node: hierarchy.kv.read(f"{node}/{ZARR_JSON}") for node in consolidated}
    listing = hierarchy.kv.list()
    expected = {ZARR_JSON} | {f"{node}/{ZARR_JSON}" for node in consolidated}
    window = InflightWindow(VERIFY_INFLIGHT_BYTES)
    for array in catalog.arrays.values():
        report.arrays += 1
        expected.update(_check_array(hierarchy, array, report, window, progress))
    window.drain()
    for node, document in consolidated.items():
        try:
            own = hierarchy.json_from(documents[node], f"{node}/{ZARR_JSON}")
        except CorruptCheckpointError as e:  # the message names the document by its URL
            report.faults.append(Fault(node, str(e).removeprefix(f"{hierarchy.url}/{node}/")))
            continue
        if own is None:
            report.faults.append(Fault(node, "zarr.json is missing"))
        elif own != document:
            report.faults.append(Fault(node, "zarr.json differs from the root's consolidated copy"))
    keys = sorted(k.decode() for k in hierarchy.wait(listing, "listing the checkpoint"))
    # Where the layout keeps its keys in the location itself, its listing shows the top too.
    top = {key.partition("/")[0] for key in keys} if hierarchy.layout.nodes_are_entries else None
    report.foreign = foreign_names(_top_level_names(location) if top is None else top, hierarchy.layout, catalog)
    for key in keys:
        if key not in expected and key.partition("/")[0] not in report.foreign:
            report.faults.append(Fault(key.rsplit("/", 1)[0], f"unexpected file {key!r} (not part of the checkpoint)"))
    return report


def _top_level_names(location: Location) -> set[str]:
    """The entries at the top of a location: a local directory's, an object store prefix's
    (objects, and the first segment of longer keys)."""
    if location.local_dir is not None:
        return set(os.listdir(location.local_dir))
    return {key.partition("/")[0] for key in location.keys()}


#: How many bytes of chunks verify keeps being read at once.
VERIFY_INFLIGHT_BYTES = 256 << 20


def _check_array(
    hierarchy: Hierarchy,
    array: ArrayNode,
    report: Report,
    window: InflightWindow,
    progress: Callable[[int], None] | None,
) -> set[str]:
    """Start reading each chunk of one array on its own, so that a fault names its chunk;
    ``window`` checks them as they complete. The chunk keys read."""
    node = array.node
    try:
        handle = hierarchy.open_array(node, array.document).result()
    except ValueError as e:  # metadata tensorstore will not open
        report.faults.append(Fault(node, f"cannot open: {short_message(e)}"))
        return set()
    itemsize = array.dtype.numpy.itemsize

    def check(index: tuple[int, ...], read: ts.Future) -> None:
        try:
            with storage_access(hierarchy.url, f"reading array {node!r}"):  # a refused request is no fault
                data = read.result()
        except ValueError as e:  # what tensorstore raises for bad or missing data
            report.faults.append(Fault(node, short_message(e), index))
            return
        report.chunks += 1
        report.bytes += data.size * itemsize
        if progress is not None:
            progress(data.size * itemsize)

    grid = [range(math.ceil(n / c)) for n, c in zip(array.shape, array.chunks)]
    keys = set()
    for index in itertools.product(*grid):
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape))
        nbytes = math.prod(r.stop - r.start for r in region) * itemsize
        window.add(handle[region].read() if region else handle.read(), nbytes, partial(check, index))
        keys.add(array.chunk_key(index))
    return keys
