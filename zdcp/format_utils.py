"""Conversions between zdcp checkpoints and ``torch.save`` files, DCP checkpoints and safetensors.

Mirrors ``torch.distributed.checkpoint.format_utils``. Every conversion runs in one process with
no process group. Conversions into zdcp go through :func:`zdcp.save`'s own writer, fed tensor by
tensor from the source (a planner that fetches each tensor when the writer asks for it), so the
result is exactly what a training job would have written. DCP and safetensors conversions stream:
memory stays bounded by the writer's window (or, for sharded safetensors output, one shard),
not by the checkpoint's size. ``torch.save`` files are whole objects by nature.

Conversions *from* DCP and from ``torch.save`` files with ``allow_pickle=True`` unpickle their
source, as ``torch.load`` does: convert only files you trust.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from .api import run_save
from .collectives import Collectives
from .errors import CheckpointNotFoundError, UnsupportedValueError, UsageError
from .format.names import Key, describe, dotted
from .planner import ZarrSavePlanner
from .view import Array, Group
from .view import open as open_checkpoint
from .writer import ZarrWriter

__all__ = [
    "torch_save_to_zdcp",
    "zdcp_to_torch_save",
    "dcp_to_zdcp",
    "zdcp_to_dcp",
    "safetensors_to_zdcp",
    "zdcp_to_safetensors",
    "SAFETENSORS_INDEX",
]

PathLike = str | os.PathLike[str]
Progress = Callable[[int], None]
#: The index file of a sharded (Hugging Face style) safetensors directory.
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Every conversion runs in this one process, with no process group.
_ONE_PROCESS = Collectives(no_dist=True)
#: Bytes of source tensors a streaming conversion keeps in flight.
_WINDOW = 256 << 20

# safetensors' dtype names (its format spec); float8_e8m0fnu and complex128 have none.
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64",
}  # fmt: skip
#: Where a safetensors file's ``__metadata__`` (str -> str) goes in a zdcp checkpoint, and back.
SAFETENSORS_METADATA_KEY = "__metadata__"


# -- torch.save ---------------------------------------------------------------------------------


def torch_save_to_zdcp(
    src: PathLike,
    dst: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    layout: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Convert a ``torch.save`` file holding a state dict into a zdcp checkpoint (in ``layout``,
    ``"files"`` or ``"packed"``).

    The file is memory-mapped when it can be (zip format), so tensors are read as they are
    written. ``allow_pickle`` loads objects beyond tensors and plain values (``weights_only=False``)
    and stores those as pickles.
    """
    state = _torch_load(src, allow_pickle)
    if not isinstance(state, dict):
        raise UnsupportedValueError(f"{src} holds a {type(state).__name__}, not a state dict")
    _save_fetching(
        state,
        lambda path: _get_path(state, path),
        dst,
        overwrite=overwrite,
        layout=layout,
        progress=progress,
        allow_pickle=allow_pickle,
    )


def zdcp_to_torch_save(
    src: PathLike, dst: PathLike, *, allow_pickle: bool = False, progress: Progress | None = None
) -> None:
    """Write a zdcp checkpoint as one ``torch.save`` file (the whole state is in memory once)."""

    def read(array: Array) -> torch.Tensor:
        tensor = array[...]
        if progress is not None:
            progress(tensor.numel() * tensor.element_size())
        return tensor

    torch.save(open_checkpoint(src, allow_pickle=allow_pickle).to_state_dict(read), dst)


