"""DCP planners that flatten state dicts the zdcp way.

They reuse everything of DCP's default planners (dedup of replicated shards, ``ShardedTensor``
flattening, resharding read items, plan validation) and change only what the format needs:
how a nested state dict is flattened (:func:`zdcp.tree.flatten`), early refusal of values the
format cannot hold, and clear, typed errors for keys and shapes that do not match.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem
from torch.distributed.checkpoint.planner_helpers import _init_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .dedup import spread_replicated
from .errors import MismatchError, MissingKeysError, UnsupportedValueError
from .format.dtypes import check_storable
from .format.names import describe
from .format.values import to_json
from .payloads import CatalogViews
from .tree import flatten

__all__ = ["ZarrSavePlanner", "ZarrLoadPlanner"]


class ZarrSavePlanner(DefaultSavePlanner):
    """DCP's default save planner over a zdcp-flattened state dict.

    ``planner_data`` of each local plan maps every FQN to its
    :class:`~zdcp.format.names.Entry`, which the writer uses to build groups and record placements.
    """

    #: Whether ``resolve_data`` supplies the data of meta-device placeholders in the state dict
    #: (conversions do); otherwise a meta tensor has no data and is refused.
    resolves_placeholders = False

    def __init__(self, *, allow_pickle: bool = False, enable_plan_caching: bool = False):
        super().__init__(
            flatten_state_dict=False,
            flatten_sharded_tensors=False,  # done leaf by leaf in flatten()
            # DCP's plan caching: an unchanged plan is not sent again, the coordinator skips
            # global planning, and each rank writes by its cached final plan (see ZarrWriter).
            **({"enable_plan_caching": True} if enable_plan_caching else {}),
        )
        self.allow_pickle = allow_pickle

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        flat, self.mappings = flatten(state_dict)
        # Refuse what the format cannot hold now, on every rank, before anything is written.
        for fqn, value in flat.items():
            key = describe(self.mappings[fqn].path)
            if isinstance(value, torch.Tensor):
                for local in _local_tensors(value):
                    check_storable(local, key=key, allow_meta=self.resolves_placeholders)
                if isinstance(value, DTensor):
                    _check_dtensor_shard(value, key)
            elif not self.allow_pickle:
                to_json(value, key)
        super().set_up_planner(flat, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        if plan.usable:  # an unusable plan stands for this rank's cached one (DCP's plan caching)
            plan = self.plan = dataclasses.replace(plan, planner_data=self.mappings)
        return plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """DCP's global plan (which checks that the shards tile each tensor), after checking that
        the ranks agree on every tensor's shape and dtype."""
        seen: dict[str, tuple[int, tuple[Any, ...]]] = {}
        for rank, plan in enumerate(all_plans):
            for item in plan.items:
                if item.tensor_data is None:
                    continue
                this = (tuple(item.tensor_data.size), item.tensor_data.properties.dtype)
                first_rank, first = seen.setdefault(item.index.fqn, (rank, this))
                if this != first:
                    raise UnsupportedValueError(
                        f"ranks disagree on tensor {item.index.fqn!r}: shape {first[0]} and dtype {first[1]} on "
                        f"rank {first_rank}, shape {this[0]} and dtype {this[1]} on rank {rank}"
                    )
        return super().create_global_plan(all_plans)

    def _dedup_save_plans(self, all_plans: list[SavePlan]) -> list[SavePlan]:
        """Each replicated tensor written once, the writes spread across its holders by bytes
        (:mod:`zdcp.dedup`); what is left replicated (values) deduplicated DCP's way."""
        return super()._dedup_save_plans(spread_replicated(all_plans))

    def lookup_object(self, index: MetadataIndex) -> Any:
        """DCP finds a plain tensor only by offset zero; a piece of a replicated one
        (:mod:`zdcp.dedup`) has others: its data is in the whole tensor (:meth:`resolve_data`)."""
        value = self.state_dict.get(index.fqn)
        if isinstance(value, torch.Tensor) and not isinstance(value, (DTensor, ShardedTensor)):
            return value
        return super().lookup_object(index)

    def resolve_data(self, write_item: WriteItem) -> Any:
        """The item's data: for a piece of a replicated tensor (:mod:`zdcp.dedup`), the part of
        this rank's local tensor the piece covers."""
        data = super().resolve_data(write_item)
        if write_item.tensor_data is None or not isinstance(data, torch.Tensor):
            return data
        chunk = write_item.tensor_data.chunk
        if tuple(data.shape) == tuple(chunk.sizes):
            return data
        origin = _local_offsets(self.state_dict[write_item.index.fqn])
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            data = data.narrow(dim, offset - origin[dim], size)
        return data


class ZarrLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner over a zdcp-flattened destination state dict.

    Loading a subset of the checkpoint is normal; asking for a key the checkpoint lacks raises
    :class:`~zdcp.MissingKeysError` unless ``allow_partial_load``. Plain values replace the
    destination's values with their stored Python types.

    Its FQNs are zdcp's (:attr:`Entry.fqn <zdcp.format.names.Entry.fqn>`): with
    :class:`~zdcp.ZarrReader`'s metadata it plans against zdcp's view of the checkpoint
    (:class:`~zdcp.payloads.CatalogViews`), and the reader reads by that view for this planner.
    """

    def __init__(self, *, allow_partial_load: bool = False):
        super().__init__(allow_partial_load=allow_partial_load)

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        _init_state_dict(state_dict)
        self.original_state_dict = state_dict
        self.state_dict, self.mappings = flatten(state_dict)
        views = metadata.storage_data if metadata is not None else None
        if isinstance(views, CatalogViews):
            metadata = Metadata(views.zdcp.metadata, planner_data=views.zdcp.paths, storage_data=views)
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata
        missing = sorted(describe(self.mappings[fqn].path) for fqn in self.state_dict if fqn not in stored)
        if missing and not self.allow_partial_load:
            raise MissingKeysError(f"checkpoint has no value for {len(missing)} key(s): {', '.join(missing)}")
        for fqn, value in self.state_dict.items():
            if fqn in stored:
                _check_fits(describe(self.mappings[fqn].path), stored[fqn], value)
        return create_default_local_load_plan(self.state_dict, self.metadata, strict=False)

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Put a plain value into the destination, in place of what it held there:
        :class:`~zdcp.ZarrReader` hands this planner values as they are, with no pickle round
        trip."""
        path = self.mappings[read_item.dest_index.fqn].path
        container: Any = self.original_state_dict
        for key in path[:-1]:
            container = container[key]
        container[path[-1]] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """DCP's way: a value as ``torch.save`` bytes (from a reader other than zdcp's)."""
        self.load_value(read_item, torch.load(value, weights_only=False))


def _check_fits(key: str, stored: Any, dest: Any) -> None:
    """Refuse a destination that is not the kind or shape of the stored value."""
    is_tensor = isinstance(stored, TensorStorageMetadata)
    if is_tensor != isinstance(dest, torch.Tensor):
        have = "a tensor" if is_tensor else "a non-tensor value"
        want = type(dest).__name__
        raise MismatchError(f"key {key!r}: checkpoint holds {have}, destination is {want}")
    if is_tensor and tuple(stored.size) != tuple(dest.size()):
        raise MismatchError(
            f"key {key!r}: checkpoint has shape {tuple(stored.size)}, destination {tuple(dest.size())}"
        )


def _local_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding this rank's data of a (possibly distributed) tensor."""
    if isinstance(tensor, DTensor):
        return [tensor.to_local()]
    if isinstance(tensor, ShardedTensor):
        return [shard.tensor for shard in tensor.local_shards()]
    return [tensor]


def _local_offsets(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's local data of a plain tensor or a ``DTensor`` starts in the whole."""
    if isinstance(tensor, DTensor):
        return tuple(compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)[1])
    return (0,) * tensor.dim()


def _check_dtensor_shard(tensor: DTensor, key: str) -> None:
    """Refuse a DTensor whose local shard is not the shape its placement gives this rank (built
    with ``from_local(..., run_check=False)`` and a wrong ``shape``): it would write elsewhere
    than the ranks' plans say."""
    expected, _ = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    local = tuple(tensor.to_local().shape)
    if local != tuple(expected):
        raise UnsupportedValueError(
            f"DTensor at {key!r}: this rank's local shard has shape {local}, but global shape "
            f"{tuple(tensor.shape)} with placements {tuple(tensor.placements)} gives it {tuple(expected)}"
        )
