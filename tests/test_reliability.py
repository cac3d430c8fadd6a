"""Faults injected for real, and what each leaves behind (docs/reliability.md): saves and ranks
killed with SIGKILL, ranks that fail, concurrent saves to one path, damaged files, and input
the format cannot hold."""

import json
import os
import random
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import owners_maybe_running, read_root, write_root
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import zdcp
from zdcp.storage.contents import interrupted_saves
from zdcp.testing import ranks_running, run_ranks


def versioned(v):
    """A state whose every tensor and value says which save it came from: 30 small tensors
    (plain files) and a 2 MiB one (inner chunks, through tensorstore)."""
    model = {f"w{j}": torch.full((16384,), float(v)) for j in range(30)}
    return {"model": model | {"big": torch.full((512, 1024), float(v))}, "version": v}


def committed_version(path):
    """The version of the checkpoint at ``path``, checked whole and consistent; None when no save
    ever committed there (then loading is refused as incomplete or missing)."""
    out = versioned(-1)
    try:
        zdcp.load(out, path)
    except (zdcp.IncompleteCheckpointError, zdcp.CheckpointNotFoundError):
        return None
    v = out["version"]
    assert all(torch.all(t == v) for t in out["model"].values()), "a mix of saves"
    assert zdcp.verify(path).ok
    return v


# -- saves killed at chosen points and at random moments -----------------------------------------

KILL_POINTS = {  # where: the function patched to SIGKILL the saving process
    "writing chunks": "zdcp.writer:_ChunkWriter.write",
    "before the documents": "zdcp.writer:ZarrWriter.finish",
    "before the commit": "zdcp.storage.saving:LocalSave.commit",
    "committing the database": "zdcp.storage.packed:_commit_with_documents",  # packed only
    "after the exchange": "zdcp.storage.saving:_delete_replaced",  # the new one is in place, the old not yet deleted
}
KILLS = [  # the database's commit exists in the packed layout only
    (layout, where)
    for layout in ("files", "packed")
    for where in KILL_POINTS
    if layout == "packed" or "database" not in where
]


def _save_killed_at(path, version, where, layout="files"):
    import importlib

    module, _, attr = KILL_POINTS[where].partition(":")
    owner = importlib.import_module(module)
    *outer, name = attr.split(".")
    for part in outer:
        owner = getattr(owner, part)
    setattr(owner, name, lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    zdcp.save(versioned(version), path, overwrite=True, layout=layout)


def _run(target, *args):
    process = mp.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(120)
    return process.exitcode


@pytest.mark.parametrize("layout, where", KILLS)
def test_a_save_killed_at_each_step_leaves_the_old_or_the_new_checkpoint(tmp_path, layout, where):
    path = tmp_path / "ckpt"
    commits = where == "after the exchange"
    if commits:  # a first save has nothing to exchange with: it completes
        assert _run(_save_killed_at, path, 1, where, layout) == 0
    else:
        assert _run(_save_killed_at, path, 1, where, layout) == -signal.SIGKILL
        # nothing committed: refused as incomplete, naming the leftovers
        with pytest.raises(zdcp.IncompleteCheckpointError, match="never committed"):
            zdcp.load(versioned(-1), path)
        zdcp.save(versioned(1), path, layout=layout)
    assert committed_version(path) == 1
    assert _run(_save_killed_at, path, 2, where, layout) == -signal.SIGKILL
    assert committed_version(path) == (2 if commits else 1)
    assert interrupted_saves(path), "a killed save leaves its staging directory (or the replaced one)"


def _save_versions_forever(path, first_version, committed, started, layout):
    version = first_version
    started.set()
    while True:
        zdcp.save(versioned(version), path, overwrite=True, layout=layout)
        committed.value = version
        version += 1


def test_saves_killed_at_random_moments_never_leave_a_partial_checkpoint(tmp_path, layout):
    path, earlier = tmp_path / "ckpt", tmp_path / "earlier"
    zdcp.save(versioned(7), earlier)
    ctx = mp.get_context("spawn")
    committed = ctx.Value("q", -1)
    rng = random.Random(5)
    newest = None
    for round_ in range(1, 6):
        committed.value = -1
        started = ctx.Event()
        saver = ctx.Process(target=_save_versions_forever, args=(path, 1000 * round_, committed, started, layout))
        saver.start()
        assert started.wait(120)
        time.sleep(rng.uniform(0.0, 0.6))
        saver.kill()
        saver.join()
        found = committed_version(path)
        reported = committed.value
        if reported < 0:  # nothing reported: the previous state, or this round's first save
            allowed = {newest, 1000 * round_}
        else:  # the last save reported as done, or the next one, committed but not yet reported
            allowed = {reported, reported + 1}
        assert found in allowed, (found, allowed)
        newest = found
    assert committed_version(earlier) == 7


# -- ranks killed, ranks failing ------------------------------------------------------------------


def _rank_saves_forever(rank, world_size, path, layout):
    version = 0
    while True:
        version += 1
        zdcp.save(versioned(version), path, overwrite=True, layout=layout)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_killed_rank_makes_the_others_fail_promptly(tmp_path, seed, layout):
    path = tmp_path / "ckpt"
    with ranks_running(2, _rank_saves_forever, path, layout) as (rank0, rank1):
        deadline = time.monotonic() + 120
        while not zdcp.latest_checkpoint(tmp_path):  # the ranks are up and saving
            assert time.monotonic() < deadline and rank0.is_alive() and rank1.is_alive()
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(0, 0.5))
        rank1.kill()
        rank0.join(60)
        assert rank0.exitcode not in (None, 0), "the surviving rank hung or claimed success"
    assert committed_version(path) >= 1


