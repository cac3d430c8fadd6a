"""The DCP tutorial flow, unchanged but for zdcp.save/zdcp.load: FSDP2 + Adam + a Stateful
AppState, saved by 2 ranks, loaded by 3, by 1, and without any process group into a plain
nn.Module; model and optimizer state must be bitwise equal to a full reference."""

import torch
import torch.nn as nn
from conftest import assert_bitwise_equal
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import zdcp
from zdcp.testing import run_ranks


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net1 = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(16, 5)  # 5 rows: uneven over 2 and 3 ranks

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))


class AppState(Stateful):
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict):
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def fsdp_model(world_size, seed):
    torch.manual_seed(seed)
    model = ToyModel()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def full_state(model, optim):
    return get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def assert_same_state(got, ref):
    (gm, go), (rm, ro) = got, ref
    assert gm.keys() == rm.keys()
    for k in rm:
        assert_bitwise_equal(gm[k], rm[k], k)
    assert go["param_groups"] == ro["param_groups"]
    assert go["state"].keys() == ro["state"].keys()
    for fqn, st in ro["state"].items():
        for k, v in st.items():
            assert_bitwise_equal(go["state"][fqn][k], v, f"{fqn}/{k}")


def train_and_save(rank, world_size, path, ref_path):
    model, optim = fsdp_model(world_size, seed=0)
    for step in range(2):
        torch.manual_seed(100 * rank + step)
        model(torch.rand(8, 16)).sum().backward()
        optim.step()
        optim.zero_grad()
    zdcp.save({"app": AppState(model, optim)}, path)
    ref = full_state(model, optim)
    if rank == 0:
        torch.save(ref, ref_path)


def load_and_compare(rank, world_size, path, ref_path):
    model, optim = fsdp_model(world_size, seed=1)  # different weights, no optimizer state yet
    zdcp.load({"app": AppState(model, optim)}, path)
    got = full_state(model, optim)
    if rank == 0:
        assert_same_state(got, torch.load(ref_path, weights_only=False))
    # training continues from the loaded state
    model(torch.rand(4, 16)).sum().backward()
    optim.step()


def test_fsdp2_save_2_load_3_1_and_no_process_group(tmp_path):
    path, ref_path = tmp_path / "step_2", tmp_path / "reference.pt"
    run_ranks(2, train_and_save, path, ref_path)
    run_ranks(3, load_and_compare, path, ref_path)
    run_ranks(1, load_and_compare, path, ref_path)

    # Inference-style load: one process, no process group, a plain nn.Module.
    model = ToyModel()
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    zdcp.load({"app": AppState(model, optim)}, path)
    assert_same_state(get_state_dict(model, optim), torch.load(ref_path, weights_only=False))

    # The hierarchy follows the state dict, and chunks are the FSDP2 shards.
    import zarr

    root = zarr.open_group(zdcp.zarr_store(path), mode="r")
    assert root["app/model/net1.weight"].chunks == (8, 16)
    assert root["app/model/net2.weight"].chunks == (3, 16)  # 5 rows over 2 ranks: 3 + 2
    assert root["app/optim/state/net2.weight/exp_avg"].chunks == (3, 16)
    assert root["app/optim/state/net1.bias/step"].shape == ()
    assert root["app/optim"].attrs["param_groups"][0]["lr"] == 0.1
    assert root.attrs["zdcp"]["world_size"] == 2
