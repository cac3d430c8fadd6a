"""How a save writes: the options every save path takes (``zdcp.save``, ``zdcp.async_save``,
``ZarrWriter`` and the conversions in ``zdcp.format_utils``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import UsageError
from .format.codecs import COMPRESSIONS
from .format.documents import user_metadata_attrs
from .storage.layout import layout_named

__all__ = ["SaveOptions"]


@dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """Options of a save, passed as keyword arguments to every save function.

    Attributes:
        overwrite: replace a committed checkpoint at the target (atomically on local paths);
            without it such a save raises :class:`~zdcp.CheckpointExistsError`.
        allow_pickle: store values that JSON cannot hold as pickles instead of refusing them.
        compression: ``None`` (default), ``"zstd"`` or ``"gzip"``.
        sync_files: make every rank's data durable before the commit record is written, and
            the commit record before the save returns (as DCP's ``FileSystemWriter``). Off, a
            power loss soon after a save may lose a checkpoint that reads as committed.
        layout: ``"files"`` (every chunk and document its own file or object) or
            ``"packed"`` (the same hierarchy in a few files per rank: tensorstore's OCDBT
            database); None (default): packed, on every location
            (:data:`~zdcp.storage.layout.DEFAULT_LAYOUT`). Readers find the layout by
            themselves.
        metadata: a plain value (JSON, as the state dict's plain values are: numbers, strings,
            lists, tuples, dicts...) stored in the root document beside zdcp's own record and
            read back as ``zdcp.open(path).metadata``: a step number, metrics, a run id.
    """

    overwrite: bool = False
    allow_pickle: bool = False
    compression: str | None = None
    sync_files: bool = True
    layout: str | None = None
    metadata: Any = None

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> SaveOptions:
        """The options named in ``options`` (keyword arguments a save function was given);
        :class:`~zdcp.UsageError` naming any that is no save option."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UsageError(f"unknown save option(s) {', '.join(map(repr, unknown))}; the options are {names}")
        return cls(**options)

    def __post_init__(self) -> None:
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise UsageError(f"compression must be None or one of {sorted(COMPRESSIONS)}, got {self.compression!r}")
        if self.layout is not None:
            layout_named(self.layout)  # raises for a name no layout has
        user_metadata_attrs(self.metadata)  # refused before anything is written
