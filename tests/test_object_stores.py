"""Checkpoints on object stores, against a real S3-compatible server (moto's server mode on
loopback, started here): save, load with resharding across gloo ranks, open, verify, the CLI,
zarr-python reading the same objects, and the failures (missing bucket, bad credentials, an
interrupted save, concurrent saves). Plus ``memory://`` and the parsing of every location form."""

import json
import os
import signal
import uuid

import pytest
import torch
import torch.multiprocessing as mp
import zarr
from conftest import (
    assert_bitwise_equal,
    assert_one_of_two_racing_saves_commits,
    new_bucket,
    objects,
    owners_maybe_running,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import zdcp
from zdcp.cli import main as cli
from zdcp.storage.location import kvstore_spec, url_of
from zdcp.testing import environment, moto_server, run_ranks

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server; the AWS environment variables point at it (ranks inherit them)."""
    with moto_server() as endpoint, environment(**_aws(endpoint)):
        yield boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _aws(endpoint):
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }


@pytest.fixture
def bucket(s3):
    return new_bucket(s3, "ckpt")


# -- locations ------------------------------------------------------------------------------------


def test_every_location_form_becomes_a_kvstore_spec(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    assert kvstore_spec("ck") == {"driver": "file", "path": f"{tmp_path}/ck/"}
    assert kvstore_spec(f"file://{tmp_path}/ck/") == {"driver": "file", "path": f"{tmp_path}/ck/"}
    assert kvstore_spec("s3://bkt/run/step_1") == {"driver": "s3", "bucket": "bkt", "path": "run/step_1/"}
    assert kvstore_spec("s3://bkt/my%20run/") == {"driver": "s3", "bucket": "bkt", "path": "my run/"}
    assert kvstore_spec("file://localhost/tmp/x")["path"] == "/tmp/x/"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert kvstore_spec("s3://bkt/x") == {
        "driver": "s3", "bucket": "bkt", "path": "x/", "endpoint": "http://minio:9000", "aws_region": "eu-west-1",
    }  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert kvstore_spec("s3://bkt")["endpoint"] == "http://s3only:9000" and kvstore_spec("s3://bkt")["path"] == ""
    assert kvstore_spec("s3://bkt")["aws_region"] == "us-west-2"
    assert kvstore_spec("gs://gbkt/a/b/") == {"driver": "gcs", "bucket": "gbkt", "path": "a/b/"}
    assert kvstore_spec("memory://tests/x") == {"driver": "memory", "path": "tests/x/"}
    spec = {"driver": "s3", "bucket": "bkt", "path": "/p", "aws_credentials": {"type": "anonymous"}}
    assert kvstore_spec(spec) == {**spec, "path": "p/"}
    for url in ("s3://bkt/run/step_1", "gs://gbkt/a", "memory://tests/x"):
        assert url_of(kvstore_spec(url)) == url
    bad_ones = ["ftp://host/x", "s3:///nobucket", "", {"bucket": "bkt"}, 3, "s3://bkt/run#3", "s3://bkt/x?v=2",
                "file://otherhost/x", {"driver": "nosuchdriver"}, {"driver": "s3", "path": "x"}, "s3://b/x"]
    for bad in bad_ones:
        with pytest.raises(zdcp.UsageError):
            kvstore_spec(bad)


def test_memory_checkpoints_round_trip_in_process(layout):
    url = f"memory://{uuid.uuid4().hex}/step_1"
    state = {"w": torch.randn(300, 300), "cfg": {"lr": 0.1}}
    zdcp.save(state, url, layout=layout)
    out = {"w": torch.zeros(300, 300), "cfg": {}}
    zdcp.load(out, url)
    assert_bitwise_equal(out["w"], state["w"]) and out["cfg"] == {"lr": 0.1}
    assert zdcp.verify(url).ok
    with pytest.raises(zdcp.CheckpointExistsError):
        zdcp.save(state, url, layout=layout)


# -- S3: one process ------------------------------------------------------------------------------


def test_save_load_open_verify_on_s3(s3, bucket):
    url = f"s3://{bucket}/run/step_1"
    g = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(512, 300, generator=g), "b": torch.randn(7, generator=g).bfloat16()},
             "step": 1}  # fmt: skip
    zdcp.save(state, url, layout="files")
    keys = objects(s3, bucket, "run/step_1/")
    assert "run/step_1/zarr.json" in keys and "run/step_1/model/w/c.0.0" in keys
    assert not any("__zdcp_saving__" in k for k in keys), "the marker goes once committed"
    out = {"model": {"w": torch.zeros(512, 300), "b": torch.zeros(7, dtype=torch.bfloat16)}, "step": 0}
    zdcp.load(out, url)
    assert_bitwise_equal(out["model"]["w"], state["model"]["w"])
    assert_bitwise_equal(out["model"]["b"], state["model"]["b"])
    assert out["step"] == 1
    ck = zdcp.open(url)
    assert_bitwise_equal(ck["model/w"][100:110, 5:9], state["model"]["w"][100:110, 5:9])
    assert zdcp.verify(url).ok
    with pytest.raises(zdcp.CheckpointExistsError, match="overwrite=True"):
        zdcp.save(state, url)
    state["step"] = 2
    zdcp.save(state, url, overwrite=True, layout="files")
    assert zdcp.open(url)["step"] == 2 and zdcp.verify(url).ok
    # damage is still damage on S3
    s3.put_object(Bucket=bucket, Key="run/step_1/model/b/c.0", Body=b"garbage")
    with pytest.raises(zdcp.CorruptCheckpointError, match="model/b"):
        zdcp.load(out, url)


def _stored_layout(where):
    """The layout the checkpoint at ``where`` was saved in, as readers find it."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    hierarchy, root = root_document(Location(where))
    assert root is not None, f"{where} holds no committed checkpoint"
    return hierarchy.layout.name


def test_saves_default_to_packed_everywhere_and_to_files_on_request(s3, bucket, tmp_path):
    """Packed by default on an object store and on a local path alike, and so does the manager;
    the files layout where a save or the manager asks for it."""
    from zdcp.format.documents import is_guard

    state = {"w": torch.ones(3)}
    remote, local = f"s3://{bucket}", tmp_path
    for root in (remote, local):
        zdcp.save(state, f"{root}/a")
        zdcp.save(state, f"{root}/b", layout="files")
        with zdcp.CheckpointManager(f"{root}/run") as manager:
            manager.save(1, state)
        with zdcp.CheckpointManager(f"{root}/run_files", layout="files") as manager:
            manager.save(1, state)
        for name, layout in [("a", "packed"), ("b", "files"), ("run/step_1", "packed"), ("run_files/step_1", "files")]:
            assert _stored_layout(f"{root}/{name}") == layout, (root, name)
            assert torch.equal(zdcp.open(f"{root}/{name}")["w"][:], torch.ones(3)), (root, name)
    # packed: a database (its manifest, one data file) and the guard zarr.json, no key at its path
    for name in ("a", "run/step_1"):
        listed = objects(s3, bucket, f"{name}/")
        assert len(listed) == 3 and listed[0].startswith(f"{name}/d/"), listed
        assert listed[1:] == [f"{name}/manifest.ocdbt", f"{name}/zarr.json"], listed
        stored = sorted(str(p.relative_to(local / name)) for p in (local / name).rglob("*") if p.is_file())
        assert len(stored) == 3 and stored[0].startswith("d/") and stored[1:] == ["manifest.ocdbt", "zarr.json"]
        assert is_guard(json.loads((local / name / "zarr.json").read_text()))
    # files: every key a file (an object) at its path, the root zarr.json the hierarchy's own
    for name in ("b", "run_files/step_1"):
        assert objects(s3, bucket, f"{name}/") == [f"{name}/w/c.0", f"{name}/w/zarr.json", f"{name}/zarr.json"]
        stored = sorted(str(p.relative_to(local / name)) for p in (local / name).rglob("*") if p.is_file())
        assert stored == ["w/c.0", "w/zarr.json", "zarr.json"], stored
        assert not is_guard(json.loads((local / name / "zarr.json").read_text()))


def test_zarr_python_reads_the_checkpoint_from_the_bucket(s3, bucket):
    """The README's snippet: zarr-python over fsspec (s3fs), no zdcp code on the read side
    except the import that registers bfloat16."""
    from zarr.storage import FsspecStore

    w = torch.randn(64, 32)
    zdcp.save({"model": {"w": w, "h": torch.ones(4).bfloat16()}}, f"s3://{bucket}/step_100", layout="files")
    store = FsspecStore.from_url(
        f"s3://{bucket}/step_100",
        read_only=True,
        storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"},
    )
    root = zarr.open_group(store, mode="r")
    assert (root["model/w"][:] == w.numpy()).all()
    assert root["model/h"][:].tolist() == [1.0] * 4
    # ... and through zdcp.zarr_store, which needs no s3fs
    root = zarr.open_group(zdcp.zarr_store(f"s3://{bucket}/step_100"), mode="r")
    assert (root["model/w"][2:5] == w[2:5].numpy()).all()


def test_cli_on_an_s3_path(s3, bucket, capsys, tmp_path):
    url = f"s3://{bucket}/c"
    zdcp.save({"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 3}, url)
    assert cli(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{url}: zdcp format 3, committed") and "w  float32 3x4" in out
    assert cli(["verify", url]) == 0
    assert capsys.readouterr().out.startswith("OK: 1 arrays")
    assert cli(["convert", url, str(tmp_path / "c.pt"), "-q"]) == 0
    assert torch.equal(torch.load(tmp_path / "c.pt")["model"]["w"], torch.arange(12.0).reshape(3, 4))
    assert cli(["convert", str(tmp_path / "c.pt"), f"s3://{bucket}/d", "-q"]) == 0
    assert zdcp.open(f"s3://{bucket}/d")["step"] == 3
    capsys.readouterr()
    assert cli(["inspect", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == url
    # DCP, torch.save and safetensors files are local: no URL on that side
    assert cli(["convert", url, f"s3://{bucket}/as_dcp", "--to", "dcp"]) == 1
    assert "local files only" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:")
    zdcp.save({"w": torch.ones(2)}, tmp_path / "local")
    assert cli(["inspect", f"file://{tmp_path}/local"]) == 0


# -- S3: failures ---------------------------------------------------------------------------------


def test_a_missing_bucket_is_a_storage_error_naming_it(s3):
    for call in (lambda u: zdcp.save({"w": torch.ones(2)}, u), lambda u: zdcp.load({"w": torch.ones(2)}, u),
                 zdcp.open, zdcp.verify):  # fmt: skip
        with pytest.raises(zdcp.StorageError, match="s3://no-such-bucket-here/x.*NoSuchBucket"):
            call("s3://no-such-bucket-here/x")


def test_bad_credentials_are_a_storage_error(monkeypatch, tmp_path):
    # a server that checks credentials once its first request (creating the bucket) is done
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "1"}) as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="locked")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        with pytest.raises(zdcp.StorageError, match="s3://locked/x"):
            zdcp.save({"w": torch.ones(2)}, "s3://locked/x")
        with pytest.raises(zdcp.StorageError, match="s3://locked/x"):
            zdcp.load({"w": torch.ones(2)}, "s3://locked/x")


def _save_then_die(url, started):
    import zdcp.writer

    real = zdcp.writer.ZarrWriter.finish

    def die_in_finish(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
        real(self, *args, **kwargs)

    zdcp.writer.ZarrWriter.finish = die_in_finish
    started.set()
    zdcp.save({"w": torch.randn(256, 256), "b": torch.ones(3)}, url, overwrite=True, layout="files")


def test_an_interrupted_save_on_s3_is_never_loadable(s3, bucket):
    url = f"s3://{bucket}/step_1"
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    saver = ctx.Process(target=_save_then_die, args=(url, started))
    saver.start()
    saver.join(120)
    assert saver.exitcode == -signal.SIGKILL
    assert any(k.endswith("/w/c.0.0") for k in objects(s3, bucket)), "the chunks were written"
    with pytest.raises(zdcp.IncompleteCheckpointError, match="never committed"):
        zdcp.load({"w": torch.zeros(256, 256), "b": torch.zeros(3)}, url)
    assert not zdcp.verify(url).ok
    # Its marker names a process of this host that is gone: the next save removes the leftovers.
    zdcp.save({"w": torch.ones(2)}, url, layout="files")
    assert objects(s3, bucket) == [f"step_1/{k}" for k in ("w/c.0", "w/zarr.json", "zarr.json")]


def test_a_save_in_flight_elsewhere_on_s3_is_left_alone(s3, bucket):
    """A marker whose save may still run (a live process here, or one on another host, which
    zdcp cannot tell from a dead one) makes a save refuse, unless ``overwrite``."""
    with owners_maybe_running() as owners:
        for name, owner in owners.items():
            marker = {"owner": owner, "session": "0" * 32, "target": f"s3://{bucket}/{name}"}
            s3.put_object(Bucket=bucket, Key=f"{name}/__zdcp_saving__", Body=json.dumps(marker).encode())
            s3.put_object(Bucket=bucket, Key=f"{name}/w/c.0", Body=b"a chunk being written")
            with pytest.raises(zdcp.CheckpointExistsError, match="interrupted zdcp save, or one still running"):
                zdcp.save({"w": torch.ones(2)}, f"s3://{bucket}/{name}")
            assert objects(s3, bucket, f"{name}/") == [f"{name}/__zdcp_saving__", f"{name}/w/c.0"]
    zdcp.save({"w": torch.ones(2)}, f"s3://{bucket}/elsewhere", overwrite=True, layout="files")
    assert objects(s3, bucket, "elsewhere/") == [f"elsewhere/{k}" for k in ("w/c.0", "w/zarr.json", "zarr.json")]


def test_latest_checkpoint_on_s3_skips_what_never_committed(s3, bucket, layout):
    run = f"s3://{bucket}/run"
    assert zdcp.latest_checkpoint(run) is None
    for step in (2, 10):
        zdcp.save({"w": torch.full((4,), float(step))}, f"{run}/step_{step}", layout=layout)
    s3.put_object(Bucket=bucket, Key="run/step_30/zarr.json", Body=b'{"zarr_format": 3, "node_type": "group"}')
    s3.put_object(Bucket=bucket, Key="run/step_40/w/c.0", Body=b"a chunk of a save that never committed")
    s3.put_object(Bucket=bucket, Key="run/step_50", Body=b"an object, not a checkpoint")
    assert zdcp.latest_checkpoint(run) == f"{run}/step_10"
    out = {"w": torch.zeros(4)}
    zdcp.load(out, zdcp.latest_checkpoint(run, verify=True))
    assert torch.equal(out["w"], torch.full((4,), 10.0))


def test_concurrent_saves_on_s3_one_fails_cleanly(s3, bucket, layout):
    assert_one_of_two_racing_saves_commits(f"s3://{bucket}/c", layout)


@pytest.mark.parametrize("overwrite", [False, True], ids=["refused", "overwrite"])
def test_a_save_committed_while_another_begins_is_neither_lost_nor_mixed(s3, bucket, layout, monkeypatch, overwrite):
    """Save B finds the prefix empty; save A then begins and commits whole before B creates its
    marker (A's marker is gone again by then, so B's creation succeeds). B must still see A's
    checkpoint: without overwrite it refuses and leaves A's whole; with it, it replaces A's
    whole, whatever A's layout."""
    import zdcp.storage.saving

    url, prefix = f"s3://{bucket}/race", "race/"
    real = zdcp.storage.saving.root_kind

    def a_commits_after_b_reads(location):
        found = real(location)
        monkeypatch.setattr(zdcp.storage.saving, "root_kind", real)  # A's reads, and B's next
        zdcp.save({"w": torch.full((64, 64), 1.0), "only_in_a": torch.ones(3)}, url, layout=layout)
        return found

    monkeypatch.setattr(zdcp.storage.saving, "root_kind", a_commits_after_b_reads)
    b_layout = "files" if layout == "packed" else "packed"
    b = {"w": torch.full((64, 64), 2.0)}
    if overwrite:
        zdcp.save(b, url, layout=b_layout, overwrite=True)
    else:
        with pytest.raises(zdcp.CheckpointExistsError, match="Checkpoint already exists"):
            zdcp.save(b, url, layout=b_layout)
    out = {"w": torch.zeros(64, 64)}
    zdcp.load(out, url)
    assert torch.all(out["w"] == (2.0 if overwrite else 1.0)) and zdcp.verify(url).ok
    assert ("only_in_a" in zdcp.open(url)) is not overwrite
    # Nothing of the other save is left: the same kinds of objects as a save alone writes.
    zdcp.save(b if overwrite else {"w": torch.full((64, 64), 1.0), "only_in_a": torch.ones(3)},
              f"s3://{bucket}/alone", layout=b_layout if overwrite else layout)  # fmt: skip

    def kinds(prefix):
        return {key[len(prefix) :].split("/")[0] for key in objects(s3, bucket, prefix)}

    assert kinds(prefix) == kinds("alone/")


# -- S3: several ranks ----------------------------------------------------------------------------


def _save_sharded(rank, world_size, url, layout="files"):
    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(1)
    full = {"rows": torch.randn(9, 40, generator=g), "cols": torch.randn(6, 50, generator=g)}
    state = {"rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
             "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]), "step": 5}  # fmt: skip
    zdcp.save(state, url, layout=layout)


def _load_resharded(rank, world_size, url):
    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(1)
    full = {"rows": torch.randn(9, 40, generator=g), "cols": torch.randn(6, 50, generator=g)}
    state = {"rows": distribute_tensor(torch.zeros(9, 40), mesh, [Shard(1)]),
             "cols": distribute_tensor(torch.zeros(6, 50), mesh, [Replicate()]), "step": 0}  # fmt: skip
    zdcp.load(state, url)
    for name in full:
        value = state[name]
        assert_bitwise_equal(value.full_tensor() if isinstance(value, DTensor) else value, full[name], name)
    assert state["step"] == 5


def test_ranks_write_their_own_chunks_to_s3_and_load_resharded(s3, bucket):
    url = f"s3://{bucket}/sharded"
    run_ranks(3, _save_sharded, url, timeout=180)
    keys = objects(s3, bucket, "sharded/rows/c.")
    assert keys == [f"sharded/rows/c.{i}.0" for i in range(3)], "one object per rank's shard"
    run_ranks(2, _load_resharded, url, timeout=180)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(9, 40, generator=g)
    out = {"rows": torch.zeros(9, 40)}
    zdcp.load(out, url, allow_partial_load=True)
    assert_bitwise_equal(out["rows"], rows)


def test_a_packed_checkpoint_on_s3_is_a_few_objects_per_rank(s3, bucket):
    """The packed layout on S3: each of 3 ranks writes one database (a manifest and a data
    object), the coordinator's root database refers to them; it loads resharded at 2 ranks,
    opens, verifies, replaces, reads in zarr-python through zdcp.zarr_store (no s3fs), and a
    damaged data object is found, never loaded."""
    url = f"s3://{bucket}/packed"
    run_ranks(3, _save_sharded, url, "packed", timeout=180)
    keys = objects(s3, bucket, "packed/")
    assert "packed/manifest.ocdbt" in keys and not any("__zdcp_saving__" in k for k in keys)
    assert len(keys) <= 4 * 3 + 16, keys
    assert {k.split("/")[1] for k in keys if "ocdbt.process_" in k} == {f"ocdbt.process_{r}" for r in range(3)}
    run_ranks(2, _load_resharded, url, timeout=180)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(9, 40, generator=g)
    assert_bitwise_equal(zdcp.open(url)["rows"][2:5], rows[2:5])
    assert zdcp.verify(url).ok
    root = zarr.open_group(zdcp.zarr_store(url), mode="r")
    assert (root["rows"][:] == rows.numpy()).all() and root.attrs["step"] == 5
    with pytest.raises(zdcp.CheckpointExistsError, match="Checkpoint already exists"):
        zdcp.save({"rows": torch.zeros(2)}, url, layout="packed")
    # Replaced by one process: its chunks go into the root database itself, no rank database.
    big = torch.randn(300, 1000, generator=g)  # above what the database keeps inline
    zdcp.save({"rows": big, "step": 6}, url, layout="packed", overwrite=True)
    assert zdcp.open(url)["step"] == 6 and zdcp.verify(url).ok
    keys = objects(s3, bucket, "packed/")
    assert not [k for k in keys if "ocdbt.process_" in k] and len(keys) <= 4 + 16, keys
    sizes = {k: s3.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in keys}
    data = max(sizes, key=sizes.get)
    body = bytearray(s3.get_object(Bucket=bucket, Key=data)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=data, Body=bytes(body))
    with pytest.raises(zdcp.CorruptCheckpointError, match="rows"):
        zdcp.load({"rows": torch.zeros(300, 1000)}, url, allow_partial_load=True)
    assert not zdcp.verify(url).ok


def test_a_kvstore_spec_gives_full_control(s3, bucket):
    """Explicit options instead of the environment: a tensorstore kvstore spec dict, here with
    the endpoint and credentials spelled out, works wherever a URL does (async_save too)."""
    spec = {
        "driver": "s3",
        "bucket": bucket,
        "path": "explicit/step_1",
        "endpoint": os.environ["AWS_ENDPOINT_URL"],
        "aws_region": "us-east-1",
    }
    state = {"w": torch.randn(40, 30), "step": 1}
    assert zdcp.async_save(state, spec).result(timeout=120) is None
    out = {"w": torch.zeros(40, 30), "step": 0}
    zdcp.load(out, f"s3://{bucket}/explicit/step_1")
    assert_bitwise_equal(out["w"], state["w"]) and out["step"] == 1
    assert zdcp.verify(spec).ok and zdcp.open(spec)["step"] == 1


def test_an_overwrite_that_takes_over_a_running_save_on_s3_wins_whole(s3, bucket, monkeypatch):
    import threading

    import zdcp.storage.saving

    url = f"s3://{bucket}/c"
    paused, release = threading.Event(), threading.Event()
    real_commit = zdcp.storage.saving.InPlaceSave.commit

    def slow_commit(self, root, *, sync):
        if threading.current_thread().name == "first":
            paused.set()
            release.wait(60)
        real_commit(self, root, sync=sync)

    monkeypatch.setattr(zdcp.storage.saving.InPlaceSave, "commit", slow_commit)
    errors = []

    def first():
        try:
            zdcp.save({"w": torch.full((64,), 1.0), "only_in_first": torch.ones(2)}, url)
        except zdcp.ZdcpError as e:
            errors.append(e)

    thread = threading.Thread(target=first, name="first")
    thread.start()
    assert paused.wait(60)
    zdcp.save({"w": torch.full((64,), 2.0)}, url, overwrite=True)  # takes the prefix over
    release.set()
    thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], zdcp.CheckpointExistsError) and "took it over" in str(errors[0])
    out = {"w": torch.zeros(64)}
    zdcp.load(out, url)
    assert torch.all(out["w"] == 2.0) and zdcp.verify(url).ok
    assert not [k for k in objects(s3, bucket) if "only_in_first" in k]


def test_saving_at_a_bucket_root_or_to_memory_from_several_ranks_is_refused(s3, bucket):
    for url in (f"s3://{bucket}", "memory://"):
        with pytest.raises(zdcp.UsageError, match="under a prefix"):
            zdcp.save({"w": torch.ones(2)}, url)
    run_ranks(2, _save_to_memory, timeout=120)


def _save_to_memory(rank, world_size):
    with pytest.raises(zdcp.UsageError, match="lives in one process"):
        zdcp.save({"w": torch.ones(2)}, "memory://shared/c")


def test_an_unreachable_endpoint_is_a_storage_error():
    # A failed request is retried by zdcp's schedule (ZDCP_RETRY_BUDGET); a kvstore spec may
    # carry a context of its own, which wins: here, one retry
    retries = {"max_retries": 1, "initial_delay": "10ms", "max_delay": "20ms"}
    spec = {"driver": "s3", "bucket": "nowhere", "path": "x", "endpoint": "http://127.0.0.1:9",
            "context": {"s3_request_retries": retries}}  # fmt: skip
    for call in (lambda u: zdcp.save({"w": torch.ones(2)}, u), lambda u: zdcp.load({"w": torch.ones(2)}, u)):
        with pytest.raises(zdcp.StorageError, match="s3://nowhere/x.*a request failed 2 times, the last: CURL error"):
            call(spec)