def _torch_load(src: PathLike, allow_pickle: bool) -> Any:
    try:
        return torch.load(src, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped
            raise
        return torch.load(src, map_location="cpu", weights_only=not allow_pickle)


# -- DCP ----------------------------------------------------------------------------------------


def dcp_to_zdcp(
    src: PathLike,
    dst: PathLike,
    *,
    overwrite: bool = False,
    layout: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Convert a DCP checkpoint directory into a zdcp checkpoint (in ``layout``), tensor by tensor.

    The nesting DCP recorded (its ``planner_data``) becomes the zdcp hierarchy; non-tensor
    values are unpickled from DCP's files (DCP stores them with ``torch.save``).
    """
    metadata = FileSystemReader(src).read_metadata()
    paths = metadata.planner_data or {}
    entries = metadata.state_dict_metadata
    tensors = {fqn: md for fqn, md in entries.items() if isinstance(md, TensorStorageMetadata)}
    values = _dcp_load(src, {fqn: None for fqn in entries if fqn not in tensors}) if len(tensors) < len(entries) else {}

    skeleton: dict[Key, Any] = {}
    for fqn, md in entries.items():
        leaf = torch.empty(md.size, dtype=md.properties.dtype, device="meta") if fqn in tensors else values[fqn]
        _set_path(skeleton, tuple(paths.get(fqn, (fqn,))), leaf)
    by_path = {tuple(paths.get(fqn, (fqn,))): fqn for fqn in tensors}
    batches = _Batches(list(tensors), lambda fqn: tensors[fqn].size.numel() * _itemsize(tensors[fqn]))

    def fetch(path: tuple[Key, ...]) -> torch.Tensor:
        fqn = by_path[path]
        if fqn not in batches.loaded:
            wanted = batches.next_from(fqn)
            batches.loaded.update(
                _dcp_load(src, {f: torch.empty(tensors[f].size, dtype=tensors[f].properties.dtype) for f in wanted})
            )
        return batches.loaded.pop(fqn)

    _save_fetching(skeleton, fetch, dst, overwrite=overwrite, layout=layout, progress=progress, allow_pickle=True)


def zdcp_to_dcp(src: PathLike, dst: PathLike, *, allow_pickle: bool = False, progress: Progress | None = None) -> None:
    """Convert a zdcp checkpoint into a DCP checkpoint directory (``FileSystemWriter``), tensor by
    tensor; DCP stores plain values with ``torch.save`` as it always does."""
    root = open_checkpoint(src, allow_pickle=allow_pickle)
    arrays = {dotted(path): array for path, array in root.arrays()}
    skeleton = root.to_state_dict(_placeholder)

    planner = _FetchingDcpPlanner(lambda fqn: arrays[fqn].read(), progress)
    with _ONE_PROCESS.dcp_call():
        dcp.save(skeleton, storage_writer=FileSystemWriter(dst), planner=planner, no_dist=True)


def _dcp_load(src: PathLike, state: dict[str, Any]) -> dict[str, Any]:
    """Load DCP entries by FQN into ``state`` (flat, no nesting) and return it."""
    # No flattening of any kind: the planner must fill this very dict, keyed by DCP's FQNs.
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    with _ONE_PROCESS.dcp_call():
        dcp.load(state, storage_reader=FileSystemReader(src), planner=planner, no_dist=True)
    return state


def _itemsize(md: TensorStorageMetadata) -> int:
    return torch.empty((), dtype=md.properties.dtype).element_size()


class _Batches:
    """Groups consecutive keys into batches of about ``_WINDOW`` bytes, so that a source with a
    per-call cost (DCP reads its metadata on every load) is read in few calls."""

    def __init__(self, order: list[str], nbytes: Callable[[str], int]):
        self.order = order
        self.position = {k: i for i, k in enumerate(order)}
        self.nbytes = nbytes
        self.loaded: dict[str, Any] = {}

    def next_from(self, key: str) -> list[str]:
        batch, total = [], 0
        for k in self.order[self.position[key] :]:
            if batch and total + self.nbytes(k) > _WINDOW:
                break
            batch.append(k)
            total += self.nbytes(k)
        return batch


# -- safetensors --------------------------------------------------------------------------------


def safetensors_to_zdcp(
    src: PathLike,
    dst: PathLike,
    *,
    overwrite: bool = False,
    layout: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Convert one ``.safetensors`` file, or a Hugging Face model directory (sharded with
    ``model.safetensors.index.json``, or a single ``model.safetensors``), into a zdcp checkpoint
    (in ``layout``).

    Tensor names stay flat (``model.layers.0.mlp.weight`` is one array); the file's
    ``__metadata__`` becomes the plain value ``__metadata__``.
    """
    safe_open = _safetensors().safe_open
    files = _safetensors_files(Path(src))
    handles = {file: safe_open(str(file), framework="pt") for file in dict.fromkeys(files.values())}
    skeleton: dict[Key, Any] = {}
    for name, file in files.items():
        piece = handles[file].get_slice(name)
        dtype = _SAFETENSORS_NAMES[piece.get_dtype()]
        skeleton[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    metadata = next(iter(handles.values())).metadata() if handles else None
    if metadata:
        skeleton[SAFETENSORS_METADATA_KEY] = dict(metadata)

    def fetch(path: tuple[Key, ...]) -> torch.Tensor:
        (name,) = path
        return handles[files[name]].get_tensor(name)

    _save_fetching(skeleton, fetch, dst, overwrite=overwrite, layout=layout, progress=progress)


def zdcp_to_safetensors(
    src: PathLike,
    dst: PathLike,
    *,
    max_shard_size: int | None = None,
    drop_values: bool = False,
    progress: Progress | None = None,
) -> None:
    """Write a zdcp checkpoint's tensors as safetensors, streaming one tensor at a time.

    Without ``max_shard_size``, ``dst`` is one ``.safetensors`` file. With it, ``dst`` is a
    directory of ``model-0000i-of-0000n.safetensors`` files of at most that many bytes (a larger
    tensor gets a file of its own) and a ``model.safetensors.index.json``, as Hugging Face writes.
    Nested keys are joined with ``"."`` (``app.model.net1.weight``). safetensors holds only
    tensors and one str -> str ``__metadata__`` dict: other plain values raise unless
    ``drop_values``.
    """
    root = open_checkpoint(src)
    tensors: dict[str, Array] = {}
    for path, array in root.arrays():
        name = dotted(path)
        if name in tensors:
            raise UnsupportedValueError(f"{describe(path)!r} and another key both become {name!r} in safetensors")
        if array.dtype not in _SAFETENSORS_DTYPES:
            raise UnsupportedValueError(f"{describe(path)!r} has dtype {array.dtype}, which safetensors cannot hold")
        tensors[name] = array
    metadata = _safetensors_metadata(root, drop_values)
    if max_shard_size is None:
        _write_safetensors(Path(dst), tensors, metadata, progress)
        return
    shards = _plan_shards(tensors, max_shard_size)
    directory = Path(dst)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(directory / file, shard, metadata, progress)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


_SAFETENSORS_NAMES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def _safetensors() -> Any:
    try:
        import safetensors
    except ImportError:
        raise UsageError('safetensors conversions need safetensors: pip install "zdcp[safetensors]"') from None
    return safetensors


def _safetensors_files(src: Path) -> dict[str, Path]:
    """Tensor name -> file, for one file or a Hugging Face model directory."""
    if src.is_file():
        with _safetensors().safe_open(str(src), framework="pt") as f:
            return dict.fromkeys(f.keys(), src)
    if (src / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((src / SAFETENSORS_INDEX).read_text())["weight_map"]
        return {name: src / file for name, file in weight_map.items()}
    if (src / "model.safetensors").is_file():
        return _safetensors_files(src / "model.safetensors")
    raise CheckpointNotFoundError(f"{src} is neither a .safetensors file nor a directory with {SAFETENSORS_INDEX}")


def _safetensors_metadata(root: Group, drop_values: bool) -> dict[str, str] | None:
    """The ``__metadata__`` to write; refuses (or drops) plain values safetensors cannot hold."""
    node = root.get(SAFETENSORS_METADATA_KEY)
    metadata = node.to_state_dict() if isinstance(node, Group) else node
    usable = isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    values = [path for path, child in root.walk() if not isinstance(child, (Group, Array))]
    others = [describe(p) for p in values if not (usable and p[0] == SAFETENSORS_METADATA_KEY)]
    if others and not drop_values:
        raise UnsupportedValueError(
            f"safetensors holds only tensors; the checkpoint also has {len(others)} other value(s): "
            f"{', '.join(others[:10])}{' ...' if len(others) > 10 else ''} (pass drop_values=True to leave them out)"
        )
    return metadata if usable else None


def _plan_shards(tensors: dict[str, Array], max_bytes: int) -> list[dict[str, Array]]:
    shards: list[dict[str, Array]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def _write_safetensors(
    file: Path, tensors: dict[str, Array], metadata: dict[str, str] | None, progress: Progress | None
) -> None:
    """Write the safetensors format (8-byte header length, JSON header, raw little-endian data),
    one tensor in memory at a time. The header is padded with spaces to a multiple of 8."""
    header: dict[str, Any] = {}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    if metadata:
        header[SAFETENSORS_METADATA_KEY] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for array in tensors.values():
            tensor = array.read().contiguous()
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            if progress is not None:
                progress(array.nbytes)


# -- shared -------------------------------------------------------------------------------------


class _Fetching:
    """A save planner over a skeleton state dict whose tensors are meta placeholders: the real
    tensor is fetched from the source only when the writer asks for it (``resolve_data``)."""

    resolves_placeholders = True

    def __init__(self, fetch: Callable[[Any], torch.Tensor], progress: Progress | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.fetch = fetch
        self.progress = progress

    def source_key(self, fqn: str) -> Any:
        """What ``fetch`` is called with for a write item's FQN."""
        return fqn

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)  # type: ignore[misc]
        tensor = self.fetch(self.source_key(write_item.index.fqn))
        if self.progress is not None:
            self.progress(tensor.numel() * tensor.element_size())
        chunk = write_item.tensor_data.chunk
        return narrow_tensor_by_index(tensor, chunk.offsets, chunk.sizes)


class _FetchingSavePlanner(_Fetching, ZarrSavePlanner):
    """Into zdcp: ``fetch`` takes the value's key path."""

    def source_key(self, fqn: str) -> tuple[Key, ...]:
        return self.mappings[fqn].path


class _FetchingDcpPlanner(_Fetching, DefaultSavePlanner):
    """Into DCP: ``fetch`` takes DCP's dotted FQN."""


def _save_fetching(
    skeleton: dict[Key, Any],
    fetch: Callable[[tuple[Key, ...]], torch.Tensor],
    dst: PathLike,
    *,
    overwrite: bool,
    layout: str | None,
    progress: Progress | None,
    allow_pickle: bool = False,
) -> None:
    writer = ZarrWriter(dst, max_inflight_bytes=_WINDOW, overwrite=overwrite, allow_pickle=allow_pickle, layout=layout)
    planner = _FetchingSavePlanner(fetch, progress, allow_pickle=allow_pickle)
    run_save(skeleton, writer, planner=planner, collectives=_ONE_PROCESS)


def _placeholder(array: Array) -> torch.Tensor:
    """A meta tensor standing in for an array in a skeleton state dict."""
    return torch.empty(array.shape, dtype=array.dtype, device="meta")


def _get_path(root: Any, path: tuple[Key, ...]) -> Any:
    """The value at ``path`` in nested dicts and lists."""
    for key in path:
        root = root[key]
    return root


def _set_path(root: dict[Key, Any], path: tuple[Key, ...], value: Any) -> None:
    """Put ``value`` at ``path``, creating dicts (str keys) and lists (int keys) on the way."""
    container: Any = root
    for key, next_key in zip(path, path[1:]):
        if isinstance(container, list):
            while len(container) <= key:
                container.append(None)
            if container[key] is None:
                container[key] = [] if isinstance(next_key, int) else {}
            container = container[key]
        else:
            container = container.setdefault(key, [] if isinstance(next_key, int) else {})
    if isinstance(container, list):
        while len(container) <= path[-1]:
            container.append(None)
    container[path[-1]] = value
