"""Direct row-slab reads equal tensorstore's reads of the same files, for every layout they
accept, and refuse damaged data as tensorstore does."""

import os

import numpy as np
import pytest
import torch
from conftest import assert_bitwise_equal

import zdcp
import zdcp.storage.localfiles
from zdcp.format.documents import array_document
from zdcp.format.dtypes import from_torch, numpy_to_tensor, tensor_to_numpy
from zdcp.storage.layout import layout_named
from zdcp.storage.localfiles import in_directory, row_slabs
from zdcp.storage.location import Location

CASES = [
    # shape, dtype, chunk rows: sharded (inner chunks), plain, edge-padded, several dims
    ((1000, 300), torch.float32, 400),  # 480 KB chunks -> 50-row inner chunks; last chunk padded
    ((1000, 300), torch.float32, 50),  # plain 60 KB chunks
    ((37, 5, 7), torch.bfloat16, 10),  # 3-d, plain, last chunk 7 of 10 rows
    ((4096, 64), torch.bool, 4096),  # one sharded chunk of bools
    ((50, 3), torch.complex64, 16),
]


def write_array(root, node, shape, dtype, chunk_rows):
    full = torch.randn(shape).to(dtype) if not dtype.is_complex else torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        full = torch.rand(shape) > 0.5
    store = layout_named("files").hierarchy(Location(root))
    doc = array_document(shape, from_torch(dtype), (chunk_rows, *shape[1:]), {"kind": "tensor"})
    store.open_array(node, doc, write=True).result().write(tensor_to_numpy(full)).result()
    return store, doc, full


