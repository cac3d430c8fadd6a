"""The files layout: every key of the hierarchy (``zarr.json`` documents, chunks) is a file under
the checkpoint's directory, or an object under its prefix: a plain Zarr v3 directory that any
Zarr reader opens as it is (docs/format.md, section 9).

Locally, chunks zdcp encodes itself and the documents are written as plain files
(:class:`~zdcp.storage.localfiles.LocalFiles`), and plain chunks are read straight from them
into their destination; elsewhere everything goes through tensorstore.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import Any

import tensorstore as ts

from ..format.constants import ZARR_JSON
from .hierarchy import Hierarchy
from .inflight import InflightWindow
from .keyvalue import encode_json
from .layout import ChunkSink, Documents, Layout
from .localfiles import DirectReader, LocalFiles, in_directory
from .location import Location
from .retries import REQUESTS_IN_FLIGHT

__all__ = ["FilesLayout"]

_PATH_MAX = 4095  # Linux's PATH_MAX, less its terminating NUL
_OBJECT_KEY_MAX = 1024  # what S3 and GCS allow


class FilesLayout(Layout):
    name = "files"
    description = "one file (or object) per chunk and per zarr.json: a plain Zarr directory"
    commit_record = ZARR_JSON  # the root document itself
    nodes_are_entries = True

    def hierarchy(self, location: Location) -> Hierarchy:
        return Hierarchy(location, self, location.spec, location.context, same_as=location)

    def read_root(self, location: Location) -> Callable[[], tuple[Hierarchy, bytes | None]]:
        hierarchy = self.hierarchy(location)
        reading = hierarchy.kv.read(ZARR_JSON)

        def result() -> tuple[Hierarchy, bytes | None]:
            found = hierarchy.wait(reading)
            return hierarchy, found.value if found.state == "value" else None

        return result

    def owns(self, name: str, nodes: Collection[str]) -> bool:
        return name == ZARR_JSON or name in nodes

    def max_key_bytes(self, location: Location) -> int | None:
        """A local path within ``PATH_MAX``, with the pending directory a save writes into (40
        bytes longer than the checkpoint's own path) and the ``.__lock`` suffix of
        tensorstore's temporary files; an object key within what S3 and GCS allow."""
        driver, prefix = location.spec["driver"], os.fsencode(location.spec["path"])
        if driver == "file":
            return _PATH_MAX - len(prefix) - len(".zdcp-") - 34 - len(".__lock")
        if driver in ("s3", "gcs"):
            return _OBJECT_KEY_MAX - len(prefix)
        return None

    def sink(
        self, location: Location, *, rank: int, sole: bool, nbytes: int, direct: bool, start_writeback: bool
    ) -> ChunkSink:
        root = location.local_dir if direct else None
        local = LocalFiles(root, start_writeback=start_writeback) if root is not None else None
        return _FilesSink(self.hierarchy(location), local)

    def direct_reader(self, hierarchy: Hierarchy) -> DirectReader | None:
        root = hierarchy.location.local_dir
        return DirectReader(lambda: in_directory(root)) if root is not None else None


class _FilesSink(ChunkSink):
    """Chunks and documents as files (``local``: plain files of a local directory, written
    without tensorstore), or through tensorstore."""

    def __init__(self, hierarchy: Hierarchy, local: LocalFiles | None):
        super().__init__(hierarchy)
        self.local = local
        self.supports_encoded_writes = local is not None

    def write_encoded(self, key: str, parts: Sequence[bytes | memoryview]) -> ts.Future | None:
        assert self.local is not None
        self.local.write(key, *parts)
        return None

    def open_array(self, node: str, document: dict[str, Any]) -> ts.Future:
        return self.hierarchy.open_array(node, document, write=True)

    def commit(self, documents: Documents, ranks: Sequence[int], confirm: Callable[[], None]) -> None:
        """Every node's ``zarr.json``, then the root one, the commit record (after
        ``confirm()``, first: node documents replace those of a save that took the place
        over)."""
        confirm()
        nodes = {f"{node}/{ZARR_JSON}": doc for node, doc in documents.items() if node}
        if self.local is not None:
            for key, doc in nodes.items():
                self.local.write(key, encode_json(doc))
        else:
            written = partial(self.hierarchy.wait, doing="writing the nodes' zarr.json")
            window = InflightWindow(None, operations=REQUESTS_IN_FLIGHT)
            try:
                for key, doc in nodes.items():
                    window.add(self.hierarchy.write_json_async(key, doc), 0, written)
                window.drain()
            except BaseException:
                window.settle()  # no write of a failed save may land after its cleanup
                raise
        self.hierarchy.wait(self.hierarchy.write_json_async(ZARR_JSON, documents[""]), "committing (writing zarr.json)")
