"""Checkpoints written by an earlier zdcp (tests/fixtures/v3, both layouts, one process and two
ranks) load, open and verify with this one, and zarr-python reads them: the format is a
contract, whatever the code that reads it becomes."""

import shutil

import pytest
import torch
import zarr
from conftest import assert_bitwise_equal
from fixtures.format_v3 import CASES, FIXTURES, METADATA, as_bytes, sharded_full, single_state

import zdcp


@pytest.fixture(params=sorted(CASES))
def fixture(request, tmp_path):
    """A copy of one fixture checkpoint (moved from where it was written), and its case."""
    path = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param, path)
    return path, CASES[request.param]


def expected_state(ranks):
    if ranks == 1:
        return single_state()
    return {"model": sharded_full(), "step": 3, "extra": [1, "two", 3.0]}


def assert_same(got, want, where=""):
    if isinstance(want, torch.Tensor):
        assert_bitwise_equal(got, want, where)
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list) and any(isinstance(v, torch.Tensor) for v in want):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}")
    else:
        assert as_bytes(got) == want and type(as_bytes(got)) is type(want), (where, got, want)


def empty_like(state):
    if isinstance(state, torch.Tensor):
        return torch.full_like(state, 0) if state.dtype != torch.bool else torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: empty_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [empty_like(v) for v in state]
    return None


def test_fixture_loads_whole(fixture):
    path, (layout, ranks, compression) = fixture
    want = expected_state(ranks)
    got = empty_like(want)
    zdcp.load(got, path)
    assert_same(got, want)


def test_fixture_opens_with_its_metadata_and_layout(fixture):
    path, (layout, ranks, compression) = fixture
    root = zdcp.open(path)
    assert root.metadata == METADATA
    assert root.info["format_version"] == 3 and root.info["world_size"] == ranks
    assert_same(root.to_state_dict(), expected_state(ranks))
    assert ((path / "manifest.ocdbt").exists()) == (layout == "packed")


def test_fixture_verifies(fixture):
    path, _ = fixture
    report = zdcp.verify(path)
    assert report.ok, report.faults
    assert report.arrays > 0 and report.chunks >= report.arrays - 1  # the empty array has no chunk


def test_fixture_reads_through_zarr_python(fixture):
    path, (layout, ranks, _) = fixture
    group = zarr.open_group(zdcp.zarr_store(path), mode="r")
    name, want = ("model/big.weight", single_state()["model"]["big.weight"]) if ranks == 1 else (
        "model/w", sharded_full()["w"])  # fmt: skip
    assert torch.equal(torch.from_numpy(group[name][2:5]), want[2:5])
