"""Single-process save/load: every dtype, plain values, nesting, subset loads, the DCP plugin
path, and clear errors for each kind of bad input."""

import gc
import io
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import zarr
from conftest import assert_bitwise_equal, commit_record, flip_a_bit, read_root, write_root

import zdcp
from zdcp.collectives import Collectives
from zdcp.format.dtypes import _ALL as ALL_DTYPES
from zdcp.storage.contents import root_document
from zdcp.storage.layout import layout_named
from zdcp.storage.location import Location


def make_tensor(dtype, shape=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def zeros_like_tree(tree):
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: zeros_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [zeros_like_tree(v) for v in tree]
    return None


def _hierarchy(path):
    """The Zarr hierarchy of the local checkpoint at ``path``, in the layout it was found in."""
    return root_document(Location(path))[0]


def _delete_key(path, key):
    """Delete ``key`` (a chunk) from the hierarchy of the local checkpoint at ``path``."""
    hierarchy = _hierarchy(path)
    hierarchy.wait(hierarchy.kv.write(key, None))
    assert hierarchy.wait(hierarchy.kv.read(key)).state == "missing"


def _write_root_bytes(path, data):
    """Replace the root zarr.json of the checkpoint at ``path`` with ``data``, in either layout."""
    hierarchy = _hierarchy(path)
    hierarchy.wait(hierarchy.kv.write("zarr.json", data))


@pytest.mark.parametrize("d", ALL_DTYPES, ids=lambda d: d.zarr)
def test_every_dtype_round_trips_bitwise(ckpt, d, layout):
    t = make_tensor(d.torch)
    sd = {"t": t, "scalar": t[0, 0].clone(), "empty": t[:0], "view": t.t()}
    zdcp.save(sd, ckpt, layout=layout)
    out = zeros_like_tree(sd)
    zdcp.load(out, ckpt)
    for k in sd:
        assert_bitwise_equal(out[k], sd[k], k)


def test_nested_state_with_plain_values_keeps_types(ckpt, layout):
    sd = {
        "app": {
            "model": {"net1.weight": torch.randn(4, 4), "net1.bias": torch.randn(4)},
            "optim": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 4)}},
                "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "foreach": None, "params": [0]}],
            },
        },
        "step": 100,
        "loss": float("nan"),
        "note": "ok",
        "sampler": {"epoch": 2, "seen": [1, 2, 3], "rng": (1, "x", None)},
        "tensors_in_list": [torch.ones(2), {"inner": torch.zeros(3)}, 7],
        "nothing_yet": {},
    }
    zdcp.save(sd, ckpt, layout=layout)
    out = zeros_like_tree(sd)
    out["app"]["optim"]["state"] = {0: {"step": torch.zeros(()), "exp_avg": torch.zeros(4, 4)}}
    out["sampler"] = {"epoch": 0, "seen": None, "rng": None}
    out["nothing_yet"] = {}
    zdcp.load(out, ckpt)
    assert repr({k: v for k, v in out.items() if k not in ("app", "tensors_in_list")}) == repr(
        {k: v for k, v in sd.items() if k not in ("app", "tensors_in_list")}
    )
    assert out["app"]["optim"]["param_groups"] == sd["app"]["optim"]["param_groups"]
    assert isinstance(out["app"]["optim"]["param_groups"][0]["betas"], tuple)
    assert 0 in out["app"]["optim"]["state"]
    assert torch.equal(out["app"]["optim"]["state"][0]["exp_avg"], sd["app"]["optim"]["state"][0]["exp_avg"])
    assert torch.equal(out["tensors_in_list"][1]["inner"], sd["tensors_in_list"][1]["inner"])
    assert out["tensors_in_list"][2] == 7