class _Failing:
    """A Stateful that fails in ``state_dict`` or ``load_state_dict`` on one rank."""

    def __init__(self, rank, fail_in):
        self.rank, self.fail_in = rank, fail_in

    def state_dict(self):
        if self.rank == 1 and self.fail_in == "state_dict":
            raise RuntimeError("state_dict failed on purpose")
        return {"x": torch.ones(2)}

    def load_state_dict(self, state):
        if self.rank == 1 and self.fail_in == "load_state_dict":
            raise RuntimeError("load_state_dict failed on purpose")


def _disk_full(*args):
    raise OSError(28, "No space left")


def _one_rank_fails(rank, world_size, root, layout):
    import zdcp.writer

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(12.0).reshape(6, 2)

    def state(fail_in=None):
        return {"w": DTensor.from_local(full.chunk(world_size)[rank], mesh, [Shard(0)]), "app": _Failing(rank, fail_in)}

    # a save failing on one rank, before planning: every rank raises, nothing is created
    with pytest.raises(zdcp.DistributedError, match=r"rank\(s\) \[1\].*failed on purpose"):
        zdcp.save(state("state_dict"), root / "a", layout=layout)
    # a save failing on one rank while it writes: every rank raises, nothing is committed
    real = zdcp.writer._ChunkWriter.write
    if rank == 1:
        zdcp.writer._ChunkWriter.write = _disk_full
    with pytest.raises(zdcp.ZdcpError, match="No space left"):
        zdcp.save(state(), root / "b", layout=layout)
    zdcp.writer._ChunkWriter.write = real
    dist.barrier()
    assert not (root / "a").exists() and not (root / "b").exists()
    assert not interrupted_saves(root / "b"), "a failed save removes its pending directory"
    # ... and one replacing a checkpoint leaves that checkpoint as it was
    zdcp.save({"w": DTensor.from_local(full.chunk(world_size)[rank] * 0, mesh, [Shard(0)])}, root / "b", layout=layout)
    if rank == 1:
        zdcp.writer._ChunkWriter.write = _disk_full
    with pytest.raises(zdcp.ZdcpError, match="No space left"):
        zdcp.save(state(), root / "b", overwrite=True, layout=layout)
    zdcp.writer._ChunkWriter.write = real
    assert torch.equal(zdcp.open(root / "b")["w"][:], torch.zeros(6, 2))
    dist.barrier()
    assert not interrupted_saves(root / "b")
    # loads failing on one rank: every rank raises
    zdcp.save(state(), root / "c", layout=layout)
    with pytest.raises(zdcp.DistributedError, match="load_state_dict failed on purpose"):
        zdcp.load(state("load_state_dict"), root / "c")
    wrong = {
        "w": DTensor.from_local(torch.zeros(3 + rank, 2), mesh, [Shard(0)], run_check=False),
        "app": _Failing(rank, None),
    }
    with pytest.raises(zdcp.ZdcpError):
        zdcp.load(wrong, root / "c")


