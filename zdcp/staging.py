"""Where a save writes, and how its result becomes the checkpoint.

A save never writes into the checkpoint's own directory. The coordinator creates a new hidden
sibling, ``.<name>.zdcp-<id>`` (``<id>`` is random, so concurrent saves never share one), every
rank writes its chunks there, the coordinator writes the ``zarr.json`` documents there with the
root document last, and then the commit moves the whole directory into place with one rename:

- no checkpoint at the path (or an empty directory): ``rename``;
- a committed checkpoint, found when the save began or committed by another save since, and
  ``overwrite``: ``renameat2(RENAME_EXCHANGE)`` swaps the two directories atomically, and the
  replaced checkpoint, now under the staging name, is deleted. A reader sees the old
  checkpoint or the new one, never neither and never a mix. Where the filesystem cannot
  exchange (not Linux, or NFS), the old one is renamed aside first (and back if the second
  rename fails), so the path is missing between the two renames; docs/reliability.md says what
  is left after a crash;
- a committed checkpoint without ``overwrite`` (another save committed since this one began):
  the save is discarded with :class:`~zdcp.CheckpointExistsError`.

So a crash at any moment leaves the previous checkpoint untouched, plus at most a staging
directory that nothing loads (:func:`interrupted_saves` finds them). zdcp deletes only a
committed zdcp checkpoint that a save with ``overwrite`` replaced (its whole directory, files
added to it since included), and the staging directory of a save that failed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CheckpointExistsError
from .layout import zdcp_attrs
from .storage import METADATA_KEY, SAVING_MARKER

__all__ = ["Staging", "stage", "interrupted_saves", "STAGING_INFIX"]

#: Staging directories are named ``.<name>` + STAGING_INFIX + <32 hex digits>``.
STAGING_INFIX = ".zdcp-"


@dataclass(frozen=True)
class Staging:
    """A save in progress: ``path`` is written, then committed to ``target``."""

    target: str
    path: str
    overwrite: bool

    def commit(self, sync: Callable[[str], None] | None) -> None:
        """Move the staged checkpoint to the target (see the module docstring), deciding by what
        the target holds now: another save may have committed there since this one began.

        ``sync(path)`` makes everything under the filesystem of ``path`` durable; it runs after
        the moves so that the new name survives a crash (None: no syncing).
        """
        try:
            os.rename(self.path, self.target)  # no target, or an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            self._replace()
        if sync is not None:
            sync(os.path.dirname(self.target))

    def _replace(self) -> None:
        if not self.overwrite or _kind(self.target) != "committed":
            self.abandon()
            raise CheckpointExistsError(
                f"{self.target} was written by another save while this one ran; this save is discarded"
            )
        if _exchange(self.path, self.target):
            _delete_replaced(self.path)
            return
        aside = _staging_name(self.target)
        os.rename(self.target, aside)
        try:
            os.rename(self.path, self.target)
        except BaseException:
            os.rename(aside, self.target)  # put the previous checkpoint back
            raise
        _delete_replaced(aside)

    def abandon(self) -> None:
        """Delete the staging directory of a failed save."""
        shutil.rmtree(self.path, ignore_errors=True)


def stage(target: str, *, overwrite: bool, marker: dict[str, object]) -> Staging:
    """Check that a save may go to ``target``, then create its staging directory (with the
    in-progress ``marker`` in it).

    Raises :class:`~zdcp.CheckpointExistsError` when the target holds a committed checkpoint
    (without ``overwrite``), or anything zdcp did not write (always).
    """
    target = os.path.realpath(target)
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise CheckpointExistsError(f"{target} exists and is not a directory")
        kind = _kind(target)
        if kind == "other":
            raise CheckpointExistsError(f"{target} is not empty and holds no zdcp checkpoint; not replacing it")
        if kind == "foreign":
            raise CheckpointExistsError(f"{target} holds a Zarr hierarchy that zdcp did not write; not replacing it")
        if kind == "committed" and not overwrite:
            raise CheckpointExistsError(f"{target} already holds a committed checkpoint; pass overwrite=True")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    path = _staging_name(target)
    os.mkdir(path)
    with open(os.path.join(path, SAVING_MARKER), "w") as f:
        json.dump({**marker, "target": target}, f)
    return Staging(target, path, overwrite)


def interrupted_saves(target: str) -> list[str]:
    """Staging directories of ``target`` left by saves that never committed (or still running)."""
    target = os.path.realpath(target)
    parent, prefix = os.path.dirname(target), f".{os.path.basename(target)}{STAGING_INFIX}"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, n) for n in names if n.startswith(prefix) and len(n) == len(prefix) + 32)


def _staging_name(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{STAGING_INFIX}{uuid.uuid4().hex}")


def _kind(directory: str) -> str:
    """What a directory holds: empty, committed (a zdcp checkpoint), foreign (a Zarr hierarchy
    zdcp did not write) or other."""
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


def _delete_replaced(directory: str) -> None:
    """Delete the checkpoint a commit replaced. The new one is in place by now, so a failure
    here only leaves the old one behind (under a staging name), with a warning."""
    try:
        if _kind(directory) in ("committed", "empty"):
            shutil.rmtree(directory)
    except OSError as e:
        warnings.warn(f"the replaced checkpoint was left at {directory}: {e}", stacklevel=3)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _libc_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


_RENAMEAT2 = _libc_renameat2()
