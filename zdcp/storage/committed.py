"""The read side of the commit protocol: what a location holds.

A location holds a committed checkpoint when its root ``zarr.json`` is there (the commit
record, :mod:`zdcp.storage.commit`), in either layout (:mod:`zdcp.storage.layouts`):
:func:`open_committed` finds it, reads and parses it, or says why there is none: nothing at
all, an incomplete save, or saves that never committed beside a local target.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

from .. import collector
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.catalog import Catalog
from ..format.constants import METADATA_KEY, PENDING_INFIX
from ..format.documents import zdcp_attrs
from .layouts import PACKED
from .store import Store, short_message, storage_access

__all__ = [
    "Committed",
    "open_committed",
    "root_document",
    "interrupted_saves",
    "pending_directories",
    "pending_name",
    "local_contents",
]


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint: the store of its hierarchy, in its layout, and its catalog."""

    store: Store
    catalog: Catalog


def open_committed(location: Store) -> Committed:
    """The committed checkpoint at ``location`` (a files-layout store of the place).

    Raises :class:`~zdcp.CheckpointNotFoundError` when there is nothing,
    :class:`~zdcp.IncompleteCheckpointError` when a save never committed there, and
    :class:`~zdcp.CorruptCheckpointError` when the root document is damaged.
    """
    with collector.paused():
        store, root = root_document(location)
        if root is not None:
            return Committed(store, Catalog.parse(root, location.url))
    if store.layout == PACKED or not location.is_empty():
        raise IncompleteCheckpointError(
            f"{location.url} holds an incomplete checkpoint: its save never committed (no root zarr.json)"
        )
    pending = interrupted_saves(location.url) if location.local_dir is not None else []
    if pending:
        raise IncompleteCheckpointError(
            f"no committed checkpoint at {location.url}: a save to it never committed (or is still running); "
            f"what saves left is in {', '.join(pending)}"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {location.url}")


def root_document(location: Store) -> tuple[Store, Any | None]:
    """The store of the hierarchy at ``location`` (a files-layout store of the place), in the
    layout found there, and its parsed root ``zarr.json`` (None when there is none)."""
    # Both at once, whichever the layout: the packed root document is the database's manifest
    # and then its root B-tree node, so reading it from the start saves an object store a round
    # trip over reading the manifest first to learn the layout.
    packed = Store(location.checkpoint_id, PACKED)
    files_root, packed_root = location.kv.read(METADATA_KEY), packed.kv.read(METADATA_KEY)
    try:
        found = location.wait(files_root)
        if found.state == "value":
            return location, json.loads(found.value)
        try:
            with storage_access(location.url):
                found = packed_root.result()
        except ValueError as e:  # not a refused or failed request: a damaged database
            raise CorruptCheckpointError(
                f"{location.url}: the packed database's B-tree cannot be read: {short_message(e)}"
            ) from None
        if found.state != "value":
            return location, None
        return packed, json.loads(found.value)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can parse
        raise CorruptCheckpointError(f"{location.url}/zarr.json is not valid JSON ({e!r})") from None


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
    """What a local directory holds: ``"empty"``, ``"committed"`` (a zdcp checkpoint, in
    either layout), ``"foreign"`` (a Zarr hierarchy zdcp did not write) or ``"other"``.

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
        return "other"
    if not os.listdir(directory):
        return "empty"
    try:
        _, root = root_document(Store(directory))
    except CorruptCheckpointError:  # not JSON, or a packed root that cannot be read
        return "other"
    if root is None:
        return "other"
    return "committed" if zdcp_attrs(root) is not None else "foreign"
