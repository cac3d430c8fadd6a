"""Chunk grids: chunks are the save-time shards for regular layouts, and every chunk lies in one
shard (one writer) for irregular ones."""

import itertools
import math

import pytest
import torch

from zdcp.format.codecs import inner_chunk_shape
from zdcp.format.constants import INNER_CHUNK_BYTES, MIN_INNER_CHUNKS
from zdcp.format.documents import chunk_shape


def torch_chunk_shards(n, w):
    """Shard(d) over w ranks, as DTensor cuts it (torch.chunk; missing trailing shards empty)."""
    sizes = [c.numel() for c in torch.arange(n).chunk(w)] if n else []
    sizes += [0] * (w - len(sizes))
    offsets = [sum(sizes[:i]) if sizes[i] else n for i in range(w)]
    return list(zip(offsets, sizes))


def assert_single_writer(shape, shards, chunks):
    """Every chunk of the grid lies inside exactly one shard."""
    grid = [range(math.ceil(n / c)) if n else range(0) for n, c in zip(shape, chunks)]
    for index in itertools.product(*grid):
        lo = [i * c for i, c in zip(index, chunks)]
        hi = [min((i + 1) * c, n) for i, c, n in zip(index, chunks, shape)]
        owners = [
            s for s in shards
            if all(o <= a and b <= o + z for o, z, a, b in zip(s[0], s[1], lo, hi))
        ]
        assert len(owners) == 1, (shape, shards, index)


@pytest.mark.parametrize("w", range(1, 17))
def test_shard_d_chunks_are_the_shards(w):
    for n in range(0, 70):
        shards = [((o,), (s,)) for o, s in torch_chunk_shards(n, w)]
        chunks = chunk_shape((n,), shards)
        assert chunks == ((max(math.ceil(n / w), 1),) if n else (1,))
        if n:
            assert_single_writer((n,), shards, chunks)


def test_two_dim_mesh_shard_both_dims():
    # [Shard(0), Shard(1)] on a 2x3 mesh of a 7x10 tensor
    rows, cols = torch_chunk_shards(7, 2), torch_chunk_shards(10, 3)
    shards = [((ro, co), (rs, cs)) for ro, rs in rows for co, cs in cols]
    assert chunk_shape((7, 10), shards) == (4, 4)
    assert_single_writer((7, 10), shards, (4, 4))


def test_irregular_layouts_get_single_writer_grids():
    # [Shard(0), Shard(0)] on a 2x3 mesh, n=7: sizes 2,2,0,1,1,1
    nested = [((0,), (2,)), ((2,), (2,)), ((7,), (0,)), ((4,), (1,)), ((5,), (1,)), ((6,), (1,))]
    assert chunk_shape((7,), nested) == (1,)
    assert_single_writer((7,), nested, (1,))
    # FSDP2 + TP (_StridedShard(0, split_factor=2), Shard(0)), n=10: sizes 3,3,2,2 at 0,5,3,8
    strided = [((0,), (3,)), ((5,), (3,)), ((3,), (2,)), ((8,), (2,))]
    assert chunk_shape((10,), strided) == (1,)
    assert_single_writer((10,), strided, (1,))
    # a 4096-row weight under the same layouts keeps large chunks
    big = [((o,), (512,)) for o in (0, 2048, 512, 2560, 1024, 3072, 1536, 3584)]
    assert chunk_shape((4096,), big) == (512,)


def test_unsharded_and_scalar():
    assert chunk_shape((5, 3), [((0, 0), (5, 3))]) == (5, 3)
    assert chunk_shape((), [((), ())]) == ()
    assert chunk_shape((0, 4), [((0, 0), (0, 4))]) == (1, 4)


@pytest.mark.parametrize(
    "chunks, itemsize, inner",
    [
        ((8192, 1024), 4, (16, 1024)),  # 64 KiB inner chunks of a 32 MiB shard
        ((100, 10), 4, (100, 10)),  # small: no inner chunks
        ((64, 512), 4, (8, 512)),  # a 128 KiB shard (a 512 x 512 weight on 8 ranks): 8 inner chunks
        ((16, 2048), 4, (2, 2048)),  # 128 KiB of 8 KiB rows
        ((2, 16384), 4, (1, 4096)),  # two rows of 64 KiB: the rows are cut too
        ((4104, 1024), 4, (12, 1024)),  # 4104 = 2^3 3^3 19: the largest divisor that fits
        ((4097, 1024), 4, (4097, 1024)),  # 4097 = 17 * 241: no divisor near 16, no inner chunks
        ((3, 70000), 4, (1, 14000)),  # one row is too large: the next dimension is cut too
        ((65537,), 4, (65537,)),  # prime: tiny inner chunks would cost more than they save
        ((), 8, ()),
    ],
)
def test_inner_chunks_divide_the_shard_and_fit(chunks, itemsize, inner):
    assert inner_chunk_shape(chunks, itemsize) == inner
    assert all(c % i == 0 for c, i in zip(chunks, inner))
    if inner != chunks:
        assert math.prod(inner) * itemsize <= min(INNER_CHUNK_BYTES, math.prod(chunks) * itemsize // MIN_INNER_CHUNKS)
