"""A checkpoint's Zarr hierarchy as its layout stores it at its location: the key-value store of
its keys (``zarr.json`` documents, chunks), and its arrays opened through tensorstore's
``zarr3`` driver."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tensorstore as ts

from .keyvalue import KeyValue
from .location import Location

if TYPE_CHECKING:
    from .layout import Layout

__all__ = ["Hierarchy"]


class Hierarchy(KeyValue):
    """The keys of the checkpoint's hierarchy at ``location`` as ``layout`` stores them: under
    ``spec`` (a kvstore spec: the place itself, or a database there), opened in ``context``
    (the location's, or one that adds what the layout needs to it). A hierarchy whose keys are
    the location's own shares its key-value store (``same_as``)."""

    def __init__(
        self,
        location: Location,
        layout: Layout,
        spec: dict[str, Any],
        context: ts.Context,
        *,
        same_as: KeyValue | None = None,
    ):
        super().__init__(spec, context, location.url, same_as=same_as)
        self.location = location
        self.layout = layout

    def __repr__(self) -> str:
        return f"Hierarchy({self.url!r}, {self.layout.name!r})"

    def node_spec(self, node: str) -> dict[str, Any]:
        """The kvstore spec of a node's directory (``node`` is a "/"-joined node path)."""
        return {**self.spec, "path": self.spec.get("path", "") + (node + "/" if node else "")}

    def open_array(
        self, node: str, document: dict[str, Any], *, write: bool = False, transaction: ts.Transaction | None = None
    ) -> ts.Future:
        """Open the array at ``node`` from its ``zarr.json`` (``document``), already known,
        without touching storage (writes within ``transaction``, when given).

        Writing stores every chunk, all-zero ones included, so that a missing chunk always
        means damage; reading treats a missing chunk as an error, never as zeros.
        """
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": self.node_spec(node), "metadata": document}
        if write:
            spec["store_data_equal_to_fill_value"] = True
        else:
            # A committed checkpoint does not change: what a database's manifest and B-tree
            # nodes were when opened still holds, and need not be fetched again per array.
            spec |= {"fill_missing_data_reads": False, "recheck_cached_data": False}
        return ts.open(
            spec,
            open=True,
            assume_metadata=True,
            read=not write,
            write=write,
            context=self.context,
            transaction=transaction,
        )
