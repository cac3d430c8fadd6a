"""Saves of replicated tensors spread across ranks by bytes (zdcp.dedup): the plan, and real saves
on gloo ranks that load back exactly at any world size."""

import glob
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import assert_bitwise_equal
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
from torch.distributed.checkpoint.planner import WriteItemType

import zdcp
from zdcp.dedup import spread_replicated
from zdcp.format.documents import chunk_shape
from zdcp.testing import run_ranks


def _ddp_state():
    """A DDP state whose largest tensor is half of it (4 MiB of 8 MiB)."""
    g = torch.Generator().manual_seed(0)
    state = {"embedding": torch.randn(1024, 1024, generator=g), "step": 3}
    state.update({f"layer{i}": torch.randn(128, 1024, generator=g) for i in range(8)})
    return state


def _written(plans):
    """The bytes of tensors each plan writes (``WriteItem.tensor_storage_size`` counts the whole
    tensor for each of its shards)."""
    sizes = [
        [
            (math.prod(i.tensor_data.chunk.sizes), i.tensor_data.properties.dtype.itemsize)
            for i in p.items
            if i.tensor_data
        ]
        for p in plans
    ]
    return [sum(n * size for n, size in plan) for plan in sizes]


def test_a_replicated_tensor_larger_than_its_share_is_written_in_pieces_by_several_ranks():
    plans = [create_default_local_save_plan(_ddp_state(), is_coordinator=rank == 0) for rank in range(4)]
    spread = spread_replicated(plans)
    written = _written(spread)
    assert written == [2 << 20] * 4, written
    dcp_written = _written(dedup_save_plans(plans))
    assert max(dcp_written) > 1.2 * sum(dcp_written) / 4, "DCP's dedup writes the tensor whole"
    pieces = [item for plan in spread for item in plan.items if item.index.fqn == "embedding"]
    assert len({rank for rank, plan in enumerate(spread) for item in plan.items if item in pieces}) == 4
    chunks = sorted((tuple(p.tensor_data.chunk.offsets), tuple(p.tensor_data.chunk.sizes)) for p in pieces)
    assert chunks == [((r, 0), (256, 1024)) for r in range(0, 1024, 256)], "they tile it, a regular grid"
    assert all(p.type == WriteItemType.SHARD for p in pieces)
    # each smaller tensor is written whole, by one rank; values are left to DCP's dedup (every plan keeps them)
    for fqn in [f"layer{i}" for i in range(8)]:
        assert sum(item.index.fqn == fqn for plan in spread for item in plan.items) == 1
    assert all(any(item.index.fqn == "step" for item in plan.items) for plan in spread)
    # nothing replicated: the plans as they were
    alone = [create_default_local_save_plan({f"r{rank}": torch.zeros(8)}, rank == 0) for rank in range(2)]
    assert spread_replicated(alone) == alone


@pytest.mark.parametrize(("rows", "pieces"), [(1000, 125), (1003, 251)])
def test_pieces_of_shards_keep_the_chunk_grid_regular_and_coarse(rows, pieces):
    """HSDP: two shards, each held by two ranks and larger than its share (a quarter of the
    tensor), so up to 4 pieces each. A shard is cut only into equal pieces whose length its
    offset is a multiple of: 1000 rows, shards of 500, pieces of 125 rows; 1003 rows, shards of
    502 rows (2 pieces of 251) and 501 rows at 502 (no such pieces: written whole)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import SavePlan, TensorProperties, TensorWriteData, WriteItem

    half, cols = (rows + 1) // 2, 4096  # 16 MiB

    def shard(start, length):
        chunk = ChunkStorageMetadata(torch.Size([start, 0]), torch.Size([length, cols]))
        data = TensorWriteData(
            chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=torch.Size([rows, cols])
        )
        return WriteItem(index=MetadataIndex("w", torch.Size([start, 0])), type=WriteItemType.SHARD, tensor_data=data)

    first, second = shard(0, half), shard(half, rows - half)
    spread = spread_replicated([SavePlan([first]), SavePlan([second]), SavePlan([first]), SavePlan([second])])
    chunks = [(tuple(i.tensor_data.chunk.offsets), tuple(i.tensor_data.chunk.sizes)) for p in spread for i in p.items]
    assert sum(math.prod(sizes) for _, sizes in chunks) == rows * cols, "they tile the tensor"
    assert chunk_shape((rows, cols), chunks) == (pieces, cols)
    if rows == 1000:
        assert [len(p.items) for p in spread] == [2, 2, 2, 2], "every rank writes a quarter"
    else:
        assert sorted(chunks) == [((0, 0), (251, cols)), ((251, 0), (251, cols)), ((502, 0), (501, cols))]


def _save_replicated(rank, world_size, path, layout):
    state = _ddp_state()
    zdcp.save(state, path, layout=layout)
    dist.barrier()
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}
    zdcp.load(out, path)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert_bitwise_equal(out[key], value, key)
    assert out["step"] == 3


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_ranks_write_about_equal_bytes_of_a_replicated_state_and_it_loads_anywhere(tmp_path, layout):
    """4 DDP ranks: the packed layout's per-rank data files hold about equal bytes (the largest
    within 1.2x the mean); the checkpoint loads back exactly on 4 ranks, 3 ranks and in one
    process, as any resharded one."""
    path = str(tmp_path / "ckpt")
    run_ranks(4, _save_replicated, path, layout)
    if layout == "packed":
        written = [sum(map(os.path.getsize, glob.glob(f"{path}/ocdbt.process_{r}/d/*"))) for r in range(4)]
        assert max(written) <= 1.2 * sum(written) / 4, written
    else:
        assert len(glob.glob(f"{path}/embedding/c.*")) == 4, "one chunk per piece"
    run_ranks(3, _load_replicated, path)
    _load_replicated(0, 1, path)


def _load_replicated(rank, world_size, path):
    state = _ddp_state()
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}
    zdcp.load(out, path)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert_bitwise_equal(out[key], value, key)


def _save_tp_replicated(rank, world_size, path):
    """A DTensor replicated over the mesh (TP's norms), larger than its share: pieces of its
    local (whole) tensor, written by every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(1)
    norm, proj = torch.randn(2048, 256, generator=g), torch.randn(64, 256, generator=g)  # 2 MiB, 64 KiB
    state = {"norm": distribute_tensor(norm, mesh, [Replicate()]), "proj": distribute_tensor(proj, mesh, [Shard(0)])}
    zdcp.save(state, path)
    written = sum(map(os.path.getsize, glob.glob(f"{path}/ocdbt.process_{rank}/d/*")))
    sizes = [None] * world_size
    dist.all_gather_object(sizes, written)
    assert max(sizes) <= 1.2 * sum(sizes) / world_size, sizes
    out = {"norm": distribute_tensor(torch.zeros(2048, 256), mesh, [Shard(1)]), "proj": torch.zeros(64, 256)}
    zdcp.load(out, path)
    assert_bitwise_equal(out["norm"].full_tensor(), norm)
    assert_bitwise_equal(out["proj"], proj)


def test_a_replicated_dtensor_is_written_in_pieces_and_loads_in_another_placement(tmp_path):
    run_ranks(2, _save_tp_replicated, str(tmp_path / "ckpt"))
