"""Finding the checkpoint to resume from in a directory of checkpoints.

Training jobs save every N steps into ``<dir>/step_<N>/`` (or ``checkpoint-<N>``, or ``<N>``),
on a local path or under an object-store prefix. A job restarted after a crash wants the newest
one that is complete: a save killed mid-way left no committed checkpoint (only a hidden staging
directory, or an incomplete one written by other means), and the newest committed one may even
be damaged if the storage failed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ZdcpError
from .storage.contents import open_committed
from .storage.location import Location
from .storage.steps import step_names
from .verify import verify_location

__all__ = ["latest_checkpoint"]


def latest_checkpoint(directory: str | os.PathLike[str], *, verify: bool = False) -> Path | str | None:
    """The newest committed zdcp checkpoint directly below ``directory`` (a local path or a
    URL: ``s3://``, ``gs://``, ``memory://``), or None: a ``Path`` for a local directory, the
    checkpoint's URL otherwise.

    Newest means the largest step number, the last number in the name (``step_100``,
    ``checkpoint-100``, ``100``; :func:`zdcp.storage.steps.step_number`); names without one
    come before all numbered ones. Skipped: hidden names (zdcp's pending directories have
    them), saves that never committed, roots that are damaged or from a newer format version,
    and with ``verify=True`` any checkpoint in which :func:`zdcp.verify` finds a fault (that
    reads every chunk). None when ``directory`` does not exist or holds no such checkpoint.

    A job restarted after a crash calls it first: in a local directory it also deletes the
    pending directories of saves whose process provably died
    (:func:`zdcp.storage.removal.remove_dead_saves`).
    """
    location = Location(directory)
    for name in reversed(step_names(location)):  # the newest first: usually one root read
        found = location.child(name)
        try:
            committed = open_committed(found)
        except ZdcpError:
            continue
        if verify and not verify_location(found, committed=committed).ok:
            continue
        if not _is_url(directory):
            return Path(directory) / name
        return Path(found.local_dir) if found.local_dir is not None else found.url
    return None


def _is_url(directory: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(directory)
