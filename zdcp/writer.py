"""``ZarrWriter``: a DCP ``StorageWriter`` that writes a checkpoint as a Zarr v3 hierarchy.

The save protocol, in DCP's call order:

1. ``prepare_global_plan`` (coordinator): derive every array's chunk grid from all ranks'
   shards, check the target (refuse to replace a committed checkpoint unless ``overwrite``, and
   anything zdcp did not write always), and prepare where the save goes
   (:mod:`zdcp.storage.saving`: a pending directory beside a local target, the in-progress
   marker under an object store prefix). Each rank's ``SavePlan.storage_data`` tells it where
   to write and the grids of the arrays it writes.
2. ``write_data`` (every rank, concurrently): write its own chunks where the save goes,
   through the sink the save's layout gives the rank (:mod:`zdcp.storage.layout`), with the
   array metadata known up front, so no rank waits on another and no data passes through the
   coordinator; small plain chunks and shards up to 4 MiB are encoded here and handed to the
   sink as bytes where it takes them. Then make them durable (a single process's writes to a
   local checkpoint become durable with the rest at the commit). Plain values travel back to
   the coordinator as JSON in the ``WriteResult``s.
3. ``finish`` (coordinator): assemble every group's and array's ``zarr.json`` and the root one
   with all of them consolidated, and commit (:mod:`zdcp.storage.saving`): the layout writes
   the documents, the root one last, and the save becomes the checkpoint (a pending directory
   renamed into place, or atomically exchanged with the checkpoint it replaces; on an object
   store the root document, written last, is the commit).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import uuid
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import tensorstore as ts
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .errors import UnsupportedValueError, UsageError
from .format.codecs import encode_chunk, plain_encoding
from .format.constants import ATTR, FORMAT_NAME, FORMAT_VERSION, INNER_CHUNK_BYTES, MAX_INLINE_BYTES, ZARR_JSON
from .format.documents import array_document, chunk_key, chunk_shape, group_document, user_metadata_attrs
from .format.dtypes import from_torch, tensor_to_numpy
from .format.names import DICT, Entry, describe, encode_key, join, node_name
from .format.values import as_bytes, to_json
from .options import SaveOptions
from .payloads import ArrayValue, RankPlan, StoredValue, WrittenTensor
from .storage.failures import storage_access
from .storage.inflight import InflightWindow
from .storage.layout import DEFAULT_LAYOUT, ChunkSink, Layout, layout_named
from .storage.location import CheckpointId, Location, kvstore_spec, location_for
from .storage.retries import REQUESTS_IN_FLIGHT
from .storage.saving import InPlaceSave, LocalSave, begin_save, check_location, save_location
from .tree import tensor_placement
from .version import __version__

__all__ = ["ZarrWriter"]

_UINT8 = from_torch(torch.uint8)


class ZarrWriter(StorageWriter):
    """Write a DCP checkpoint as a Zarr v3 hierarchy (see docs/format.md).

    Args:
        path: the checkpoint location; may also come later as DCP's ``checkpoint_id``.
        max_inflight_bytes: how many bytes of chunk writes a rank keeps in flight, or held by
            a layout that holds its writes until the commit (``None``: no limit). Bounds the
            host memory that GPU tensors' copies or lazily produced tensors take while they
            are written.
        direct_writes: encode plain chunks (shards up to :data:`DIRECT_SHARD_BYTES`) here and
            hand them to the layout as bytes where it takes them (plain files of a local
            checkpoint, values of a database); ``False`` writes every chunk through
            tensorstore. The bytes are the same either way.
        **options: the fields of :class:`~zdcp.SaveOptions` (``overwrite``, ``allow_pickle``,
            ``compression``, ``sync_files``).
    """

    def __init__(
        self,
        path: CheckpointId | None = None,
        *,
        max_inflight_bytes: int | None = 1 << 30,
        direct_writes: bool = True,
        **options: Any,
    ):
        self.location: Location | None = Location(path) if path is not None else None
        self.options = SaveOptions.of(options)
        self.max_inflight_bytes = max_inflight_bytes
        self.direct_writes = direct_writes
        self._rank = 0  # this rank, as the layout's sink needs it (set_up_storage_writer)
        self._reset_state()

    @property
    def checkpoint_id(self) -> CheckpointId | None:
        return self.location.checkpoint_id if self.location is not None else None

    @property
    def layout(self) -> Layout:
        """The layout this writer saves in: the options', or the default."""
        return layout_named(self.options.layout or DEFAULT_LAYOUT)

    def _reset_state(self) -> None:
        # Coordinator-only state, from prepare_global_plan to finish.
        self._save: LocalSave | InPlaceSave | None = None
        self._grids: dict[str, tuple[int, ...]] = {}
        self._entries: dict[str, Entry] = {}
        self._world_size = 1
        # The coordinator's own sink, which commits the save in finish.
        self._sink: ChunkSink | None = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: CheckpointId) -> bool:
        try:
            kvstore_spec(checkpoint_id)
        except UsageError:
            return False
        return True

    def reset(self, checkpoint_id: CheckpointId | None = None) -> None:
        self.abandon()  # a save through this writer that never committed (DCP has no failure hook)
        self.location = location_for(checkpoint_id, self.location, type(self).__name__)
        self._reset_state()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._rank = kwargs.get("rank", 0)
        if kwargs.get("use_collectives", True) is False and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank would plan, stage and commit alone: each commit would hold one rank's shards.
            raise UsageError("ZarrWriter needs DCP's collectives when several ranks save (use_collectives=True)")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Refuse, before anything is written, a key whose files would have paths longer than
        the storage allows (deep nesting: each node name is at most 128 bytes)."""
        assert self.location is not None
        limit = self.layout.max_key_bytes(self.location)
        if limit is None:
            return plan
        entries = _entries_of(plan)
        for item in plan.items:
            # An FQN is at least as long as its node path; a chunk key adds at most the digits
            # of every dimension's length.
            shape = item.tensor_data.size if item.tensor_data is not None else torch.Size([1])
            if len(item.index.fqn) + 12 + sum(len(str(n)) + 1 for n in shape) <= limit:
                continue
            entry = entries.get(item.index.fqn) or Entry.from_dcp_path((item.index.fqn,))
            chunk = chunk_key(entry.node, [max(n - 1, 0) for n in shape])
            longest = max(len(chunk), len(f"{entry.node}/{ZARR_JSON}"))
            if longest > limit:
                raise UnsupportedValueError(
                    f"key {describe(entry.path)!r} is nested too deep for {self.location.url}: its files need keys of "
                    f"{longest} bytes there, and at most {limit} fit (use fewer or shorter keys, or a shorter path)"
                )
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Derive every array's chunk grid from all ranks' shards, check the target and prepare
        the save, and tell each rank its grids and the save's session (:class:`RankPlan`).

        With DCP's plan caching, a rank whose plan did not change sends an unusable plan and
        then writes by its cached final plan. This writer keeps the final plans it handed out
        (:data:`_HANDED_OUT`), so it knows every rank's items: the grids are derived from all
        of them, the session stays the one the cached plans carry, and a rank whose cached
        storage data would be out of date (a grid changed by another rank's new shards) gets
        its plan again, usable.
        """
        assert self.location is not None
        self._world_size = len(plans)
        if self.location.spec["driver"] == "memory" and self._world_size > 1:
            raise UsageError(
                f"{self.location.url}: a memory:// store lives in one process; several ranks cannot share it"
            )
        global _HANDED_OUT
        cached = _HANDED_OUT
        if all(getattr(p, "usable", True) for p in plans):
            session, full = uuid.uuid4().hex, plans
        elif cached is not None and len(cached.plans) == len(plans):
            session = cached.session
            full = [p if getattr(p, "usable", True) else cached.plans[rank] for rank, p in enumerate(plans)]
        else:
            raise UsageError("DCP's plan cache holds plans this process's ZarrWriter never handed out: save without it")
        for plan in full:
            self._entries.update(_entries_of(plan))
        shards: dict[str, list[tuple[Any, Any]]] = {}
        shapes: dict[str, torch.Size] = {}
        for item in _tensor_items(p.items for p in full):
            fqn = item.index.fqn
            shards.setdefault(fqn, []).append((item.tensor_data.chunk.offsets, item.tensor_data.chunk.sizes))
            shapes[fqn] = item.tensor_data.size
        self._grids = {fqn: chunk_shape(shapes[fqn], s) for fqn, s in shards.items()}
        # Last, once the plans are known to be valid: nothing is created for a save that fails
        # planning.
        self._save = begin_save(
            self.location,
            overwrite=self.options.overwrite,
            session=session,
            marker={"world_size": self._world_size, "zdcp": __version__},
        )
        handed_out, scattered = [], []
        for rank, (sent, plan) in enumerate(zip(plans, full)):
            data = RankPlan(session, {i.index.fqn: self._grids[i.index.fqn] for i in _tensor_items([plan.items])})
            handed_out.append(dataclasses.replace(plan, storage_data=data, usable=True))
            # A rank that sent an unusable plan keeps its cached final plan if that carries this
            # very storage data; any other rank gets its plan (copies share the items).
            keeps = not getattr(sent, "usable", True) and cached is not None and cached.plans[rank].storage_data == data
            scattered.append(sent if keeps else handed_out[rank])
        _HANDED_OUT = _HandedOut(session, handed_out)
        return scattered

    def abandon(self) -> None:
        """Delete what a save that failed wrote (on the coordinator; a no-op elsewhere); the
        previous checkpoint, if any, is untouched. Every save of :mod:`zdcp.api` calls it."""
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
        if self._save is not None:
            self._save.abandon()
            self._save = None

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        assert self.location is not None
        if self._save is not None and not getattr(planner, "_enable_plan_caching", False):
            _forget_handed_out()  # the coordinator keeps the plans only for DCP's plan cache
        rank_plan: RankPlan = plan.storage_data
        if self._save is None:
            location = save_location(self.location, rank_plan.session)
            check_location(location, rank_plan.session)
        elif rank_plan.session == self._save.session:  # the coordinator knows which save it prepared
            location = self._save.location
        else:
            raise UsageError(f"{self.location.url}: this rank's plan is not for the save being prepared")
        # The only process of a save also commits it, with this very sink (a layout may then keep
        # the writes for the commit's own transaction instead of completing them apart).
        sole = self._save is not None and self._world_size == 1
        # Each rank's data is durable before it reports success. A single process's becomes
        # durable with everything else at the commit instead, where the save syncs through a
        # handle opened before any write: one sync of the filesystem per save, not two. With
        # several ranks the coordinator syncs here too, alongside the others (on other hosts,
        # its sync at the commit would only start once theirs are done).
        syncs_at_commit = sole and self._save is not None and self._save.syncs_at_commit
        # Opened before anything is written, for the sync to report every write's failure.
        durable = location.filesystem_sync() if self.options.sync_files and not syncs_at_commit else None
        try:
            sink = self.layout.sink(
                location,
                rank=self._rank,
                sole=sole,
                nbytes=sum(_nbytes(item) for item in _tensor_items([plan.items])),
                direct=self.direct_writes,
                start_writeback=self.options.sync_files,
            )
            chunks = _ChunkWriter(sink, rank_plan, self)
            try:
                with storage_access(location.url, f"writing rank {self._rank}'s chunks"):
                    written, results = self._write_items(plan, planner, chunks)
                    sink.complete()
                if durable is not None:
                    durable.sync()
            except BaseException:
                chunks.settle()  # no write of this failed save may land after the caller cleans up
                if sole:
                    # No other rank writes there: what this save wrote goes now, before DCP
                    # raises (it tells a storage writer nothing of a failure), so that a retry
                    # finds the space free. With several ranks, some may still be writing;
                    # the next save of this process to the same target removes it then
                    # (SavesUnderWay), and zdcp's own saves do once DCP returns.
                    self.abandon()
                raise
        finally:
            if durable is not None:
                durable.close()
        if self._save is not None:
            self._sink = sink
        # The planner's (flattened) state dict still holds the DTensor/ShardedTensor, whose
        # placement the write items do not carry.
        sources = getattr(planner, "state_dict", {})
        for item, nbytes in written:
            source = sources.get(item.index.fqn)
            placement = tensor_placement(source) if isinstance(source, torch.Tensor) else None
            written_as = WrittenTensor(placement, rank_plan.grids[item.index.fqn])
            results.append(WriteResult(index=item.index, size_in_bytes=nbytes, storage_data=written_as))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_items(
        self, plan: SavePlan, planner: SavePlanner, chunks: _ChunkWriter
    ) -> tuple[list[tuple[WriteItem, int]], list[WriteResult]]:
        """Write the plan's items: ``(tensor item, bytes)`` per tensor, and the plain values'
        results."""
        entries = _entries_of(plan)
        written: list[tuple[WriteItem, int]] = []
        results: list[WriteResult] = []
        for item in plan.items:
            entry = entries.get(item.index.fqn) or Entry.from_dcp_path((item.index.fqn,))
            if item.type == WriteItemType.BYTE_IO:
                results.append(self._write_value(chunks, item, entry, planner))
            else:
                tensor = _host_tensor(planner.resolve_data(item))
                written.append((item, chunks.write(item, entry, tensor)))
        chunks.drain()
        return written, results

    def _write_value(self, chunks: _ChunkWriter, item: WriteItem, entry: Entry, planner: SavePlanner) -> WriteResult:
        """A plain value goes back to the coordinator as JSON; a large byte string, or with
        ``allow_pickle`` a value JSON cannot hold, is written here as an array."""
        value = _lookup(planner, item)
        raw = as_bytes(value)
        if raw is not None and len(raw[0]) > MAX_INLINE_BYTES:
            stored = chunks.write_value(entry, raw[0], {"kind": "bytes", "type": raw[1]})
            return WriteResult(index=item.index, size_in_bytes=len(raw[0]), storage_data=stored)
        try:
            j, desc = to_json(value, describe(entry.path))
        except UnsupportedValueError:
            if not self.options.allow_pickle:
                raise
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            stored = chunks.write_value(entry, data, {"kind": "pickle"})
            return WriteResult(index=item.index, size_in_bytes=len(data), storage_data=stored)
        return WriteResult(index=item.index, size_in_bytes=0, storage_data=StoredValue(j, desc))

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self._save is not None and self._sink is not None
        # Per FQN: a StoredValue or ArrayValue for plain values, a WrittenTensor for tensors
        # (every rank that wrote a shard reports the same placement).
        stored = {r.index.fqn: r.storage_data for rank in results for r in rank}
        _check_grids(metadata, results, self._grids)
        groups: dict[tuple[Any, ...], _Group] = {(): _Group(DICT)}
        arrays: dict[str, dict[str, Any]] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            entry = self._entries.get(fqn) or Entry.from_dcp_path((fqn,))
            for depth, kind in enumerate(entry.kinds):
                groups.setdefault(entry.path[:depth], _Group(kind)).check(kind, entry.path[:depth])
            if isinstance(md, BytesStorageMetadata):
                data = stored[fqn]
                if isinstance(data, ArrayValue):
                    arrays[entry.node] = array_document([data.nbytes], _UINT8, [data.nbytes], data.attrs)
                    groups[entry.path[:-1]].name_child(entry.path[-1])
                else:
                    groups[entry.path[:-1]].add(entry.path[-1], data)
            else:
                dtype = from_torch(md.properties.dtype)
                written = stored.get(fqn)
                placement = written.placement if isinstance(written, WrittenTensor) else None
                attrs = {"kind": "tensor", "dtype": dtype.torch_name, "placement": placement}
                grid = self._grids[fqn]
                arrays[entry.node] = array_document(list(md.size), dtype, grid, attrs, self.options.compression)
                groups[entry.path[:-1]].name_child(entry.path[-1])
        for path in groups:
            if path:
                groups[path[:-1]].name_child(path[-1])
        nodes = {join([node_name(k) for k in path]): g.document() for path, g in groups.items()}
        nodes.update(arrays)
        root = nodes.pop("")
        root["attributes"][ATTR].update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            zdcp_version=__version__,
            torch_version=torch.__version__,
            world_size=self._world_size,
        )
        if self.options.metadata is not None:
            root["attributes"][ATTR].update(user_metadata_attrs(self.options.metadata))
        # Sorted by path: zarr-python 3.1 rebuilds the tree with itertools.groupby and loses
        # children unless siblings are adjacent.
        consolidated = dict(sorted(nodes.items()))
        root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": consolidated}
        ranks = [rank for rank, rank_results in enumerate(results) if any(map(_wrote_array, rank_results))]
        write_root = partial(self._sink.commit, {"": root, **nodes}, ranks)
        # From here the save cleans up after itself: a failure once the checkpoint is committed
        # must not delete it.
        save, self._save, self._sink = self._save, None, None
        save.commit(write_root, sync=self.options.sync_files)


