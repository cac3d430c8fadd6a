"""What a committed checkpoint holds, parsed from its root ``zarr.json``.

The root document is the commit record and carries every other node's metadata (consolidated),
so one read tells a reader every array, group and plain value, with no listing and no per-node
reads. Everything here is validated before use: node names must be names zdcp writes (so a
crafted checkpoint cannot point reads outside its directory), and the format version must be
one this zdcp understands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from .constants import ATTR, FORMAT_NAME, FORMAT_VERSION
from .documents import chunk_key, chunk_key_separator, zdcp_attrs
from .dtypes import DType, from_torch_name, from_zarr
from .names import DICT, LIST, Entry, Key, decode_key
from .values import from_json

__all__ = ["Catalog", "GroupNode", "ArrayNode", "ValueNode"]


@dataclass(frozen=True)
class ArrayNode:
    """A stored array: a tensor (``kind == "tensor"``) or a pickled value (``"pickle"``)."""

    entry: Entry
    kind: str
    shape: tuple[int, ...]
    dtype: DType
    chunks: tuple[int, ...]
    document: dict[str, Any]
    layout: dict[str, Any] | None
    separator: str  # of its chunk keys (layout.chunk_key)

    def chunk_key(self, node: str, index: tuple[int, ...]) -> str:
        return chunk_key(node, index, self.separator)


@dataclass(frozen=True)
class ValueNode:
    """A plain value: stored as JSON in its group's attributes, or a whole group of them."""

    entry: Entry
    value: Any


@dataclass(frozen=True)
class GroupNode:
    """A group: a dict or a list of the state dict. ``children`` maps each key to a node path
    (an array, a group, or a plain value)."""

    entry: Entry
    container: str
    children: dict[Key, str]


@dataclass(frozen=True)
class Catalog:
    """Every node of a committed checkpoint, keyed by node path (the root group is ``""``).

    ``values`` holds the plain values as stored. ``composites`` holds, for every group with no
    array below it, the whole group rebuilt as one Python value (a list or dict): DCP's own
    planner splits a list of dicts such as ``param_groups`` into one value per leaf, and a
    reader asking for the list as one value finds it here.
    """

    info: dict[str, Any]
    documents: dict[str, Any]  # every non-root node's zarr.json, as consolidated in the root
    groups: dict[str, GroupNode]
    arrays: dict[str, ArrayNode]
    values: dict[str, ValueNode]
    composites: dict[str, ValueNode]

    @classmethod
    def parse(cls, root: Any, where: str) -> Catalog:
        info = zdcp_attrs(root)
        if info is None or info.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}/zarr.json is not the root of a zdcp checkpoint")
        version = info.get("format_version")
        if type(version) is not int or version < 1:
            raise CorruptCheckpointError(f"{where}/zarr.json: format_version {version!r} is not a format version")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where} was written in zdcp format version {version!r}; this zdcp reads up to "
                f"{FORMAT_VERSION}: upgrade zdcp"
            )
        try:
            nodes = dict(root["consolidated_metadata"]["metadata"])
        except (KeyError, TypeError):
            raise CorruptCheckpointError(f"{where}/zarr.json has no consolidated metadata") from None
        nodes[""] = root
        try:
            return cls._build(info, nodes)
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where}/zarr.json: malformed node metadata ({e!r})") from None

    @classmethod
    def _build(cls, info: dict[str, Any], nodes: dict[str, Any]) -> Catalog:
        containers: dict[str, str] = {}
        for node, doc in nodes.items():
            if doc["node_type"] == "group":
                containers[node] = (zdcp_attrs(doc) or {}).get("container", DICT)

        def entry(node: str) -> Entry:
            names = node.split("/")
            path: tuple[Key, ...] = tuple(decode_key(n) for n in names)
            kinds = tuple(containers["/".join(names[:i])] for i in range(len(names)))
            return Entry(path, kinds)

        arrays: dict[str, ArrayNode] = {}
        values: dict[str, ValueNode] = {}
        for node, doc in nodes.items():
            attrs = zdcp_attrs(doc) or {}
            if doc["node_type"] == "array":
                kind = attrs.get("kind", "tensor")
                dtype = from_torch_name(attrs["dtype"]) if kind == "tensor" else from_zarr(doc["data_type"])
                if dtype.zarr != doc["data_type"]:
                    raise ValueError(f"{node}: torch dtype {dtype.torch_name} stored as {doc['data_type']}")
                shape, chunks = tuple(doc["shape"]), tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
                if not _grid_ok(shape, chunks):
                    raise ValueError(f"{node}: shape {list(shape)} with chunk shape {list(chunks)}")
                arrays[node] = ArrayNode(
                    entry=entry(node),
                    kind=kind,
                    shape=shape,
                    dtype=dtype,
                    chunks=chunks,
                    document=doc,
                    layout=attrs.get("layout"),
                    separator=chunk_key_separator(doc),
                )
                continue
            types = attrs.get("types", {})
            for name, value in doc.get("attributes", {}).items():
                if name == ATTR:
                    continue
                path = f"{node}/{name}" if node else name
                values[path] = ValueNode(entry(path), from_json(value, types.get(name)))
        groups = {g: GroupNode(entry(g) if g else Entry((), ()), kind, {}) for g, kind in containers.items()}
        for node in [*sorted(groups), *sorted(arrays), *values]:
            if node:
                parent, _, name = node.rpartition("/")
                groups[parent].children[decode_key(name)] = node
        for g, group in groups.items():
            if group.container == LIST and set(group.children) != set(range(len(group.children))):
                raise ValueError(f"list group {g!r} does not hold exactly the indices 0..{len(group.children) - 1}")
        documents = {node: doc for node, doc in nodes.items() if node}
        return cls(info, documents, groups, arrays, values, _composites(groups, arrays, values))


def _grid_ok(shape: tuple[Any, ...], chunks: tuple[Any, ...]) -> bool:
    """A shape of non-negative ints with a chunk shape of positive ints, one per dimension, and
    no more elements in the array or in a chunk than an int64 counts (a crafted shape must not
    reach an allocation)."""
    ints = all(type(n) is int for n in shape + chunks)
    if not (ints and len(shape) == len(chunks) and all(n >= 0 for n in shape) and all(c >= 1 for c in chunks)):
        return False
    return math.prod(shape) < _MAX_ELEMENTS and math.prod(chunks) < _MAX_ELEMENTS


_MAX_ELEMENTS = 2**63


def _composites(
    groups: dict[str, GroupNode], arrays: dict[str, ArrayNode], values: dict[str, ValueNode]
) -> dict[str, ValueNode]:
    """Each group without arrays below it, rebuilt as a list or dict of its values."""
    with_arrays = {"/".join(node.split("/")[:i]) for node in arrays for i in range(len(node.split("/")))}

    def rebuild(group: GroupNode) -> Any:
        items = {
            key: rebuild(groups[node]) if node in groups else values[node].value
            for key, node in group.children.items()
        }
        if group.container == LIST:
            return [items[i] for i in range(len(items))]
        return items

    return {g: ValueNode(node.entry, rebuild(node)) for g, node in groups.items() if g and g not in with_arrays}