def test_layout_on_disk_is_the_nested_state_dict(ckpt):
    sd = {
        "app": {
            "model": {"net1.weight": torch.randn(4, 4)},
            "optim": {"state": {"net1.weight": {"exp_avg": torch.randn(4, 4)}}},
        }
    }
    zdcp.save(sd, ckpt, layout="files")  # the files layout: every key a file at its path
    assert (ckpt / "app/model/net1.weight/zarr.json").is_file()
    assert (ckpt / "app/optim/state/net1.weight/exp_avg/zarr.json").is_file()
    for group in ["", "app", "app/model", "app/optim", "app/optim/state", "app/optim/state/net1.weight"]:
        assert json.loads((ckpt / group / "zarr.json").read_text())["node_type"] == "group"
    doc = json.loads((ckpt / "app/model/net1.weight/zarr.json").read_text())
    assert doc["attributes"]["zdcp"]["dtype"] == "float32"
    assert {"name": "crc32c"} in doc["codecs"]


def test_subset_load_and_missing_keys(ckpt, layout):
    zdcp.save({"a": torch.ones(3), "b": torch.zeros(2), "c": 5}, ckpt, layout=layout)
    out = {"a": torch.zeros(3)}
    zdcp.load(out, ckpt)
    assert torch.equal(out["a"], torch.ones(3))
    with pytest.raises(zdcp.MissingKeysError, match="'?model/missing'?") as e:
        zdcp.load({"a": torch.zeros(3), "model": {"missing": torch.zeros(1)}}, ckpt)
    assert isinstance(e.value, Exception)
    out = {"a": torch.zeros(3), "extra": torch.full((1,), 7.0)}
    zdcp.load(out, ckpt, allow_partial_load=True)
    assert torch.equal(out["extra"], torch.full((1,), 7.0))


def test_shape_and_dtype_mismatch_name_the_key(ckpt, layout):
    zdcp.save({"m": {"w": torch.arange(6.0).reshape(2, 3)}}, ckpt, layout=layout)
    with pytest.raises(zdcp.MismatchError, match=r"m/w.*\(2, 3\).*\(3, 2\)"):
        zdcp.load({"m": {"w": torch.zeros(3, 2)}}, ckpt)
    dest = torch.zeros(2, 3, dtype=torch.bfloat16)
    with pytest.raises(zdcp.MismatchError, match="m/w.*float32.*bfloat16"):
        zdcp.load({"m": {"w": dest}}, ckpt)
    assert not dest.any()  # nothing was written into the destination
    zdcp.load({"m": {"w": dest}}, ckpt, allow_cast=True)
    assert torch.equal(dest, torch.arange(6.0).reshape(2, 3).bfloat16())
    with pytest.raises(zdcp.MismatchError, match="m/w"):
        zdcp.load({"m": {"w": 3}}, ckpt)


