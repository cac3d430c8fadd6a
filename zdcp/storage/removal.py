"""Removing checkpoints, and what saves and removals that never finished left: always un-commit
first (the commit record goes before anything else), so that a kill at any moment leaves either
the whole checkpoint, committed, or what is left of it un-committed, never loaded, and marked as
the leftovers of a save are (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil

from ..errors import CheckpointNotFoundError
from ..format.constants import SAVING_MARKER
from .contents import COMMITTED, NO_ROOT, local_contents, pending_name, root_kind
from .keyvalue import encode_json
from .layout import layouts
from .location import Location
from .oscalls import process_identity, process_running, sync_directory

__all__ = [
    "SAVES_UNDER_WAY",
    "remove_committed",
    "remove_interrupted",
    "remove_dead_saves",
    "uncommit",
    "delete_marked",
]

#: The pending directories of this process's saves that have neither committed nor been
#: abandoned (:class:`~zdcp.storage.saving.LocalSave` adds and removes them whole, so no lock
#: is needed): the only ones of this process that :func:`remove_dead_saves` leaves alone.
SAVES_UNDER_WAY: set[str] = set()


def remove_committed(location: Location) -> None:
    """Delete the committed zdcp checkpoint at ``location``, un-committing it first, so that a
    kill at any moment leaves either the whole checkpoint, committed, or what is left of it
    un-committed (never loaded) and marked as this process's, as a save's leftovers are:

    - local: a marker naming this process goes into the directory, the directory is renamed to
      a pending name (:func:`~zdcp.storage.contents.pending_name`) and the rename made
      durable, then it is deleted (:func:`remove_dead_saves` removes what a kill left);
    - object store: the marker is written, then the commit record deleted, then the rest, the
      marker last (:func:`remove_interrupted` removes what a kill left).

    Raises :class:`~zdcp.CheckpointNotFoundError` when the location holds no committed zdcp
    checkpoint; nothing is deleted then.
    """
    url = location.url
    marker = encode_json({"owner": process_identity(), "removing": True, "target": url})
    if location.local_dir is None:
        if root_kind(location)[0] != COMMITTED:
            raise CheckpointNotFoundError(f"no committed zdcp checkpoint at {url}; nothing removed")
        generation = location.write_marker(marker)
        uncommit(location)
        delete_marked(location, generation)
        return
    target = os.path.realpath(location.local_dir.rstrip("/"))
    if local_contents(target) != COMMITTED:
        raise CheckpointNotFoundError(f"no committed zdcp checkpoint at {target}; nothing removed")
    with open(os.path.join(target, SAVING_MARKER), "wb") as f:
        f.write(marker)
    aside = pending_name(target)
    os.rename(target, aside)
    sync_directory(os.path.dirname(target))
    shutil.rmtree(aside)


def remove_interrupted(location: Location) -> bool:
    """Delete what a save or a removal that never finished left under an object-store prefix
    (its marker, and no commit record); True if there was such a thing. The caller knows that
    nothing is saving there now: on an object store, a marker cannot tell a dead save from a
    running one."""
    found = location.wait(location.read_marker())
    if found.state != "value" or root_kind(location)[0] != NO_ROOT:
        return False
    delete_marked(location, found.stamp.generation)
    return True


def remove_dead_saves(pending: list[str]) -> None:
    """Delete those of the ``pending`` directories whose save provably ended without a commit:
    its process no longer runs (same host, boot and PID namespace), or it is this process and
    the save is not under way; and every one a removal left (:func:`remove_committed`: it was
    un-committed, whoever removes it). Any other is left alone: it may be running on another
    host."""
    me = process_identity()
    for path in pending:
        try:
            with open(os.path.join(path, SAVING_MARKER), "rb") as f:
                marker = json.load(f)
            owner, removing = marker.get("owner"), marker.get("removing") is True
        except (OSError, ValueError, AttributeError):
            continue  # no marker (yet): nothing proves anything
        if removing:
            dead = True
        elif owner == me and me is not None:
            dead = path not in SAVES_UNDER_WAY
        else:
            dead = process_running(owner) is False
        if dead:
            shutil.rmtree(path, ignore_errors=True)


def uncommit(location: Location) -> None:
    """Delete the commit record under an object-store prefix: every layout's (the checkpoint
    may be of any), so that no load finds the checkpoint any more."""
    for deleting in [location.kv.write(layout.commit_record, None) for layout in layouts()]:
        location.wait(deleting)


def delete_marked(location: Location, generation: bytes) -> None:
    """Delete everything under an object-store prefix, its marker (of ``generation``) last:
    until it goes, what is left is known for the leftovers of a save or removal."""
    location.delete_all_but_marker()
    location.delete_marker(if_equal=generation)
