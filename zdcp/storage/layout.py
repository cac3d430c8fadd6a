"""How a checkpoint's Zarr hierarchy is stored at its location: the :class:`Layout` strategy,
the :class:`ChunkSink` each rank of a save writes through, and the registry that finds layouts
by name, as fsspec's registry finds filesystems (docs/format.md, section 9).

A layout is one module and one entry in :data:`_KNOWN`. Nothing outside ``zdcp/storage`` names
one: the writer asks the layout of its save for a sink per rank and lets the coordinator's sink
commit; readers get the layout a checkpoint was found in (:func:`zdcp.storage.contents.root_document`
asks every registered layout) and ask it for direct reads of chunks from local files.

What the layouts share, and so do not decide: the commit protocol around a save
(:mod:`zdcp.storage.saving`: where a save writes, its marker, the atomic move or the root
written last), which has the coordinator's :meth:`ChunkSink.commit` write the hierarchy's
documents, the root one last, as its ``write_root`` step.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar

import tensorstore as ts

from ..errors import UsageError
from .hierarchy import Hierarchy
from .localfiles import DirectReader
from .location import Location

__all__ = [
    "Layout",
    "ChunkSink",
    "DirectReader",
    "Documents",
    "layout_named",
    "layout_names",
    "layouts",
    "DEFAULT_LAYOUT",
]

#: Every node's ``zarr.json`` of a save, by node path (the root's under ``""``).
Documents = dict[str, dict[str, Any]]


class ChunkSink(ABC):
    """Where one rank of a save writes its chunks: into ``hierarchy``, arrays opened through
    :meth:`open_array`, and (where :attr:`supports_encoded_writes`) chunks encoded by zdcp
    itself (:func:`zdcp.format.codecs.encode_chunk`) through :meth:`write_encoded`, which costs
    a fraction of opening an array per tensor.

    Once the rank's writes are done, :meth:`complete` makes them part of the save. The
    coordinator's sink then commits the whole save (:meth:`commit`), or a failure aborts it.
    """

    #: Whether :meth:`write_encoded` takes chunks.
    supports_encoded_writes: bool = False
    #: Whether the writes it takes stay in memory until the commit or a :meth:`release`: an
    #: array's write then holds its tensor, an encoded chunk its copy.
    holds_writes: bool = False

    def __init__(self, hierarchy: Hierarchy):
        self.hierarchy = hierarchy

    def write_encoded(self, key: str, parts: Sequence[bytes | memoryview]) -> ts.Future | None:
        """Write the chunk at ``key`` (its bytes are ``parts``, one after another); a future
        for the write, or None when it is done already."""
        raise NotImplementedError(f"{type(self).__name__} takes no encoded chunks")

    @abstractmethod
    def open_array(self, node: str, document: dict[str, Any]) -> ts.Future:
        """Open the array at ``node`` (its ``zarr.json`` is ``document``) for writing."""

    def release(self) -> bool:
        """Write out what this sink holds of the writes made so far, so that it no longer holds
        their sources (tensors, encoded chunks) in memory, where it can before the commit; True
        when it did, and the arrays it opened must then be opened anew. A sink whose writes
        complete as they are made holds nothing: False."""
        return False

    def complete(self) -> None:
        """Make this rank's completed writes part of the save."""

    def abort(self) -> None:
        """Let this rank's writes go (after a failure); never raises."""

    @abstractmethod
    def commit(self, documents: Documents, ranks: Sequence[int], confirm: Callable[[], None]) -> None:
        """On the coordinator: make the save whole, so that it reads as the checkpoint: the
        chunks of every rank in ``ranks`` (those that wrote any) and ``documents``, the root
        document becoming visible last, once ``confirm()`` returns (it raises when the location
        is no longer this save's, and is called before anything another save could see)."""


