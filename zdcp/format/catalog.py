"""What a committed checkpoint holds, parsed from its root ``zarr.json``.

The root document is the commit record and carries every other node's metadata (consolidated),
so one read tells a reader every array, group and plain value, with no listing and no per-node
reads. Everything here is validated before use: node names must be names zdcp writes (so a
crafted checkpoint cannot point reads outside its directory), and the format version must be
one this zdcp understands.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError, UnsafeError, UnsupportedFormatError
from .constants import ATTR, FORMAT_NAME, FORMAT_VERSION
from .documents import chunk_key, chunk_key_separator, zdcp_attrs
from .dtypes import DType, from_torch_name, from_zarr
from .names import DICT, LIST, Entry, Key, decode_key, decode_node_name, describe
from .values import BYTES_TYPES, from_bytes, from_json

__all__ = ["Catalog", "GroupNode", "ArrayNode", "ValueNode", "ARRAY_KINDS"]

#: What an array holds: a tensor, a large byte string, or a pickled value.
ARRAY_KINDS = ("tensor", "bytes", "pickle")


@dataclass(frozen=True)
class ArrayNode:
    """A stored array at the node path ``node``: a tensor (``kind == "tensor"``), a large byte
    string (``"bytes"``, of Python type ``bytes_type``) or a pickled value (``"pickle"``)."""

    entry: Entry
    node: str
    kind: str
    shape: tuple[int, ...]
    dtype: DType
    chunks: tuple[int, ...]
    document: dict[str, Any]
    placement: dict[str, Any] | None
    separator: str  # of its chunk keys
    bytes_type: str | None = None

    def chunk_key(self, index: tuple[int, ...]) -> str:
        return chunk_key(self.node, index, self.separator)

    def check_readable(self, *, allow_pickle: bool) -> None:
        """Refuse to read a pickled value without the caller's opt-in."""
        if self.kind == "pickle" and not allow_pickle:
            raise UnsafeError(
                f"{describe(self.entry.path)!r} is a pickled value; reading it runs code from the checkpoint: "
                "pass allow_pickle=True only if you trust the checkpoint"
            )

    def value(self, data: bytes, *, allow_pickle: bool) -> Any:
        """The value a ``"bytes"`` or ``"pickle"`` array holds, from its stored bytes."""
        self.check_readable(allow_pickle=allow_pickle)
        if self.kind == "bytes":
            assert self.bytes_type is not None
            return from_bytes(data, self.bytes_type)
        return pickle.loads(data)


@dataclass(frozen=True)
class ValueNode:
    """A plain value: stored as JSON in its group's attributes, or a whole group of them."""

    entry: Entry
    value: Any


@dataclass(frozen=True)
class GroupNode:
    """A group: a dict or a list of the state dict. ``children`` maps each key to the FQN of
    an array, a group, or a plain value."""

    entry: Entry
    container: str
    children: dict[Key, str]


@dataclass(frozen=True)
class Catalog:
    """Every node of a committed checkpoint, keyed by FQN (:attr:`Entry.fqn
    <zdcp.format.names.Entry.fqn>`: the root group is ``""``); an array's node path, where its
    files are, is its own (they differ where a long name was shortened).

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
        long_names: dict[str, dict[str, str]] = {}
        for node, doc in nodes.items():
            if doc["node_type"] == "group":
                attrs = zdcp_attrs(doc) or {}
                containers[node] = attrs.get("container", DICT)
                long_names[node] = attrs.get("long_names", {})
        # Per node path: its entry and its FQN, each name decoded once.
        entries: dict[str, tuple[Entry, str]] = {"": (Entry((), ()), "")}

        def entry(node: str) -> tuple[Entry, str]:
            found = entries.get(node)
            if found is None:
                parent, _, name = node.rpartition("/")
                above, above_fqn = entry(parent)
                key, whole = decode_node_name(name, long_names[parent])
                here = Entry(above.path + (key,), above.kinds + (containers[parent],))
                found = entries[node] = here, f"{above_fqn}/{whole}" if above_fqn else whole
            return found

        groups: dict[str, GroupNode] = {}
        arrays: dict[str, ArrayNode] = {}
        values: dict[str, ValueNode] = {}
        for node in sorted(nodes):  # parents before their children
            doc = nodes[node]
            attrs = zdcp_attrs(doc) or {}
            here, fqn = entry(node)
            if doc["node_type"] == "array":
                kind = attrs.get("kind", "tensor")
                if kind not in ARRAY_KINDS:
                    raise ValueError(f"{node}: unknown array kind {kind!r}")
                dtype = from_torch_name(attrs["dtype"]) if kind == "tensor" else from_zarr(doc["data_type"])
                if kind != "tensor" and (dtype.zarr != "uint8" or len(doc["shape"]) != 1):
                    raise ValueError(f"{node}: a {kind} value stored as {doc['data_type']} of shape {doc['shape']}")
                bytes_type = attrs["type"] if kind == "bytes" else None
                if kind == "bytes" and bytes_type not in BYTES_TYPES:
                    raise ValueError(f"{node}: unknown byte-string type {bytes_type!r}")
                if dtype.zarr != doc["data_type"]:
                    raise ValueError(f"{node}: torch dtype {dtype.torch_name} stored as {doc['data_type']}")
                shape, chunks = tuple(doc["shape"]), tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
                if not _grid_ok(shape, chunks):
                    raise ValueError(f"{node}: shape {list(shape)} with chunk shape {list(chunks)}")
                arrays[fqn] = ArrayNode(
                    entry=here,
                    node=node,
                    kind=kind,
                    shape=shape,
                    dtype=dtype,
                    chunks=chunks,
                    document=doc,
                    placement=attrs.get("placement", attrs.get("layout")),  # "layout" before version 3
                    separator=chunk_key_separator(doc),
                    bytes_type=bytes_type,
                )
                continue
            group = groups[fqn] = GroupNode(here, containers[node], {})
            types = attrs.get("types", {})
            for name, value in doc.get("attributes", {}).items():
                if name == ATTR:
                    continue
                leaf = Entry(here.path + (decode_key(name),), here.kinds + (group.container,))
                values[f"{fqn}/{name}" if fqn else name] = ValueNode(leaf, from_json(value, types.get(name)))
        # Children in a stable order: groups, arrays, then values, as stored.
        for fqn, node in [*sorted(groups.items()), *sorted(arrays.items()), *values.items()]:
            if fqn:
                groups[fqn.rpartition("/")[0]].children[node.entry.path[-1]] = fqn
        for g, group in groups.items():
            if group.container == LIST and set(group.children) != set(range(len(group.children))):
                raise ValueError(f"list group {g!r} does not hold exactly the indices 0..{len(group.children) - 1}")
        documents = {node: doc for node, doc in nodes.items() if node}
        return cls(info, documents, groups, arrays, values, _composites(groups, arrays, values))


def _grid_ok(shape: tuple[Any, ...], chunks: tuple[Any, ...]) -> bool:
    """A shape of non-negative ints with a chunk shape of positive ints, one per dimension, and
    no more elements in the array or in a chunk than an int64 counts (a crafted shape must not
    reach an allocation)."""
    if len(shape) != len(chunks):
        return False
    elements = chunk_elements = 1
    for n, c in zip(shape, chunks):
        if type(n) is not int or type(c) is not int or n < 0 or c < 1:
            return False
        elements *= n
        chunk_elements *= c
    return elements < _MAX_ELEMENTS and chunk_elements < _MAX_ELEMENTS


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
