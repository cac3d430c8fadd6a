"""Where a checkpoint is: a ``checkpoint_id`` parsed into a tensorstore kvstore spec, and the
:class:`Location` it names, the place itself (whatever is, or is not yet, stored there).

Accepted, everywhere a ``checkpoint_id`` is (save, load, open, verify, convert, the CLI):

- a local path, or a ``file://`` URL (relative paths are made absolute, so that every rank
  resolves the same directory wherever it runs from);
- ``s3://bucket/prefix`` (percent-escapes in the prefix are decoded, as tensorstore does; no
  ``?`` or ``#``): endpoint and region from the standard AWS environment variables
  (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``),
  credentials from tensorstore's default AWS chain (``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance metadata);
- ``gs://bucket/prefix``: Google Cloud Storage, with Application Default Credentials;
- ``memory://name``: a store in this process's memory, shared by every zdcp call in the
  process (for tests and experiments; other processes do not see it);
- a tensorstore kvstore spec as a dict, for full control (``{"driver": "s3", "bucket": ...,
  "endpoint": ..., "aws_credentials": {...}}``); its ``path`` is the checkpoint's prefix.

Nothing is hard-coded: what the environment does not say, tensorstore's defaults decide.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

import tensorstore as ts

from ..errors import UsageError
from ..format.constants import SAVING_MARKER
from .keyvalue import KeyValue
from .oscalls import FilesystemSync
from .retries import RETRY_WATCH, RetrySchedule, context_spec

__all__ = ["CheckpointId", "Location", "location_for", "kvstore_spec", "url_of"]

CheckpointId = str | os.PathLike[str] | dict[str, Any]

#: memory:// stores live in a tensorstore context: one for the process, so that they outlive a call.
_PROCESS_MEMORY = ts.Context()


class Location(KeyValue):
    """A place for a checkpoint: a local directory or an object-store prefix (``spec``, the
    kvstore spec :func:`kvstore_spec` gives), with the tensorstore context that everything
    opened there during one operation shares, so that all its I/O draws on one pool of
    file-I/O and copy threads. Its keys are what is stored under the place; how a checkpoint's
    Zarr hierarchy is stored among them is a layout's business (:mod:`zdcp.storage.layout`).

    On an object store, failed requests are retried by zdcp's schedule
    (:mod:`zdcp.storage.retries`; ``retries`` gives another, as for a failed save's cleanup).

    Writes are not synced one by one (tensorstore's ``file_io_sync`` is off): a save that
    needs them on disk syncs the filesystem once its writes are done
    (:meth:`filesystem_sync`), which costs about what a single ``fsync`` does, where a save of
    thousands of small files would otherwise ``fsync`` each one.
    """

    def __init__(self, checkpoint_id: CheckpointId, *, retries: RetrySchedule | None = None):
        self.checkpoint_id = checkpoint_id
        spec = kvstore_spec(checkpoint_id)
        retrying = context_spec(spec["driver"], retries)  # nothing for local files and memory
        memory = spec["driver"] == "memory"
        context = _PROCESS_MEMORY if memory else ts.Context({"file_io_sync": False, **retrying})
        super().__init__(spec, context, url_of(spec))
        if retrying:
            RETRY_WATCH.using(self)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def local_dir(self) -> str | None:
        """The directory, when the place is in the local filesystem; else None."""
        return self.spec["path"] if self.spec["driver"] == "file" else None

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None

    def with_retries(self, retries: RetrySchedule) -> Location:
        """This place, with its failed requests retried by ``retries``."""
        return Location(self.spec, retries=retries)

    def child(self, name: str) -> Location:
        """The place ``name`` below this one (a subdirectory, a longer prefix)."""
        return Location({**self.spec, "path": self.spec["path"] + name.strip("/") + "/"})

    def child_names(self) -> list[str]:
        """The names of the places below this one that hold anything: the subdirectories of a
        local directory, the next path segments of an object store's keys."""
        if self.local_dir is not None:
            try:
                return sorted(entry.name for entry in os.scandir(self.local_dir) if entry.is_dir())
            except FileNotFoundError:
                return []
        return sorted({key.partition("/")[0] for key in self.keys() if "/" in key})

    # -- the saving marker (docs/format.md, section 5) ------------------------------------------

    def read_marker(self) -> ts.Future:
        """Start reading the saving marker: a read result, with the marker's generation."""
        return self.kv.read(SAVING_MARKER)

    def marker(self) -> Any | None:
        """The saving marker, parsed; None when there is none."""
        return self.read_json(SAVING_MARKER)

    def write_marker(self, marker: bytes, *, if_equal: bytes | None = None) -> bytes:
        """Write the saving marker (only where its generation is ``if_equal``, when given:
        tensorstore's generation of no value creates it only if absent); its new generation,
        empty when the condition did not hold."""
        return self.wait(
            self.kv.write(SAVING_MARKER, marker, if_equal=if_equal), "writing the saving marker"
        ).generation

    def delete_marker(self, *, if_equal: bytes | None = None) -> None:
        """Delete the saving marker (only where its generation is ``if_equal``, when given)."""
        self.wait(self.kv.write(SAVING_MARKER, None, if_equal=if_equal), "deleting the saving marker")

    def delete_all_but_marker(self) -> None:
        """Delete every key under the place but the saving marker."""
        self.wait(self.kv.delete_range(ts.KvStore.KeyRange(exclusive_max=SAVING_MARKER)), "deleting its objects")
        self.wait(self.kv.delete_range(ts.KvStore.KeyRange(inclusive_min=SAVING_MARKER + "\0")), "deleting its objects")

    def filesystem_sync(self) -> FilesystemSync | None:
        """For a local place, a handle that makes writes under it durable; open it before
        writing (see :class:`~zdcp.storage.oscalls.FilesystemSync`). None for an object store,
        which has made a write durable when it acknowledges it."""
        return FilesystemSync(self.local_dir) if self.local_dir is not None else None


def location_for(checkpoint_id: CheckpointId | None, current: Location | None, owner: str) -> Location:
    """The location of a DCP storage plugin (``owner`` names it): DCP hands it over in
    ``reset(checkpoint_id)``, or the user gave it to the constructor (``current``)."""
    if checkpoint_id is not None:
        return Location(checkpoint_id)
    if current is None:
        raise UsageError(f"{owner} needs a path: pass it to {owner}(...) or as checkpoint_id")
    return current


def kvstore_spec(checkpoint_id: CheckpointId) -> dict[str, Any]:
    """The tensorstore kvstore spec of a checkpoint's root; its ``path`` ends with "/" (or is
    empty: the root of a bucket). Raises :class:`~zdcp.UsageError` for anything else."""
    spec = _spec(checkpoint_id)
    try:
        ts.KvStore.Spec(spec)
    except ValueError as e:
        raise UsageError(f"{checkpoint_id!r} is not a valid location: {e}") from None
    return spec


def _spec(checkpoint_id: CheckpointId) -> dict[str, Any]:
    if isinstance(checkpoint_id, dict):
        if "driver" not in checkpoint_id:
            raise UsageError(f"a kvstore spec needs a 'driver': {checkpoint_id!r}")
        spec = dict(checkpoint_id)
        if spec["driver"] == "file":
            spec["path"] = os.path.abspath(spec.get("path", "")).rstrip("/") + "/"
        else:
            spec["path"] = _prefix(spec.get("path", ""))
        return spec
    try:
        text = os.fspath(checkpoint_id)
    except TypeError:
        text = None
    if not isinstance(text, str) or not text:
        raise UsageError(f"checkpoint_id must be a path, a URL or a kvstore spec dict, got {checkpoint_id!r}")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if not scheme:
        return {"driver": "file", "path": os.path.abspath(text).rstrip("/") + "/"}
    parts = urlsplit(text)
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise UsageError(f"{text}: a location has no query or fragment ('?', '#')")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"{text}: file:// URLs name local paths (file:///path)")
        return {"driver": "file", "path": os.path.abspath(unquote(parts.path)).rstrip("/") + "/"}
    if scheme == "memory":
        return {"driver": "memory", "path": _prefix(unquote(parts.netloc + parts.path))}
    if scheme in ("s3", "gs"):
        if not parts.netloc:
            raise UsageError(f"{text}: no bucket name")
        if scheme == "gs":
            return {"driver": "gcs", "bucket": parts.netloc, "path": _prefix(unquote(parts.path))}
        spec: dict[str, Any] = {"driver": "s3", "bucket": parts.netloc, "path": _prefix(unquote(parts.path))}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            spec["endpoint"] = endpoint
        if region:
            spec["aws_region"] = region
        return spec
    raise UsageError(f"{text}: unsupported scheme {scheme!r} (use a path, file://, s3://, gs:// or memory://)")


def url_of(spec: dict[str, Any]) -> str:
    """A URL naming the checkpoint, for messages (a local path for local checkpoints)."""
    path = spec.get("path", "").rstrip("/")
    driver = spec["driver"]
    if driver == "file":
        return path
    if driver in ("s3", "gcs"):
        return f"{'s3' if driver == 's3' else 'gs'}://{spec['bucket']}/{path}".rstrip("/")
    return f"{driver}://{path}"


def _prefix(path: str) -> str:
    """A key prefix: no leading "/", one trailing "/" (none for the root of a bucket)."""
    path = path.strip("/")
    return path + "/" if path else ""
