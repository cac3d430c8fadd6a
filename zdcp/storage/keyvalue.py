"""A tensorstore key-value store as zdcp uses one: opened once, on first use, in a given context;
requests whose failures become :class:`~zdcp.StorageError`; JSON documents read and written
whole. A :class:`~zdcp.storage.location.Location` (the keys under a place) and a
:class:`~zdcp.storage.hierarchy.Hierarchy` (the keys of a checkpoint's Zarr hierarchy, as its
layout stores them) are both one.
"""

from __future__ import annotations

import json
from typing import Any

import tensorstore as ts

from ..errors import CorruptCheckpointError, StorageError
from .failures import failure_message

__all__ = ["KeyValue", "encode_json"]


class KeyValue:
    """The key-value store of ``spec`` (a tensorstore kvstore spec), opened in ``context``;
    ``url`` names it in messages. With ``same_as`` (a store of the same spec and context),
    that one's, opened once for both."""

    def __init__(self, spec: dict[str, Any], context: ts.Context, url: str, *, same_as: KeyValue | None = None):
        self.spec = spec
        self.context = context
        self.url = url
        self._same_as = same_as
        self._kv: ts.KvStore | None = None

    @property
    def kv(self) -> ts.KvStore:
        if self._same_as is not None:
            return self._same_as.kv
        if self._kv is None:
            self._kv = self.wait(ts.KvStore.open(self.spec, context=self.context))
        return self._kv

    def wait(self, future: ts.Future, doing: str | None = None) -> Any:
        """``future.result()`` of a key-value operation (or an open), with any failure raised
        as a StorageError naming what was being done (``doing``): these carry no checkpoint
        data whose damage could be the cause."""
        try:
            return future.result()
        except ValueError as e:
            raise StorageError(failure_message(e, self.url, doing)) from None

    def read_json(self, key: str) -> Any | None:
        """The parsed JSON document at ``key``, or None when there is none; a document that is
        no JSON is a :class:`~zdcp.CorruptCheckpointError` naming it."""
        return self.json_from(self.kv.read(key), key)

    def json_from(self, reading: ts.Future, key: str) -> Any | None:
        """:meth:`read_json` of a read of ``key`` already started (several at once cost one
        round trip on an object store)."""
        result = self.wait(reading)
        if result.state != "value":
            return None
        return parse_json(result.value, f"{self.url}/{key}")

    def write_json_async(self, key: str, doc: Any) -> ts.Future:
        """Write one JSON document (atomically replacing any old one)."""
        return self.kv.write(key, encode_json(doc))

    def write_json(self, key: str, doc: Any) -> None:
        self.wait(self.write_json_async(key, doc))

    def keys(self) -> list[str]:
        """Every key, sorted."""
        return sorted(key.decode() for key in self.wait(self.kv.list()))

    def is_empty(self) -> bool:
        return not self.wait(self.kv.list())


def encode_json(doc: Any) -> bytes:
    """A JSON document as stored: compact (json's C encoder only runs without indent, and the
    root document of a checkpoint with thousands of arrays is large), strict (no NaN)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def parse_json(data: bytes, where: str) -> Any:
    """A stored JSON document, parsed; :class:`~zdcp.CorruptCheckpointError` naming ``where``
    when it is none."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can parse
        raise CorruptCheckpointError(f"{where} is not valid JSON ({e!r})") from None
