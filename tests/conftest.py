import warnings

import pytest
import torch

import zdcp  # noqa: F401  (registers bf16/fp8 with zarr-python for every test)


@pytest.fixture(autouse=True)
def _quiet_single_process_warnings():
    # DCP warns on every single-process call; the tests make many on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@pytest.fixture
def ckpt(tmp_path):
    """A fresh checkpoint path (not yet existing)."""
    return tmp_path / "ckpt"


def assert_bitwise_equal(a, b, where=""):
    """Tensors equal bit for bit (NaNs and -0.0 included), same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[a.element_size()]
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        width = {4: torch.int32, 8: torch.int64}[a.element_size()]
    if a.dtype == torch.bool:
        assert torch.equal(a, b), where
        return
    assert torch.equal(a.contiguous().view(width), b.contiguous().view(width)), where