def test_existing_missing_and_incomplete_checkpoints(ckpt, tmp_path, layout):
    with pytest.raises(zdcp.CheckpointNotFoundError, match=str(ckpt)):
        zdcp.load({"a": torch.zeros(1)}, ckpt)
    zdcp.save({"a": torch.ones(1), "old": torch.ones(4)}, ckpt, layout=layout)
    with pytest.raises(zdcp.CheckpointExistsError, match="overwrite=True"):
        zdcp.save({"a": torch.zeros(1)}, ckpt, layout=layout)
    zdcp.save({"a": torch.full((1,), 2.0)}, ckpt, overwrite=True, layout=layout)
    assert not (ckpt / "old").exists()  # the replaced checkpoint left nothing behind
    out = {"a": torch.zeros(1)}
    zdcp.load(out, ckpt)
    assert out["a"].item() == 2.0
    # a save that fails after it started writing (a tensor type zdcp cannot store) never
    # commits, leaves the checkpoint it was to replace as it was, and cleans up after itself
    bad = {"a": torch.ones(1), "q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}
    with pytest.raises(zdcp.UnsupportedValueError, match="'q'"):
        zdcp.save(bad, ckpt, overwrite=True, layout=layout)
    zdcp.load(out, ckpt)
    assert out["a"].item() == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(zdcp.UnsupportedValueError, match="'q'"):
        zdcp.save(bad, tmp_path / "new", layout=layout)
    with pytest.raises(zdcp.CheckpointNotFoundError):
        zdcp.load(out, tmp_path / "new")
    zdcp.save({"a": torch.full((1,), 3.0)}, ckpt, overwrite=True, layout=layout)
    zdcp.load(out, ckpt)
    assert out["a"].item() == 3.0 and not (ckpt / "__zdcp_saving__").exists()

    # zdcp never deletes what it did not write, overwrite or not: a damaged checkpoint (no
    # commit record, no save in progress) is refused, foreign files are kept (test_foreign.py)
    commit_record(ckpt).unlink()
    with pytest.raises(zdcp.CheckpointExistsError, match="holds no zdcp checkpoint"):
        zdcp.save({"a": torch.zeros(1)}, ckpt, overwrite=True, layout=layout)
    assert len(list(ckpt.rglob("*"))) > 1, "the damaged checkpoint is left as it was"
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "notes.txt").write_text("keep me")
    zdcp.save({"a": torch.zeros(1)}, foreign, overwrite=True, layout=layout)
    assert (foreign / "sub" / "notes.txt").read_text() == "keep me"


