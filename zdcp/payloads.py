"""The payloads zdcp's storage plugins and planners hand each other through DCP's plans, write
results and ``Metadata``: plain dataclasses (DCP keeps its own in its ``metadata.py``).

Save: the coordinator's writer tells each rank where to write in ``SavePlan.storage_data``
(:class:`RankPlan`); each rank reports every plain value back in ``WriteResult.storage_data``
(:class:`StoredValue` or :class:`ArrayValue`), and every tensor's placement (:class:`WrittenTensor`).

Load: ``Metadata.storage_data`` of :class:`~zdcp.ZarrReader` is :class:`CatalogViews`, the
checkpoint's leaves under both FQN schemes; :class:`~zdcp.planner.ZarrLoadPlanner` plans
against zdcp's, DCP's own planners against DCP's dotted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RankPlan", "WrittenTensor", "StoredValue", "ArrayValue", "ValueSource", "CatalogView", "CatalogViews"]


@dataclass(frozen=True)
class RankPlan:
    """What the coordinator tells a rank: the save's session, from which the rank finds where
    to write (:func:`zdcp.storage.saving.save_location`), and the chunk grid of every array it
    writes. Nothing in it names one save's target: DCP may cache it for the next save."""

    session: str
    grids: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class WrittenTensor:
    """What a rank reports of a tensor it wrote: its placement record, and the grid it cut its
    chunks along (the coordinator checks that every rank used the same one)."""

    placement: dict[str, Any] | None
    grid: tuple[int, ...]


@dataclass(frozen=True)
class StoredValue:
    """A plain value on its way to the coordinator: its JSON and its type descriptor."""

    json: Any
    desc: Any


@dataclass(frozen=True)
class ArrayValue:
    """A value the rank stored as a uint8 array of ``nbytes`` bytes, with zdcp attributes
    ``attrs``: a large byte string (``{"kind": "bytes", "type": ...}``) or a pickle
    (``{"kind": "pickle"}``)."""

    nbytes: int
    attrs: dict[str, Any]


@dataclass(frozen=True)
class ValueSource:
    """Where one FQN's data comes from: the array or value of a catalog FQN, or part of a
    plain value."""

    fqn: str
    subpath: tuple[Any, ...] = ()


@dataclass
class CatalogView:
    """A checkpoint's leaves described to DCP under one FQN scheme."""

    metadata: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    sources: dict[str, ValueSource] = field(default_factory=dict)

    def add(self, fqn: str, md: Any, source: ValueSource, path: tuple[Any, ...]) -> None:
        self.metadata[fqn], self.sources[fqn], self.paths[fqn] = md, source, path


@dataclass(frozen=True)
class CatalogViews:
    """Both FQN schemes: zdcp's (encoded keys joined with "/", :attr:`Entry.fqn
    <zdcp.format.names.Entry.fqn>`) and DCP's dotted FQNs.

    Kept apart because the two can disagree: DCP splits a list of dicts into one item per leaf
    and reads a dotted name that zdcp may hold as another node's path.
    """

    zdcp: CatalogView
    dcp: CatalogView
