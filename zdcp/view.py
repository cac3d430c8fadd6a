"""``zdcp.open``: a lazy, read-only view of a checkpoint, for people without the training code.

Opening reads one document (the root ``zarr.json``, which carries every node's metadata), so
opening a 100 GB checkpoint costs the same as opening a small one. Groups behave like read-only
mappings, plain values come back as Python values, and arrays are handles: indexing one reads
only the stored chunks the index touches and returns a CPU tensor.

    ck = zdcp.open("checkpoints/step_100")
    w = ck["app/model/net1.weight"]          # or ck["app"]["model"]["net1.weight"]
    w.shape, w.dtype, w.chunks, w.nbytes     # metadata only
    w[10:20, 3:7]                            # a torch.Tensor; reads one or two chunks
    ck["app/optim"].to_state_dict()          # a nested state dict, original types
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tensorstore as ts
import torch

from .format.catalog import ArrayNode, Catalog, GroupNode
from .format.documents import user_metadata
from .format.dtypes import numpy_to_tensor
from .format.names import LIST, Key, describe
from .storage.contents import open_committed
from .storage.failures import reading
from .storage.hierarchy import Hierarchy
from .storage.location import CheckpointId, Location

__all__ = ["open", "Group", "Array"]

def open(checkpoint_id: CheckpointId, *, allow_pickle: bool = False) -> Group:  # noqa: A001
    """Open a committed checkpoint read-only; returns its root :class:`Group`.

    Args:
        allow_pickle: let values saved with ``allow_pickle=True`` be unpickled when read.
            Unpickling runs code chosen by whoever wrote the checkpoint: trusted files only.
    """
    committed = open_committed(Location(checkpoint_id))
    return Group(_Source(committed.hierarchy, committed.catalog, allow_pickle), "")


class _Source:
    """What every view of one opened checkpoint shares: its hierarchy, its catalog, the arrays
    opened so far."""

    def __init__(self, hierarchy: Hierarchy, catalog: Catalog, allow_pickle: bool):
        self.hierarchy = hierarchy
        self.catalog = catalog
        self.allow_pickle = allow_pickle
        self._arrays: dict[str, ts.TensorStore] = {}

    def array(self, node: ArrayNode) -> ts.TensorStore:
        if node.node not in self._arrays:
            self._arrays[node.node] = self.hierarchy.wait(self.hierarchy.open_array(node.node, node.document))
        return self._arrays[node.node]

    def child(self, node: str) -> Any:
        """The view of a node: a Group, an Array, or a plain value."""
        catalog = self.catalog
        if node in catalog.groups:
            return Group(self, node)
        if node in catalog.values:
            return catalog.values[node].value
        array = catalog.arrays[node]
        if array.kind == "tensor":
            return Array(self, array)
        array.check_readable(allow_pickle=self.allow_pickle)
        data = _read(self.array(array), ..., array, self.hierarchy.url).numpy().tobytes()
        return array.value(data, allow_pickle=self.allow_pickle)


class Group(Mapping[Key, Any]):
    """A group of a checkpoint: a read-only mapping from keys to groups, arrays and values.

    A ``str`` key that names no child but contains ``"/"`` is taken as a path of keys, so
    ``ck["app/model/net1.weight"]`` is ``ck["app"]["model"]["net1.weight"]``.
    """

    def __init__(self, source: _Source, node: str):
        self._source = source
        self._node: GroupNode = source.catalog.groups[node]

    @property
    def path(self) -> tuple[Key, ...]:
        """The keys from the root of the state dict to this group."""
        return self._node.entry.path

    @property
    def is_list(self) -> bool:
        """Whether the state dict held a list here (its keys are then 0, 1, ...)."""
        return self._node.container == LIST

    @property
    def info(self) -> dict[str, Any]:
        """The checkpoint's own record: format version, world size, torch and zdcp versions."""
        return dict(self._source.catalog.info)

    @property
    def metadata(self) -> Any:
        """The ``metadata`` the checkpoint was saved with (:class:`~zdcp.SaveOptions`), or
        None."""
        return user_metadata(self._source.catalog.info)

    def __getitem__(self, key: Key) -> Any:
        children = self._node.children
        if key in children:
            return self._source.child(children[key])
        if isinstance(key, str) and "/" in key:
            view: Any = self
            for part in key.split("/"):
                if not isinstance(view, Group):
                    raise KeyError(f"{describe(self.path + (part,))}: not a group")
                view = view[_as_key(view, part)]
            return view
        raise KeyError(f"{describe(self.path + (key,))} is not in the checkpoint")

    def __iter__(self) -> Iterator[Key]:
        return iter(self._node.children)

    def __len__(self) -> int:
        return len(self._node.children)

    def __repr__(self) -> str:
        kind = "list" if self.is_list else "group"
        return f"<zdcp {kind} {describe(self.path)!r} with {len(self)} entries>"

    def walk(self) -> Iterator[tuple[tuple[Key, ...], Any]]:
        """Every node below this group, depth first, parents before children, as
        ``(key_path, view)``: groups, arrays and plain values."""
        for key in self:
            child = self[key]
            yield self.path + (key,), child
            if isinstance(child, Group):
                yield from child.walk()

    def arrays(self) -> Iterator[tuple[tuple[Key, ...], Array]]:
        """Every array below this group, with its key path, depth first."""
        return ((path, child) for path, child in self.walk() if isinstance(child, Array))

    def to_state_dict(self, read: Callable[[Array], Any] = lambda array: array[...]) -> dict[Key, Any] | list[Any]:
        """This group as a nested state dict (a list where the state dict held one), plain values
        with their original types and arrays replaced by ``read(array)``: by default the whole
        tensor on the CPU."""
        items = {}
        for key in self:
            child = self[key]
            if isinstance(child, Group):
                child = child.to_state_dict(read)
            elif isinstance(child, Array):
                child = read(child)
            items[key] = child
        if self.is_list:
            return [items[i] for i in range(len(items))]
        return items


class Array:
    """A stored tensor. Metadata is free; indexing reads only the chunks the index touches."""

    def __init__(self, source: _Source, node: ArrayNode):
        self._source = source
        self._node = node

    @property
    def path(self) -> tuple[Key, ...]:
        return self._node.entry.path

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._node.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._node.dtype.torch

    @property
    def chunks(self) -> tuple[int, ...]:
        """The chunk shape: the shard shape the tensor was saved with."""
        return self._node.chunks

    @property
    def ndim(self) -> int:
        return len(self._node.shape)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self._node.dtype.numpy.itemsize

    @property
    def placement(self) -> dict[str, Any] | None:
        """How the tensor was distributed at save (placements, mesh), as recorded."""
        return self._node.placement

    def __len__(self) -> int:
        if not self._node.shape:
            raise TypeError("len() of a 0-d array")
        return self._node.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return _read(self._source.array(self._node), index, self._node, self._source.hierarchy.url)

    def read(self) -> torch.Tensor:
        """The whole tensor, on the CPU."""
        return self[...]

    def __repr__(self) -> str:
        return f"<zdcp array {describe(self.path)!r} shape={tuple(self.shape)} dtype={self.dtype} chunks={self.chunks}>"


def _read(store: ts.TensorStore, index: Any, node: ArrayNode, url: str) -> torch.Tensor:
    with reading(describe(node.entry.path), url):
        data = store[index].read().result()
    return numpy_to_tensor(data, node.dtype.torch)


def _as_key(group: Group, part: str) -> Key:
    """A path segment as a key: int where the group is a list or has that int key."""
    if part not in group._node.children and part.lstrip("-").isdigit() and int(part) in group._node.children:
        return int(part)
    return part