def test_a_failure_on_one_rank_fails_every_rank_promptly(tmp_path, layout):
    run_ranks(2, _one_rank_fails, tmp_path, layout, timeout=120)


def _inconsistent_shards(rank, world_size, root):
    mesh = init_device_mesh("cpu", (world_size,))
    # the ranks disagree on the tensor's shape
    with pytest.raises(zdcp.UnsupportedValueError, match="ranks disagree on tensor 'w'"):
        zdcp.save({"w": torch.ones(3 + rank)}, root / "a")
    # a local shard that is not what its placement says: rank 1 holds 3 rows of a 5-row tensor
    local = torch.ones(3, 2)
    bad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([5, 2]), stride=(2, 1))
    with pytest.raises(zdcp.UnsupportedValueError, match=r"local shard has shape \(3, 2\).*gives it \(2, 2\)"):
        zdcp.save({"w": bad}, root / "b")
    dist.barrier()
    assert not any(root.iterdir())


def test_inconsistent_shards_are_refused_before_writing(tmp_path):
    run_ranks(2, _inconsistent_shards, tmp_path, timeout=120)


# -- concurrent saves to one path -----------------------------------------------------------------


def _concurrent_save(path, version, overwrite, barrier, results, layout):
    barrier.wait()
    try:
        zdcp.save(versioned(version), path, overwrite=overwrite, layout=layout)
        results.put((version, "ok"))
    except zdcp.CheckpointExistsError as e:
        results.put((version, str(e)))


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_saves_to_one_path_leave_one_whole_checkpoint(tmp_path, overwrite, layout):
    ctx = mp.get_context("spawn")
    for attempt in range(2):
        path = tmp_path / f"ckpt{attempt}"
        if overwrite and attempt == 0:  # both replace a checkpoint; then both are first saves
            zdcp.save(versioned(0), path, layout=layout)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        args = [(path, v, overwrite, barrier, results, layout) for v in (1, 2)]
        savers = [ctx.Process(target=_concurrent_save, args=a) for a in args]
        for p in savers:
            p.start()
        outcomes = dict(results.get(timeout=120) for _ in savers)
        for p in savers:
            p.join(60)
        found = committed_version(path)
        succeeded = [v for v, outcome in outcomes.items() if outcome == "ok"]
        if overwrite:  # each replaces what it finds at its commit: both succeed, the later wins
            assert sorted(succeeded) == [1, 2] and found in succeeded, outcomes
        else:  # exactly one commits; the other fails cleanly
            assert len(succeeded) == 1 and found == succeeded[0], outcomes
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging left behind"


def test_a_packed_root_swapped_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """A packed root is several files: read while another save swaps the directory for its own,
    the read fails (here made to, deterministically); what the directory holds is then read
    again, on the directory now there, instead of being taken for something zdcp did not write."""
    import zdcp.storage.contents as contents
    from zdcp.storage.oscalls import exchange

    target, other = tmp_path / "c", tmp_path / "other"
    zdcp.save(versioned(1), target, layout="packed")
    zdcp.save(versioned(2), other, layout="packed")
    real, calls = contents.root_document, []

    def swapped_midway(store):
        calls.append(store.url)
        if len(calls) == 1:
            assert exchange(str(other), str(target))
            raise zdcp.CorruptCheckpointError("the manifest of one directory, the node of the other")
        return real(store)

    monkeypatch.setattr(contents, "root_document", swapped_midway)
    assert contents.local_contents(str(target)) == "committed" and len(calls) == 2
    assert committed_version(target) == 2


# -- input the format cannot hold, and crafted checkpoints ---------------------------------------

