"""zdcp: PyTorch distributed checkpoints stored as Zarr v3 hierarchies through tensorstore.

    import zdcp
    zdcp.save({"app": app_state}, "ckpt/step_100")   # every rank writes its own shards
    zdcp.load({"app": app_state}, "ckpt/step_100")   # any world size, any placement

A training run saves, keeps and resumes its checkpoints with ``zdcp.CheckpointManager``; a job
restarted after a crash finds the newest with ``zdcp.latest_checkpoint("ckpt")``. Without the
training code: ``zdcp.open(path)`` for lazy read-only access, ``zdcp.verify(path)`` to check
every chunk, ``zdcp.zarr_store(path)`` for zarr-python, ``zdcp.format_utils`` for
conversions, and the ``zdcp`` command. Code that calls DCP itself (Lightning, Accelerate, the HF
Trainer) writes zdcp checkpoints after ``zdcp.as_dcp_backend()``.

Importing zdcp also registers bfloat16 and float8 with zarr-python, so that plain zarr code
can read the arrays zdcp writes.
"""

from . import errors as _errors
from . import zarr_dtypes as _zarr_dtypes
from .api import async_save, load, save
from .backend import DcpBackend, as_dcp_backend
from .checkpoints import latest_checkpoint
from .errors import *  # noqa: F403  (the error classes are public API)
from .manager import CheckpointManager
from .options import SaveOptions
from .reader import ZarrReader
from .verify import Report, verify
from .version import __version__ as __version__
from .view import Array, Group, open
from .writer import ZarrWriter
from .zarr_store import zarr_store

_zarr_dtypes.register()

__all__ = [
    "save",
    "async_save",
    "SaveOptions",
    "load",
    "open",
    "Group",
    "Array",
    "verify",
    "Report",
    "latest_checkpoint",
    "CheckpointManager",
    "ZarrWriter",
    "ZarrReader",
    "zarr_store",
    "as_dcp_backend",
    "DcpBackend",
    *_errors.__all__,
]
