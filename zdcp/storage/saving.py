"""The commit protocol of a save: where it writes, and how its result becomes the checkpoint.

A save never writes into the checkpoint's own directory. The coordinator creates a new hidden
sibling, the *pending directory* ``.<name>.zdcp-<id>`` (``<id>`` is random, so concurrent saves
never share one), every rank writes its chunks there, the coordinator writes the ``zarr.json``
documents there with the root document last, and then the commit moves the whole directory
into place with one rename:

- no checkpoint at the path (or an empty directory): ``rename``;
- a committed checkpoint (zdcp's, or a DCP checkpoint), found when the save began or committed
  by another save since, and ``overwrite``; or a directory of foreign files only: the foreign
  files (:mod:`~zdcp.storage.foreign`) are hard-linked into the pending directory, then
  ``renameat2(RENAME_EXCHANGE)`` swaps the two directories atomically, and the replaced
  directory, now under the pending name, is deleted (a foreign entry that appeared in it
  meanwhile is moved over first). A load that starts finds the
  old checkpoint or the new one, never neither and never a mix (a reader already reading
  while the checkpoint is replaced may read the new chunks: replace only what nobody reads).
  Where the filesystem cannot exchange (not Linux, or NFS), the old one is renamed aside first
  (and back if the second rename fails), so the path is missing between the two renames;
  docs/reliability.md says what is left after a crash;
- a committed checkpoint without ``overwrite`` (another save committed since this one began):
  the save is discarded with :class:`~zdcp.CheckpointExistsError`.

So a crash at any moment leaves the previous checkpoint untouched, plus at most a pending
directory that nothing loads (:func:`~zdcp.storage.contents.interrupted_saves` finds them).
zdcp deletes only a checkpoint that a save with ``overwrite`` replaced (zdcp's or DCP's; the
foreign files beside it are kept), and the pending directory of a save that failed.

**Object stores** (``s3://``, ``gs://``, ``memory://``) have no rename. There a save writes in
place, under the checkpoint's own prefix, and the root document, written last, is the commit
(:class:`InPlaceSave`). The coordinator first creates the marker ``__zdcp_saving__`` with a
conditional write that succeeds only if it does not exist yet, so of two saves started at the
same time one fails cleanly; a later save finds the marker of an interrupted (or running) one
and refuses unless ``overwrite``, or unless the marker's save provably ended
(:func:`~zdcp.storage.removal.save_is_dead`: its process is gone, or it is a finished save of
this process), whose leftovers it removes. A failed save deletes what it wrote, its marker last,
retrying each request for a few seconds only (:func:`~zdcp.storage.retries.cleanup_schedule`):
where the store is still failing, what is left stays under the marker for the next save.
Having found neither a marker nor a checkpoint, a save looks for a committed one again once its
marker exists: another save may have begun and committed between the first look and the marker.
Replacing a committed checkpoint deletes its root document first, so no load that starts finds
the old root over new chunks, and then the old objects: on an object store, the old checkpoint
is gone before the new one commits (save each step under a new prefix to keep the previous one
until then).

Within the protocol, the layout of the save (:mod:`zdcp.storage.layout`) writes the chunks and
commits the hierarchy (:meth:`~zdcp.storage.layout.ChunkSink.commit`, the ``write_root`` step of
a commit); removing a committed checkpoint, and what interrupted saves left, is
:mod:`zdcp.storage.removal`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import tensorstore as ts

from ..errors import CheckpointExistsError, CorruptCheckpointError, StorageError, UsageError, ZdcpError
from ..format.constants import SAVING_MARKER
from .contents import (
    COMMITTED,
    DCP,
    EMPTY,
    NOT_ZDCP,
    OTHER,
    UNREADABLE,
    interrupted_saves,
    local_contents,
    pending_name,
    root_kind,
)
from .foreign import check_links, foreign_entries, link_entries, zarr_remains
from .keyvalue import encode_json
from .location import Location
from .oscalls import FilesystemSync, exchange, process_identity
from .removal import SAVES_UNDER_WAY, delete_marked, remove_dead_saves, save_is_dead, uncommit
from .retries import cleanup_schedule

__all__ = ["LocalSave", "InPlaceSave", "WriteRoot", "begin_save", "save_location", "check_location"]

#: What a save's commit writes: the root document and whatever becomes visible with it. It is
#: given ``confirm``, which raises :class:`~zdcp.CheckpointExistsError` when the location is no
#: longer this save's, and calls it before writing anything that another save could see.
WriteRoot = Callable[[Callable[[], None]], None]


def _nothing_to_confirm() -> None:
    """A local save's pending directory is its own: the move decides (``LocalSave._replace``)."""