UNSTORABLE = {
    "sparse": (lambda: torch.eye(3).to_sparse(), "layout torch.sparse_coo"),
    "sparse_csr": (lambda: torch.eye(3).to_sparse_csr(), "layout torch.sparse_csr"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensor"),
    "meta": (lambda: torch.empty(3, device="meta"), "meta device"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "dtype torch.qint8"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", UNSTORABLE)
def test_unstorable_tensors_are_refused_naming_the_key(tmp_path, kind):
    make, message = UNSTORABLE[kind]
    with pytest.raises(zdcp.UnsupportedValueError, match=f"'model/layers/0/w'.*{message}"):
        zdcp.save({"model": {"layers": [{"w": make()}]}, "ok": torch.ones(2)}, tmp_path / "c")
    assert not any(tmp_path.iterdir()), "refused before anything was written"


def _node(doc, name):
    return doc["consolidated_metadata"]["metadata"][name]


CRAFTED = {  # what is done to the root document, and the error it must give
    "huge shape": (lambda doc: _node(doc, "w").update(shape=[2**63]), zdcp.CorruptCheckpointError),
    "shape of strings": (lambda doc: _node(doc, "w").update(shape=["4"]), zdcp.CorruptCheckpointError),
    "attributes not a dict": (lambda doc: _node(doc, "cfg").update(attributes=[1]), zdcp.CorruptCheckpointError),
    "node type unknown": (lambda doc: _node(doc, "cfg").update(node_type="link"), zdcp.CorruptCheckpointError),
    "format version a bool": (
        lambda doc: doc["attributes"]["zdcp"].update(format_version=True),
        zdcp.CorruptCheckpointError,
    ),
    "chunk keys escaping": (
        lambda doc: _node(doc, "w").update(
            chunk_key_encoding={"name": "default", "configuration": {"separator": "/../"}}
        ),
        zdcp.CorruptCheckpointError,
    ),
    "escaping node name": (
        lambda doc: doc["consolidated_metadata"]["metadata"].update({"../outside": _node(doc, "w")}),
        zdcp.UnsafeError,
    ),
}


@pytest.mark.parametrize("craft", CRAFTED)
def test_crafted_metadata_is_refused_as_corrupt_or_unsafe(tmp_path, craft, layout):
    change, error = CRAFTED[craft]
    path = tmp_path / "c"
    zdcp.save({"w": torch.ones(4), "cfg": {"lr": 0.1}}, path, layout=layout)
    doc = read_root(path)
    change(doc)
    write_root(path, doc)
    with pytest.raises(error):
        zdcp.load({"w": torch.zeros(4), "cfg": {"lr": 0.0}}, path)
    with pytest.raises(error):
        zdcp.open(path)


def test_deeply_nested_metadata_is_corrupt_not_a_crash(tmp_path, layout):
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    path = tmp_path / "c"
    zdcp.save({"w": torch.ones(4)}, path, layout=layout)
    doc = json.dumps(read_root(path))
    hierarchy, _ = root_document(Location(path))  # the root zarr.json's bytes, in either layout
    hierarchy.wait(hierarchy.kv.write("zarr.json", doc[:-1] + ',"deep":' + "[" * 100_000 + "]" * 100_000 + "}"))
    with pytest.raises(zdcp.CorruptCheckpointError, match="not valid JSON"):
        zdcp.load({"w": torch.zeros(4)}, path)


# -- damaged files --------------------------------------------------------------------------------


def _damage_cases(path):
    """(description, file, damaged bytes) for each chunk file: a flipped bit at a random place,
    and the file cut short."""
    rng = random.Random(3)
    for chunk in sorted(p for p in path.rglob("*") if p.is_file() and p.name.split(".")[0] == "c"):
        data = chunk.read_bytes()
        flipped = bytearray(data)
        bit = rng.randrange(len(data) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield f"bit {bit} of {chunk.name}", chunk, bytes(flipped)
        yield f"{chunk.name} truncated", chunk, data[: rng.randrange(len(data))]


@pytest.mark.parametrize("direct_reads", [True, False])
def test_any_damaged_chunk_fails_load_and_verify_naming_array_and_chunk(tmp_path, direct_reads):
    import torch.distributed.checkpoint as dcp

    from zdcp.collectives import Collectives
    from zdcp.planner import ZarrLoadPlanner

    path = tmp_path / "c"
    state = {"plain": torch.randn(10, 3), "inner": torch.randn(4, 300, 100)}  # 120 KB: 4 inner chunks
    zdcp.save(state, path, layout="files")  # chunk files to damage (packed: the next test)
    cases = list(_damage_cases(path))
    assert len(cases) == 4
    for what, chunk, damaged in cases:
        good = chunk.read_bytes()
        chunk.write_bytes(damaged)
        array = chunk.relative_to(path).parts[0]
        with pytest.raises(zdcp.CorruptCheckpointError, match=f"'{array}'") as raised:
            reader = zdcp.ZarrReader(path, direct_reads=direct_reads)
            with Collectives(no_dist=True).dcp_call():
                dest = {k: torch.zeros_like(v) for k, v in state.items()}
                dcp.load(dest, storage_reader=reader, planner=ZarrLoadPlanner(), no_dist=True)
        assert "chunk" in str(raised.value), (what, raised.value)
        faults = zdcp.verify(path).faults
        assert len(faults) == 1 and faults[0].node == array and faults[0].chunk is not None, (what, faults)
        chunk.write_bytes(good)
    zdcp.load({k: torch.zeros_like(v) for k, v in state.items()}, path)


def _save_packed_version_3(rank, world_size, path):
    zdcp.save(versioned(3), path, layout="packed")


@pytest.mark.parametrize("savers", [1, 2])
def test_damaged_or_missing_data_files_of_a_packed_checkpoint_are_never_loaded(tmp_path, savers):
    """A packed checkpoint's chunks live in data files (the ranks' databases', or the root
    database's when one process saved): a flipped byte, a truncated or a missing data file (or
    a rank's whole database) fails load, open and verify (OCDBT itself reads a missing data
    file as empty values: the chunk checksums and sizes catch it). Where only chunks are lost,
    the error names the array; the root database's own file also holds its B-tree, whose loss
    loses the whole checkpoint."""
    path = tmp_path / "c"
    if savers == 1:
        zdcp.save(versioned(3), path, layout="packed")
    else:
        run_ranks(savers, _save_packed_version_3, path, timeout=120)
    data = _largest_data_file(path)
    rank_database = data.relative_to(path).parts[0]
    assert rank_database.startswith("ocdbt.process_") == (savers > 1)
    good = data.read_bytes()
    cases = {
        "a flipped byte": lambda: data.write_bytes(good[:5000] + bytes([good[5000] ^ 0x10]) + good[5001:]),
        "a truncated data file": lambda: data.write_bytes(good[: len(good) // 2]),
        "a missing data file": data.unlink,
    }
    if savers > 1:
        cases["a missing rank database"] = lambda: os.rename(path / rank_database, tmp_path / "aside")
    for what, damage in cases.items():
        damage()
        names_array = savers > 1 or what == "a flipped byte"
        with pytest.raises(zdcp.CorruptCheckpointError, match="array 'model/" if names_array else None):
            zdcp.load(versioned(-1), path)
        with pytest.raises(zdcp.CorruptCheckpointError):
            zdcp.open(path).to_state_dict()
        faults = zdcp.verify(path).faults
        assert faults, what
        if names_array:
            assert all(f.node.startswith("model/") and f.chunk is not None for f in faults), (what, faults)
        if (tmp_path / "aside").exists():
            os.rename(tmp_path / "aside", path / rank_database)
        data.write_bytes(good)
        assert committed_version(path) == 3, what


def test_missing_or_corrupt_node_documents_are_named_by_verify(tmp_path, layout):
    """Loads read every node's metadata from the root document (the commit record); the nodes'
    own zarr.json serve other Zarr readers, and verify checks each one against it."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    path = tmp_path / "c"
    zdcp.save({"model": {"w": torch.ones(3)}, "cfg": {"lr": 0.1}}, path, layout=layout)
    if layout == "files":  # the nodes' zarr.json files of the directory
        (path / "model/w/zarr.json").unlink()
        (path / "cfg/zarr.json").write_text("{")
    else:  # the same keys where the layout keeps them (packed: in the database)
        hierarchy, _ = root_document(Location(path))
        hierarchy.wait(hierarchy.kv.write("model/w/zarr.json", None))
        hierarchy.wait(hierarchy.kv.write("cfg/zarr.json", b"{"))
    faults = {f.node: f.message for f in zdcp.verify(path).faults}
    assert faults == {"model/w": "zarr.json is missing", "cfg": faults["cfg"]}
    assert "not valid JSON" in faults["cfg"]


# -- resuming after a crash -----------------------------------------------------------------------


def _largest_data_file(path):
    """The file holding most of a checkpoint's chunk data, in either layout."""
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_latest_checkpoint_skips_what_a_crash_or_damage_left(tmp_path, layout):
    assert zdcp.latest_checkpoint(tmp_path / "none yet") is None
    for step in (1, 2, 5, 10):
        zdcp.save(versioned(step), tmp_path / f"step_{step}", layout=layout)
    # never committed (written by other means): no root document, or no database manifest
    (tmp_path / "step_10" / ("zarr.json" if layout == "files" else "manifest.ocdbt")).unlink()
    assert _run(_save_killed_at, tmp_path / "step_20", 20, "before the commit", layout) == -signal.SIGKILL
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    chunk = _largest_data_file(tmp_path / "step_5")
    data = chunk.read_bytes()
    chunk.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])  # damaged data: only verify sees it
    assert zdcp.latest_checkpoint(tmp_path) == tmp_path / "step_5"
    assert zdcp.latest_checkpoint(tmp_path, verify=True) == tmp_path / "step_2"
    out = versioned(-1)
    zdcp.load(out, zdcp.latest_checkpoint(tmp_path, verify=True))
    assert out["version"] == 2


# -- DCP features the Zarr storage cannot honour, and commit corner cases ------------------------


@pytest.fixture
def plan_cache():
    """DCP's plan caches are class attributes, kept per process: start and end empty."""
    from torch.distributed.checkpoint.planner import SavePlanner

    caches = [v for k, v in vars(SavePlanner).items() if k.startswith("_cached") and isinstance(v, dict)]
    assert caches, "DCP keeps no plan cache where this test looks"
    for cache in caches:
        cache.clear()
    yield
    for cache in caches:
        cache.clear()


@pytest.mark.parametrize("planner", ["DefaultSavePlanner", "ZarrSavePlanner"])
def test_dcp_plan_caching_saves_every_checkpoint(tmp_path, planner, plan_cache, monkeypatch):
    """With DCP's plan caching, saves after the first skip planning (their plans arrive
    unusable) and still write each checkpoint whole, into its own pending directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    from zdcp.planner import ZarrSavePlanner

    seen = []
    real = zdcp.ZarrWriter.prepare_global_plan
    recording = lambda self, plans: seen.append(plans[0].usable) or real(self, plans)  # noqa: E731
    monkeypatch.setattr(zdcp.ZarrWriter, "prepare_global_plan", recording)
    make = {"DefaultSavePlanner": DefaultSavePlanner, "ZarrSavePlanner": ZarrSavePlanner}[planner]
    steps = [(1, "step_1"), (2, "step_2"), (3, "step_2"), (4, "step_4")]  # step_2 replaced; step 4 adds a key
    for step, name in steps:
        state = {"model": {"w": torch.full((5, 3), float(step))}, "step": step}
        if step == 4:
            state["new"] = torch.ones(2)
        writer = zdcp.ZarrWriter(tmp_path / name, overwrite=True)
        dcp.save(state, storage_writer=writer, planner=make(enable_plan_caching=True), no_dist=True)
    assert seen == [True, False, False, True], "saves 2 and 3 used the cached plan, 4 planned again"
    for step, name in steps[0], steps[2], steps[3]:
        out = {"model": {"w": torch.zeros(5, 3)}, "step": 0}
        zdcp.load(out, tmp_path / name, allow_partial_load=True)
        assert out["step"] == step and torch.equal(out["model"]["w"], torch.full((5, 3), float(step)))
        assert zdcp.verify(tmp_path / name).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2", "step_4"], "no pending directory left"


def test_a_rank_writes_only_where_the_coordinator_prepared_the_save(tmp_path):
    from zdcp.storage.location import Location
    from zdcp.storage.saving import check_location, save_location

    zdcp.save({"w": torch.ones(2)}, tmp_path / "c")
    location = save_location(Location(tmp_path / "d"), "0" * 32)
    with pytest.raises(zdcp.UsageError, match="not where the coordinator prepared this save"):
        check_location(location, "0" * 32)
    assert not (tmp_path / f".d.zdcp-{'0' * 32}").exists()


#: Where each layout writes the bytes of a (small, plain) chunk of a local save: made to fail as
#: on a full disk.
CHUNK_WRITES = {
    "files": "zdcp.storage.localfiles.LocalFiles.write",  # a file of the directory
    "packed": "zdcp.storage.packed._DatabaseSink.write_encoded",  # a value of the rank's database
}


def _disk_full_writing(self, key, *parts):
    raise OSError(28, "No space left on device", key)


def test_failed_saves_through_other_paths_leave_nothing_behind(tmp_path, layout):
    """dcp.save with the ZarrWriter, whose own write failed, removes its pending directory
    before DCP raises, while the caller still holds the exception and the writer (DCP has no
    failure hook); a retry then saves. A conversion (which runs zdcp's own save) leaves
    nothing either."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp

    from zdcp import format_utils

    safetensors.torch.save_file({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.MonkeyPatch.context() as failing:
        failing.setattr(CHUNK_WRITES[layout], _disk_full_writing)
        writer = zdcp.ZarrWriter(tmp_path / "dcp", layout=layout)
        try:
            dcp.save({"w": torch.ones(3)}, storage_writer=writer, no_dist=True)
        except BaseException as e:  # DCP's CheckpointException
            failure = e
        else:
            raise AssertionError("the save did not fail")
        assert "No space left" in str(failure)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
        with pytest.raises(zdcp.StorageError, match="No space left"):
            format_utils.safetensors_to_zdcp(tmp_path / "model.safetensors", tmp_path / "converted", layout=layout)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    dcp.save({"w": torch.ones(3)}, storage_writer=zdcp.ZarrWriter(tmp_path / "dcp", layout=layout), no_dist=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp", "model.safetensors"]
    del failure, writer


def _other_rank_fails_then_retry(rank, world_size, root, layout):
    """Rank 1's writes fail: the coordinator's writer, still held, never learns why its save
    ended; the next save of this process to the target removes what the failed one left."""
    import torch.distributed.checkpoint as dcp

    state = {f"t{i}": torch.full((64,), float(rank)) for i in range(4)}
    failed = zdcp.ZarrWriter(root / "step_1", layout=layout)
    with pytest.MonkeyPatch.context() as failing:
        if rank == 1:
            failing.setattr(CHUNK_WRITES[layout], _disk_full_writing)
        with pytest.raises(BaseException, match="No space left"):
            dcp.save(state, storage_writer=failed)
    dist.barrier()
    if rank == 0:
        assert len(interrupted_saves(root / "step_1")) == 1  # the failed save's, not yet known dead
    dist.barrier()
    dcp.save(state, storage_writer=zdcp.ZarrWriter(root / "step_1", layout=layout))
    if rank == 0:
        assert interrupted_saves(root / "step_1") == []
    del failed


def test_a_failed_dcp_save_is_removed_by_the_next_save_of_the_process(tmp_path, layout):
    run_ranks(2, _other_rank_fails_then_retry, tmp_path, layout, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert zdcp.verify(tmp_path / "step_1").ok


def test_what_killed_saves_left_is_removed_once_their_process_is_gone(tmp_path):
    """The next save to the same target, and latest_checkpoint, delete the pending directories
    of saves whose process provably died (on this host); those of live processes, or from
    other hosts, stay."""
    assert _run(_save_killed_at, tmp_path / "step_20", 20, "before the commit") == -signal.SIGKILL
    killed = interrupted_saves(tmp_path / "step_20")
    assert len(killed) == 1
    with owners_maybe_running() as owners:
        kept = []
        for name, owner in owners.items():
            pending = tmp_path / f".step_20.zdcp-{name:0>32}"
            pending.mkdir()
            (pending / "__zdcp_saving__").write_text(json.dumps({"owner": owner}))
            kept.append(str(pending))
        zdcp.save(versioned(21), tmp_path / "step_20")
        assert interrupted_saves(tmp_path / "step_20") == sorted(kept)
        assert committed_version(tmp_path / "step_20") == 21
        assert _run(_save_killed_at, tmp_path / "step_30", 30, "writing chunks") == -signal.SIGKILL
        assert interrupted_saves(tmp_path / "step_30")
        assert zdcp.latest_checkpoint(tmp_path) == tmp_path / "step_20"
        assert not interrupted_saves(tmp_path / "step_30")
        assert interrupted_saves(tmp_path / "step_20") == sorted(kept)


def _without_collectives(rank, world_size, root):
    import torch.distributed.checkpoint as dcp

    with pytest.raises(zdcp.UsageError, match="use_collectives"):
        dcp.save({"w": torch.ones(2)}, storage_writer=zdcp.ZarrWriter(root / "c"), use_collectives=False)


def test_saving_without_collectives_on_several_ranks_is_refused(tmp_path):
    run_ranks(2, _without_collectives, tmp_path, timeout=120)
    assert not any(tmp_path.iterdir())


def test_replacing_without_an_atomic_exchange_puts_the_old_one_back_on_failure(tmp_path, monkeypatch):
    import zdcp.storage.saving

    path = tmp_path / "ckpt"
    zdcp.save(versioned(1), path)
    monkeypatch.setattr(zdcp.storage.oscalls, "_RENAMEAT2", None)  # as on NFS or macOS
    zdcp.save(versioned(2), path, overwrite=True)  # two renames
    assert committed_version(path) == 2
    real_rename = os.rename

    def failing_second_rename(src, dst):
        if ".zdcp-" in os.fspath(src) and os.fspath(dst) == str(path):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(zdcp.storage.saving.os, "rename", failing_second_rename)
    with pytest.raises(zdcp.ZdcpError, match="Input/output error"):
        zdcp.save(versioned(3), path, overwrite=True)
    monkeypatch.setattr(zdcp.storage.saving.os, "rename", real_rename)
    assert committed_version(path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_save_leaves_no_write_behind(tmp_path, monkeypatch, layout):
    """Writes still in flight when a save fails complete before its staging directory is
    removed, so none of them recreates it afterwards."""
    import zdcp.writer

    real, calls = zdcp.writer._host_tensor, []

    def failing_late(tensor):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("device lost")
        return real(tensor)

    state = {f"w{i}": torch.randn(512, 1024) for i in range(10)}  # 2 MiB each: tensorstore writes
    zdcp.save(versioned(1), tmp_path / "ckpt", layout=layout)
    monkeypatch.setattr(zdcp.writer, "_host_tensor", failing_late)
    with pytest.raises(zdcp.ZdcpError, match="device lost"):
        zdcp.save(state, tmp_path / "ckpt", overwrite=True, layout=layout)
    time.sleep(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert committed_version(tmp_path / "ckpt") == 1


def _files_under(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _record_syncs(monkeypatch, events):
    """Record, at every sync of the filesystem and at the commit's rename, which files the
    staging directory holds."""
    import zdcp.storage.oscalls
    import zdcp.storage.saving

    real_sync, real_rename = zdcp.storage.oscalls.FilesystemSync.sync, os.rename

    def sync(self):
        real_sync(self)  # what exists when the sync starts is covered by it
        events.append(("sync", _files_under(self.path)))

    def rename(src, dst):
        if ".zdcp-" in os.path.basename(src):
            events.append(("commit", _files_under(src)))
        real_rename(src, dst)

    monkeypatch.setattr(zdcp.storage.oscalls.FilesystemSync, "sync", sync)
    monkeypatch.setattr(zdcp.storage.saving.os, "rename", rename)


def _synced_before_commit(events):
    """The files of the commit that no sync before it covered."""
    commit = next(i for i, (kind, _) in enumerate(events) if kind == "commit")
    synced = set().union(*(files for kind, files in events[:commit] if kind == "sync"))
    return events[commit][1] - synced


def _last_own_write(layout, rank):
    """The file that rank ``rank`` writes last of its share of a save: its chunk (files), the
    manifest of its database (packed), which that database's commit writes last."""
    return {"files": f"w/c.{rank}.0", "packed": f"ocdbt.process_{rank}/manifest.ocdbt"}[layout]


def _rank_syncs_its_writes(rank, world_size, root, layout):
    events = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _record_syncs(monkeypatch, events)
        mesh = init_device_mesh("cpu", (world_size,))
        full = torch.arange(4000.0).reshape(100, 40)
        w = DTensor.from_local(full.chunk(world_size)[rank], mesh, [Shard(0)])
        zdcp.save({"w": w}, root / "c", layout=layout)
    # Every rank syncs once its own chunk is in the staging directory, alongside the others; the
    # coordinator then syncs the documents before the commit and the rename after it.
    assert events[0][0] == "sync" and _last_own_write(layout, rank) in events[0][1], events[0]
    if rank == 0:
        assert [kind for kind, _ in events] == ["sync", "sync", "commit", "sync"]
        assert _synced_before_commit(events) == set()
    else:
        assert [kind for kind, _ in events] == ["sync"]
    assert torch.equal(zdcp.open(root / "c")["w"][:], torch.arange(4000.0).reshape(100, 40))


def test_every_rank_syncs_its_own_writes_before_the_commit(tmp_path, layout):
    run_ranks(2, _rank_syncs_its_writes, tmp_path, layout, timeout=120)
