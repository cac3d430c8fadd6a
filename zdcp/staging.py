"""Where a save writes, and how its result becomes the checkpoint.

A save never writes into the checkpoint's own directory. The coordinator creates a new hidden
sibling, ``.<name>.zdcp-<id>`` (``<id>`` is random, so concurrent saves never share one), every
rank writes its chunks there, the coordinator writes the ``zarr.json`` documents there with the
root document last, and then the commit moves the whole directory into place with one rename:

- no checkpoint at the path yet (or an empty directory): ``rename``, which fails, leaving the
  path alone, if another save committed there in the meantime;
- a committed checkpoint and ``overwrite``: ``renameat2(RENAME_EXCHANGE)`` swaps the two
  directories atomically, and the replaced checkpoint, now under the staging name, is deleted.
  A reader sees the old checkpoint or the new one, never neither and never a mix. Where the
  filesystem cannot exchange (not Linux, or NFS), the old one is renamed aside first and the
  path is missing between the two renames; docs/reliability.md says what is left after a crash.

So a crash at any moment leaves the previous checkpoint untouched, plus at most a staging
directory that nothing loads (:func:`interrupted_saves` finds them). Only what zdcp wrote is ever
deleted: a committed zdcp checkpoint it replaces, or the staging directory of a save that failed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
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
    replaces: bool  # the target held a committed checkpoint when the save began

    def commit(self, sync: Callable[[str], None] | None) -> None:
        """Move the staged checkpoint to the target (see the module docstring).

        ``sync(path)`` makes everything under the filesystem of ``path`` durable; it runs after
        the moves so that the new name survives a crash (None: no syncing).
        """
        if not self.replaces or not os.path.lexists(self.target):  # (removed by someone meanwhile)
            try:
                os.rename(self.path, self.target)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                shutil.rmtree(self.path, ignore_errors=True)
                raise CheckpointExistsError(
                    f"{self.target} was written by another save while this one ran; this save is discarded"
                ) from None
        elif _exchange(self.path, self.target):
            _delete_if_ours(self.path)
        else:
            aside = _staging_name(self.target)
            os.rename(self.target, aside)
            os.rename(self.path, self.target)
            _delete_if_ours(aside)
        if sync is not None:
            sync(os.path.dirname(self.target))

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
    replaces = False
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
        replaces = kind == "committed"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    path = _staging_name(target)
    os.mkdir(path)
    with open(os.path.join(path, SAVING_MARKER), "w") as f:
        json.dump({**marker, "target": target}, f)
    return Staging(target, path, replaces)


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
    root = os.path.join(directory, METADATA_KEY)
    if os.path.exists(root):
        try:
            with open(root, "rb") as f:
                doc = json.load(f)
        except ValueError:  # not JSON: certainly not a checkpoint of ours
            return "other"
        return "committed" if zdcp_attrs(doc) is not None else "foreign"
    return "empty" if not os.listdir(directory) else "other"


def _delete_if_ours(directory: str) -> None:
    if _kind(directory) in ("committed", "empty"):
        shutil.rmtree(directory)


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
