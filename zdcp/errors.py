"""zdcp's exceptions.

Every error zdcp raises is an :class:`Exception` subclass under :class:`ZdcpError`, so that
``except Exception`` in a training loop catches it. (DCP's own ``CheckpointException`` derives
from ``BaseException`` and slips past such handlers.) The classes are split by what a caller
can do about them: a missing or incomplete checkpoint can fall back to an older one, a mismatch
is a bug in the caller's state dict, an unsupported value needs a different value or an opt-in.
"""

from __future__ import annotations

__all__ = [
    "ZdcpError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointExistsError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "MissingKeysError",
    "MismatchError",
    "UnsupportedValueError",
    "UnsafeError",
    "DistributedError",
    "UsageError",
    "StorageError",
]


class ZdcpError(Exception):
    """Base class of every error zdcp raises."""


class CheckpointNotFoundError(ZdcpError, FileNotFoundError):
    """No checkpoint exists at the given location."""


class IncompleteCheckpointError(ZdcpError):
    """The location holds a checkpoint whose save never committed (crashed or still running)."""


class CheckpointExistsError(ZdcpError, FileExistsError):
    """A save would replace a committed checkpoint, or write into a directory that is not one."""


class CorruptCheckpointError(ZdcpError):
    """The checkpoint's files do not match what its metadata promises."""


class UnsupportedFormatError(ZdcpError):
    """The checkpoint was written in a newer (or unknown) version of the format."""


class MissingKeysError(ZdcpError, KeyError):
    """The destination state dict asks for keys that the checkpoint does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MismatchError(ZdcpError):
    """A stored value does not fit its destination (shape, dtype or kind)."""


class UnsupportedValueError(ZdcpError, TypeError):
    """A state dict holds a value or key that the format cannot store as asked."""


class UnsafeError(ZdcpError):
    """Reading would run stored code (pickle) or leave the checkpoint; needs an explicit opt-in."""


class DistributedError(ZdcpError):
    """Ranks failed with different errors; ``failures`` maps each failing rank to its error."""

    def __init__(self, message: str, failures: dict[int, BaseException]):
        super().__init__(message)
        self.failures = failures

    def __reduce__(self) -> tuple[type[DistributedError], tuple[str, dict[int, BaseException]]]:
        return type(self), (self.args[0], self.failures)


class UsageError(ZdcpError, ValueError):
    """zdcp was called with an argument or in a mode it does not support (a bad option value,
    or a DCP feature that the Zarr storage cannot honour)."""


class StorageError(ZdcpError, OSError):
    """The storage refused or failed a request: a missing bucket, bad credentials, no access,
    the service unreachable. Not a property of the checkpoint: retrying may help."""
