"""DTensor and ShardedTensor checkpoints saved at one world size and placement, loaded at
another; chunk grids equal the save-time shards; errors reach every rank."""

import json
import shutil
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import zarr
from conftest import assert_bitwise_equal
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import zdcp
from zdcp.format.documents import is_guard
from zdcp.testing import run_ranks
from zdcp.verify import verify

# name: (shape, dtype); uneven row counts on purpose
SHAPES = {
    "rows7": ((7, 3), torch.float32),
    "rows5": ((5, 4), torch.float32),
    "rows3": ((3, 2), torch.bfloat16),
    "cols": ((4, 9), torch.float32),
    "rep": ((3, 3), torch.float64),
    "big": ((1024, 256), torch.float32),  # 1 MiB: shards get inner chunks at every world size
}
SHAPES_2D = {
    "grid": ((6, 10), torch.float32),  # [Shard(0), Shard(1)]
    "nested": ((5, 4), torch.float32),  # [Shard(0), Shard(0)]: rows 2,1,1,1, no regular grid
    "mixed": ((5, 6), torch.bfloat16),  # [Replicate(), Shard(1)]
}
SAVE_1D = {"rows7": [Shard(0)], "rows5": [Shard(0)], "rows3": [Shard(0)], "cols": [Shard(1)], "rep": [Replicate()],
           "big": [Shard(0)]}
LOAD_1D = {"rows7": [Shard(1)], "rows5": [Replicate()], "rows3": [Shard(1)], "cols": [Shard(0)], "rep": [Shard(0)],
           "big": [Shard(1)]}
SAVE_2D = {"grid": [Shard(0), Shard(1)], "nested": [Shard(0), Shard(0)], "mixed": [Replicate(), Shard(1)]}
LOAD_2D_AS_1D = {"grid": [Shard(1)], "nested": [Replicate()], "mixed": [Shard(0)]}
LOAD_1D_AS_2D = {"rows7": [Shard(1), Shard(0)], "rows5": [Shard(0), Shard(0)], "rows3": [Replicate(), Shard(0)],
                 "cols": [Shard(0), Shard(1)], "rep": [Shard(1), Replicate()], "big": [Shard(1), Shard(0)]}


def reference(name):
    shape, dtype = {**SHAPES, **SHAPES_2D}[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g).to(dtype)


def dtensors(mesh, placements, fill=True):
    return {
        name: distribute_tensor(reference(name) if fill else torch.zeros_like(reference(name)), mesh, p)
        for name, p in placements.items()
    }


def load_and_check(path, mesh, placements):
    state = {"model": dtensors(mesh, placements, fill=False), "step": 0}
    zdcp.load(state, path)
    for name, dt in state["model"].items():
        assert dt.placements == tuple(placements[name])
        assert_bitwise_equal(dt.full_tensor(), reference(name), name)
    assert state["step"] == 7


def save_1d(rank, world_size, root):
    mesh = init_device_mesh("cpu", (world_size,))
    # files: the test reads the directories with zarr-python as they are, and deletes chunk files
    zdcp.save({"model": dtensors(mesh, SAVE_1D), "step": 7}, root / f"w{world_size}", layout="files")


def save_at_4(rank, world_size, root, layout):
    zdcp.save({"model": dtensors(init_device_mesh("cpu", (4,)), SAVE_1D), "step": 7}, root / "w4", layout=layout)
    zdcp.save({"model": dtensors(init_device_mesh("cpu", (2, 2)), SAVE_2D), "step": 7}, root / "w4_2d", layout=layout)


def save_and_reshard_at_4(rank, world_size, root):
    save_at_4(rank, world_size, root, "files")
    mesh1 = init_device_mesh("cpu", (4,))
    mesh2 = init_device_mesh("cpu", (2, 2))
    for saved_at in ("w2", "w3"):
        load_and_check(root / saved_at, mesh1, LOAD_1D)
        load_and_check(root / saved_at, mesh2, LOAD_1D_AS_2D)


def reshard_at_3(rank, world_size, root):
    mesh = init_device_mesh("cpu", (3,))
    load_and_check(root / "w4", mesh, LOAD_1D)
    load_and_check(root / "w4_2d", mesh, LOAD_2D_AS_1D)


