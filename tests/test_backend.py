"""``zdcp.as_dcp_backend``: code that calls DCP with a path (``dcp.save(checkpoint_id=...)``,
``FileSystemWriter(path)``, ``dcp.async_save``) writes zdcp checkpoints, reads DCP's and zdcp's
alike, and gets DCP's classes back when the switch is closed."""

import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import assert_bitwise_equal
from test_fsdp2_tutorial import AppState, assert_same_state, fsdp_model, full_state
from torch.distributed.checkpoint import _storage_utils, format_utils, state_dict_saver
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import zdcp
from zdcp.testing import run_ranks

DCP_NAMES = [
    (module, name)
    for module in (dcp, _storage_utils, format_utils)
    for name in ("FileSystemWriter", "FileSystemReader")
    if hasattr(module, name)
] + [(dcp, "async_save"), (state_dict_saver, "async_save")]


def _state(value):
    return {"w": torch.arange(12.0).reshape(4, 3) + value, "nested": {"b": torch.ones(2) * value}, "step": value}


def _empty():
    return {"w": torch.zeros(4, 3), "nested": {"b": torch.zeros(2)}, "step": -1}


def _assert_state(got, value):
    ref = _state(value)
    assert_bitwise_equal(got["w"], ref["w"], "w")
    assert_bitwise_equal(got["nested"]["b"], ref["nested"]["b"], "nested.b")
    assert got["step"] == value


def _assert_zdcp(path):
    names = os.listdir(path)
    assert ".metadata" not in names and not any(n.endswith(".distcp") for n in names), names
    assert zdcp.verify(path).ok


def test_path_only_save_and_load_are_zdcp_in_the_backend_layout(tmp_path, layout):
    with zdcp.as_dcp_backend(layout=layout):
        dcp.save(_state(1), checkpoint_id=tmp_path / "ck")
        out = _empty()
        dcp.load(out, checkpoint_id=tmp_path / "ck")
    _assert_state(out, 1)
    _assert_zdcp(tmp_path / "ck")
    assert ("manifest.ocdbt" in os.listdir(tmp_path / "ck")) == (layout == "packed")
    out = _empty()
    zdcp.load(out, tmp_path / "ck")  # an ordinary zdcp checkpoint
    _assert_state(out, 1)


def test_explicit_writers_and_readers_take_dcp_arguments(tmp_path):
    path = tmp_path / "ck"
    with zdcp.as_dcp_backend(compression="zstd"):
        writer = dcp.FileSystemWriter(path, single_file_per_rank=False, thread_count=4, sync_files=False)
        assert isinstance(writer, zdcp.ZarrWriter)
        assert writer.options.overwrite and not writer.options.sync_files and writer.options.compression == "zstd"
        dcp.save(_state(1), storage_writer=writer)
        dcp.save(_state(2), storage_writer=dcp.FileSystemWriter(path))  # re-saving to a path: DCP's default
        with pytest.raises(dcp.CheckpointException, match="holds a committed checkpoint; pass overwrite=True"):
            dcp.save(_state(3), storage_writer=dcp.FileSystemWriter(path, overwrite=False))
        reader = dcp.FileSystemReader(path)
        assert isinstance(reader, zdcp.ZarrReader)
        assert pickle.loads(pickle.dumps(reader)).checkpoint_id == reader.checkpoint_id
        out = _empty()
        dcp.load(out, storage_reader=reader)
    _assert_state(out, 2)
    _assert_zdcp(path)


def test_a_run_begun_on_dcp_resumes_and_its_next_save_is_zdcp(tmp_path):
    path = tmp_path / "last.ckpt"
    dcp.save(_state(1), checkpoint_id=path)  # DCP's own format
    (path / "meta.pt").write_bytes(b"a framework's file")
    with zdcp.as_dcp_backend():
        assert not isinstance(dcp.FileSystemReader(path), zdcp.ZarrReader)  # DCP's reader for DCP's files
        out = _empty()
        dcp.load(out, checkpoint_id=path)
        _assert_state(out, 1)
        dcp.save(_state(2), checkpoint_id=path)  # the same path, as Lightning re-saves last.ckpt
        assert isinstance(dcp.FileSystemReader(path), zdcp.ZarrReader)
        out = _empty()
        dcp.load(out, checkpoint_id=path)
    _assert_state(out, 2)
    _assert_zdcp(path)
    assert zdcp.verify(path).foreign == ["meta.pt"]