class LocalSave:
    """A local save in progress: the pending directory ``path`` is written, then committed to
    ``target``. Its commit makes everything written durable, through a handle opened before
    any write (:attr:`syncs_at_commit`).

    A save that does not commit deletes its pending directory: when it is abandoned, and also
    when it is forgotten without either (``dcp.save`` has no hook through which a failed save
    could abandon it, so the writer's last reference going away has to do).
    """

    def __init__(self, target: str, path: str, overwrite: bool, session: str):
        self.target = target
        self.path = path
        self.overwrite = overwrite
        self.session = session
        #: Where the ranks write: the pending directory.
        self.location = Location(path)
        # Opened before any write of the save, for the syncs to report their failures.
        self.durable = FilesystemSync(path)
        token = object()  # this save, among those that ever used the path
        SAVES_UNDER_WAY.add(path, self, token)
        self._discard = weakref.finalize(self, _discard_pending, path, self.durable, token)
        self._token = token

    #: The commit syncs the filesystem: a single process need not sync its writes before.
    syncs_at_commit = True

    def commit(self, write_root: WriteRoot, *, sync: bool) -> None:
        """Write the root document (``write_root``) into the pending directory, make
        everything durable (when ``sync``), and move it to the target (see the module
        docstring), deciding by what the target holds now: another save may have committed
        there since this one began. Until the move succeeds, a failure removes the pending
        directory."""
        try:
            write_root(_nothing_to_confirm)
            self.location.delete_marker()
            if sync:
                self.durable.sync()  # everything written is on disk before the move
            try:
                os.rename(self.path, self.target)  # no target, or an empty directory
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                self._replace()
        except BaseException:
            self.abandon()
            raise
        self._discard.detach()
        SAVES_UNDER_WAY.discard(self.path, self._token)
        try:
            if sync:
                self.durable.sync()  # the new name survives a crash (same filesystem)
        finally:
            self.durable.close()

    def _replace(self) -> None:
        """Commit onto a target that is not empty: a checkpoint (zdcp's or DCP's) that this
        save may replace, or foreign files only. The foreign files are linked into the pending
        directory, then the two directories swap places."""
        kind = local_contents(self.target)
        if kind == EMPTY:  # emptied since the rename failed
            os.rename(self.path, self.target)
            return
        if kind not in (COMMITTED, DCP, OTHER) or (kind != OTHER and not self.overwrite):
            raise CheckpointExistsError(
                f"{self.target} was written by another save while this one ran; this save is discarded"
            )
        carried = foreign_entries(self.target, kind)
        _refuse_remains(self.target, carried if kind == OTHER else [])
        link_entries(self.target, carried, self.path)
        if exchange(self.path, self.target):
            _delete_replaced(self.path, kind, self.target, carried)
            return
        aside = pending_name(self.target)
        os.rename(self.target, aside)
        try:
            os.rename(self.path, self.target)
        except BaseException:
            os.rename(aside, self.target)  # put the previous checkpoint back
            raise
        _delete_replaced(aside, kind, self.target, carried)

    def abandon(self) -> None:
        """Delete the pending directory of a failed save."""
        self._discard()

    def forget(self) -> None:
        """Another save found this one dead and removes what it left: this one deletes
        nothing any more (a new save may have taken the path)."""
        self._discard.detach()
        self.durable.close()


def _discard_pending(path: str, durable: FilesystemSync, token: object) -> None:
    durable.close()
    shutil.rmtree(path, ignore_errors=True)
    SAVES_UNDER_WAY.discard(path, token)