class _Group:
    """A group being assembled at finish: its container kind, plain values, and the whole
    names of its children whose node names are shortened."""

    def __init__(self, kind: str):
        self.kind = kind
        self.values: dict[str, Any] = {}
        self.types: dict[str, Any] = {}
        self.long_names: dict[str, str] = {}

    def check(self, kind: str, path: tuple[Any, ...]) -> None:
        if kind != self.kind:
            raise UnsupportedValueError(f"{describe(path)} is used both as a {self.kind} and a {kind}")

    def add(self, key: Any, value: StoredValue) -> None:
        name = encode_key(key)
        self.values[name] = value.json
        if value.desc is not None:
            self.types[name] = value.desc

    def name_child(self, key: Any) -> None:
        """Record the whole name of the child node at ``key`` if its node name is shortened."""
        short = node_name(key)
        if short != (name := encode_key(key)):
            self.long_names[short] = name

    def document(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"container": self.kind}
        if self.types:
            attrs["types"] = self.types
        if self.long_names:
            attrs["long_names"] = self.long_names
        return group_document(self.values, attrs)


#: Sharded chunks up to this size are encoded here (:class:`_ChunkWriter`); tensorstore,
#: which encodes a chunk's inner chunks on several threads, keeps larger ones.
DIRECT_SHARD_BYTES = 4 << 20
#: The most bytes of encoded chunks a sink that holds its writes (a packed rank's transaction)
#: keeps before it releases them: they are copies of the tensors, memory a save takes beyond
#: the state (unbounded, 32 tensors of 4 MiB took 110% of the state above it).
HELD_COPIES_BYTES = 64 << 20


