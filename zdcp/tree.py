"""The shape of a state dict: which leaf sits at which key path, under which containers.

DCP flattens a nested state dict into ``{fqn: leaf}`` plus a mapping ``fqn -> key path``.
zdcp's planners flatten the same way, with three differences that the format needs:

* the FQN is the leaf's keys encoded by :mod:`zdcp.format.names` and joined with ``"/"``
  (``"app/model/net1.weight"``): unique, and the node path of the leaf except where a long
  name is shortened;
* key types are kept (DCP turns int keys into strings), and each key remembers whether it
  indexes a dict or a list, so groups can be rebuilt as the right container;
* a list is only descended into when it holds tensors; a list of plain values (optimizer
  ``param_groups``) is one leaf stored as JSON, not dozens of scalars. Empty dicts are leaves
  too, so that they survive a round trip.

:class:`~zdcp.format.names.Entry` is what zdcp's planners put in ``SavePlan.planner_data``; the writer also accepts
DCP's plain key-path tuples (:meth:`Entry.from_dcp_path`) so that DCP's default planner works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._sharded_tensor_utils import _flatten_sharded_tensors
from torch.distributed.tensor import DTensor

from .errors import UnsupportedValueError
from .format.names import DICT, LIST, Entry, Key, describe, encode_key

__all__ = ["flatten", "tensor_placement"]


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_tensor(v) for v in value)
    return False


def flatten(state_dict: Mapping[Key, Any]) -> tuple[dict[str, Any], dict[str, Entry]]:
    """``({fqn: leaf}, {fqn: Entry})`` for a nested state dict.

    A ``ShardedTensor`` nested in another (FSDP's 2-D state dicts) is replaced by its inner
    shard, as DCP's planners do; DCP's own helper for it rebuilds the whole state dict with
    ``str()``-ed keys, so it is applied leaf by leaf here.
    """
    flat: dict[str, Any] = {}
    entries: dict[str, Entry] = {}

    def visit(path: tuple[Key, ...], kinds: tuple[str, ...], value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                encode_key(k, describe(path))  # refuse unsupported key types, naming where
                visit(path + (k,), kinds + (DICT,), v)
        elif isinstance(value, list) and _holds_tensor(value):
            for i, v in enumerate(value):
                visit(path + (i,), kinds + (LIST,), v)
        else:
            if isinstance(value, ShardedTensor):
                value = _flatten_sharded_tensors({"t": value}).get("t")
                if value is None:  # no local shard: nothing to read or write here
                    return
            entry = Entry(path, kinds)
            flat[entry.fqn] = value
            entries[entry.fqn] = entry

    for key, value in state_dict.items():
        if not isinstance(key, str):  # DCP's load sorts the top-level keys and calls Stateful by name
            raise UnsupportedValueError(f"top-level state-dict key {key!r} must be a str")
        visit((key,), (DICT,), value)
    return flat, entries


def tensor_placement(tensor: torch.Tensor) -> dict[str, Any]:
    """A JSON description of how a tensor is distributed (recorded, never needed to load)."""
    if isinstance(tensor, DTensor):
        mesh = tensor.device_mesh
        return {
            "type": "DTensor",
            "mesh_shape": list(mesh.shape),
            "mesh_dim_names": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
            "placements": [repr(p) for p in tensor.placements],
        }
    if isinstance(tensor, ShardedTensor):
        return {"type": "ShardedTensor", "sharding_spec": repr(tensor.sharding_spec())}
    return {"type": "Tensor"}