@pytest.mark.parametrize("shape, dtype, chunk_rows", CASES, ids=str)
def test_row_slabs_equal_tensorstore(tmp_path, shape, dtype, chunk_rows):
    store, doc, full = write_array(tmp_path, "a", shape, dtype, chunk_rows)
    slabs = row_slabs(doc)
    assert slabs is not None and slabs.sharded == (doc["codecs"][0]["name"] == "sharding_indexed")
    handle = store.open_array("a", doc).result()
    n = shape[0]
    for start, stop in [(0, n), (0, 1), (n - 1, n), (n // 3, n // 3 + 1), (n // 7, n - n // 5), (n // 2, n)]:
        dest = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        rows = dest.reshape(-1).view(torch.uint8).numpy().reshape(stop - start, slabs.row_bytes)
        slabs.read(in_directory(store.spec["path"]), "a", "a", start, stop, rows)
        expected = numpy_to_tensor(handle[start:stop].read().result(), dtype)
        assert_bitwise_equal(dest, expected, (start, stop))
        assert_bitwise_equal(dest, full[start:stop], (start, stop))


def test_layouts_it_does_not_take(tmp_path):
    _, doc, _ = write_array(tmp_path, "cols", (20, 30), torch.float32, 20)
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [20, 10]  # chunked along columns too
    assert row_slabs(doc) is None
    zstd = array_document((20, 30), from_torch(torch.float32), (20, 30), {}, compression="zstd")
    assert row_slabs(zstd) is None
    assert row_slabs(array_document((), from_torch(torch.float32), (), {})) is None


def test_damage_is_refused(tmp_path):
    store, doc, full = write_array(tmp_path, "a", (1000, 300), torch.float32, 400)
    slabs = row_slabs(doc)
    dest = np.empty((1000, slabs.row_bytes), dtype=np.uint8)
    shard = tmp_path / "a/c.1.0"
    data = bytearray(shard.read_bytes())
    count = 400 // slabs.inner_rows
    index = np.frombuffer(bytes(data[-(count * 16 + 4) : -4]), dtype="<u8").reshape(count, 2)
    damaged = (650 - 400) // slabs.inner_rows  # the inner chunk of chunk 1 holding row 650
    data[int(index[damaged, 0]) + 5] ^= 0x10
    shard.write_bytes(bytes(data))
    first_damaged_row = 400 + damaged * slabs.inner_rows
    files = in_directory(store.spec["path"])
    slabs.read(files, "a", "a", 0, first_damaged_row, dest[:first_damaged_row])  # the rows before it
    with pytest.raises(zdcp.CorruptCheckpointError, match="'a': chunk 1 fails its crc32c"):
        slabs.read(in_directory(store.spec["path"]), "a", "a", 650, 700, dest[:50])
    with pytest.raises(zdcp.CorruptCheckpointError, match="'a': chunk 1 fails its crc32c"):
        slabs.read(files, "a", "a", 400, 800, dest[:400])  # the whole chunk: its inner chunks in one read
    data[-10] ^= 0x01  # the index itself
    shard.write_bytes(bytes(data))
    with pytest.raises(zdcp.CorruptCheckpointError, match="damaged shard index"):
        slabs.read(in_directory(store.spec["path"]), "a", "a", 400, 500, dest[:100])
    (tmp_path / "a/c.2.0").unlink()
    with pytest.raises(zdcp.CorruptCheckpointError, match="chunk 2 is missing"):
        slabs.read(in_directory(store.spec["path"]), "a", "a", 900, 1000, dest[:100])
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated: its index is gone
    with pytest.raises(zdcp.CorruptCheckpointError, match="'a'"):
        slabs.read(in_directory(store.spec["path"]), "a", "a", 400, 500, dest[:100])


def test_load_takes_the_direct_path_and_agrees(ckpt, monkeypatch):
    calls = []
    real_read = zdcp.storage.localfiles.RowSlabs.read
    recording = lambda self, *a: calls.append(a[1]) or real_read(self, *a)  # noqa: E731
    monkeypatch.setattr(zdcp.storage.localfiles.RowSlabs, "read", recording)
    t = torch.randn(3000, 100)  # 1.2 MB: inner chunks
    # the files layout: every chunk a file (packed, below, keeps small ones in its B-tree)
    zdcp.save({"w": t, "b": torch.randn(7, 3).bfloat16()}, ckpt, layout="files")
    direct = {"w": torch.zeros_like(t), "b": torch.zeros(7, 3, dtype=torch.bfloat16)}
    via_ts = {"w": torch.zeros_like(t), "b": torch.zeros(7, 3, dtype=torch.bfloat16)}
    import torch.distributed.checkpoint as dcp

    dcp.load(direct, storage_reader=zdcp.ZarrReader(ckpt), no_dist=True)
    assert sorted(calls) == ["b", "w"]
    dcp.load(via_ts, storage_reader=zdcp.ZarrReader(ckpt, direct_reads=False), no_dist=True)
    assert len(calls) == 2
    for k in direct:
        assert_bitwise_equal(direct[k], via_ts[k], k)
    assert_bitwise_equal(direct["w"], t)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_direct_writes_make_the_same_files_as_tensorstore(tmp_path, compression):
    """Small plain chunks and node documents written as plain files are byte for byte what
    tensorstore writes; larger (sharded) and compressed chunks still go through tensorstore."""
    import torch.distributed.checkpoint as dcp

    from zdcp.format.dtypes import _ALL as ALL_DTYPES
    from zdcp.planner import ZarrSavePlanner

    g = torch.Generator().manual_seed(0)
    state = {
        "dtypes": {d.torch_name: torch.randn(3, 5, generator=g).to(d.torch) for d in ALL_DTYPES},
        "scalar": torch.tensor(2.5),
        "large": torch.randn(300, 300, generator=g),  # 360 KB: inner chunks of 100 rows
        "wide": torch.randn(4, 70000, generator=g),  # a row is 280 KB: inner chunks of 1 x 17500
        "huge": torch.randn(1100, 1024, generator=g),  # 4.3 MiB: through tensorstore
        "empty": torch.empty(0, 4),
        "opt": {"step": 3, "param_groups": [{"lr": 0.1}]},
    }
    trees = {}
    for direct in (True, False):
        path = tmp_path / str(direct)
        writer = zdcp.ZarrWriter(path, layout="files", compression=compression, direct_writes=direct)
        dcp.save(state, storage_writer=writer, planner=ZarrSavePlanner(), no_dist=True)
        trees[direct] = _files(path)
    assert trees[True] == trees[False]
    assert "dtypes/float32/c.0.0" in trees[True] and "scalar/c" in trees[True]
    loaded = zdcp.open(tmp_path / "True").to_state_dict()
    for name, tensor in state["dtypes"].items():
        assert_bitwise_equal(loaded["dtypes"][name], tensor)
    assert_bitwise_equal(loaded["scalar"], state["scalar"])
    for name in ("large", "wide", "huge"):
        assert_bitwise_equal(loaded[name], state[name])


def test_direct_writes_take_small_chunks_and_shards_up_to_4_mib(tmp_path, monkeypatch):
    written = []
    real = zdcp.storage.localfiles.LocalFiles.write

    def recording(self, key, *parts):
        written.append(key)
        real(self, key, *parts)

    monkeypatch.setattr(zdcp.storage.localfiles.LocalFiles, "write", recording)
    state = {"small": torch.ones(10), "large": torch.ones(300, 300), "huge": torch.ones(1100, 1024)}
    zdcp.save(state, tmp_path / "c", layout="files")  # a chunk a file, by its key
    assert sorted(key for key in written if not key.endswith("zarr.json")) == ["large/c.0.0", "small/c.0"]


@pytest.mark.parametrize("sync_files", [True, False])
def test_large_direct_writes_start_their_write_back_when_the_save_syncs(tmp_path, monkeypatch, sync_files):
    started = []
    real = zdcp.storage.localfiles.start_writeback

    def recording(fd):
        started.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(zdcp.storage.localfiles, "start_writeback", recording)
    state = {"small": torch.ones(10), "large": torch.ones(300, 300)}  # 360 KB: over WRITEBACK_BYTES
    zdcp.save(state, tmp_path / "c", layout="files", sync_files=sync_files)  # a chunk a file
    if sync_files:
        assert [p.rsplit("/", 2)[-2:] for p in started] == [["large", "c.0.0"]]
    else:
        assert started == []
    assert_bitwise_equal(zdcp.open(tmp_path / "c")["large"][:], state["large"])


def test_local_files_finish_partial_writes_and_make_missing_directories(tmp_path, monkeypatch):
    """A ``writev`` that writes less than asked (as the kernel may) is continued where it
    stopped; directories are made as needed, also when another writer made some of them."""
    real_writev = os.writev

    def short_writev(fd, buffers):
        budget, head = 7, []
        for b in buffers:
            head.append(memoryview(b)[:budget])
            budget -= head[-1].nbytes
            if budget == 0:
                break
        return real_writev(fd, head)

    monkeypatch.setattr(os, "writev", short_writev)
    parts = [b"abc", b"", bytes(range(256)) * 3, b"xyz" * 5]
    (tmp_path / "a" / "b").mkdir(parents=True)  # another writer's
    files = zdcp.storage.localfiles.LocalFiles(str(tmp_path) + "/")
    files.write("a/b/c/d/file", *parts)
    files.write("a/e", b"second")
    assert (tmp_path / "a/b/c/d/file").read_bytes() == b"".join(parts)
    assert (tmp_path / "a/e").read_bytes() == b"second"


def test_packed_direct_writes_store_what_tensorstore_stores(tmp_path):
    """A packed save encodes small plain chunks and shards itself, as values of its rank's
    database: the same values as tensorstore writes, key for key."""
    import tensorstore as ts
    import torch.distributed.checkpoint as dcp

    from zdcp.planner import ZarrSavePlanner

    state = {"small": torch.arange(10.0), "shard": torch.randn(300, 300), "big": torch.randn(1100, 1024)}
    for direct in (True, False):
        writer = zdcp.ZarrWriter(tmp_path / str(direct), layout="packed", direct_writes=direct)
        dcp.save(state, storage_writer=writer, planner=ZarrSavePlanner(), no_dist=True)
    values = {}
    for direct in (True, False):
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path / str(direct)}/"}).result()
        values[direct] = {key: kv[key] for key in kv.list().result()}
    assert values[True] == values[False] and b"shard/c.0.0" in values[True]
    for name, tensor in zdcp.open(tmp_path / "True").to_state_dict().items():
        assert_bitwise_equal(tensor, state[name])


def test_packed_value_extents_are_where_the_values_are(tmp_path):
    """The B-tree walk that finds a packed database's values in its data files, over a
    database of several levels (small nodes), agrees with OCDBT's own reads."""
    import tensorstore as ts

    from zdcp.storage.packed import value_extents

    spec = {"driver": "ocdbt", "base": f"file://{tmp_path}/", "config": {"max_decoded_node_bytes": 1000}}
    kv = ts.KvStore.open(spec).result()
    values = {f"a/{i:04d}/c.0": bytes([i % 256]) * (200 + i) for i in range(300)}
    for key, value in values.items():
        kv[key] = value
    height = ts.ocdbt.dump(kv.base).result()["versions"][-1]["root_height"]
    assert height >= 1, "the test needs interior nodes"
    found = value_extents(layout_named("packed").hierarchy(Location(tmp_path)), f"{tmp_path}/")
    assert sorted(found) == sorted(values)
    for key, (path, offset, length) in found.items():
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(length) == values[key], key


def test_packed_loads_read_plain_chunks_straight_into_the_destination(tmp_path, monkeypatch):
    """A local packed checkpoint's plain chunks are read from its data files like files-layout
    chunks (small ones, kept inside the B-tree, through tensorstore); the same values."""
    calls = []
    real_read = zdcp.storage.localfiles.RowSlabs.read
    recording = lambda self, *a: calls.append(a[1]) or real_read(self, *a)  # noqa: E731
    monkeypatch.setattr(zdcp.storage.localfiles.RowSlabs, "read", recording)
    state = {"w": torch.randn(3000, 100), "small": torch.randn(7, 3)}  # 1.2 MB sharded; 84 B inline
    zdcp.save(state, tmp_path / "p", layout="packed")
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    zdcp.load(out, tmp_path / "p")
    assert calls == ["w"]
    for k in state:
        assert_bitwise_equal(out[k], state[k], k)


def test_a_large_packed_save_is_a_few_data_files_written_as_they_fill(tmp_path):
    """A rank's chunks go into about 16 data files of at least 8 MiB (one data file, written
    once the whole state was in it, made large saves 3x slower); a small state is one. Loads,
    straight from the data files, read every file's chunks back exactly."""
    from zdcp.storage.packed import MIN_DATA_FILE_BYTES, data_file_bytes

    assert data_file_bytes(1000) == MIN_DATA_FILE_BYTES and data_file_bytes(512 << 20) == 32 << 20
    large = {f"w{i}": torch.randn(1024, 1024) for i in range(40)}  # 160 MiB: 16 files of 10 MiB
    small = {f"s{i}": torch.randn(64) for i in range(50)}
    for name, state, files in (("large", large, range(12, 17)), ("small", small, [1])):
        zdcp.save(state, tmp_path / name, layout="packed")
        # A file is written once it holds at least its size: a chunk more, at most.
        assert len(list((tmp_path / name / "d").iterdir())) in files, name
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        zdcp.load(out, tmp_path / name)
        for k in state:
            assert_bitwise_equal(out[k], state[k], k)
    objects = [p for p in (tmp_path / "small").rglob("*") if p.is_file()]
    assert len(objects) <= 4, objects


def test_a_packed_save_holds_at_most_its_window_and_a_bounded_amount_of_copies(tmp_path, monkeypatch):
    """A write into a database's transaction completes at once and holds its source until the
    commit: a save has the sink release what it holds (a version of the database no reader
    sees before the commit) every window's worth, and every HELD_COPIES_BYTES of encoded
    chunks, which are copies of the tensors."""
    import tensorstore as ts

    import zdcp.writer

    state = {f"w{i}": torch.randn(512, 512) for i in range(8)}  # 1 MiB each: encoded sharded chunks
    state |= {f"s{i}": torch.randn(256) for i in range(20)}  # 1 KiB each: encoded plain chunks

    def versions(window, copies):
        monkeypatch.setattr(zdcp.writer, "HELD_COPIES_BYTES", copies)
        path = tmp_path / f"{window}-{copies}"
        torch.distributed.checkpoint.save(state, storage_writer=zdcp.ZarrWriter(path, max_inflight_bytes=window))
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        zdcp.load(out, path)
        for k in state:
            assert_bitwise_equal(out[k], state[k], k)
        assert zdcp.verify(path).ok
        base = ts.KvStore.open({"driver": "file", "path": f"{path}/"}).result()
        return len(ts.ocdbt.dump(base).result()["versions"])

    assert versions(None, 64 << 20) == 1, "nothing to release: one commit"
    assert versions(3 << 20, 64 << 20) == 3  # 8 MiB: released at 3 and 6 MiB, then the commit
    assert versions(None, 3 << 20) == 3  # the same, counted as copies
    # Through arrays (no encoded chunks), only the window counts.
    monkeypatch.setattr(zdcp.writer, "HELD_COPIES_BYTES", 1 << 20)
    path = tmp_path / "arrays"
    torch.distributed.checkpoint.save(state, storage_writer=zdcp.ZarrWriter(path, direct_writes=False))
    base = ts.KvStore.open({"driver": "file", "path": f"{path}/"}).result()
    assert len(ts.ocdbt.dump(base).result()["versions"]) == 1
