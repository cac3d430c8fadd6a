"""A zdcp checkpoint is a plain Zarr v3 hierarchy: zarr-python and tensorstore open it with no
training code, bf16/fp8 included, and read slices (the files layout's directory directly; the
packed layout's through zdcp.zarr_store, or tensorstore's ocdbt driver)."""

import json

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr
from conftest import assert_bitwise_equal, read_root

import zdcp
from zdcp.format.dtypes import EXTENSION_DTYPES, tensor_to_numpy


@pytest.mark.parametrize("d", EXTENSION_DTYPES, ids=lambda d: d.zarr)
def test_bf16_and_fp8_read_and_write_through_zarr_python(ckpt, d):
    t = (torch.randn(6, 4) * 3).to(d.torch)
    zdcp.save({"m": {"t": t}}, ckpt, layout="files")  # a plain directory zarr-python opens
    array = zarr.open_group(ckpt, mode="r")["m/t"]
    assert array.dtype == d.numpy and array.metadata.data_type.to_json(zarr_format=3) == d.zarr
    assert np.array_equal(array[1:4].view(np.uint8), tensor_to_numpy(t[1:4]).view(np.uint8))

    # zarr-python writes the type too, and tensorstore reads what it wrote
    other = zarr.create_array(ckpt.parent / "by_zarr", shape=(6, 4), chunks=(3, 4), dtype=d.numpy)
    other[:] = tensor_to_numpy(t)
    back = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(ckpt.parent / "by_zarr")}}).result()
    assert np.array_equal(back.read().result().view(np.uint8), tensor_to_numpy(t).view(np.uint8))


def test_tensorstore_opens_an_array_and_reads_a_slice(ckpt):
    t = torch.arange(200, dtype=torch.float32).reshape(20, 10)
    zdcp.save({"layer": {"weight": t}}, ckpt, layout="files")  # each array a plain directory
    array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(ckpt / "layer/weight")}}).result()
    assert array.shape == (20, 10) and array.dtype == ts.float32
    assert np.array_equal(array[5:8, 2:4].read().result(), t[5:8, 2:4].numpy())


def test_zarr_python_sees_groups_values_and_chunks(ckpt):
    sd = {"model": {"w": torch.randn(9, 2).bfloat16()}, "optim": {"param_groups": [{"lr": 0.5, "betas": (0.9, 0.95)}]},
          "step": 12}
    zdcp.save(sd, ckpt, layout="files")  # a plain directory zarr-python opens
    root = zarr.open_group(ckpt, mode="r")
    assert set(root.group_keys()) == {"model", "optim"}
    assert root.attrs["step"] == 12
    assert root["optim"].attrs["param_groups"] == [{"lr": 0.5, "betas": [0.9, 0.95]}]
    # without consolidated metadata too: every group has its own zarr.json
    plain = zarr.open_group(ckpt, mode="r", use_consolidated=False)
    w = plain["model/w"]
    assert w.chunks == (9, 2)
    out = torch.from_numpy(w[:].view(np.int16)).view(torch.bfloat16)
    assert_bitwise_equal(out, sd["model"]["w"])


def test_root_document_records_what_load_needs(ckpt, layout):
    zdcp.save({"w": torch.ones(2, dtype=torch.float16)}, ckpt, layout=layout)
    root = read_root(ckpt)
    info = root["attributes"]["zdcp"]
    assert info["format"] == "zdcp" and info["format_version"] == 3
    assert info["world_size"] == 1 and info["torch_version"] == torch.__version__
    assert root["consolidated_metadata"]["metadata"]["w"]["attributes"]["zdcp"]["dtype"] == "float16"
    assert "pickle" not in json.dumps(root)


def test_data_types_are_declared_as_zarr_entry_points():
    from importlib.metadata import entry_points

    declared = {ep.name: ep.load() for ep in entry_points(group="zarr.data_type") if ep.value.startswith("zdcp.")}
    assert set(declared) == {d.zarr for d in EXTENSION_DTYPES}
    assert all(cls._zarr_v3_name == name for name, cls in declared.items())


