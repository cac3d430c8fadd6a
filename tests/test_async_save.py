"""zdcp.async_save in one process: returns after staging, the checkpoint holds the state as it
was at the call, and errors arrive through the future as zdcp errors."""

import concurrent.futures

import pytest
import torch

import zdcp


def test_async_save_snapshots_the_state(ckpt, layout):
    state = {"w": torch.arange(1000.0), "cfg": {"lr": 0.1, "history": [1, 2]}, "step": 3}
    future = zdcp.async_save(state, ckpt, layout=layout)
    assert isinstance(future, concurrent.futures.Future)
    state["w"].add_(1.0)  # training goes on
    state["cfg"]["history"].append(3)
    state["cfg"]["lr"] = 9.0
    state["step"] = 4
    assert future.result(timeout=60) is None
    out = {"w": torch.zeros(1000), "cfg": {"lr": 0.0, "history": None}, "step": 0}
    zdcp.load(out, ckpt)
    assert torch.equal(out["w"], torch.arange(1000.0))
    assert out["cfg"] == {"lr": 0.1, "history": [1, 2]} and out["step"] == 3


def test_async_save_errors_come_through_the_future(ckpt, layout):
    zdcp.save({"w": torch.ones(1)}, ckpt, layout=layout)
    future = zdcp.async_save({"w": torch.zeros(1)}, ckpt, layout=layout)
    with pytest.raises(zdcp.CheckpointExistsError, match="overwrite=True"):
        future.result(timeout=60)
    out = {"w": torch.zeros(1)}
    zdcp.load(out, ckpt)
    assert out["w"].item() == 1.0  # the committed checkpoint is untouched
    assert zdcp.async_save({"w": torch.zeros(1)}, ckpt, overwrite=True, layout=layout).result(timeout=60) is None


def test_successive_async_saves_run_in_order(tmp_path):
    futures = [zdcp.async_save({"i": torch.tensor(i)}, tmp_path / "ck", overwrite=True) for i in range(4)]
    for f in futures:
        f.result(timeout=60)
    out = {"i": torch.tensor(-1)}
    zdcp.load(out, tmp_path / "ck")
    assert out["i"].item() == 3
