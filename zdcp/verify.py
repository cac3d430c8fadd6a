"""``zdcp.verify``: read a whole checkpoint and report everything wrong with it.

Checks, in order: the commit record (root ``zarr.json``) and format version; that every node's
own ``zarr.json`` exists and matches the copy consolidated in the root; every chunk of every
array (present, checksum correct, right size); and files that belong to no node. Each fault
names the node and, for chunks, the chunk index, so a damaged checkpoint can be judged (and an
older one chosen) without guessing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CorruptCheckpointError, StorageError, ZdcpError
from .format.catalog import ArrayNode
from .format.constants import ZARR_JSON
from .storage.contents import Committed, open_committed
from .storage.failures import short_message, storage_access
from .storage.hierarchy import Hierarchy
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
    for node, document in consolidated.items():
        try:
            own = hierarchy.read_json(f"{node}/{ZARR_JSON}")
        except CorruptCheckpointError as e:  # the message names the document by its URL
            report.faults.append(Fault(node, str(e).removeprefix(f"{hierarchy.url}/{node}/")))
            continue
        if own is None:
            report.faults.append(Fault(node, "zarr.json is missing"))
        elif own != document:
            report.faults.append(Fault(node, "zarr.json differs from the root's consolidated copy"))
    expected = {ZARR_JSON} | {f"{node}/{ZARR_JSON}" for node in consolidated}
    for array in catalog.arrays.values():
        report.arrays += 1
        expected.update(_check_array(hierarchy, array, report, progress))
    for key in hierarchy.keys():
        if key not in expected:
            report.faults.append(Fault(key.rsplit("/", 1)[0], f"unexpected file {key!r} (not part of the checkpoint)"))
    return report


def _check_array(
    hierarchy: Hierarchy, array: ArrayNode, report: Report, progress: Callable[[int], None] | None
) -> set[str]:
    """Read each chunk of one array on its own, so that a fault names its chunk."""
    node = array.node
    try:
        handle = hierarchy.open_array(node, array.document).result()
    except ValueError as e:  # metadata tensorstore will not open
        report.faults.append(Fault(node, f"cannot open: {short_message(e)}"))
        return set()
    grid = [range(math.ceil(n / c)) for n, c in zip(array.shape, array.chunks)]
    reads = []
    keys = set()
    for index in itertools.product(*grid):
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape))
        reads.append((index, handle[region].read() if region else handle.read()))
        keys.add(array.chunk_key(index))
    itemsize = array.dtype.numpy.itemsize
    for index, read in reads:
        try:
            with storage_access(hierarchy.url):  # a refused request is not a fault of the checkpoint
                data = read.result()
        except ValueError as e:  # what tensorstore raises for bad or missing data
            report.faults.append(Fault(node, short_message(e), index))
            continue
        report.chunks += 1
        report.bytes += data.size * itemsize
        if progress is not None:
            progress(data.size * itemsize)
    return keys