def test_large_shards_have_checksummed_inner_chunks(ckpt):
    t = torch.randn(1024, 1024).bfloat16()  # 2 MiB in one chunk: 32-row (64 KiB) inner chunks
    zdcp.save({"w": t}, ckpt, layout="files")  # its shard a file to list and damage
    doc = json.loads((ckpt / "w/zarr.json").read_text())
    (sharding,) = doc["codecs"]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [32, 1024]
    assert {"name": "crc32c"} in sharding["configuration"]["codecs"]
    assert {"name": "crc32c"} in sharding["configuration"]["index_codecs"]
    assert sorted(p.name for p in (ckpt / "w").iterdir()) == ["c.0.0", "zarr.json"]  # still one object per shard

    z = zarr.open_group(ckpt, mode="r")["w"]
    assert z.shards == (1024, 1024) and z.chunks == (32, 1024)
    assert np.array_equal(z[100:300].view(np.int16), t[100:300].view(torch.int16).numpy())
    out = {"w": torch.zeros_like(t)}
    zdcp.load(out, ckpt)
    assert_bitwise_equal(out["w"], t)
    assert_bitwise_equal(zdcp.open(ckpt)["w"][500:520, 7], t[500:520, 7])

    # a flipped byte inside one inner chunk: reads that touch it fail, others still work
    shard = ckpt / "w/c.0.0"
    data = bytearray(shard.read_bytes())
    # the index at the end: (offset, nbytes) per inner chunk as little-endian u64, then crc32c
    index = np.frombuffer(bytes(data[-(32 * 16 + 4) : -4]), dtype="<u8").reshape(32, 2)
    assert (index[:, 1] == 32 * 1024 * 2 + 4).all()  # each inner chunk: data + its checksum
    data[int(index[12, 0]) + 10] ^= 0x01  # inside inner chunk 12 (rows 384-415)
    shard.write_bytes(bytes(data))
    view = zdcp.open(ckpt)["w"]
    assert_bitwise_equal(view[0:384], t[0:384])
    with pytest.raises(zdcp.CorruptCheckpointError, match="'w'"):
        view[400:410]
    assert not zdcp.verify(ckpt).ok


def test_zarr_python_reads_either_layout_through_zdcp_zarr_store(ckpt, layout):
    """zarr-python cannot read OCDBT; zdcp.zarr_store serves both layouts' keys (listing,
    partial reads of sharded chunks, consolidated metadata or not)."""
    big = torch.randn(600, 300)  # 720 KB: inner chunks, read partially
    sd = {"model": {"w": big, "b": torch.randn(5).bfloat16()}, "step": 3, "cfg": {"lr": 0.1}}
    zdcp.save(sd, ckpt, layout=layout)
    store = zdcp.zarr_store(ckpt)
    for consolidated in (True, False):
        root = zarr.open_group(store, mode="r", use_consolidated=consolidated)
        assert sorted(root.group_keys()) == ["cfg", "model"] and root.attrs["step"] == 3
        assert np.array_equal(root["model/w"][100:103, 7:9], big[100:103, 7:9].numpy())
        assert root["model/b"][:].view(np.uint16).tolist() == sd["model"]["b"].view(torch.int16).numpy().view(
            np.uint16
        ).tolist()
        assert root["cfg"].attrs["lr"] == 0.1
    with pytest.raises((ValueError, NotImplementedError)):
        zarr.open_group(store, mode="a").create_group("new")
    if layout == "packed":
        packed = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{ckpt}/", "path": "model/w/"}}
        ).result()
        assert np.array_equal(packed[5:7].read().result(), big[5:7].numpy())


def test_plain_zarr_python_refuses_a_packed_checkpoint_naming_zdcp_zarr_store(ckpt):
    """A packed checkpoint's directory holds a guard zarr.json, not its root: zarr-python
    opening the directory fails with a message saying what to use instead, and neither
    creates an empty group there nor changes a byte; tensorstore finds no array at a node's
    path (never zeros)."""
    from zdcp.format.documents import GUARD_FIELD

    sd = {"model": {"w": torch.arange(12.0).reshape(4, 3), "b": torch.randn(5).bfloat16()}, "step": 3}
    zdcp.save(sd, ckpt)  # the default layout: packed

    def contents():
        return {str(p.relative_to(ckpt)): p.read_bytes() if p.is_file() else None for p in sorted(ckpt.rglob("*"))}

    before = contents()
    # TypeError on zarr 3.1 (an unexpected field), MetadataValidationError (a ValueError) on 3.4
    for mode in ("r", "r+", "a"):
        with pytest.raises((TypeError, ValueError), match=r"zdcp\.zarr_store"):
            zarr.open_group(ckpt, mode=mode)
    with pytest.raises((TypeError, ValueError), match=r"zdcp\.zarr_store"):
        zarr.open(ckpt)
    with pytest.raises(FileExistsError):
        zarr.open_group(ckpt, mode="w-")
    with pytest.raises(ValueError):
        ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(ckpt / "model/w")}}).result()
    assert contents() == before

    guard = json.loads((ckpt / "zarr.json").read_text())
    assert guard[GUARD_FIELD]["must_understand"] is True
    out = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.bfloat16)}}
    zdcp.load(out, ckpt)
    assert_bitwise_equal(out["model"]["w"], sd["model"]["w"])
    assert_bitwise_equal(out["model"]["b"], sd["model"]["b"])
    assert zdcp.verify(ckpt).ok
    root = zarr.open_group(zdcp.zarr_store(ckpt), mode="r")
    assert root.attrs["step"] == 3
    assert np.array_equal(root["model/w"][:], sd["model"]["w"].numpy())
    assert_bitwise_equal(torch.from_numpy(root["model/b"][:].view(np.int16)).view(torch.bfloat16), sd["model"]["b"])

    # The guard is no commit record: damaged, it leaves the database's root readable.
    (ckpt / "zarr.json").write_text("{")
    out = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.bfloat16)}}
    zdcp.load(out, ckpt)
    assert_bitwise_equal(out["model"]["w"], sd["model"]["w"])