class InPlaceSave:
    """A save written in place under an object store prefix (see the module docstring).

    ``generation`` is the storage generation of this save's marker: the save owns the prefix
    while the marker is unchanged, and commits or cleans up only then. Unlike a
    :class:`LocalSave`, one that is forgotten without either does not clean up: that would be
    requests to a remote store at whatever moment the garbage collector picks, which may wait
    for minutes on an unreachable one; the next save to the prefix finds its marker.
    """

    #: An object store has made a write durable when it acknowledges it.
    syncs_at_commit = False

    def __init__(self, location: Location, generation: bytes, session: str):
        #: Where the ranks write: the prefix itself.
        self.location = location
        self.generation = generation
        self.session = session
        self.name = in_place_name(location, session)
        SAVES_UNDER_WAY.add(self.name, self, self)

    def commit(self, write_root: WriteRoot, *, sync: bool) -> None:
        """Write the root document (``write_root``), the commit, if the prefix is still this
        save's; then remove the marker (a failure there only leaves a harmless marker beside
        the root)."""
        # The marker is read while write_root prepares what it commits (a packed save's merge
        # reads the ranks' databases first), one round trip fewer than reading it before.
        marker = self.location.read_marker()
        try:
            write_root(lambda: _check_owned(self.location, self.generation, marker))
        except BaseException:
            self.abandon()
            raise
        try:
            self.release()
        except ZdcpError as e:
            warnings.warn(f"{self.location.url} is committed, but its save marker stays: {e}", stacklevel=3)

    def release(self) -> None:
        """Delete the marker, if it is still this save's."""
        SAVES_UNDER_WAY.discard(self.name, self)
        self.location.delete_marker(if_equal=self.generation)

    def abandon(self) -> None:
        """Delete what a failed save wrote, its marker last, unless another save has taken the
        prefix over (``overwrite``) since: then what is there is that save's."""

        def delete_what_it_wrote(location: Location) -> None:
            try:
                _check_owned(location, self.generation)
            except CheckpointExistsError:
                return
            delete_marked(location, self.generation)

        self._clean_up(delete_what_it_wrote, "what the failed save wrote stays under its marker")

    def release_after_failure(self) -> None:
        """:meth:`release`, after a failure."""
        self._clean_up(lambda location: location.delete_marker(if_equal=self.generation), "its marker stays")

    def _clean_up(self, work: Callable[[Location], None], left: str) -> None:
        """``work`` on the location, after a failure, each request retried for a few seconds
        only: the save has failed already, maybe for an outage that goes on. What cannot be
        deleted now stays under the marker, which the next save to the prefix finds dead
        (:func:`~zdcp.storage.removal.save_is_dead`) and removes; a warning says so (``left``),
        and the error raised stays the save's own. The save stays under way until then, so that
        no other save of this process takes its marker for a dead one's meanwhile."""
        location = self.location.with_retries(cleanup_schedule())
        try:
            work(location)
        except StorageError as e:
            warnings.warn(f"{location.url}: {left}, for the next save to it to remove: {e}", stacklevel=4)
        finally:
            SAVES_UNDER_WAY.discard(self.name, self)

    def forget(self) -> None:
        """Another save found this one dead and removes what it left."""


def in_place_name(location: Location, session: str) -> str:
    """What a save to an object-store ``location`` is known as among
    :data:`~zdcp.storage.removal.SAVES_UNDER_WAY`."""
    return f"{location.url}#{session}"


def _check_owned(location: Location, generation: bytes, marker: ts.Future | None = None) -> None:
    """Raise unless the marker (``marker``, a read of it under way) is still this save's."""
    found = location.wait(location.read_marker() if marker is None else marker)
    if found.state != "value" or found.stamp.generation != generation:
        raise CheckpointExistsError(
            f"another save to {location.url} took it over while this one ran; this save is not committed"
        )


def begin_save(
    location: Location, *, overwrite: bool, session: str, marker: dict[str, Any]
) -> LocalSave | InPlaceSave:
    """Check that a save may go to ``location``, then prepare it: a pending directory
    beside a local target, named after ``session`` (:func:`save_location`), or the in-progress
    marker under an object store prefix. The marker records ``marker``, the session and this
    process (so that a later save can tell a save whose process died, and remove what it left).

    Raises :class:`~zdcp.CheckpointExistsError` when the target holds a committed checkpoint
    (without ``overwrite``), an interrupted or running save (object stores, without
    ``overwrite``), a running save of this session (local), or anything zdcp did not write
    (always).
    """
    marker = {**marker, "session": session, "owner": process_identity()}
    if location.local_dir is None:
        return _begin_in_place(location, overwrite=overwrite, session=session, marker=marker)
    return _begin_beside(_local_target(location), overwrite=overwrite, session=session, marker=marker)


