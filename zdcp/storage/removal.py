"""Removing checkpoints, and what saves and removals that never finished left: always un-commit
first (the commit record goes before anything else), so that a kill at any moment leaves either
the whole checkpoint, committed, or what is left of it un-committed, never loaded, and marked as
the leftovers of a save are (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import weakref
from typing import Any

from ..errors import CheckpointNotFoundError
from ..format.constants import SAVING_MARKER
from .contents import COMMITTED, NO_ROOT, local_contents, pending_name, root_kind
from .foreign import foreign_entries, link_entries
from .keyvalue import encode_json
from .layout import layouts
from .location import Location
from .oscalls import exchange, process_identity, process_running, sync_directory

__all__ = [
    "SavesUnderWay",
    "SAVES_UNDER_WAY",
    "save_is_dead",
    "remove_committed",
    "remove_interrupted",
    "remove_dead_saves",
    "uncommit",
    "delete_marked",
]


class SavesUnderWay:
    """This process's saves that have neither committed nor been abandoned, by where they write
    (a pending directory; an object-store location and the save's session), each with the
    thread that began it.

    What a save of this process left may go unless the save is here and its thread is another
    one, still running (:meth:`running`). A thread runs one save at a time (DCP's save returns
    when it is over, and async saves run one after another on one background thread), so a
    save that a thread begins means that its earlier one is over: failed without a commit and
    without being abandoned, as a ``dcp.save`` through a ``ZarrWriter`` is when another rank's
    writes failed (DCP gives a storage writer no failure hook). Whoever finds such a save dead
    ends it (:meth:`end`), so that it cleans up nothing later (a new save may write there by
    then).
    """

    def __init__(self) -> None:
        self._saves: dict[str, tuple[threading.Thread, object, weakref.ref[Any]]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, save: Any, token: object) -> None:
        """Register ``save`` (with a ``forget()`` method) as under way at ``name``; ``token``
        identifies it to :meth:`discard`."""
        with self._lock:
            self._saves[name] = (threading.current_thread(), token, weakref.ref(save))

    def discard(self, name: str, token: object) -> None:
        """The save ``token`` at ``name`` is over (committed or abandoned); another registered
        there since stays."""
        with self._lock:
            if name in self._saves and self._saves[name][1] is token:
                del self._saves[name]

    def running(self, name: str) -> bool:
        """Whether the save ``name`` may still be running."""
        with self._lock:
            thread = self._saves[name][0] if name in self._saves else None
        return thread is not None and thread is not threading.current_thread() and thread.is_alive()

    def end(self, name: str) -> None:
        """The save at ``name`` was found dead: it is forgotten, and told to clean up nothing."""
        with self._lock:
            _, _, ref = self._saves.pop(name, (None, None, lambda: None))
        save = ref()
        if save is not None:
            save.forget()


#: This process's saves under way.
SAVES_UNDER_WAY = SavesUnderWay()


def save_is_dead(marker: Any, name: str, *, local: bool) -> bool:
    """Whether the save or removal whose saving marker is ``marker`` (parsed) provably ended
    without a commit, so that what it left may be removed: a save's (or on an object store, a
    removal's) when its process no longer runs (same host, boot and PID namespace), or when it
    is a save of this process that is not running (:class:`SavesUnderWay`, where it is known as
    ``name``: it is then ended). A removal's pending directory (``local``) is always dead: it
    was un-committed and renamed aside first, and deleting it twice is harmless; on an object
    store a removal still deleting could delete a new save's objects. Anything else may be
    running on another host."""
    if not isinstance(marker, dict):
        return False  # no marker (yet), or not one of ours: nothing proves anything
    removing = marker.get("removing") is True
    if removing and local:
        return True
    owner, me = marker.get("owner"), process_identity()
    if owner == me and me is not None:
        if removing or SAVES_UNDER_WAY.running(name):
            return False
        SAVES_UNDER_WAY.end(name)
        return True
    return process_running(owner) is False


def remove_committed(location: Location) -> None:
    """Delete the committed zdcp checkpoint at ``location``, un-committing it first, so that a
    kill at any moment leaves either the whole checkpoint, committed, or what is left of it
    un-committed (never loaded) and marked as this process's, as a save's leftovers are:

    - local: a marker naming this process goes into the directory, the directory is renamed to
      a pending name (:func:`~zdcp.storage.contents.pending_name`) and the rename made
      durable, then it is deleted (:func:`remove_dead_saves` removes what a kill left). Where
      the directory holds foreign files (:mod:`~zdcp.storage.foreign`), a directory of hard
      links to them first takes its place (swapped atomically where the filesystem can; where
      it cannot, a kill between the two renames leaves the path missing and the links in that
      directory, which nothing deletes), so that they stay at the path;
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
    foreign = foreign_entries(target, COMMITTED)
    kept, carrying = _keep_foreign(target, foreign) if foreign else (None, None)
    with open(os.path.join(target, SAVING_MARKER), "wb") as f:
        f.write(marker)
    try:
        if kept is not None and exchange(kept, target):
            aside = kept
            os.unlink(os.path.join(target, SAVING_MARKER))  # the links' marker, now at the path
        else:
            aside = pending_name(target)
            os.rename(target, aside)
            if kept is not None:
                try:
                    os.rename(kept, target)
                except BaseException:
                    os.rename(aside, target)  # the checkpoint back, with the removal's marker
                    os.unlink(os.path.join(target, SAVING_MARKER))
                    raise
                os.unlink(os.path.join(target, SAVING_MARKER))
    finally:
        if kept is not None:
            SAVES_UNDER_WAY.discard(kept, carrying)
    sync_directory(os.path.dirname(target))
    shutil.rmtree(aside)


def _keep_foreign(target: str, foreign: list[str]) -> tuple[str, _Carrying]:
    """A new pending directory of hard links to the ``foreign`` entries of ``target``, to
    take its place, and what it is known as among :data:`SAVES_UNDER_WAY` until the removal is
    over. Its marker says so (``carrying``): after a kill, :func:`remove_dead_saves` deletes
    it, or moves it to the target where the target is missing (a kill between two renames)."""
    kept, carrying = pending_name(target), _Carrying()
    os.mkdir(kept)
    SAVES_UNDER_WAY.add(kept, carrying, carrying)
    try:
        with open(os.path.join(kept, SAVING_MARKER), "wb") as f:
            f.write(encode_json({"owner": process_identity(), "carrying": True, "target": target}))
        link_entries(target, foreign, kept)
    except BaseException:
        SAVES_UNDER_WAY.discard(kept, carrying)
        shutil.rmtree(kept, ignore_errors=True)
        raise
    return kept, carrying


class _Carrying:
    """A removal's directory of links, under way (:class:`SavesUnderWay` entries need one)."""

    def forget(self) -> None:
        """Nothing to stop: the removal deletes nothing of it."""


def remove_interrupted(location: Location) -> bool:
    """Delete what a save or a removal that never finished left under an object-store prefix
    (its marker, and no commit record); True if there was such a thing. The caller knows that
    nothing is saving there now (the manager, the one saver of its directory): a marker proves
    a save dead only where its process ran on this host (:func:`save_is_dead`)."""
    found = location.wait(location.read_marker())
    if found.state != "value" or root_kind(location)[0] != NO_ROOT:
        return False
    delete_marked(location, found.stamp.generation)
    return True


def remove_dead_saves(pending: list[str]) -> None:
    """Delete those of the ``pending`` directories whose save provably ended without a commit
    (:func:`save_is_dead`), and every one a removal left (:func:`remove_committed`). Any other
    is left alone: it may be running on another host."""
    for path in pending:
        try:
            with open(os.path.join(path, SAVING_MARKER), "rb") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            continue  # no marker (yet): nothing proves anything
        if not save_is_dead(marker, path, local=True):
            continue
        target = marker.get("target") if marker.get("carrying") is True else None
        if isinstance(target, str) and not os.path.lexists(target):
            # A removal's links to the foreign files, killed between its two renames (no
            # atomic exchange): the links take the place the removal meant them to.
            os.rename(path, target)
            os.unlink(os.path.join(target, SAVING_MARKER))
        else:
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