def test_unsupported_values_are_refused_before_writing(ckpt):
    with pytest.raises(zdcp.UnsupportedValueError, match="cfg/dtype"):
        zdcp.save({"w": torch.ones(2), "cfg": {"dtype": torch.float32}}, ckpt)
    assert not ckpt.exists() or not any(ckpt.iterdir())
    with pytest.raises(zdcp.UnsupportedValueError, match="quint8|qint8"):
        zdcp.save({"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}, ckpt)


def test_pickle_needs_opt_in_at_save_and_at_load(ckpt, layout):
    sd = {"w": torch.ones(2), "obj": {"dtype": torch.float32, "shape": torch.Size([2, 3])}}
    zdcp.save(sd, ckpt, allow_pickle=True, layout=layout)
    out = {"w": torch.zeros(2), "obj": {"dtype": None, "shape": None}}
    with pytest.raises(zdcp.UnsafeError, match="obj/dtype"):
        zdcp.load(out, ckpt)
    assert out["obj"]["dtype"] is None
    zdcp.load(out, ckpt, allow_pickle=True)
    assert out["obj"] == sd["obj"]


def test_newer_format_version_is_refused(ckpt, layout):
    zdcp.save({"a": torch.ones(1)}, ckpt, layout=layout)
    root = read_root(ckpt)
    root["attributes"]["zdcp"]["format_version"] = 99
    write_root(ckpt, root)
    with pytest.raises(zdcp.UnsupportedFormatError, match="99"):
        zdcp.load({"a": torch.zeros(1)}, ckpt)


def _as_older_format(ckpt, version):
    """Rewrite a checkpoint as format version 2 or 1 wrote it: node names never shortened (a
    long key's directory has its whole name) and the placement record under "layout"; in
    version 1 also chunk keys separated by "/" (``a/c/0/0``) instead of "." (``a/c.0.0``)."""
    root = json.loads((ckpt / "zarr.json").read_text())
    root["attributes"]["zdcp"]["format_version"] = version
    nodes = root["consolidated_metadata"]["metadata"]
    for node in [n for n in nodes if "%h" in n]:  # top-level only, in these tests
        whole = root["attributes"]["zdcp"]["long_names"].pop(node)
        (ckpt / node).rename(ckpt / whole)
        nodes[whole] = nodes.pop(node)
    root["attributes"]["zdcp"].pop("long_names", None)
    for node, doc in nodes.items():
        if doc["node_type"] != "array":
            continue
        doc["attributes"]["zdcp"]["layout"] = doc["attributes"]["zdcp"].pop("placement")
        if version == 1:
            doc["chunk_key_encoding"]["configuration"]["separator"] = "/"
            for chunk in (ckpt / node).glob("c.*"):
                moved = ckpt / node / "/".join(chunk.name.split("."))
                moved.parent.mkdir(parents=True, exist_ok=True)
                chunk.rename(moved)
        (ckpt / node / "zarr.json").write_text(json.dumps(doc))
    root["consolidated_metadata"]["metadata"] = dict(sorted(nodes.items()))
    (ckpt / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("direct_reads", [True, False])
def test_older_format_versions_still_load(ckpt, direct_reads, version):
    long = "long_" * 40  # 200 bytes: shortened since version 3, whole before
    state = {"w": torch.randn(300, 300), "b": torch.randn(7), long: torch.tensor(3.0), "cfg": {"lr": 0.1}}
    # versions 1 and 2 had no packed layout (docs/format.md): their checkpoints are in the files one
    zdcp.save(state, ckpt, layout="files")
    _as_older_format(ckpt, version)
    chunk = "w/c/0/0" if version == 1 else "w/c.0.0"
    assert (ckpt / chunk).is_file() and (ckpt / long).is_dir()
    assert (version == 1) == (not list(ckpt.glob("*/c.*")))
    out = {"w": torch.zeros(300, 300), "b": torch.zeros(7), long: torch.tensor(0.0), "cfg": {}}
    dcp.load(out, storage_reader=zdcp.ZarrReader(ckpt, direct_reads=direct_reads), no_dist=True)
    for key in ("w", "b", long):
        assert_bitwise_equal(out[key], state[key], key)
    assert_bitwise_equal(zdcp.open(ckpt)["w"][10:20, 5], state["w"][10:20, 5])
    assert zdcp.open(ckpt)["w"].placement == {"type": "Tensor"}
    report = zdcp.verify(ckpt)
    assert report.ok and report.chunks == 3, report
    (ckpt / chunk).unlink()
    assert not zdcp.verify(ckpt).ok


def test_corrupt_and_missing_chunks_fail_loudly(ckpt, layout):
    # "w": 4 KiB, stored out of the packed layout's B-tree, in a data file
    zdcp.save({"w": torch.arange(1024.0), "z": torch.zeros(4)}, ckpt, layout=layout)
    flip_a_bit(ckpt, "w/c.0", at=3)
    with pytest.raises(zdcp.CorruptCheckpointError, match="'w'"):
        zdcp.load({"w": torch.zeros(1024)}, ckpt)
    _delete_key(ckpt, "z/c.0")  # an all-zero chunk is written too, so its absence is damage
    with pytest.raises(zdcp.CorruptCheckpointError, match="'z'"):
        zdcp.load({"z": torch.ones(4)}, ckpt)


def test_errors_are_exceptions_under_one_base():
    for name in zdcp.__all__:
        obj = getattr(zdcp, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, zdcp.ZdcpError) and issubclass(obj, Exception), name


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_compression_round_trips_and_opens_in_zarr(ckpt, compression, layout):
    import zarr

    t = torch.randn(64, 8).bfloat16()
    zdcp.save({"t": t}, ckpt, compression=compression, layout=layout)
    out = {"t": torch.zeros_like(t)}
    zdcp.load(out, ckpt)
    assert_bitwise_equal(out["t"], t)
    z = zarr.open_group(zdcp.zarr_store(ckpt), mode="r")["t"]
    assert np.array_equal(z[:].view(np.int16), t.view(torch.int16).numpy())


def test_dcp_plugin_path_is_the_same_format(tmp_path, layout):
    sd = {"model": {"w": torch.randn(6, 2), "b": torch.randn(2).bfloat16()}, "step": 4,
          "optim": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    dcp.save(sd, storage_writer=zdcp.ZarrWriter(tmp_path / "via_dcp", layout=layout), no_dist=True)
    zdcp.save(sd, tmp_path / "via_zdcp", layout=layout)
    via_dcp, via_zdcp = _hierarchy(tmp_path / "via_dcp"), _hierarchy(tmp_path / "via_zdcp")
    assert via_dcp.layout.name == via_zdcp.layout.name == layout
    for node in ["model/w", "model/b"]:
        a = via_dcp.read_json(f"{node}/zarr.json")
        b = via_zdcp.read_json(f"{node}/zarr.json")
        assert a is not None and a == b
    for src in ["via_dcp", "via_zdcp"]:
        for loader in ["dcp", "zdcp"]:
            out = {"model": {"w": torch.zeros(6, 2), "b": torch.zeros(2).bfloat16()}, "step": 0,
                   "optim": {"param_groups": [{"lr": 0.0, "params": None}]}}
            if loader == "dcp":
                dcp.load(out, storage_reader=zdcp.ZarrReader(tmp_path / src), no_dist=True)
            else:
                zdcp.load(out, tmp_path / src)
            assert torch.equal(out["model"]["w"], sd["model"]["w"]), (src, loader)
            assert torch.equal(out["model"]["b"], sd["model"]["b"]), (src, loader)
            assert out["step"] == 4 and out["optim"] == sd["optim"], (src, loader)


def test_hostile_keys_stay_inside_the_checkpoint(tmp_path, layout):
    ckpt = tmp_path / "inner" / "ckpt"
    weird = ["..", "../escape", "/etc/passwd", ".", "", "__zarr", "zarr.json", "zdcp", "a/b", "%i1", "é"]
    sd = {k: {"t": torch.full((2,), float(i)), "v": i} for i, k in enumerate(weird)}
    sd["top"] = {k: i for i, k in enumerate(weird + [3])}
    zdcp.save(sd, ckpt, layout=layout)
    outside = [p for p in tmp_path.rglob("*") if ckpt not in p.parents and p != ckpt and p != ckpt.parent]
    assert outside == []
    out = {k: {"t": torch.zeros(2), "v": None} for k in weird}
    out["top"] = {k: None for k in weird + [3]}
    zdcp.load(out, ckpt)
    assert out["top"] == sd["top"]
    for i, k in enumerate(weird):
        assert out[k]["v"] == i and torch.equal(out[k]["t"], sd[k]["t"]), k
    import zarr

    assert zarr.open_group(zdcp.zarr_store(ckpt), mode="r")["..%2Fescape/t"].shape == (2,)
    with pytest.raises(zdcp.UnsupportedValueError, match="top-level.*3"):
        zdcp.save({3: torch.ones(1)}, tmp_path / "int_top", layout=layout)


def test_empty_state_dict(ckpt, layout):
    zdcp.save({}, ckpt, layout=layout)
    zdcp.load({}, ckpt)
    assert read_root(ckpt)["consolidated_metadata"]["metadata"] == {}


def test_damage_is_named_on_the_tensorstore_path_too(ckpt, layout):
    # direct_reads=False reads through tensorstore; the default reads this array directly (in
    # the packed layout from its data file: 4 KiB, stored out of the B-tree)
    zdcp.save({"w": torch.arange(1024.0).reshape(2, 512)}, ckpt, layout=layout)
    flip_a_bit(ckpt, "w/c.0.0", at=0)
    for reader in (zdcp.ZarrReader(ckpt, direct_reads=False), zdcp.ZarrReader(ckpt)):
        with pytest.raises(dcp.api.CheckpointException) as e:
            dcp.load({"w": torch.zeros(2, 512)}, storage_reader=reader, no_dist=True)
        (failure, _), = e.value.failures.values()
        assert isinstance(failure, zdcp.CorruptCheckpointError) and "'w'" in str(failure)


def test_a_reader_reused_for_another_checkpoint(tmp_path):
    zdcp.save({"w": torch.arange(6.0)}, tmp_path / "plain")
    zdcp.save({"w": torch.arange(6.0) * 2}, tmp_path / "zstd", compression="zstd")
    reader = zdcp.ZarrReader()
    for path, factor in [("plain", 1), ("zstd", 2), ("plain", 1)]:
        out = {"w": torch.zeros(6)}
        dcp.load(out, checkpoint_id=tmp_path / path, storage_reader=reader, no_dist=True)
        assert torch.equal(out["w"], torch.arange(6.0) * factor), path


def test_malformed_metadata_is_corruption_not_a_crash(ckpt, layout):
    zdcp.save({"w": torch.ones(4)}, ckpt, layout=layout)
    root = read_root(ckpt)
    root["consolidated_metadata"]["metadata"]["w"]["chunk_grid"]["configuration"]["chunk_shape"] = [0]
    write_root(ckpt, root)
    with pytest.raises(zdcp.CorruptCheckpointError, match="chunk shape"):
        zdcp.load({"w": torch.zeros(4)}, ckpt)
    _write_root_bytes(ckpt, b"{not json")
    with pytest.raises(zdcp.CorruptCheckpointError, match="not valid JSON"):
        zdcp.load({"w": torch.zeros(4)}, ckpt)
    assert "not valid JSON" in str(zdcp.verify(ckpt).faults[0])


def test_keys_that_are_not_text_are_refused(ckpt):
    with pytest.raises(zdcp.UnsupportedValueError, match="not valid Unicode"):
        zdcp.save({"m": {"\ud800": torch.ones(1)}}, ckpt)


def test_each_save_step_is_made_durable_before_the_next(ckpt, monkeypatch, layout):
    """sync_files: the chunks and the staged documents reach the disk (one sync of the staging
    directory's filesystem, through a handle opened before any write) before the commit
    renames the staging directory into place, and the rename is synced too. (Other ranks sync
    their own chunks: tests/test_reliability.py.)"""
    from zdcp.storage.oscalls import FilesystemSync

    committed = ckpt / layout_named(layout).commit_record

    seen = []
    real_init = FilesystemSync.__init__

    def opened(self, path):
        real_init(self, path)
        self.files_at_open = _files(path)

    def record(self):
        assert pathlib.Path(self.path).name.startswith(".ckpt.zdcp-")
        seen.append((self.files_at_open, _files(self.path), committed.exists()))

    monkeypatch.setattr(FilesystemSync, "__init__", opened)
    monkeypatch.setattr(FilesystemSync, "sync", record)
    zdcp.save({"w": torch.ones(3), "cfg": {"lr": 0.1}, "b": torch.zeros(2, 2)}, ckpt, layout=layout)
    (opened_before_writes, staged, before_move), (_, _, after_move) = seen
    assert opened_before_writes == set()
    if layout == "files":
        assert staged == {"w/c.0", "b/c.0.0", "w/zarr.json", "b/zarr.json", "cfg/zarr.json", "zarr.json"}
    else:  # the database (its manifest and data files) and the guard zarr.json
        data_files = staged - {"manifest.ocdbt", "zarr.json"}
        assert {"manifest.ocdbt", "zarr.json"} <= staged and data_files
        assert all(name.startswith("d/") for name in data_files), staged
    assert staged == _files(ckpt), "everything the checkpoint holds was synced before the move"
    assert not before_move and after_move
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]

    seen.clear()
    zdcp.save({"w": torch.ones(3)}, ckpt, overwrite=True, sync_files=False, layout=layout)
    assert seen == []
    assert_bitwise_equal(zdcp.open(ckpt)["w"][:], torch.ones(3))


def _files(root):
    root = pathlib.Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


class _RecordsCollector:
    """A Stateful that records whether Python's garbage collector runs during save and load."""

    def __init__(self):
        self.seen: list[bool] = []

    def state_dict(self):
        self.seen.append(gc.isenabled())
        return {"x": torch.ones(3)}

    def load_state_dict(self, state):
        self.seen.append(gc.isenabled())


def test_save_and_load_pause_the_garbage_collector_and_restore_it(ckpt):
    stateful = _RecordsCollector()
    assert gc.isenabled()
    zdcp.save({"s": stateful}, ckpt)
    zdcp.load({"s": stateful}, ckpt)
    assert stateful.seen == [False, False, False] and gc.isenabled()
    with pytest.raises(zdcp.CheckpointExistsError):
        zdcp.save({"s": stateful}, ckpt)
    assert gc.isenabled(), "re-enabled after a failed save"
    gc.disable()
    try:
        zdcp.save({"s": stateful}, ckpt, overwrite=True)
        assert not gc.isenabled(), "a collector the caller turned off stays off"
    finally:
        gc.enable()


@pytest.mark.parametrize("key", ["k" * 300, "é" * 100], ids=["300 ascii", "100 non-ascii"])
def test_keys_longer_than_a_file_name_save_and_load(tmp_path, key, layout):
    """DCP saves such keys; so does zdcp, with the node's name shortened and the whole key kept
    by its parent, through every way in and out."""
    state = {key: torch.randn(3), "model": {key: {"w": torch.arange(4)}, "cfg": {key: 1.5}}}
    zdcp.save(state, tmp_path / "zdcp", layout=layout)
    dcp.save(state, storage_writer=zdcp.ZarrWriter(tmp_path / "dcp"), no_dist=True)
    for path in (tmp_path / "zdcp", tmp_path / "dcp"):
        assert all(len(p.name.encode()) <= 128 for p in path.rglob("*")), path
        out = {key: torch.zeros(3), "model": {key: {"w": torch.zeros(4, dtype=torch.int64)}, "cfg": {key: 0.0}}}
        zdcp.load(out, path)
        assert torch.equal(out[key], state[key]) and torch.equal(out["model"][key]["w"], state["model"][key]["w"])
        assert out["model"]["cfg"] == {key: 1.5}
        assert torch.equal(zdcp.open(path)["model"][key]["w"][1:3], torch.tensor([1, 2]))
        assert zdcp.verify(path).ok
        root = zarr.open_group(zdcp.zarr_store(path), mode="r")
        (short,) = set(root["model"].group_keys()) - {"cfg"}
        assert len(short) <= 128 and "%h" in short
    out = {key: torch.zeros(3), "model": {key: {"w": torch.zeros(4, dtype=torch.int64)}, "cfg": {key: 0.0}}}
    dcp.load(out, storage_reader=zdcp.ZarrReader(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(out[key], state[key])


def test_nesting_deeper_than_a_path_holds_is_refused_before_writing(tmp_path):
    state = level = {}
    for i in range(40):  # 40 names of 106 bytes: over 4 KiB of path
        level[f"level{i}" + "x" * 100] = level = {}
    level["w"] = torch.ones(2)
    with pytest.raises(zdcp.UnsupportedValueError, match=r"'level0x+/.*/w' is nested too deep for .*ckpt"):
        # the files layout: one file per key, each key a path that the filesystem must hold
        zdcp.save(state | {"ok": torch.ones(1)}, tmp_path / "ckpt", layout="files")
    assert not any(tmp_path.iterdir()), "refused before anything was written"


def test_a_single_process_failure_is_reported_as_what_it_is(ckpt, monkeypatch):
    """Without a process group there are no ranks to name: a failed write is a StorageError
    naming the file, another error a plain ZdcpError naming it, never a DistributedError."""
    import zdcp.storage.localfiles

    def disk_full(self, key, *parts):
        raise OSError(28, "No space left on device", key)

    monkeypatch.setattr(zdcp.storage.localfiles.LocalFiles, "write", disk_full)
    with pytest.raises(zdcp.StorageError, match=r"w/c\.0: No space left on device") as raised:
        zdcp.save({"w": torch.ones(3)}, ckpt, layout="files")  # LocalFiles: the files layout's local writes
    assert not isinstance(raised.value, zdcp.DistributedError) and "rank" not in str(raised.value)
    monkeypatch.undo()

    class Broken(torch.distributed.checkpoint.DefaultSavePlanner):
        def resolve_data(self, item):
            raise RuntimeError("device lost")

    with pytest.raises(zdcp.ZdcpError, match="RuntimeError: device lost") as raised:
        zdcp.api.run_save(
            {"w": torch.ones(3)}, zdcp.ZarrWriter(ckpt), planner=Broken(), collectives=Collectives(no_dist=True)
        )
    assert not isinstance(raised.value, zdcp.DistributedError) and "rank" not in str(raised.value)
    assert not ckpt.exists() and not list(ckpt.parent.iterdir())


def test_bytes_values_round_trip_without_pickle(ckpt, layout):
    """DCP stores bytes and io.BytesIO natively (dataloader states, losses in a BytesIO); zdcp
    stores them without pickle, small ones inline as base64, large leaves as uint8 arrays, and
    gives back the same types, from load and from open."""
    big = bytes(range(256)) * 200  # 50 KiB: an array of its own
    state = {
        "blob": b"\x00\x01 dataloader state",
        "losses": io.BytesIO(b"loss history"),
        "big": big,
        "big_io": io.BytesIO(big[::-1]),
        "nested": {"rng": [b"a", (b"", io.BytesIO(b"c"))]},
        "w": torch.ones(2),
    }
    zdcp.save(state, ckpt, layout=layout)
    assert "pickle" not in json.dumps(read_root(ckpt))
    root = read_root(ckpt)["consolidated_metadata"]["metadata"]
    assert root["big"]["attributes"]["zdcp"] == {"kind": "bytes", "type": "bytes"}
    assert root["big_io"]["attributes"]["zdcp"] == {"kind": "bytes", "type": "BytesIO"}
    out = {"blob": None, "losses": None, "big": None, "big_io": None, "nested": {"rng": None}, "w": torch.zeros(2)}
    zdcp.load(out, ckpt)  # no allow_pickle needed
    for view in (out, zdcp.open(ckpt).to_state_dict()):
        assert view["blob"] == state["blob"] and type(view["blob"]) is bytes
        assert type(view["losses"]) is io.BytesIO and view["losses"].getvalue() == b"loss history"
        assert view["big"] == big and view["big_io"].getvalue() == big[::-1] and view["big_io"].tell() == 0
        rng = view["nested"]["rng"]
        assert rng[0] == b"a" and rng[1][0] == b"" and rng[1][1].getvalue() == b"c"
    dcp_out = {"blob": None, "losses": None, "big": None, "big_io": None, "w": torch.zeros(2)}
    dcp.load(dcp_out, storage_reader=zdcp.ZarrReader(ckpt), no_dist=True)  # DCP's own planner
    assert dcp_out["big"] == big and dcp_out["losses"].getvalue() == b"loss history"
    assert zarr.open_group(zdcp.zarr_store(ckpt), mode="r")["big"][:].tobytes() == big
    report = zdcp.verify(ckpt)
    assert report.ok and report.arrays == 3, report


def test_refusing_to_replace_says_what_dcp_says(ckpt, layout):
    """DCP's FileSystemWriter says "Checkpoint already exists"; users and DCP's tests grep for it."""
    zdcp.save({"w": torch.ones(1)}, ckpt, layout=layout)
    with pytest.raises(zdcp.CheckpointExistsError, match="Checkpoint already exists"):
        zdcp.save({"w": torch.ones(1)}, ckpt, layout=layout)
    with pytest.raises(dcp.api.CheckpointException, match="Checkpoint already exists"):
        dcp.save({"w": torch.ones(1)}, storage_writer=zdcp.ZarrWriter(ckpt), no_dist=True)
