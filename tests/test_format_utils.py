"""Conversions round-trip bit-exactly against files written by torch.save, DCP and safetensors
themselves, keeping dtypes, nesting and plain values where the target can hold them."""

import json

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_bitwise_equal
from safetensors import safe_open

import zdcp
import zdcp.storage.inflight
import zdcp.writer
from zdcp import format_utils as fu


def training_state():
    return {
        "model": {
            "net1.weight": torch.randn(6, 4),
            "net1.bias": torch.randn(6).bfloat16(),
            "scale": torch.randn(3).to(torch.float8_e4m3fn),
            "mask": torch.rand(5) > 0.5,
        },
        "optim": {
            "state": {"net1.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(6, 4)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "params": ["net1.weight"]}],
        },
        "step": 3,
    }


def assert_same_tree(a, b, where=""):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert_bitwise_equal(a, b, where)
    elif isinstance(a, dict):
        assert set(a) == set(b), where  # key order is not kept (the hierarchy is sorted)
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_torch_save_round_trip(tmp_path):
    sd = training_state()
    torch.save(sd, tmp_path / "src.pt")
    fu.torch_save_to_zdcp(tmp_path / "src.pt", tmp_path / "z")
    assert zdcp.open(tmp_path / "z")["model/net1.bias"].dtype == torch.bfloat16
    fu.zdcp_to_torch_save(tmp_path / "z", tmp_path / "back.pt")
    assert_same_tree(torch.load(tmp_path / "back.pt", weights_only=True), sd)


def test_torch_save_with_objects_needs_pickle_opt_in(tmp_path):
    torch.save({"w": torch.ones(2), "dtype": torch.float16}, tmp_path / "src.pt")
    with pytest.raises(zdcp.UnsupportedValueError, match="'dtype'.*allow_pickle"):
        fu.torch_save_to_zdcp(tmp_path / "src.pt", tmp_path / "z")
    assert not (tmp_path / "z").exists() or not any((tmp_path / "z").iterdir())
    fu.torch_save_to_zdcp(tmp_path / "src.pt", tmp_path / "z2", allow_pickle=True)
    assert zdcp.open(tmp_path / "z2", allow_pickle=True)["dtype"] is torch.float16


def test_dcp_round_trip(tmp_path):
    sd = training_state()
    dcp.save(sd, checkpoint_id=tmp_path / "dcp_src", no_dist=True)
    fu.dcp_to_zdcp(tmp_path / "dcp_src", tmp_path / "z")
    ck = zdcp.open(tmp_path / "z")
    assert ck["optim/param_groups"][0]["betas"] == (0.9, 0.999)  # one JSON value again, not DCP's split leaves
    assert_same_tree(ck["model"].to_state_dict(), sd["model"])
    fu.zdcp_to_dcp(tmp_path / "z", tmp_path / "dcp_back")
    out = training_state()
    for group in (out["model"], out["optim"]["state"]["net1.weight"]):
        for v in group.values():
            v.zero_() if v.dtype != torch.bool else v.fill_(False)
    out["optim"]["param_groups"] = [{"lr": 0, "betas": None, "eps": 0, "params": None}]
    out["step"] = 0
    dcp.load(out, checkpoint_id=tmp_path / "dcp_back", no_dist=True)
    assert_same_tree(out, sd)


def test_safetensors_file_round_trip(tmp_path):
    tensors = {
        "model.embed.weight": torch.randn(10, 4).bfloat16(),
        "model.layers.0.weight": torch.randn(4, 4),
        "model.layers.0.scale": torch.randn(4).to(torch.float8_e5m2),
        "lm_head.bias": torch.arange(3, dtype=torch.int64),
    }
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    fu.safetensors_to_zdcp(tmp_path / "model.safetensors", tmp_path / "z")
    ck = zdcp.open(tmp_path / "z")
    assert ck["model.embed.weight"].dtype == torch.bfloat16 and ck["__metadata__"]["format"] == "pt"
    fu.zdcp_to_safetensors(tmp_path / "z", tmp_path / "back.safetensors")
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert_bitwise_equal(back[k], tensors[k], k)
    with safe_open(tmp_path / "back.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_safetensors_sharded_directory_both_ways(tmp_path):
    tensors = {f"layers.{i}.weight": torch.randn(64, 16) for i in range(5)}  # 4 KiB each
    fu_src = tmp_path / "z"
    zdcp.save(tensors, fu_src)
    fu.zdcp_to_safetensors(fu_src, tmp_path / "hf", max_shard_size=9000)
    index = json.loads((tmp_path / "hf" / fu.SAFETENSORS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 5 * 64 * 16 * 4
    for name, file in index["weight_map"].items():
        assert_bitwise_equal(safetensors.torch.load_file(tmp_path / "hf" / file)[name], tensors[name], name)
    fu.safetensors_to_zdcp(tmp_path / "hf", tmp_path / "z2")
    assert_same_tree(zdcp.open(tmp_path / "z2").to_state_dict(), tensors)


def test_safetensors_says_what_it_cannot_hold(tmp_path):
    zdcp.save(training_state(), tmp_path / "z")
    with pytest.raises(zdcp.UnsupportedValueError, match="optim/param_groups.*drop_values"):
        fu.zdcp_to_safetensors(tmp_path / "z", tmp_path / "x.safetensors")
    fu.zdcp_to_safetensors(tmp_path / "z", tmp_path / "x.safetensors", drop_values=True)
    names = safetensors.torch.load_file(tmp_path / "x.safetensors").keys()
    assert "model.net1.weight" in names and "optim.state.net1.weight.exp_avg" in names
    zdcp.save({"c": torch.ones(2, dtype=torch.complex128)}, tmp_path / "c128")
    with pytest.raises(zdcp.UnsupportedValueError, match="complex128"):
        fu.zdcp_to_safetensors(tmp_path / "c128", tmp_path / "c.safetensors")


def test_streaming_conversion_holds_one_window_of_tensors(tmp_path, monkeypatch):
    # Conversions into zdcp fetch each tensor when the writer asks for it, and the writer keeps
    # (and references) only its window of them in flight: record the bytes in flight.
    # 256 KiB each, and no direct shard writes: every chunk goes through tensorstore and its
    # window (zdcp.storage.localfiles writes small chunks synchronously, holding nothing).
    monkeypatch.setattr(zdcp.writer, "DIRECT_SHARD_BYTES", 0)
    tensors = {f"t{i}": torch.full((65536,), float(i)) for i in range(12)}
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors")
    in_flight = []
    real_add = zdcp.storage.inflight.InflightWindow.add

    def recording(self, write, nbytes):
        real_add(self, write, nbytes)
        in_flight.append(self.bytes)

    monkeypatch.setattr(zdcp.storage.inflight.InflightWindow, "add", recording)
    size = 65536 * 4
    for window, most in [(2 * size, 2 * size), (None, 12 * size)]:
        monkeypatch.setattr(fu, "_WINDOW", window)
        in_flight.clear()
        fu.safetensors_to_zdcp(tmp_path / "m.safetensors", tmp_path / f"z{window}")
        assert max(in_flight) == most, (window, in_flight)
        assert_same_tree(zdcp.open(tmp_path / f"z{window}").to_state_dict(), tensors)
