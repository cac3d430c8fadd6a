"""``zdcp.as_dcp_backend``: DCP's file-system checkpoints written as zdcp checkpoints, for code
that calls DCP itself (Lightning, Accelerate and the HF Trainer, torchtitan).

DCP has no registry of storage backends. Given only a ``checkpoint_id``, ``dcp.save`` and
``dcp.load`` build a ``FileSystemWriter`` or ``FileSystemReader`` by the names in
``torch.distributed.checkpoint._storage_utils``; frameworks build them by the names in
``torch.distributed.checkpoint`` (``dist_cp.FileSystemWriter(ckpt_dir)``), looked up when they
save. Rebinding those names is therefore the one switch that reaches them all.
``dcp.async_save`` is wrapped too: with a checkpoint id alone and
``AsyncCheckpointerType.PROCESS`` it saves in a process of its own, which the rebinding does
not reach, so the wrapper builds the writer here and hands it over.

What the rebound names build:

- :class:`FileSystemWriter` takes DCP's arguments and writes a zdcp checkpoint with the
  backend's save options. ``overwrite`` keeps DCP's meaning and default (True: replace a
  checkpoint at the path, zdcp's or DCP's); ``sync_files`` is honoured; the others (how DCP
  lays out and stages its files) have no meaning for zdcp and are ignored.
- :class:`FileSystemReader` detects the format: a directory holding a DCP checkpoint (a
  ``.metadata`` file and no zdcp commit record) is read by DCP's own reader, anything else by
  zdcp's (and a zdcp checkpoint over which DCP's own writer wrote later, by DCP's). The
  format is detected when the reader is made: one made for a zdcp checkpoint and ``reset`` to
  a DCP one stays zdcp's. A run that began on DCP resumes under the backend, and its next
  saves are zdcp.
  zdcp's reader refuses to cast a tensor into a destination of another dtype unless the
  backend was opened with ``allow_cast=True`` (DCP casts silently).

Names bound elsewhere before the call (``from torch.distributed.checkpoint.filesystem import
FileSystemWriter`` in a module imported earlier) keep DCP's classes: docs/integrations.md.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import threading
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader as DcpFileSystemReader
from torch.distributed.checkpoint import FileSystemWriter as DcpFileSystemWriter

from .errors import UsageError
from .options import SaveOptions
from .reader import ZarrReader
from .storage.contents import DCP_METADATA
from .storage.layout import layouts
from .storage.location import CheckpointId
from .writer import ZarrWriter

__all__ = ["as_dcp_backend", "DcpBackend", "FileSystemWriter", "FileSystemReader"]


class FileSystemWriter(ZarrWriter):
    """DCP's ``FileSystemWriter`` as zdcp: the same constructor, a zdcp checkpoint.

    The save options are the backend's that is active when the writer is made (none: zdcp's
    defaults); the writer keeps them, so that it may be handed to another process (an async
    save of type ``PROCESS``).
    """

    def __init__(
        self,
        path: CheckpointId,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Any = None,
        serialization_format: Any = None,
    ):
        options = dict(_active_backend().options)
        options["sync_files"] = sync_files and options.get("sync_files", True)
        super().__init__(path, overwrite=overwrite, **options)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: CheckpointId) -> bool:
        # The paths DCP's own writer takes (local ones): s3:// and others stay fsspec's.
        return DcpFileSystemWriter.validate_checkpoint_id(checkpoint_id)


class FileSystemReader(ZarrReader):
    """DCP's ``FileSystemReader`` as zdcp: the same constructor; a DCP checkpoint (``.metadata``
    and no zdcp commit record) gets DCP's own reader instead."""

    def __new__(cls, path: CheckpointId | None = None, _extension_registry: Any = None) -> Any:
        # (``path`` is optional for pickle, which makes the instance with no arguments.)
        if path is not None and is_dcp_checkpoint(path):
            return DcpFileSystemReader(path, _extension_registry)
        return super().__new__(cls)

    def __init__(self, path: CheckpointId | None = None, _extension_registry: Any = None):
        super().__init__(path, allow_cast=_active_backend().allow_cast)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: CheckpointId) -> bool:
        return DcpFileSystemReader.validate_checkpoint_id(checkpoint_id)


def is_dcp_checkpoint(path: CheckpointId) -> bool:
    """Whether the local directory ``path`` is to be read as a DCP checkpoint: it holds one
    (a ``.metadata`` file) and no zdcp checkpoint, or a zdcp checkpoint older than it (DCP's
    writer, without the switch, wrote over a zdcp checkpoint in place)."""
    if not isinstance(path, str | os.PathLike):
        return False
    try:
        dcp_written = os.stat(os.path.join(path, DCP_METADATA)).st_mtime_ns
    except OSError:
        return False
    records = [os.path.join(path, layout.commit_record) for layout in layouts()]
    zdcp_written = [os.stat(record).st_mtime_ns for record in records if os.path.isfile(record)]
    return not zdcp_written or dcp_written > max(zdcp_written)


