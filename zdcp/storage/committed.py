"""The read side of the commit protocol: what a location holds.

A location holds a committed checkpoint when its root ``zarr.json`` is there (the commit
record, :mod:`zdcp.storage.commit`); :func:`read_catalog` reads and parses it, or says why there
is none: nothing at all, an incomplete save, or saves that never committed beside a local
target.
"""

from __future__ import annotations

import json
import os
import uuid

from .. import collector
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.catalog import Catalog
from ..format.constants import METADATA_KEY, PENDING_INFIX
from ..format.documents import zdcp_attrs
from .store import Store

__all__ = ["read_catalog", "interrupted_saves", "pending_directories", "pending_name", "local_contents"]


def read_catalog(store: Store) -> Catalog:
    """The catalog of the committed checkpoint at ``store``'s location.

    Raises :class:`~zdcp.CheckpointNotFoundError` when there is nothing,
    :class:`~zdcp.IncompleteCheckpointError` when a save never committed there, and
    :class:`~zdcp.CorruptCheckpointError` when the root document is damaged.
    """
    with collector.paused():
        try:
            root = store.read_json(METADATA_KEY)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can parse
            raise CorruptCheckpointError(f"{store.url}/zarr.json is not valid JSON ({e!r})") from None
        if root is not None:
            return Catalog.parse(root, store.url)
    if not store.is_empty():
        raise IncompleteCheckpointError(
            f"{store.url} holds an incomplete checkpoint: its save never committed (no root zarr.json)"
        )
    pending = interrupted_saves(store.url) if store.local_root is not None else []
    if pending:
        raise IncompleteCheckpointError(
            f"no committed checkpoint at {store.url}: a save to it never committed (or is still running); "
            f"what saves left is in {', '.join(pending)}"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {store.url}")


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
    """What a local directory holds: ``"empty"``, ``"committed"`` (a zdcp checkpoint),
    ``"foreign"`` (a Zarr hierarchy zdcp did not write) or ``"other"``."""
    if not os.path.isdir(directory):
        return "other"
    root = os.path.join(directory, METADATA_KEY)
    if os.path.exists(root):
        try:
            with open(root, "rb") as f:
                doc = json.load(f)
        except ValueError:  # not JSON: certainly not a checkpoint of ours
            return "other"
        return "committed" if zdcp_attrs(doc) is not None else "foreign"
    return "empty" if not os.listdir(directory) else "other"
