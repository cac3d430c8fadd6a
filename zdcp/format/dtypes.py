"""Data types: torch <-> Zarr v3 ``data_type`` <-> numpy, and zero-copy tensor/array views.

Zarr v3 names are the ones tensorstore writes (``"bfloat16"``, ``"float8_e4m3fn"``, ...); numpy
has no bfloat16 or float8 types of its own, so those come from ``ml_dtypes``. numpy cannot view a
bf16/fp8 tensor directly (``Tensor.numpy()`` raises), so conversions go through an integer type
of the same width and reinterpret the bytes: no copy in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from ..errors import UnsupportedValueError

__all__ = [
    "DType",
    "from_torch",
    "check_storable",
    "from_zarr",
    "from_torch_name",
    "tensor_to_numpy",
    "numpy_to_tensor",
]


@dataclass(frozen=True)
class DType:
    """One supported element type under its three names."""

    torch: torch.dtype
    zarr: str
    numpy: np.dtype
    # Integer type of the same width used to reinterpret the bytes when numpy cannot view
    # the torch dtype directly; None when ``Tensor.numpy()`` works as is.
    carrier: torch.dtype | None = None

    @property
    def torch_name(self) -> str:
        """``"bfloat16"`` for ``torch.bfloat16``: the name recorded in zdcp metadata."""
        return str(self.torch).removeprefix("torch.")


def _ml(name: str, carrier: torch.dtype) -> DType:
    return DType(getattr(torch, name), name, np.dtype(getattr(ml_dtypes, name)), carrier)


_ALL: tuple[DType, ...] = (
    DType(torch.float32, "float32", np.dtype(np.float32)),
    DType(torch.float64, "float64", np.dtype(np.float64)),
    DType(torch.float16, "float16", np.dtype(np.float16)),
    _ml("bfloat16", torch.int16),
    _ml("float8_e4m3fn", torch.uint8),
    _ml("float8_e5m2", torch.uint8),
    _ml("float8_e4m3fnuz", torch.uint8),
    _ml("float8_e5m2fnuz", torch.uint8),
    _ml("float8_e8m0fnu", torch.uint8),
    DType(torch.int8, "int8", np.dtype(np.int8)),
    DType(torch.int16, "int16", np.dtype(np.int16)),
    DType(torch.int32, "int32", np.dtype(np.int32)),
    DType(torch.int64, "int64", np.dtype(np.int64)),
    DType(torch.uint8, "uint8", np.dtype(np.uint8)),
    DType(torch.uint16, "uint16", np.dtype(np.uint16)),
    DType(torch.uint32, "uint32", np.dtype(np.uint32)),
    DType(torch.uint64, "uint64", np.dtype(np.uint64)),
    DType(torch.bool, "bool", np.dtype(np.bool_)),
    DType(torch.complex64, "complex64", np.dtype(np.complex64)),
    DType(torch.complex128, "complex128", np.dtype(np.complex128)),
)
_BY_TORCH = {d.torch: d for d in _ALL}
_BY_ZARR = {d.zarr: d for d in _ALL}
_BY_TORCH_NAME = {d.torch_name: d for d in _ALL}

#: The float8 and bfloat16 types that zarr-python does not know on its own.
EXTENSION_DTYPES: tuple[DType, ...] = tuple(d for d in _ALL if d.carrier is not None)


def from_torch(dtype: torch.dtype, *, key: str = "") -> DType:
    """The entry for a torch dtype; raises naming ``key`` when the format cannot hold it."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        where = f" at {key!r}" if key else ""
        raise UnsupportedValueError(f"tensor{where} has dtype {dtype}, which zdcp cannot store") from None


def check_storable(tensor: torch.Tensor, *, key: str, allow_meta: bool = False) -> None:
    """Refuse, naming ``key``, a (local) tensor without dense data that zdcp can store: sparse,
    nested, on the meta device (unless ``allow_meta``: a placeholder whose data comes later),
    or of a dtype the format cannot hold."""
    if tensor.is_nested:
        raise UnsupportedValueError(f"tensor at {key!r} is a nested tensor, which zdcp cannot store")
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(
            f"tensor at {key!r} has layout {tensor.layout}, which zdcp cannot store; save .to_dense() instead"
        )
    if tensor.is_meta and not allow_meta:
        raise UnsupportedValueError(f"tensor at {key!r} is on the meta device: it has no data to save")
    from_torch(tensor.dtype, key=key)


def from_zarr(name: str) -> DType:
    """The entry for a Zarr v3 ``data_type`` name."""
    try:
        return _BY_ZARR[name]
    except KeyError:
        raise UnsupportedValueError(f"Zarr data type {name!r} has no torch equivalent") from None


def from_torch_name(name: str) -> DType:
    """The entry for a recorded torch dtype name (``"bfloat16"``)."""
    try:
        return _BY_TORCH_NAME[name]
    except KeyError:
        raise UnsupportedValueError(f"unknown torch dtype {name!r} in checkpoint metadata") from None


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (strides kept), typed with the Zarr dtype."""
    d = from_torch(tensor.dtype)
    if d.carrier is None:
        return tensor.numpy()
    return tensor.view(d.carrier).numpy().view(d.numpy)


def numpy_to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, of torch dtype ``dtype``."""
    d = from_torch(dtype)
    if d.carrier is None:
        return torch.from_numpy(array)
    carrier_np = torch.empty((), dtype=d.carrier).numpy().dtype
    return torch.from_numpy(array.view(carrier_np)).view(dtype)