def test_a_load_into_another_dtype_casts_only_when_the_backend_allows_it(tmp_path):
    path = tmp_path / "ck"
    into_bf16 = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
    with zdcp.as_dcp_backend():
        dcp.save({"w": torch.arange(12.0).reshape(4, 3) / 7}, checkpoint_id=path)
        with pytest.raises(dcp.CheckpointException, match="checkpoint has dtype torch.float32, destination torch.bf"):
            dcp.load(into_bf16, checkpoint_id=path)
    with zdcp.as_dcp_backend(allow_cast=True):  # DCP's behaviour: cast silently
        dcp.load(into_bf16, checkpoint_id=path)
    assert_bitwise_equal(into_bf16["w"], (torch.arange(12.0).reshape(4, 3) / 7).to(torch.bfloat16), "w")


def test_closing_gives_dcp_back_and_calls_nest():
    originals = {(m, n): getattr(m, n) for m, n in DCP_NAMES}
    outer = zdcp.as_dcp_backend(layout="files")
    inner = zdcp.as_dcp_backend(layout="packed")
    assert all(getattr(m, n) is not originals[m, n] for m, n in DCP_NAMES)
    assert dcp.FileSystemWriter("/tmp/x").options.layout == "packed"
    inner.close()
    inner.close()  # again: nothing
    assert dcp.FileSystemWriter("/tmp/x").options.layout == "files"
    with outer:
        pass
    assert all(getattr(m, n) is originals[m, n] for m, n in DCP_NAMES)
    assert "closed" in repr(outer)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"overwrite": False}, "overwrite is an argument of DCP's FileSystemWriter"),
        ({"compression": "lz4"}, "compression must be None or one of"),
        ({"layuot": "files"}, "unknown save option"),
    ],
)
def test_bad_backend_options_are_refused_at_once(options, message):
    with pytest.raises(zdcp.UsageError, match=message):
        zdcp.as_dcp_backend(**options)
    assert dcp.FileSystemWriter.__module__ == "torch.distributed.checkpoint.filesystem"


def test_torch_format_utils_convert_into_the_directory_of_the_torch_file(tmp_path):
    # PyTorch's own test_format_utils converts into the directory that holds the .pt file.
    torch.save(_state(4), tmp_path / "model.pt")
    with zdcp.as_dcp_backend():
        format_utils.torch_save_to_dcp(tmp_path / "model.pt", tmp_path)
        _assert_zdcp(tmp_path)
        assert zdcp.verify(tmp_path).foreign == ["model.pt"]
        format_utils.dcp_to_torch_save(tmp_path, tmp_path / "back.pt")
    _assert_state(torch.load(tmp_path / "back.pt", weights_only=False), 4)


def _async_saves_through_the_backend(rank, world_size, root):
    model, optim = fsdp_model(world_size, seed=0)
    model(torch.randn(4, 16)).sum().backward()
    optim.step()
    reference = full_state(model, optim)
    with zdcp.as_dcp_backend():
        for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
            path = f"{root}/{kind.value}"
            future = dcp.async_save({"app": AppState(model, optim)}, checkpoint_id=path, async_checkpointer_type=kind)
            future.result(timeout=120)
            dist.barrier()
            if rank == 0:
                _assert_zdcp(path)
            fresh_model, fresh_optim = fsdp_model(world_size, seed=1)
            fresh_model(torch.randn(4, 16)).sum().backward()
            fresh_optim.step()  # optimizer state to load into
            dcp.load({"app": AppState(fresh_model, fresh_optim)}, checkpoint_id=path)
            loaded = full_state(fresh_model, fresh_optim)
            if rank == 0:  # a full state dict with cpu_offload is rank 0's alone
                assert_same_state(loaded, reference)


def test_async_save_with_a_path_in_a_thread_and_in_a_process_is_zdcp(tmp_path):
    run_ranks(2, _async_saves_through_the_backend, str(tmp_path), timeout=300)


def test_a_dcp_checkpoint_written_over_a_zdcp_one_is_read_as_the_newer(tmp_path):
    path = tmp_path / "ck"
    with zdcp.as_dcp_backend():
        dcp.save(_state(1), checkpoint_id=path)
    dcp.save(_state(2), checkpoint_id=path)  # DCP's writer, without the switch: in place, beside zdcp's
    with zdcp.as_dcp_backend():
        out = _empty()
        dcp.load(out, checkpoint_id=path)
        _assert_state(out, 2)
        dcp.save(_state(3), checkpoint_id=path)  # replaces both; DCP's files are no foreign files
    _assert_zdcp(path)
    assert zdcp.verify(path).foreign == []