class DcpBackend:
    """What :func:`as_dcp_backend` returns: the switch, until :meth:`close` (or the end of a
    ``with`` block) undoes it. Several may be open: the last one's options apply, and DCP's
    own classes come back when all are closed."""

    def __init__(self, options: dict[str, Any], allow_cast: bool):
        #: The save options of the writers made while this backend is the latest open one.
        self.options = options
        #: Whether its readers cast tensors stored in another dtype than the destination's.
        self.allow_cast = allow_cast

    def close(self) -> None:
        """Undo this call of :func:`as_dcp_backend` (again: nothing)."""
        with _LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
                if not _OPEN:
                    _restore()

    def __enter__(self) -> DcpBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self in _OPEN else "closed"
        return f"<zdcp DCP backend {state} {self.options} allow_cast={self.allow_cast}>"


def as_dcp_backend(*, allow_cast: bool = False, **options: Any) -> DcpBackend:
    """From this call on, in this process, DCP's file-system checkpoints are zdcp checkpoints:
    ``FileSystemWriter(path, ...)`` and ``FileSystemReader(path)`` of
    ``torch.distributed.checkpoint``, and ``dcp.save``/``dcp.load``/``dcp.async_save`` given
    only a ``checkpoint_id`` (a local path). Readers load DCP checkpoints still (their format
    is detected).

    Args:
        allow_cast: readers of zdcp checkpoints cast a tensor stored in another dtype than its
            destination's, as DCP's reader does silently; by default they refuse, naming the
            key (:class:`~zdcp.MismatchError`), as ``zdcp.load`` does. A load that casts
            reads every region on each rank that needs it (no shared reads).
        **options: zdcp's save options (:class:`~zdcp.SaveOptions`: ``layout``,
            ``compression``, ``allow_pickle``, ``sync_files``, ``metadata``), for every save
            through DCP's writer. ``overwrite`` is not one of them: it is the writer's own
            argument, with DCP's default (True).

    Returns a :class:`DcpBackend`, which undoes it (``close()``, or as a context manager).
    Calling it again is harmless: the latest call's options apply until it is closed.
    """
    if "overwrite" in options:
        raise UsageError("overwrite is an argument of DCP's FileSystemWriter (default True), not a backend option")
    SaveOptions.of(options)  # refused here, not at the first save
    backend = DcpBackend(dict(options), allow_cast)
    with _LOCK:
        if not _OPEN:
            _install()
        _OPEN.append(backend)
    return backend


#: The backends open, oldest first.
_OPEN: list[DcpBackend] = []
_LOCK = threading.Lock()
#: What the switch rebinds: each module's names, and what they were bound to before.
_MODULES = (
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint._storage_utils",
    "torch.distributed.checkpoint.format_utils",
)
_REPLACED: dict[tuple[str, str], Any] = {}


def _active_backend() -> DcpBackend:
    """The latest backend open; with none, one of zdcp's defaults."""
    with _LOCK:
        return _OPEN[-1] if _OPEN else DcpBackend({}, allow_cast=False)


def _install() -> None:
    """Rebind every name there is (a torch version may lack one); all or nothing."""
    replacements: dict[tuple[str, str], Any] = {}
    for name in _MODULES:
        module = importlib.import_module(name)
        for attr, replacement in (("FileSystemWriter", FileSystemWriter), ("FileSystemReader", FileSystemReader)):
            if hasattr(module, attr):
                replacements[name, attr] = replacement
    for name in (dcp.__name__, "torch.distributed.checkpoint.state_dict_saver"):
        replacements[name, "async_save"] = _with_writer(importlib.import_module(name).async_save)
    try:
        for (name, attr), replacement in replacements.items():
            module = importlib.import_module(name)
            _REPLACED[name, attr] = getattr(module, attr)
            setattr(module, attr, replacement)
    except BaseException:
        _restore()
        raise


def _restore() -> None:
    for (name, attr), original in _REPLACED.items():
        setattr(importlib.import_module(name), attr, original)
    _REPLACED.clear()


def _with_writer(async_save: Any) -> Any:
    """``async_save`` that builds the writer for a ``checkpoint_id`` without one, here: a
    save in a process of its own would build DCP's there."""
    signature = inspect.signature(async_save)

    @functools.wraps(async_save)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        checkpoint_id = bound.arguments.get("checkpoint_id")
        if (
            bound.arguments.get("storage_writer") is None
            and checkpoint_id is not None
            and FileSystemWriter.validate_checkpoint_id(checkpoint_id)
        ):
            bound.arguments["storage_writer"] = FileSystemWriter(checkpoint_id)
        return async_save(*bound.args, **bound.kwargs)

    return wrapper
