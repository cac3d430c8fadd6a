"""Plain Python values <-> JSON attributes, keeping their Python types.

State dicts carry small non-tensor values: learning rates, step counts, ``betas`` tuples, optimizer
``param_groups``, sampler states. zdcp stores them as JSON in their group's Zarr attributes so that
any Zarr reader sees them as they are, and records beside them (in a *type descriptor*) only what
JSON cannot say, so that zdcp gives back exactly the Python value it was given:

* ``float`` ``nan``/``inf``/``-inf`` are stored as the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"`` (the Zarr convention for fill values) with descriptor ``"float"``;
* a ``tuple`` is stored as a JSON array with descriptor ``{"t": "tuple"}``;
* ``bytes`` and ``io.BytesIO`` are stored as base64 text with descriptor ``"bytes"`` or
  ``"BytesIO"`` (large ones at the top of a state dict's leaves go into arrays instead:
  :func:`as_bytes`, :func:`from_bytes`);
* dict keys are stored as encoded key names (:mod:`zdcp.format.names`), so int keys stay ints;
* a container whose members need descriptors records them under ``"items"``, keyed by the
  member's index or encoded key; members that need none are left out.

A value without a descriptor (``null``) is plain JSON. Anything else (numpy scalars, custom
objects, namedtuples) is refused: such values need the caller's pickle opt-in.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from ..errors import UnsupportedValueError
from .names import decode_key, encode_key

__all__ = ["to_json", "from_json", "as_bytes", "from_bytes", "BYTES_TYPES"]

JSON = Any
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_to_json(x: float) -> tuple[JSON, JSON]:
    if math.isfinite(x):
        return x, None
    return ("NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"), "float"


#: The descriptors of the byte-string types, which are also the ``type`` of a bytes array.
BYTES_TYPES = ("bytes", "BytesIO")


def as_bytes(value: Any) -> tuple[bytes, str] | None:
    """A byte-string value's bytes and type name (one of :data:`BYTES_TYPES`), else None."""
    if type(value) is bytes:
        return value, "bytes"
    if type(value) is io.BytesIO:
        return value.getvalue(), "BytesIO"
    return None


def from_bytes(data: bytes, type_name: str) -> bytes | io.BytesIO:
    """The value that :func:`as_bytes` took apart (a ``BytesIO`` positioned at its start)."""
    if type_name not in BYTES_TYPES:
        raise ValueError(f"unknown byte-string type {type_name!r}")
    return data if type_name == "bytes" else io.BytesIO(data)


def to_json(value: Any, where: str = "") -> tuple[JSON, JSON]:
    """``(json_value, descriptor)`` for a plain value; raises naming ``where`` otherwise."""
    t = type(value)
    if value is None or t in (bool, int, str):
        return value, None
    if t is float:
        return _float_to_json(value)
    raw = as_bytes(value)
    if raw is not None:
        return base64.b64encode(raw[0]).decode("ascii"), raw[1]
    if t in (list, tuple):
        items, descs = [], {}
        for i, v in enumerate(value):
            items.append(_member(v, where, i, descs, str(i)))
        desc = {"t": "tuple"} if t is tuple else {"t": "list"} if descs else None
        if descs:
            desc["items"] = descs
        return items, desc
    if isinstance(value, dict):
        obj, descs = {}, {}
        for k, v in value.items():
            name = encode_key(k, where or "<root>")
            obj[name] = _member(v, where, k, descs, name)
        return obj, ({"t": "dict", "items": descs} if descs else None)
    raise UnsupportedValueError(
        f"value at {where or '<root>'!r} has type {t.__name__}, which JSON cannot hold; "
        "store it as a tensor or plain value, or save with allow_pickle=True"
    )


def _member(v: Any, where: str, key: Any, descs: dict[str, JSON], name: str) -> JSON:
    j, d = to_json(v, f"{where}/{key}" if where else str(key))
    if d is not None:
        descs[name] = d
    return j


def from_json(value: JSON, desc: JSON = None) -> Any:
    """The Python value that :func:`to_json` turned into ``(value, desc)``."""
    if desc == "float":
        return _NON_FINITE[value]
    if desc in BYTES_TYPES:
        return from_bytes(base64.b64decode(value, validate=True), desc)
    items = desc.get("items", {}) if isinstance(desc, dict) else {}
    if isinstance(value, list):
        out = [from_json(v, items.get(str(i))) for i, v in enumerate(value)]
        return tuple(out) if isinstance(desc, dict) and desc.get("t") == "tuple" else out
    if isinstance(value, dict):
        return {decode_key(k): from_json(v, items.get(k)) for k, v in value.items()}
    return value
