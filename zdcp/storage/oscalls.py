"""What the commit protocol needs of the operating system beyond Python's ``os``: the Linux calls
``syncfs``, ``sync_file_range`` and ``renameat2`` through the C library, and whether a process
still runs (from /proc); no-ops or fallbacks elsewhere."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["FilesystemSync", "sync_directory", "start_writeback", "exchange", "process_identity", "process_running"]


class FilesystemSync:
    """Makes every completed write and delete on the filesystem holding ``path`` durable:
    ``syncfs`` on Linux (data and metadata), ``sync`` elsewhere.

    Open it before the writes it is to cover: since Linux 5.8, ``syncfs`` reports a write-back
    error to every handle opened before the error happened, so a handle opened first learns of
    a failed write-back of these writes even when another process's sync saw it first.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY) if _SYNCFS is not None else None

    def sync(self) -> None:
        if self.fd is None:
            os.sync()
        elif _SYNCFS(self.fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sync_directory(path: str) -> None:
    """Make the entries of directory ``path`` durable (a rename in it): ``fsync`` of the
    directory, which, unlike ``syncfs``, leaves other dirty data on the filesystem alone."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting for them
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux only): a hint that lets the disk work
    while the writer creates its next files. Never a substitute for :class:`FilesystemSync`,
    which reports any write-back error, so this one's result is ignored."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def exchange(a: str, b: str) -> bool:
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


def _libc(name: str) -> Callable[..., int] | None:
    """The C library function ``name`` (setting ``errno``) on Linux; None elsewhere or when
    this libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc("syncfs")
_SYNC_FILE_RANGE = _libc("sync_file_range")
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
_RENAMEAT2 = _libc("renameat2")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def process_identity() -> dict[str, Any] | None:
    """This process, recorded so that a later process can tell whether it still runs: host
    name, boot, PID namespace, PID and start time (from Linux's /proc); None elsewhere."""
    host = _host()
    started = _start_time(os.getpid())
    if host is None or started is None:
        return None
    return {**host, "pid": os.getpid(), "started": started}


def process_running(identity: Any) -> bool | None:
    """Whether the process ``identity`` (:func:`process_identity`) still runs: True or False
    when this process can tell (the same host, boot and PID namespace), None when it cannot."""
    if not isinstance(identity, dict) or type(identity.get("pid")) is not int:
        return None
    host = _host()
    if host is None or any(identity.get(k) != v for k, v in host.items()):
        return None
    return _start_time(identity["pid"]) == identity.get("started")


def _host() -> dict[str, str] | None:
    """What a PID is unique within: the host, its boot (a reboot reuses PIDs) and the PID
    namespace (a container on the same host sees other PIDs)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return {"host": socket.gethostname(), "boot": boot, "pid_namespace": namespace}


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), which
    tells it from a later process that reuses its PID; None when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[19])
