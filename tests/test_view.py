"""zdcp.open: lazy navigation, metadata for free, slices that read only the chunks they touch,
and materialisation with the original key and container types."""

import math

import pytest
import torch
from conftest import assert_bitwise_equal, read_root, write_root

import zdcp


@pytest.fixture
def saved(ckpt):
    sd = {
        "model": {"net1.weight": torch.arange(80.0).reshape(8, 10), "emb": torch.randn(6, 4).bfloat16()},
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        "step": 5,
        "lst": [torch.zeros(2), (1, "x")],
    }
    zdcp.save(sd, ckpt)
    return sd, ckpt


def test_navigation_and_metadata(saved):
    sd, ckpt = saved
    ck = zdcp.open(ckpt)
    assert set(ck) == {"model", "optim", "step", "lst"} and len(ck) == 4
    assert ck["step"] == 5
    assert ck["optim"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]
    assert ck["optim/state/0/step"].read().item() == 3.0  # int key 0 reached through a path
    assert ck["optim"]["state"][0]["step"].shape == ()
    w = ck["model/net1.weight"]
    assert ck["model"]["net1.weight"].path == w.path == ("model", "net1.weight")
    assert (w.shape, w.dtype, w.chunks, w.nbytes, w.ndim, len(w)) == ((8, 10), torch.float32, (8, 10), 320, 2, 8)
    assert w.placement == {"type": "Tensor"}
    assert ck.info["format_version"] == 3 and ck.info["world_size"] == 1
    assert ck["lst"].is_list and list(ck["lst"]) == [0, 1]
    with pytest.raises(KeyError, match="model/nope"):
        ck["model/nope"]


def test_slices_equal_the_source(saved):
    sd, ckpt = saved
    ck = zdcp.open(ckpt)
    w, src = ck["model/net1.weight"], sd["model"]["net1.weight"]
    for index in [(slice(2, 5), slice(3, 7)), 3, (Ellipsis, 0), (slice(None), slice(None, None, 2)), ...]:
        assert torch.equal(w[index], src[index]), index
    assert_bitwise_equal(ck["model/emb"][1:3], sd["model"]["emb"][1:3])


def test_to_state_dict_keeps_types(saved):
    sd, ckpt = saved
    out = zdcp.open(ckpt).to_state_dict()
    assert out["optim"]["state"][0]["step"].item() == 3.0
    assert out["lst"][1] == (1, "x") and isinstance(out["lst"], list)
    assert repr(out["optim"]["param_groups"]) == repr(sd["optim"]["param_groups"])
    assert torch.equal(out["model"]["net1.weight"], sd["model"]["net1.weight"])
    assert zdcp.open(ckpt)["optim"].to_state_dict()["param_groups"][0]["lr"] == 0.1


def test_pickled_values_need_opt_in(ckpt):
    zdcp.save({"obj": {"dtype": torch.float16}}, ckpt, allow_pickle=True)
    with pytest.raises(zdcp.UnsafeError, match="obj/dtype"):
        zdcp.open(ckpt)["obj"]["dtype"]
    assert zdcp.open(ckpt, allow_pickle=True)["obj"]["dtype"] is torch.float16


def test_open_errors(tmp_path):
    with pytest.raises(zdcp.CheckpointNotFoundError):
        zdcp.open(tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "something").write_text("x")
    with pytest.raises(zdcp.IncompleteCheckpointError):
        zdcp.open(tmp_path / "partial")


def test_a_list_group_with_a_gap_is_corrupt(ckpt, layout):
    zdcp.save({"lst": [torch.zeros(1), torch.ones(1), 5]}, ckpt, layout=layout)
    root = read_root(ckpt)
    del root["consolidated_metadata"]["metadata"]["lst/%i1"]
    write_root(ckpt, root)
    with pytest.raises(zdcp.CorruptCheckpointError, match="indices 0..1"):
        zdcp.open(ckpt)


def test_a_save_s_metadata_comes_back_as_given(tmp_path, layout):
    metadata = {"step": 7, "metrics": {"loss": float("nan"), "acc": 0.5}, "betas": (0.9, 0.99), 3: "int key"}
    zdcp.save({"w": torch.ones(2)}, tmp_path / "a", layout=layout, metadata=metadata)
    found = zdcp.open(tmp_path / "a").metadata
    assert found["betas"] == (0.9, 0.99) and found[3] == "int key" and math.isnan(found["metrics"]["loss"])
    assert zdcp.open(tmp_path / "a").info["metadata"]["step"] == 7  # plain JSON in the root document
    zdcp.save({"w": torch.ones(2)}, tmp_path / "b")
    assert zdcp.open(tmp_path / "b").metadata is None
    with pytest.raises(zdcp.UnsupportedValueError, match="metadata must be a plain value"):
        zdcp.save({"w": torch.ones(2)}, tmp_path / "c", metadata={"x": object()})
    assert not (tmp_path / "c").exists()
