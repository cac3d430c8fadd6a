"""``zdcp.zarr_store``: a checkpoint as a read-only zarr-python store, in any layout, at any
location.

zarr-python reads a files-layout checkpoint in a local directory by itself, and one on an object
store through fsspec (s3fs, gcsfs). It cannot read tensorstore's OCDBT databases, which hold
packed checkpoints. This store serves every key of the hierarchy through tensorstore's key-value
stores, wherever and however it is stored, with no other package:

    import zarr, zdcp
    root = zarr.open_group(zdcp.zarr_store("s3://bucket/run/step_100"), mode="r")
    root["app/model/net1.weight"][2:4]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import tensorstore as ts
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from .storage.contents import root_document
from .storage.hierarchy import Hierarchy
from .storage.location import CheckpointId, Location

__all__ = ["zarr_store", "ZarrStore"]


def zarr_store(checkpoint_id: CheckpointId) -> ZarrStore:
    """A read-only zarr-python store of the checkpoint at ``checkpoint_id`` (any location a
    checkpoint can be at), in whichever layout it is stored."""
    hierarchy, _ = root_document(Location(checkpoint_id))
    return ZarrStore(hierarchy)


class ZarrStore(Store):
    """A read-only zarr-python :class:`~zarr.abc.store.Store` over the keys of a checkpoint's
    hierarchy (:class:`~zdcp.storage.hierarchy.Hierarchy`), as its layout stores them."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, hierarchy: Hierarchy):
        super().__init__(read_only=True)
        self._hierarchy = hierarchy

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZarrStore) and other._hierarchy.spec == self._hierarchy.spec

    def __repr__(self) -> str:
        return f"zdcp.ZarrStore({self._hierarchy.url!r}, layout={self._hierarchy.layout.name!r})"

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        kv = self._hierarchy.kv
        if isinstance(byte_range, SuffixByteRequest):
            found = await kv.read(key)  # tensorstore takes a suffix as a negative start
            data = found.value[-byte_range.suffix :] if found.state == "value" else None
        else:
            found = await kv.read(key, byte_range=_slice(byte_range))
            data = found.value if found.state == "value" else None
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return (await self._hierarchy.kv.read(key, byte_range=slice(0, 0))).state == "value"

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:
        for key in await self._hierarchy.kv.list():
            yield key.decode()

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in await self._hierarchy.kv.list(ts.KvStore.KeyRange(prefix, _after(prefix))):
            yield key.decode()

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        seen: set[str] = set()
        async for key in self.list_prefix(prefix):
            child = key[len(prefix) :].split("/", 1)[0]
            if child not in seen:
                seen.add(child)
                yield child


def _slice(byte_range: Any) -> slice | None:
    if byte_range is None:
        return None
    if isinstance(byte_range, RangeByteRequest):
        return slice(byte_range.start, byte_range.end)
    if isinstance(byte_range, OffsetByteRequest):
        return slice(byte_range.offset, None)
    raise TypeError(f"unsupported byte range {byte_range!r}")


def _after(prefix: str) -> str:
    """The smallest key that does not start with ``prefix`` and sorts after every key that does."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""