def save_location(location: Location, session: str) -> Location:
    """Where the ranks of a save to ``location`` with ``session`` write: the pending directory
    of a local target, the prefix itself on an object store. Each rank finds it from what it
    knows, so nothing that differs from save to save travels in a (cached) plan."""
    if location.local_dir is None:
        return location
    return Location(pending_name(_local_target(location), session))


def check_location(location: Location, session: str) -> None:
    """Refuse to write where the coordinator did not prepare a save of ``session``: a rank
    must never create a pending directory (or write into an object-store prefix) itself."""
    try:
        marker = location.marker()
    except CorruptCheckpointError:
        marker = None
    if not isinstance(marker, dict) or marker.get("session") != session:
        raise UsageError(
            f"{location.url} is not where the coordinator prepared this save (DCP's cached plans out of step "
            "with the writer's?); this rank writes nothing there"
        )


def _local_target(location: Location) -> str:
    assert location.local_dir is not None
    return os.path.realpath(location.local_dir.rstrip("/"))


def _begin_in_place(location: Location, *, overwrite: bool, session: str, marker: dict[str, object]) -> InPlaceSave:
    url = location.url
    if not location.spec["path"]:
        # Replacing or cleaning up would delete every object of the bucket (or memory store).
        raise UsageError(f"{url}: save checkpoints under a prefix (s3://bucket/run/step_100), not at the root")
    # All that decides where the save stands, read at once: one round trip.
    reading_marker, listing = location.read_marker(), location.kv.list()
    committed = _committed(location, overwrite)
    found = location.wait(reading_marker)
    if not committed and found.state == "value" and not overwrite and not _dead_save(location, found.value):
        raise CheckpointExistsError(
            f"{url} holds an interrupted zdcp save, or one still running; pass overwrite=True to replace it "
            "(make sure no other save to it is running)"
        )
    if not committed and found.state != "value" and location.wait(listing):
        raise CheckpointExistsError(f"{url} holds objects that are not a zdcp checkpoint; not deleting them")
    # Take the prefix: create the marker, or replace the one found, only if nobody else did since.
    expected = found.stamp.generation if found.state == "value" else _NO_VALUE
    content = encode_json({**marker, "target": url})
    generation = location.write_marker(content, if_equal=expected) or _written_before(location, content)
    if not generation:
        raise CheckpointExistsError(f"another save to {url} started at the same time; this one is not written")
    in_place = InPlaceSave(location, generation, session)
    if expected == _NO_VALUE and not committed:
        # Another save may have begun and committed (its marker gone again) between the reads
        # above and this marker's creation: what this marker guards starts only now.
        try:
            committed = _committed(location, overwrite)
        except BaseException:
            in_place.release_after_failure()  # whatever is there stays as it is
            raise
    try:
        if committed:
            uncommit(location)  # first: no load finds the old root over new chunks
        if committed or found.state == "value":
            location.delete_all_but_marker()  # what is left of the replaced checkpoint or the interrupted save
    except BaseException:
        in_place.abandon()  # this save had begun to replace what was there: the rest goes too
        raise
    return in_place


def _written_before(location: Location, content: bytes) -> bytes:
    """The generation of the marker when it holds ``content``, this save's (its session is
    new): the conditional write that created it succeeded, but its answer was lost, and the
    retry found the marker there (S3 412, GCS 412); else empty."""
    found = location.wait(location.read_marker(), "reading the saving marker")
    return found.stamp.generation if found.state == "value" and found.value == content else b""


def _dead_save(location: Location, marker: bytes) -> bool:
    """Whether the saving ``marker`` found under ``location`` is a save's (or a removal's)
    that provably ended without a commit."""
    try:
        parsed = json.loads(marker)
    except ValueError:
        return False
    session = parsed.get("session") if isinstance(parsed, dict) else None
    return save_is_dead(parsed, in_place_name(location, session if isinstance(session, str) else ""), local=False)