class _ChunkWriter:
    """One rank's chunk writes into its sink (:class:`~zdcp.storage.layout.ChunkSink`), with a
    window of writes in flight.

    Small plain chunks and shards up to :data:`DIRECT_SHARD_BYTES` are encoded here
    (:func:`~zdcp.format.codecs.encode_chunk`) and handed to the sink as bytes where it takes
    them: that costs a fraction of opening a tensorstore array per tensor. The rest goes
    through tensorstore."""

    def __init__(self, sink: ChunkSink, plan: RankPlan, writer: ZarrWriter):
        self.sink = sink
        self.grids = plan.grids
        self.compression = writer.options.compression
        remote = not sink.hierarchy.location.is_local
        self.window = InflightWindow(writer.max_inflight_bytes, operations=REQUESTS_IN_FLIGHT if remote else None)
        self.documents: dict[str, dict[str, Any]] = {}
        self.arrays: dict[str, ts.Future] = {}
        self.held = self.copied = 0  # bytes written, and copied, since the sink last released them

    def write(self, item: WriteItem, entry: Entry, tensor: torch.Tensor) -> int:
        """Start writing ``tensor``, the shard ``item`` describes; returns its size in bytes."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return 0
        fqn, chunk = item.index.fqn, item.tensor_data.chunk
        if fqn not in self.documents:
            dtype = from_torch(item.tensor_data.properties.dtype, key=describe(entry.path))
            shape = list(item.tensor_data.size)
            self.documents[fqn] = array_document(shape, dtype, self.grids[fqn], {}, self.compression)
        index = _whole_chunk(chunk.offsets, chunk.sizes, self.grids[fqn])
        direct = index is not None and self.sink.supports_encoded_writes
        encoding = plain_encoding(self.documents[fqn]) if direct else None
        if encoding is not None and nbytes <= (INNER_CHUNK_BYTES if encoding.inner is None else DIRECT_SHARD_BYTES):
            assert index is not None
            key, parts = chunk_key(entry.node, index), encode_chunk(tensor_to_numpy(tensor), encoding)
            writing = self.sink.write_encoded(key, parts)
            if writing is not None:
                self.window.add(writing, nbytes)
            self._hold(nbytes, copied=nbytes)
        else:
            if fqn not in self.arrays:
                self.arrays[fqn] = self.sink.open_array(entry.node, self.documents[fqn])
            region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            target = self.arrays[fqn].result()[region]
            # No copy of the source: the save does not return before the write completes.
            self.window.add(target.write(tensor_to_numpy(tensor), can_reference_source_data_indefinitely=True), nbytes)
            self._hold(nbytes)
        return nbytes

    def _hold(self, nbytes: int, *, copied: int = 0) -> None:
        """Count ``nbytes`` written into a sink that holds its writes (``copied`` of them as
        copies: encoded chunks), and have it release what it holds once that is the window's
        worth, or :data:`HELD_COPIES_BYTES` of copies. A write into a transaction completes at
        once but holds its source until the commit, so the window alone would bound nothing;
        and where the tensors stay in memory anyway (a training state), only the copies
        add to it."""
        if not self.sink.holds_writes:
            return
        self.held += nbytes
        self.copied += copied
        if (self.window.limit is not None and self.held >= self.window.limit) or self.copied >= HELD_COPIES_BYTES:
            self.window.drain()
            if self.sink.release():
                self.arrays.clear()  # opened in the transaction released
            self.held = self.copied = 0

    def write_value(self, entry: Entry, data: bytes, attrs: dict[str, Any]) -> ArrayValue:
        """Write a value stored as an array (a large byte string, a pickle: ``attrs`` say
        which) in one chunk."""
        array = np.frombuffer(data, dtype=np.uint8)
        document = array_document([array.size], _UINT8, [array.size], attrs)
        handle = self.sink.open_array(entry.node, document).result()
        self.window.add(handle.write(array, can_reference_source_data_indefinitely=True), array.size)
        self._hold(array.size)
        return ArrayValue(array.size, attrs)

    def drain(self) -> None:
        """Complete every write (into the sink)."""
        self.window.drain()

    def settle(self) -> None:
        """After a failure: wait for every write in flight, and let the sink's writes go."""
        self.window.settle()
        self.sink.abort()


