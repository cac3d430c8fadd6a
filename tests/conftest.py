import subprocess
import sys
import uuid
import warnings
from contextlib import contextmanager

import pytest
import torch

import zdcp  # noqa: F401  (registers bf16/fp8 with zarr-python for every test)
from zdcp.storage.layout import layout_names


@pytest.fixture(autouse=True)
def _quiet_single_process_warnings():
    # DCP warns on every single-process call; the tests make many on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@pytest.fixture
def ckpt(tmp_path):
    """A fresh checkpoint path (not yet existing)."""
    return tmp_path / "ckpt"


def assert_bitwise_equal(a, b, where=""):
    """Tensors equal bit for bit (NaNs and -0.0 included), same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[a.element_size()]
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        width = {4: torch.int32, 8: torch.int64}[a.element_size()]
    if a.dtype == torch.bool:
        assert torch.equal(a, b), where
        return
    assert torch.equal(a.contiguous().view(width), b.contiguous().view(width)), where


@pytest.fixture(params=layout_names())
def layout(request):
    """Each registered layout in turn (zdcp.SaveOptions.layout): tests of behaviour every layout
    promises."""
    return request.param


def read_root(path):
    """A checkpoint's root zarr.json, in either layout."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    return root_document(Location(path))[1]


def write_root(path, document):
    """Replace a checkpoint's root zarr.json, in either layout (to craft a damaged one)."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    hierarchy, _ = root_document(Location(path))
    # an existing database takes writes under the configuration its manifest records
    hierarchy.write_json("zarr.json", document)


def commit_record(path):
    """What un-commits a local checkpoint when deleted: the commit record of its layout (the
    root zarr.json, a database's manifest)."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    hierarchy, root = root_document(Location(path))
    assert root is not None, f"{path} holds no committed checkpoint"
    return path / hierarchy.layout.commit_record


def flip_a_bit(path, key, at):
    """Damage the chunk ``key`` of the local checkpoint at ``path``: flip a bit of its byte
    ``at``, where the layout stores it (the packed layout: in a data file, for a chunk large
    enough to be stored out of the B-tree)."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location
    from zdcp.storage.packed import value_extents

    hierarchy, _ = root_document(Location(path))
    if hierarchy.layout.name == "files":
        file, offset = path / key, 0
    else:
        extents = value_extents(hierarchy, f"{path}/")
        assert key in extents, f"{key} is stored inside the B-tree: make its tensor larger"
        file, offset, _ = extents[key]
    with open(file, "r+b") as f:
        f.seek(offset + at)
        byte = f.read(1)[0]
        f.seek(offset + at)
        f.write(bytes([byte ^ 0x01]))


def _save_at_once(url, version, barrier, results, layout):

    barrier.wait()
    try:
        zdcp.save({"w": torch.full((64, 64), float(version))}, url, layout=layout)
        results.put((version, "ok"))
    except zdcp.CheckpointExistsError as e:
        results.put((version, str(e)))


def assert_one_of_two_racing_saves_commits(url, layout):
    """Two processes start saving to an object-store ``url`` at once: exactly one commits, the
    other fails cleanly, and what is there loads whole."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    savers = [ctx.Process(target=_save_at_once, args=(url, v, barrier, results, layout)) for v in (1, 2)]
    for p in savers:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in savers)
    for p in savers:
        p.join(60)
    winners = [v for v, outcome in outcomes.items() if outcome == "ok"]
    assert len(winners) == 1, outcomes
    out = {"w": torch.zeros(64, 64)}
    zdcp.load(out, url)
    assert torch.all(out["w"] == winners[0]) and zdcp.verify(url).ok


def new_bucket(s3, stem):
    """A new S3 bucket (``s3``: a boto3 client), named ``stem-<random>``."""
    name = f"{stem}-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def new_gcs_bucket(endpoint, stem):
    """A new bucket on the GCS emulator at ``endpoint``, named ``stem-<random>``."""
    import json
    import urllib.request

    name = f"{stem}-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(request, timeout=10).close()
    return name


def objects(s3, bucket, prefix=""):
    """The keys of a bucket's objects (under ``prefix``), sorted."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@contextmanager
def owners_maybe_running():
    """Owners a saving marker may name whose save zdcp cannot prove dead, by name: a process
    of this host that runs, one on another host, one of this host before a reboot."""
    from zdcp.storage.oscalls import _start_time, process_identity

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        me = process_identity()
        yield {
            "alive": {**me, "pid": alive.pid, "started": _start_time(alive.pid)},
            "elsewhere": {**me, "host": "another-host", "pid": 1},
            "rebooted": {**me, "boot": "another-boot", "pid": 1},
        }
    finally:
        alive.kill()
        alive.wait()
