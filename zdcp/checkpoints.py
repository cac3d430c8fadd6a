"""Finding the checkpoint to resume from in a directory of checkpoints.

Training jobs save every N steps into ``<dir>/step_<N>/`` (or ``checkpoint-<N>``, or ``<N>``).
A job restarted after a crash wants the newest one that is complete: a save killed mid-way left
no committed checkpoint (only a hidden staging directory, or an incomplete one written by other
means), and the newest committed one may even be damaged if the storage failed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ZdcpError
from .storage.commit import remove_dead_saves
from .storage.committed import open_committed, pending_directories
from .storage.store import Store
from .verify import verify as verify_checkpoint

__all__ = ["latest_checkpoint"]

_NUMBER = re.compile(r"\d+")


def latest_checkpoint(directory: str | os.PathLike[str], *, verify: bool = False) -> Path | None:
    """The newest committed zdcp checkpoint among ``directory``'s subdirectories, or None.

    Newest means the largest step number, the last number in the name (``step_100``,
    ``checkpoint-100``, ``100``); names without one come before all numbered ones. Skipped:
    hidden directories (zdcp's staging directories are), saves that never committed, roots
    that are damaged or from a newer format version, and with ``verify=True`` any checkpoint in
    which :func:`zdcp.verify` finds a fault (that reads every chunk). None when ``directory``
    does not exist or holds no such checkpoint.

    A job restarted after a crash calls it first: it also deletes the pending directories of
    saves whose process provably died (:func:`zdcp.storage.commit.remove_dead_saves`).
    """
    remove_dead_saves(pending_directories(directory))
    try:
        entries = [p for p in Path(directory).iterdir() if p.is_dir() and not p.name.startswith(".")]
    except FileNotFoundError:
        return None
    for path in sorted(entries, key=_step, reverse=True):
        try:
            open_committed(Store(path))
        except ZdcpError:
            continue
        if verify and not verify_checkpoint(path).ok:
            continue
        return path
    return None


def _step(path: Path) -> tuple[int, str]:
    numbers = _NUMBER.findall(path.name)
    return (int(numbers[-1]) if numbers else -1, path.name)
