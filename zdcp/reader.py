"""``ZarrReader``: a DCP ``StorageReader`` over a zdcp checkpoint.

Each array is described to DCP as *one* chunk covering the whole tensor. DCP then asks for one
slice per destination shard, whatever the save-time sharding was, and each slice is read in one
tensorstore call that touches only the stored chunks it overlaps, straight into the destination
tensor's memory when that is on the CPU.

Every leaf is described under two FQN schemes (:class:`~zdcp.payloads.CatalogViews`): zdcp's
(encoded keys joined with "/"), which zdcp's planner uses, and DCP's dotted FQN, which DCP's default planner uses, so
``dcp.load(..., storage_reader=ZarrReader(p))`` works as well as ``zdcp.load``. In the dotted
view plain values are split the way DCP's planner splits them (a list of dicts becomes one item
per leaf). ``read_metadata`` hands DCP the dotted view; :class:`~zdcp.planner.ZarrLoadPlanner`
plans against zdcp's view, and ``read_data`` reads by the view of the planner it is given.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tensorstore as ts
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .collectives import Collectives, attempt, distributed
from .errors import CorruptCheckpointError, MismatchError, UsageError
from .format.catalog import ArrayNode
from .format.dtypes import numpy_to_tensor, tensor_to_numpy
from .format.names import describe, dotted
from .payloads import CatalogView, CatalogViews, ValueSource
from .planner import ZarrLoadPlanner
from .sharing import Region, Sharing, Transfer, batches, plan_sharing, region_of
from .storage.contents import Committed, open_committed, root_document
from .storage.failures import reading
from .storage.inflight import InflightWindow
from .storage.layout import DirectReader
from .storage.location import CheckpointId, Location, location_for

__all__ = ["ZarrReader"]


class ZarrReader(StorageReader):
    """Read a zdcp checkpoint through DCP's load machinery.

    Args:
        path: the checkpoint location; may also come later as DCP's ``checkpoint_id``, or with
            ``committed``.
        allow_cast: cast stored tensors to the destination's dtype instead of refusing.
        allow_pickle: unpickle values that were saved with ``allow_pickle=True``. Unpickling
            runs code chosen by whoever wrote the checkpoint: only for trusted checkpoints.
        max_inflight_bytes: how many bytes of reads a rank keeps in flight (``None``: no limit).
            Each read holds a decoded copy of the chunks it touches until it lands in the
            destination; the window bounds that memory.
        direct_reads: read whole-row slabs of plain local chunks straight into the destination
            where the checkpoint's layout can (:meth:`~zdcp.storage.layout.Layout.direct_reader`);
            ``False`` sends every read through tensorstore.
        committed: the checkpoint, already opened, for the next load only (``zdcp.load`` opens
            it before DCP does, so that a missing or damaged checkpoint raises its own error on
            every rank; DCP would replace it by an ``AssertionError``).
        share_reads: where several ranks of the load read the same stored region (replicas),
            one of them reads it and sends it to the others (:mod:`zdcp.sharing`); ``False``:
            every rank reads all it needs from storage, which is faster only where storage is
            faster than the interconnect. Never with ``allow_cast``.
        process_group: the load's process group (the default group when None), which the
            shared reads go over; a load over another group shares nothing.
    """

    def __init__(
        self,
        path: CheckpointId | None = None,
        *,
        allow_cast: bool = False,
        allow_pickle: bool = False,
        max_inflight_bytes: int | None = 64 << 20,
        direct_reads: bool = True,
        committed: Committed | None = None,
        share_reads: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ):
        if path is not None:
            self.location: Location | None = Location(path)
        else:
            self.location = committed.hierarchy.location if committed is not None else None
        self.allow_cast = allow_cast
        self.allow_pickle = allow_pickle
        self.max_inflight_bytes = max_inflight_bytes
        self.direct_reads = direct_reads
        self.share_reads = share_reads
        self.process_group = process_group
        self._given = committed
        self._direct: tuple[DirectReader | None] | None = None  # once known (it may be None)
        self.committed: Committed | None = None
        self.views = CatalogViews(CatalogView(), CatalogView())

    @property
    def checkpoint_id(self) -> CheckpointId | None:
        return self.location.checkpoint_id if self.location is not None else None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: CheckpointId) -> bool:
        try:
            return root_document(Location(checkpoint_id))[1] is not None
        except (UsageError, CorruptCheckpointError):  # not a location, a root that is no JSON
            return False

    def reset(self, checkpoint_id: CheckpointId | None = None) -> None:
        if checkpoint_id is not None:
            self._given = None
        self.location = location_for(checkpoint_id, self.location, type(self).__name__)
        self._direct = None
        self.committed = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        assert self.location is not None
        self.committed, self._given = self._given or open_committed(self.location), None
        catalog = self.committed.catalog
        zdcp_fqns, dcp_fqns = CatalogView(), CatalogView()
        candidates: dict[str, list[tuple[Any, ValueSource, tuple[Any, ...]]]] = {}
        for fqn, array in catalog.arrays.items():
            md = _tensor_metadata(array) if array.kind == "tensor" else BytesStorageMetadata()
            zdcp_fqns.add(fqn, md, ValueSource(fqn), array.entry.path)
            candidates.setdefault(array.entry.dcp_fqn, []).append((md, ValueSource(fqn), array.entry.path))
        for fqn, value in catalog.composites.items():
            zdcp_fqns.add(fqn, BytesStorageMetadata(), ValueSource(fqn), value.entry.path)
        for fqn, value in catalog.values.items():
            path = value.entry.path
            zdcp_fqns.add(fqn, BytesStorageMetadata(), ValueSource(fqn), path)
            for sub in _dcp_leaves(value.value):
                leaf = path + sub
                found = (BytesStorageMetadata(), ValueSource(fqn, sub), leaf)
                candidates.setdefault(dotted(leaf), []).append(found)
        # DCP's dotted names can be ambiguous ("a.b" vs a -> b); an ambiguous one is left out.
        for fqn, found in candidates.items():
            if len(found) == 1:
                dcp_fqns.add(fqn, *found[0])
        self.views = CatalogViews(zdcp=zdcp_fqns, dcp=dcp_fqns)
        return Metadata(state_dict_metadata=dcp_fqns.metadata, planner_data=dcp_fqns.paths, storage_data=self.views)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, CatalogViews):
            raise UsageError("ZarrReader got metadata it did not read itself")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Plan which rank reads each region that several ranks need (:mod:`zdcp.sharing`)."""
        shares = self.share_reads and not self.allow_cast and distributed() and len(plans) > 1
        if not shares or len(plans) != dist.get_world_size(self.process_group):
            return plans
        assert self.committed is not None
        hierarchy = self.committed.hierarchy
        order = functools.cache(lambda: hierarchy.layout.storage_order(hierarchy))  # asked once, if at all

        def position(region: Region) -> tuple[str, int]:
            """Where the stored chunk holding the region's first element lies."""
            array, chunk_at = self._array(region[0]), order()
            if chunk_at is None or array is None or not array.shape:
                return "", 0
            return chunk_at(array.chunk_key(tuple(o // n for o, n in zip(region[1], array.chunks))))

        return plan_sharing(plans, self._itemsize, position)

    def _array(self, fqn: str) -> ArrayNode | None:
        """The stored array a plan's ``fqn`` reads from, by either view of the checkpoint."""
        assert self.committed is not None
        source = self.views.zdcp.sources.get(fqn) or self.views.dcp.sources.get(fqn)
        return self.committed.catalog.arrays.get(source.fqn) if source is not None else None

    def _itemsize(self, fqn: str) -> int:
        array = self._array(fqn)
        return array.dtype.numpy.itemsize if array is not None else 1

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if isinstance(plan.storage_data, Sharing):
            self._read_sharing(plan, planner, plan.storage_data)
        else:
            window = InflightWindow(self.max_inflight_bytes)
            self._read(self._prepare(plan.items, planner).own, planner, window)
            window.drain()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_sharing(self, plan: LoadPlan, planner: LoadPlanner, sharing: Sharing) -> None:
        """Read the regions this rank reads for others and exchange them, batch by batch: a
        batch's sends and receives are in flight while this rank reads its regions of the next
        batch, and before each exchange every rank agrees that its reads of that batch
        succeeded (so that none waits for a region whose reader failed). Then this rank's own
        regions. Each batch holds half the window, so that two of them in flight hold one."""
        collectives = Collectives(self.process_group)
        rank = dist.get_rank(self.process_group)
        half = self.max_inflight_bytes // 2 if self.max_inflight_bytes is not None else None
        steps = list(batches(sharing.transfers, half))
        windows: dict[int, InflightWindow] = {}  # the reads of a batch, in flight

        def start(step: int) -> None:
            windows[step] = InflightWindow(None)
            regions = [t.region for t in steps[step] if t.reader == rank]
            self._read([read for region in regions for read in reads.sent[region]], planner, windows[step])

        def read_own() -> None:
            window = InflightWindow(self.max_inflight_bytes)
            self._read(reads.own, planner, window)
            window.drain()

        def buffer(transfer: Transfer, device: torch.device) -> torch.Tensor:
            _, dest, array = reads.received[transfer.region][0]
            if dest.device == device and dest.dtype == array.dtype.torch and dest.is_contiguous():
                return dest  # received in place
            return torch.empty(transfer.region[2], dtype=array.dtype.torch, device=device)

        sent = {t.region for t in sharing.transfers if t.reader == rank}
        reads, error = attempt(lambda: self._prepare(plan.items, planner, sharing.received_by(rank), sent))
        tag = 0  # of the batch's first transfer: each has its own
        try:
            if error is None:
                _, error = attempt(lambda: start(0))
            for step, batch in enumerate(steps):
                if error is None:
                    _, error = attempt(windows[step].drain)
                collectives.agree(error, "reading the checkpoint")
                landing = collectives.exchange(batch, lambda t: reads.sent[t.region][0][1], buffer, tag)
                tag += len(batch)
                if step + 1 < len(steps):
                    _, error = attempt(lambda: start(step + 1))
                for transfer, data in landing():
                    for item, dest, _ in reads.received[transfer.region]:
                        if data is not dest:
                            dest.copy_(data.view(dest.shape))
                        planner.commit_tensor(item, dest)
        finally:  # after a failure: no read is left writing into a destination
            for window in windows.values():
                window.settle()
        collectives.run("reading the checkpoint", read_own)

    def _prepare(
        self,
        items: list[ReadItem],
        planner: LoadPlanner,
        received: Mapping[Region, Transfer] | None = None,
        sent: set[Region] | None = None,
    ) -> _Reads:
        """Check that ``items`` can be read into the planner's destinations, load the values
        among them, and sort the tensor reads: of regions in ``received`` (another rank reads
        them), of regions in ``sent`` (this rank reads them for others too), and the rest."""
        assert self.committed is not None
        catalog = self.committed.catalog
        view = self.views.zdcp if isinstance(planner, ZarrLoadPlanner) else self.views.dcp
        sources = [view.sources[item.storage_index.fqn] for item in items]
        for source in sources:
            array = catalog.arrays.get(source.fqn)
            if array is not None:
                array.check_readable(allow_pickle=self.allow_pickle)
        reads, value_items = _Reads(), []
        for item, source in zip(items, sources):
            if item.type == LoadItemType.BYTE_IO:
                value_items.append((item, source))
                continue
            array = catalog.arrays[source.fqn]
            dest = planner.resolve_tensor(item)
            if dest.dtype != array.dtype.torch and not self.allow_cast:
                raise MismatchError(
                    f"key {describe(array.entry.path)!r}: checkpoint has dtype {array.dtype.torch}, "
                    f"destination {dest.dtype} (pass allow_cast=True to convert)"
                )
            region = region_of(item)
            if received and region in received:
                reads.received.setdefault(region, []).append((item, dest, array))
            elif sent and region in sent:
                reads.sent.setdefault(region, []).append((item, dest, array))
            else:
                reads.own.append((item, dest, array))
        # Only now that every item is known to fit does the destination change.
        for item, source in value_items:
            value = self._value(source)
            if isinstance(planner, ZarrLoadPlanner):
                planner.load_value(item, value)
            else:  # DCP's planners take torch.save bytes
                planner.load_bytes(item, _torch_saved(value))
        return reads

    def _read(self, reads: list[_Read], planner: LoadPlanner, window: InflightWindow) -> None:
        """Start reading ``reads`` into their destinations: one tensorstore call per
        destination slice, in ``window`` (the caller drains it), or straight from local files
        for whole-row slabs of plain chunks, at once. Each is committed to the planner once read."""
        assert self.committed is not None
        hierarchy = self.committed.hierarchy
        stores: dict[str, ts.TensorStore] = {}
        for item, dest, array in reads:
            node = array.node
            if self._read_direct(item, dest, array):
                planner.commit_tensor(item, dest)
                continue
            if node not in stores:
                stores[node] = hierarchy.wait(hierarchy.open_array(node, array.document))
            region = stores[node][tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))]
            in_place = dest.device.type == "cpu" and dest.dtype == array.dtype.torch
            if in_place:  # tensorstore writes into the destination's memory: no staging copy
                future = ts.array(tensor_to_numpy(dest), copy=False, write=True).write(region)
            else:
                future = region.read()
            nbytes = dest.numel() * dest.element_size()
            finish = functools.partial(_finish_read, planner, item, dest, array, in_place, hierarchy.url)
            window.add(future, nbytes, finish)

    def _read_direct(self, item: ReadItem, dest: torch.Tensor, array: ArrayNode) -> bool:
        """Read ``item`` with the layout's direct reader when its chunks and destination
        allow it: plain chunks in local files, where the layout tells where they lie."""
        if not self.direct_reads:
            return False
        if dest.device.type != "cpu" or dest.dtype != array.dtype.torch or not dest.is_contiguous():
            return False
        if not array.shape or dest.numel() == 0:  # no rows
            return False
        if any(item.storage_offsets[1:]) or list(item.lengths[1:]) != list(array.shape[1:]):
            return False
        if self._direct is None:  # asked of the checkpoint's layout once per load
            assert self.committed is not None
            hierarchy = self.committed.hierarchy
            self._direct = (hierarchy.layout.direct_reader(hierarchy),)
        direct = self._direct[0]
        if direct is None:
            return False
        start, stop = item.storage_offsets[0], item.storage_offsets[0] + item.lengths[0]
        destination = dest.reshape(-1).view(torch.uint8).numpy()
        return direct.read_rows(array.node, array.document, describe(array.entry.path), start, stop, destination)

    def _value(self, source: ValueSource) -> Any:
        """The value for a BYTE_IO item: a new object, as unpickling would give (the catalog's
        own stays as parsed)."""
        assert self.committed is not None
        catalog, hierarchy = self.committed.catalog, self.committed.hierarchy
        if source.fqn in catalog.arrays:
            array = catalog.arrays[source.fqn]
            with reading(describe(array.entry.path), hierarchy.url):
                data = hierarchy.open_array(array.node, array.document).result().read().result()
            value = array.value(data.tobytes(), allow_pickle=self.allow_pickle)
        else:
            value = (catalog.values.get(source.fqn) or catalog.composites[source.fqn]).value
            for key in source.subpath:
                value = value[key]
            value = copy.deepcopy(value)
        return value


#: One tensor read: the plan's item, its destination, the stored array.
_Read = tuple[ReadItem, torch.Tensor, ArrayNode]


@dataclass
class _Reads:
    """A rank's tensor reads, sorted for a load that shares reads (:mod:`zdcp.sharing`)."""

    own: list[_Read] = field(default_factory=list)  # of regions no other rank gets from this one
    sent: dict[Region, list[_Read]] = field(default_factory=dict)  # read here, sent to others too
    received: dict[Region, list[_Read]] = field(default_factory=dict)  # read by another rank


def _torch_saved(value: Any) -> io.BytesIO:
    """``value`` as the ``torch.save`` bytes DCP's planners load."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def _finish_read(
    planner: LoadPlanner, item: ReadItem, dest: torch.Tensor, array: ArrayNode, in_place: bool, url: str, future: Any
) -> None:
    with reading(describe(array.entry.path), url):
        result = future.result()
    if not in_place:
        dest.copy_(numpy_to_tensor(result, array.dtype.torch))
    planner.commit_tensor(item, dest)


def _dcp_leaves(value: Any, sub: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Key paths, relative to a plain value, of the leaves DCP's planner splits it into.

    Mirrors ``torch.distributed.checkpoint._traverse.traverse_state_dict``: mappings are
    descended into, lists only when they hold a mapping somewhere; everything else is a leaf.
    Unlike DCP, the paths keep the real (not ``str()``-ed) keys, so they can index the value.
    """
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _dcp_leaves(v, sub + (k,))]
    if isinstance(value, list) and _holds_mapping(value):
        return [p for i, v in enumerate(value) for p in _dcp_leaves(v, sub + (i,))]
    return [sub]


def _holds_mapping(values: list[Any]) -> bool:
    return any(isinstance(v, Mapping) or (isinstance(v, list) and _holds_mapping(v)) for v in values)


def _tensor_metadata(array: ArrayNode) -> TensorStorageMetadata:
    size = torch.Size(array.shape)
    whole = ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)
    return TensorStorageMetadata(TensorProperties(dtype=array.dtype.torch), size, [whole])
