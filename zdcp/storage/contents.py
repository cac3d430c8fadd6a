"""What a location holds, as the commit protocol (:mod:`zdcp.storage.saving`) leaves it: a
committed checkpoint (its root ``zarr.json``, the commit record, in whichever layout it is
stored), or why there is none (nothing at all, an incomplete save, saves that never committed
beside a local target).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from .. import collector
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.catalog import Catalog
from ..format.constants import PENDING_INFIX
from ..format.documents import is_guard, zdcp_attrs
from .hierarchy import Hierarchy
from .keyvalue import parse_json
from .layout import layouts
from .location import Location

__all__ = [
    "Committed",
    "open_committed",
    "root_document",
    "root_kind",
    "holds_commit_record",
    "interrupted_saves",
    "pending_directories",
    "pending_name",
    "local_contents",
    "dcp_files",
]


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint: its hierarchy, in its layout, and its catalog."""

    hierarchy: Hierarchy
    catalog: Catalog


def open_committed(location: Location) -> Committed:
    """The committed checkpoint at ``location``.

    Raises :class:`~zdcp.CheckpointNotFoundError` when there is nothing,
    :class:`~zdcp.IncompleteCheckpointError` when a save never committed there, and
    :class:`~zdcp.CorruptCheckpointError` when the root document is damaged.
    """
    with collector.paused():
        hierarchy, root = root_document(location)
        if root is not None:
            return Committed(hierarchy, Catalog.parse(root, location.url))
    if not location.is_empty():
        raise IncompleteCheckpointError(
            f"{location.url} holds an incomplete checkpoint: its save never committed (no root zarr.json)"
        )
    pending = interrupted_saves(location.local_dir) if location.local_dir is not None else []
    if pending:
        raise IncompleteCheckpointError(
            f"no committed checkpoint at {location.url}: a save to it never committed (or is still running); "
            f"what saves left is in {', '.join(pending)}"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {location.url}")


def root_document(location: Location) -> tuple[Hierarchy, Any | None]:
    """The hierarchy at ``location``, in the layout found there, and its parsed root
    ``zarr.json``; None when there is none (the hierarchy is then the first layout's).

    A guard document (:func:`~zdcp.format.documents.is_guard`) at the location's own
    ``zarr.json``, which the files layout reads as its root, is no root: the layout that wrote
    it holds the checkpoint's root elsewhere, and reads it as its own."""
    # Every layout's read at once: on an object store, one round trip whichever it is.
    results = [layout.read_root(location) for layout in layouts()]
    first = None
    damage: CorruptCheckpointError | None = None  # raised unless another layout finds a root
    for result in results:
        hierarchy, found = result()
        first = first or hierarchy
        if found is None:
            continue
        try:
            document = parse_json(found, f"{location.url}/zarr.json")
        except CorruptCheckpointError as e:  # a damaged guard leaves the database's root readable
            damage = damage or e
            continue
        if not is_guard(document):
            return hierarchy, document
    if damage is not None:
        raise damage
    assert first is not None
    return first, None


#: What the root document at a location says of it (:func:`root_kind`).
NO_ROOT, COMMITTED, NOT_ZDCP, UNREADABLE = "no root", "committed", "not zdcp", "unreadable"
#: What a local directory holds besides (:func:`local_contents`): nothing, a DCP checkpoint
#: (``FileSystemWriter``'s), or anything else.
EMPTY, DCP, OTHER = "empty", "dcp", "other"
#: The file that marks a directory as a DCP checkpoint (``FileSystemWriter``'s pickled metadata).
DCP_METADATA = ".metadata"
#: The suffix of the data files of a DCP checkpoint.
_DCP_DATA_SUFFIX = ".distcp"


def dcp_files(directory: str, names: list[str]) -> set[str]:
    """Those of ``names``, the entries of a local ``directory``, that are the files of a DCP
    checkpoint there (``.metadata``, ``*.distcp``: regular files, where ``.metadata`` is one);
    none where there is no DCP checkpoint."""
    if not os.path.isfile(os.path.join(directory, DCP_METADATA)):
        return set()
    return {
        n
        for n in names
        if (n == DCP_METADATA or n.endswith(_DCP_DATA_SUFFIX)) and os.path.isfile(os.path.join(directory, n))
    }


def root_kind(location: Location) -> tuple[str, dict[str, Any] | None]:
    """Whether ``location`` holds a committed zdcp checkpoint, the one answer every caller
    asks for: :data:`COMMITTED` and zdcp's record (the root's ``attributes.zdcp``); else
    :data:`NO_ROOT` (nothing committed), :data:`NOT_ZDCP` (a Zarr root zdcp did not write) or
    :data:`UNREADABLE` (a root that is no JSON, or a database that cannot be read), with None."""
    try:
        _, root = root_document(location)
    except CorruptCheckpointError:
        return UNREADABLE, None
    if root is None:
        return NO_ROOT, None
    info = zdcp_attrs(root)
    return (COMMITTED, info) if info is not None else (NOT_ZDCP, None)


def holds_commit_record(directory: str | os.PathLike[str]) -> bool:
    """Whether the local ``directory`` holds what marks a checkpoint in some layout."""
    return any(os.path.isfile(os.path.join(directory, layout.commit_record)) for layout in layouts())


def interrupted_saves(target: str | os.PathLike[str]) -> list[str]:
    """Pending directories of a local ``target`` left by saves that never committed (or that
    are still running)."""
    target = os.path.realpath(target)
    return pending_directories(os.path.dirname(target), f".{os.path.basename(target)}{PENDING_INFIX}")


def pending_directories(directory: str | os.PathLike[str], prefix: str = ".") -> list[str]:
    """The pending directories in ``directory`` (of every target, or of those whose names
    start with ``prefix``)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        os.path.join(directory, n)
        for n in names
        if n.startswith(prefix) and len(n.rpartition(PENDING_INFIX)[2]) == 32 and PENDING_INFIX in n
    )


def pending_name(target: str, session: str | None = None) -> str:
    """The pending directory of a save to the local ``target``: named after the save's
    ``session`` (32 hex digits), or a new random name."""
    session = session or uuid.uuid4().hex
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{PENDING_INFIX}{session}")


def local_contents(directory: str) -> str:
    """What a local directory holds: :data:`EMPTY`, :data:`COMMITTED` (a zdcp checkpoint, in
    any layout, maybe beside foreign files), :data:`NOT_ZDCP` (a Zarr hierarchy zdcp did not
    write), :data:`DCP` (a DCP checkpoint) or :data:`OTHER`.

    A packed root is several files (the manifest, then a B-tree node): when another save
    swaps the directory for its own meanwhile (``renameat2(RENAME_EXCHANGE)``), the read may
    mix the two and fail. Such a read is made again, on the directory now there.
    """
    while True:
        before = _identity(directory)
        found = _contents(directory)
        if _identity(directory) == before:
            return found


def _identity(directory: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(directory)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _contents(directory: str) -> str:
    if not os.path.isdir(directory):
        return OTHER
    if not os.listdir(directory):
        return EMPTY
    kind, _ = root_kind(Location(directory))
    if kind in (COMMITTED, NOT_ZDCP):
        return kind
    return DCP if os.path.isfile(os.path.join(directory, DCP_METADATA)) else OTHER