@dataclasses.dataclass(frozen=True)
class _HandedOut:
    """The final plans the coordinator's writer last handed out, as the ranks hold them when
    DCP caches them, and their session."""

    session: str
    plans: list[SavePlan]


#: This process's :class:`_HandedOut`, as DCP keeps its plan cache: per process.
_HANDED_OUT: _HandedOut | None = None


def _forget_handed_out() -> None:
    global _HANDED_OUT
    _HANDED_OUT = None


def _check_grids(metadata: Metadata, results: list[list[WriteResult]], grids: dict[str, tuple[int, ...]]) -> None:
    """Refuse to commit chunks cut along another grid than the shards of the save give (a
    rank's cached plan out of step with this writer's): the checkpoint would not read back."""
    for rank, rank_results in enumerate(results):
        for result in rank_results:
            written = result.storage_data
            if isinstance(written, WrittenTensor) and written.grid != grids.get(result.index.fqn):
                raise UsageError(
                    f"rank {rank} wrote {result.index.fqn!r} in chunks of {written.grid}, but the save's shards give "
                    f"{grids.get(result.index.fqn)} (DCP's cached plans out of step with the writer's): nothing is "
                    "committed"
                )
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and fqn in grids:
            expected = chunk_shape(md.size, [(c.offsets, c.sizes) for c in md.chunks])
            if expected != grids[fqn]:
                raise UsageError(f"{fqn!r}: the save's metadata gives chunks of {expected}, the plans {grids[fqn]}")


