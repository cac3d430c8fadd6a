"""bfloat16 and float8 data types for zarr-python.

zarr-python 3.1 has no bfloat16 or float8 types, so without help it refuses to open the arrays
that tensorstore (and so zdcp) writes with ``"data_type": "bfloat16"`` or ``"float8_e4m3fn"``.
This module defines one zarr ``ZDType`` per such type, backed by the ``ml_dtypes`` numpy types,
and registers them at import under the names tensorstore uses (which match the zarr-extensions
registry). After ``import zdcp``, plain zarr-python code reads and writes those arrays.

The same classes are declared in the ``zarr.data_type`` entry-point group (pyproject.toml). zarr
3.1.6 collects that group but never loads it, so the import remains the documented way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat

from .format.dtypes import EXTENSION_DTYPES, from_zarr

__all__ = [
    "BFloat16",
    "Float8E4M3FN",
    "Float8E5M2",
    "Float8E4M3FNUZ",
    "Float8E5M2FNUZ",
    "Float8E8M0FNU",
    "register",
]


@dataclass(frozen=True, kw_only=True)
class _MLFloat(BaseFloat):  # type: ignore[type-arg]
    """A zarr float type whose numpy side is an ``ml_dtypes`` type; it has no Zarr v2 name."""

    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _native(cls) -> np.dtype:
        return from_zarr(cls._zarr_v3_name).numpy

    def to_native_dtype(self) -> np.dtype:
        # ml_dtypes types are native-endian only; the ``bytes`` codec handles byte order.
        return self._native()

    @property
    def item_size(self) -> int:
        return self._native().itemsize


def _define(zarr_name: str, class_name: str) -> type[_MLFloat]:
    native = from_zarr(zarr_name).numpy
    return dataclass(frozen=True, kw_only=True)(
        type(
            class_name,
            (_MLFloat,),
            {
                "dtype_cls": type(native),
                "_zarr_v3_name": zarr_name,
                "__doc__": f"Zarr v3 data type ``{zarr_name}`` backed by ``ml_dtypes.{zarr_name}``.",
                "__module__": __name__,
                "__qualname__": class_name,
            },
        )
    )


BFloat16 = _define("bfloat16", "BFloat16")
Float8E4M3FN = _define("float8_e4m3fn", "Float8E4M3FN")
Float8E5M2 = _define("float8_e5m2", "Float8E5M2")
Float8E4M3FNUZ = _define("float8_e4m3fnuz", "Float8E4M3FNUZ")
Float8E5M2FNUZ = _define("float8_e5m2fnuz", "Float8E5M2FNUZ")
Float8E8M0FNU = _define("float8_e8m0fnu", "Float8E8M0FNU")

_CLASSES = (BFloat16, Float8E4M3FN, Float8E5M2, Float8E4M3FNUZ, Float8E5M2FNUZ, Float8E8M0FNU)
assert {c._zarr_v3_name for c in _CLASSES} == {d.zarr for d in EXTENSION_DTYPES}


def register() -> None:
    """Add the types to zarr-python's data-type registry (idempotent)."""
    for cls in _CLASSES:
        data_type_registry.register(cls._zarr_v3_name, cls)