def test_dtensor_placements_reshard_across_world_sizes(tmp_path):
    run_ranks(2, save_1d, tmp_path)
    run_ranks(3, save_1d, tmp_path)
    run_ranks(4, save_and_reshard_at_4, tmp_path)
    run_ranks(3, reshard_at_3, tmp_path)

    for world_size in (2, 3, 4):
        group = zarr.open_group(tmp_path / f"w{world_size}/model", mode="r")
        for name in ("rows7", "rows5", "rows3"):
            rows = SHAPES[name][0][0]
            # Shard(0) over W ranks: torch.chunk sizes, i.e. chunk length ceil(rows / W)
            assert group[name].chunks == (-(-rows // world_size), SHAPES[name][0][1]), (world_size, name)
        assert group["cols"].chunks == (4, -(-9 // world_size))
        # the 1 MiB tensor: one object per rank's shard; shards above 64 KiB hold inner chunks of
        # at most 64 KiB and an eighth of the shard (342 rows at 3: the largest divisor within 42)
        big = zdcp.open(tmp_path / f"w{world_size}")["model/big"]
        shard_rows = -(-1024 // world_size)
        assert big.chunks == (shard_rows, 256)
        assert group["big"].shards == (shard_rows, 256)
        assert group["big"].chunks == {2: (64, 256), 3: (38, 256), 4: (32, 256)}[world_size]
        assert group["rep"].chunks == (3, 3)
        assert group["rows7"].attrs["zdcp"]["placement"]["placements"] == ["Shard(dim=0)"]
    grid = zarr.open_group(tmp_path / "w4_2d/model", mode="r")
    assert grid["grid"].chunks == (3, 5)
    assert grid["nested"].chunks == (1, 4)  # shards of 2,1,1,1 rows: one-row chunks, one writer each
    assert grid["mixed"].chunks == (5, 3)
    assert grid["grid"].attrs["zdcp"]["placement"]["mesh_shape"] == [2, 2]

    # verify reads every chunk of a multi-rank checkpoint: rows7 (2-row chunks over 4 ranks)
    # and the other arrays; and names what is damaged below
    report = verify(tmp_path / "w4_2d")
    assert report.ok and report.arrays == 3 and report.chunks == 4 + 5 + 2, report

    # zdcp.open slices read only the chunks they touch: without the chunks a slice does not
    # touch, it still reads; a slice that needs a missing chunk fails.
    shutil.copytree(tmp_path / "w4", tmp_path / "w4_damaged")
    rows7 = zdcp.open(tmp_path / "w4_damaged")["model/rows7"]
    assert rows7.chunks == (2, 3) and rows7.placement["placements"] == ["Shard(dim=0)"]
    for chunk in (0, 1, 3):
        (tmp_path / f"w4_damaged/model/rows7/c.{chunk}.0").unlink()
    assert_bitwise_equal(rows7[4:6, 1:], reference("rows7")[4:6, 1:])
    with pytest.raises(zdcp.CorruptCheckpointError, match="model/rows7"):
        rows7[3:5]
    faults = verify(tmp_path / "w4_damaged").faults
    assert sorted(f.chunk for f in faults) == [(0, 0), (1, 0), (3, 0)] and {f.node for f in faults} == {"model/rows7"}

    # Any checkpoint loads whole in a plain process, no process group.
    for ckpt, names in [("w2", SHAPES), ("w3", SHAPES), ("w4", SHAPES), ("w4_2d", SHAPES_2D)]:
        state = {"model": {n: torch.zeros_like(reference(n)) for n in names}, "step": 0}
        zdcp.load(state, tmp_path / ckpt)
        for n in names:
            assert_bitwise_equal(state["model"][n], reference(n), f"{ckpt}/{n}")
        # zarr-python reads the same values
        name = next(n for n in names if SHAPES_2D.get(n, SHAPES.get(n))[1] == torch.float32)
        stored = zarr.open_group(tmp_path / ckpt, mode="r")[f"model/{name}"][:]
        assert torch.equal(torch.from_numpy(stored), reference(name))


def test_packed_checkpoints_reshard_like_files_ones(tmp_path):
    """The packed layout: the same grids (chunks = shards), a database per rank, resharded
    loads at 3 ranks and in one process, every chunk verified."""
    run_ranks(4, save_at_4, tmp_path, "packed")
    run_ranks(3, reshard_at_3, tmp_path)
    for name in ("w4", "w4_2d"):
        files = [p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file()]
        assert len(files) <= 4 * 4 + 16, files
        top = {f.parts[0] for f in files}
        # the root database, its guard zarr.json (which Zarr readers refuse), a database per rank
        assert {"manifest.ocdbt", "d", "zarr.json"} <= top, top
        assert top - {"manifest.ocdbt", "d", "zarr.json"} == {f"ocdbt.process_{r}" for r in range(4)}, top
        assert is_guard(json.loads((tmp_path / name / "zarr.json").read_text()))
    group = zarr.open_group(zdcp.zarr_store(tmp_path / "w4"), mode="r")["model"]
    assert group["rows7"].chunks == (2, 3) and group["big"].shards == (256, 256) and group["cols"].chunks == (4, 3)
    report = verify(tmp_path / "w4_2d")
    assert report.ok and report.arrays == 3 and report.chunks == 4 + 5 + 2, report
    for ckpt, names in [("w4", SHAPES), ("w4_2d", SHAPES_2D)]:
        state = {"model": {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in names.items()}}
        zdcp.load(state, tmp_path / ckpt, allow_partial_load=True)
        for name, tensor in state["model"].items():
            assert_bitwise_equal(tensor, reference(name), (ckpt, name))


def sharded_tensor_save_and_load(rank, world_size, root):
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world_size)])
    full = reference("rows7")
    st = sharded_tensor.empty(spec, *full.shape)
    for shard in st.local_shards():
        rows = slice(shard.metadata.shard_offsets[0], shard.metadata.shard_offsets[0] + shard.metadata.shard_sizes[0])
        shard.tensor.copy_(full[rows])
    zdcp.save({"st": st}, root / "sharded")
    dest = sharded_tensor.zeros(spec, *full.shape)
    zdcp.load({"st": dest}, root / "sharded")
    for shard in dest.local_shards():
        off, size = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
        assert_bitwise_equal(shard.tensor, full[off : off + size])


def dcp_plugin_path(rank, world_size, root):
    mesh = init_device_mesh("cpu", (world_size,))
    dcp.save({"model": dtensors(mesh, SAVE_1D), "step": 7}, storage_writer=zdcp.ZarrWriter(root / "plugin"))
    load_and_check(root / "plugin", mesh, LOAD_1D)  # zdcp.load reads what DCP wrote
    state = {"model": dtensors(mesh, LOAD_1D, fill=False), "step": 0}
    dcp.load(state, storage_reader=zdcp.ZarrReader(root / "plugin"))
    for name, dt in state["model"].items():
        assert_bitwise_equal(dt.full_tensor(), reference(name), name)
    assert state["step"] == 7

    # async: training changes the tensors as soon as async_save returns; the checkpoint holds
    # the values of the call. A gloo group of its own carries the background collectives.
    group = dist.new_group(backend="gloo")
    state = {"model": dtensors(mesh, SAVE_1D), "step": 7}
    future = zdcp.async_save(state, root / "async", process_group=group)
    for dt in state["model"].values():
        dt.to_local().add_(1000)
    state["step"] = 8
    assert future.result() is None
    load_and_check(root / "async", mesh, LOAD_1D)
    # two async saves in flight at once (one rank slower to start the second): their
    # collectives run in order on the saver thread, never interleaved
    first = zdcp.async_save({"model": dtensors(mesh, SAVE_1D), "step": 1}, root / "async1", process_group=group)
    if rank == 1:
        time.sleep(0.5)
    second = zdcp.async_save({"model": dtensors(mesh, SAVE_1D), "step": 7}, root / "async2", process_group=group)
    assert first.result() is None and second.result() is None
    load_and_check(root / "async2", mesh, LOAD_1D)
    # DCP's own async flow with the zdcp writer
    state = {"model": dtensors(mesh, SAVE_1D), "step": 7}
    response = dcp.async_save(state, storage_writer=zdcp.ZarrWriter(root / "dcp_async"), process_group=group)
    response.result()
    load_and_check(root / "dcp_async", mesh, LOAD_1D)


def errors_reach_every_rank(rank, world_size, root):
    mesh = init_device_mesh("cpu", (world_size,))
    state = {"model": dtensors(mesh, SAVE_1D), "step": 7}
    zdcp.save(state, root / "e")
    with pytest.raises(zdcp.CheckpointExistsError, match="overwrite=True"):
        zdcp.save(state, root / "e")
    asks = {"model": dtensors(mesh, SAVE_1D, fill=False)}
    if rank == 1:
        asks["model"]["only_on_rank_1"] = torch.zeros(2)
    with pytest.raises(zdcp.MissingKeysError, match="model/only_on_rank_1"):
        zdcp.load(asks, root / "e")
    with pytest.raises(zdcp.CheckpointNotFoundError):
        zdcp.load(asks, root / "nothing_here")
    bad = {"model": dtensors(mesh, SAVE_1D), "cfg": object() if rank == 1 else 1}
    with pytest.raises(zdcp.UnsupportedValueError, match="cfg"):
        zdcp.save(bad, root / "bad")
    dist.barrier()
    with pytest.raises(zdcp.CheckpointNotFoundError):  # nothing of the failed save was committed
        zdcp.load({"cfg": 0}, root / "bad")


def test_sharded_tensor_dcp_plugin_and_errors_on_every_rank(tmp_path):
    run_ranks(2, sharded_tensor_save_and_load, tmp_path)
    run_ranks(2, dcp_plugin_path, tmp_path)
    assert zarr.open_group(zdcp.zarr_store(tmp_path / "plugin"), mode="r")["model/rows7"].chunks == (4, 3)
    run_ranks(2, errors_reach_every_rank, tmp_path)
    assert zarr.open_group(zdcp.zarr_store(tmp_path / "sharded"), mode="r")["st"].chunks == (4, 3)
    state = {"st": torch.zeros(7, 3)}
    zdcp.load(state, tmp_path / "sharded")
    assert_bitwise_equal(state["st"], reference("rows7"))


def cached_plans(rank, world_size, root):
    """DCP's plan caching on 4 ranks: the first save plans, the second reuses every rank's
    cached plan, in the third one rank's plan changes (a tensor of its own) and only that rank
    is planned again."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    mesh = init_device_mesh("cpu", (world_size,))
    seen = []
    real = zdcp.ZarrWriter.prepare_global_plan

    def recording(self, plans):
        seen.append([p.usable for p in plans])
        return real(self, plans)

    zdcp.ZarrWriter.prepare_global_plan = recording
    for step in (1, 2, 3):
        state = {"model": dtensors(mesh, SAVE_1D), "step": step}
        for dt in state["model"].values():
            dt.to_local().mul_(step)
        if step == 3 and rank == 3:
            state["only_rank_3"] = torch.full((2,), 3.0)
        planner = DefaultSavePlanner(enable_plan_caching=True)
        dcp.save(state, storage_writer=zdcp.ZarrWriter(root / f"step_{step}"), planner=planner)
    if rank == 0:
        assert seen == [[True] * 4, [False] * 4, [False, False, False, True]], seen


def test_dcp_plan_caching_on_four_ranks(tmp_path):
    run_ranks(4, cached_plans, tmp_path)
    for step in (1, 2, 3):
        state = {"model": {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in SHAPES.items()}, "step": 0}
        zdcp.load(state, tmp_path / f"step_{step}")
        assert state["step"] == step
        for name, tensor in state["model"].items():
            assert_bitwise_equal(tensor, reference(name) * step, (step, name))
        assert verify(tmp_path / f"step_{step}").ok
    only = {"only_rank_3": torch.zeros(2)}
    zdcp.load(only, tmp_path / "step_3")
    assert torch.equal(only["only_rank_3"], torch.full((2,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2", "step_3"]