def _wrote_array(result: WriteResult) -> bool:
    return result.size_in_bytes > 0 and isinstance(result.storage_data, (WrittenTensor, ArrayValue))


def _entries_of(plan: SavePlan) -> dict[str, Entry]:
    """FQN -> Entry from a plan's ``planner_data``: zdcp's Entries or DCP's key-path tuples."""
    data = plan.planner_data or {}
    return {fqn: e if isinstance(e, Entry) else Entry.from_dcp_path(e) for fqn, e in data.items()}


def _tensor_items(item_lists: Iterable[Iterable[WriteItem]]) -> Iterable[WriteItem]:
    for items in item_lists:
        for item in items:
            if item.type != WriteItemType.BYTE_IO:
                yield item


def _nbytes(item: WriteItem) -> int:
    """The bytes of the shard a tensor write item writes."""
    assert item.tensor_data is not None
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def _whole_chunk(offsets: Sequence[int], sizes: Sequence[int], grid: Sequence[int]) -> tuple[int, ...] | None:
    """The index of the chunk that the region ``offsets``/``sizes`` covers exactly, if any."""
    if list(sizes) != list(grid) or any(o % g for o, g in zip(offsets, grid)):
        return None
    return tuple(o // g for o, g in zip(offsets, grid))


def _host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values on the CPU as a plain (no conj/neg bit) tensor, copied only if needed."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor


def _lookup(planner: SavePlanner, item: WriteItem) -> Any:
    """The Python object behind a BYTE_IO item (DCP's planners only hand out torch.save bytes)."""
    lookup = getattr(planner, "lookup_object", None)
    if lookup is not None:
        return lookup(item.index)
    return torch.load(planner.resolve_data(item), weights_only=True)