class Layout(ABC):
    """A way to store a checkpoint's Zarr hierarchy at a location (a strategy: stateless; one
    instance per layout, from :func:`layout_named`)."""

    #: The name users give (``SaveOptions.layout``, ``zdcp convert --layout``).
    name: ClassVar[str]
    #: One line for help texts.
    description: ClassVar[str]
    #: The key under the location whose presence marks a checkpoint stored in this layout;
    #: deleting it un-commits the checkpoint.
    commit_record: ClassVar[str]

    def __repr__(self) -> str:
        return f"<zdcp layout {self.name!r}>"

    #: Whether the nodes of the root group are entries at the top of a checkpoint's directory
    #: (each a directory, or a prefix), so that telling foreign files from them needs the nodes.
    nodes_are_entries: ClassVar[bool]

    @abstractmethod
    def owns(self, name: str, nodes: Collection[str]) -> bool:
        """Whether ``name``, an entry at the top of a checkpoint's directory (or prefix), is
        part of a checkpoint stored in this layout whose top-level nodes are ``nodes``.
        Anything else there is a foreign file (:mod:`zdcp.storage.foreign`)."""

    @abstractmethod
    def hierarchy(self, location: Location) -> Hierarchy:
        """The hierarchy of a checkpoint stored in this layout at ``location``, to read it."""

    @abstractmethod
    def read_root(self, location: Location) -> Callable[[], tuple[Hierarchy, bytes | None]]:
        """Start reading the root ``zarr.json`` of a checkpoint stored in this layout at
        ``location``; the returned function waits for it and gives the hierarchy and the
        document's bytes (None when there is none). Several layouts' reads run at once."""

    def max_key_bytes(self, location: Location) -> int | None:
        """The longest key of a hierarchy a save may write at ``location``; None: no limit."""
        return None

    @abstractmethod
    def sink(
        self, location: Location, *, rank: int, sole: bool, nbytes: int, direct: bool, start_writeback: bool
    ) -> ChunkSink:
        """The sink of rank ``rank`` of a save writing at ``location`` (where the commit
        protocol has the ranks write). ``sole``: this is the only process of the save, which
        also commits it. ``nbytes``: about how many bytes of tensors the rank writes (a layout
        may size its files by it). ``direct``: the sink may take encoded chunks.
        ``start_writeback``: the save syncs its files once written, so large local files may
        start their write-back at once."""

    def direct_reader(self, hierarchy: Hierarchy) -> DirectReader | None:
        """Reads of plain chunks straight from local files into their destination
        (:mod:`zdcp.storage.localfiles`), where this layout knows where they lie; None where
        they cannot be read so."""
        return None

    def storage_order(self, hierarchy: Hierarchy) -> Callable[[str], tuple[str, int]] | None:
        """Where the chunks of ``hierarchy`` lie, where this layout stores several in one file:
        for a chunk key, its file and the offset of its first byte there (``("", 0)`` for one
        it keeps elsewhere). A load that splits reads between ranks keeps neighbours together
        by it, since a reader's request for one chunk may bring its neighbours (reads of one
        file coalesce on an object store). None: each chunk is a file (object) of its own, and
        no order is better than the keys'. May cost reads (of an index): ask once per load."""
        return None


#: Every layout, by name, as ``"module:class"``: imported on first use. The order is the order in
#: which readers look for a checkpoint, and the first is the layout of a missing one.
_KNOWN: dict[str, str] = {
    "files": "zdcp.storage.files:FilesLayout",
    "packed": "zdcp.storage.packed:PackedLayout",
}
_LOADED: dict[str, Layout] = {}


def layout_named(name: str) -> Layout:
    """The layout called ``name``; :class:`~zdcp.UsageError` when there is none."""
    if not isinstance(name, str) or name not in _KNOWN:
        raise UsageError(f"layout must be one of {list(_KNOWN)}, got {name!r}")
    if name not in _LOADED:
        module, _, cls = _KNOWN[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]


def layout_names() -> tuple[str, ...]:
    return tuple(_KNOWN)


def layouts() -> list[Layout]:
    """Every layout, in the order readers look for a checkpoint."""
    return [layout_named(name) for name in _KNOWN]


#: The layout a save uses unless told otherwise, on every location: packed. A few files per
#: rank instead of one per chunk saves faster than the files layout for FSDP states, many small
#: tensors, loops that delete old checkpoints and object stores, and as fast for large tensors
#: (docs/benchmarks.md has today's ratios). The files layout stays, on request, for a plain
#: Zarr directory.
DEFAULT_LAYOUT = "packed"