def _committed(location: Location, overwrite: bool) -> bool:
    """Whether ``location`` holds a committed zdcp checkpoint that this save may replace
    (``overwrite``); raises if it holds one otherwise, or a hierarchy zdcp did not write."""
    url = location.url
    kind, _ = root_kind(location)
    if kind == UNREADABLE:  # not JSON: certainly not a checkpoint of ours
        raise CheckpointExistsError(f"{url} holds a zarr.json zdcp did not write; not replacing it")
    if kind == NOT_ZDCP:
        raise CheckpointExistsError(f"{url} holds a Zarr hierarchy that zdcp did not write; not replacing it")
    if kind != COMMITTED:
        return False
    if not overwrite:
        raise CheckpointExistsError(
            f"Checkpoint already exists: {url} holds a committed checkpoint; pass overwrite=True"
        )
    return True


#: tensorstore's storage generation of a key that has no value: a write on this condition
#: creates the key only if it does not exist (S3 ``If-None-Match: *``).
_NO_VALUE = b"\x02"


def _begin_beside(target: str, *, overwrite: bool, session: str, marker: dict[str, Any]) -> LocalSave:
    """The pending directory of a local save, with the in-progress ``marker`` in it; first,
    what dead saves to the same target left is removed."""
    foreign: list[str] = []
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise CheckpointExistsError(f"{target} exists and is not a directory")
        kind = local_contents(target)
        _check_replaceable(target, kind, overwrite)
        if kind != EMPTY:
            foreign = foreign_entries(target, kind)
        _refuse_remains(target, foreign if kind == OTHER else [])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    remove_dead_saves(interrupted_saves(target))
    path = pending_name(target, session)
    try:
        os.mkdir(path)
    except FileExistsError:
        raise CheckpointExistsError(f"another save of this job to {target} is still running ({path})") from None
    save = LocalSave(target, path, overwrite, session)
    try:
        check_links(target, foreign, path)  # the commit could not keep them: refuse before writing
    except BaseException:
        save.abandon()
        raise
    with open(os.path.join(path, SAVING_MARKER), "w") as f:
        json.dump({**marker, "target": target}, f)
    return save


def _refuse_remains(target: str, foreign: list[str]) -> None:
    """Raise :class:`~zdcp.CheckpointExistsError` where the entries ``foreign`` of ``target``,
    which holds no checkpoint, look like the remains of one (:func:`zarr_remains`)."""
    remains = zarr_remains(target, foreign)
    if remains:
        raise CheckpointExistsError(
            f"{target} holds no zdcp checkpoint but what looks like part of one ({', '.join(remains)}); "
            "not replacing it"
        )


def _check_replaceable(target: str, kind: str, overwrite: bool) -> None:
    """Raise :class:`~zdcp.CheckpointExistsError` unless a save may commit to the local
    ``target``, which holds ``kind`` (:func:`~zdcp.storage.contents.local_contents`): a
    checkpoint (zdcp's or DCP's) only with ``overwrite``, a Zarr hierarchy zdcp did not write
    never. Foreign files alone are no obstacle: the commit keeps them."""
    if kind == NOT_ZDCP:
        raise CheckpointExistsError(f"{target} holds a Zarr hierarchy that zdcp did not write; not replacing it")
    if kind in (COMMITTED, DCP) and not overwrite:
        which = "committed" if kind == COMMITTED else "DCP"
        raise CheckpointExistsError(
            f"Checkpoint already exists: {target} holds a {which} checkpoint; pass overwrite=True"
        )


def _delete_replaced(directory: str, kind: str, target: str, carried: list[str]) -> None:
    """Delete the directory a commit replaced, which held ``kind`` (its checkpoint, and the
    foreign files of which ``carried`` are linked into the new ``target``). Foreign files that arrived there while
    the commit ran are moved into ``target`` first. The new checkpoint is in place by now, so a
    failure here only leaves the old directory behind (under a pending name), with a warning."""
    try:
        for name in sorted(set(foreign_entries(directory, kind)) - set(carried)):
            os.rename(os.path.join(directory, name), os.path.join(target, name))
        shutil.rmtree(directory)
    except (OSError, ZdcpError) as e:
        warnings.warn(f"the replaced checkpoint was left at {directory}: {e}", stacklevel=3)
