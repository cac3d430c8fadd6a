"""zdcp.CheckpointManager: the retention rules and their combination, metrics, async ordering
and error surfacing, preemption agreement across ranks, restore at another world size, kills
during a save and during a removal, and the same flow on S3 (moto)."""

import os
import signal
import uuid

import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_bitwise_equal, new_bucket
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import zdcp
from zdcp.manager.policies import (
    AnyPreservation,
    AnySave,
    BestN,
    EveryNSteps,
    FixedInterval,
    KeepAll,
    LatestN,
    OnPreemption,
    retained_steps,
)
from zdcp.manager.step_index import StepIndex
from zdcp.testing import environment, moto_server, run_ranks


def _state(step):
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 32, generator=g), "step": step}


def _empty():
    return {"w": torch.zeros(64, 32), "step": -1}


def _assert_restored(state, step):
    assert_bitwise_equal(state["w"], _state(step)["w"]) and state["step"] == step


def _on_disk(directory):
    return sorted(int(n[5:]) for n in os.listdir(directory) if n.startswith("step_") and n[5:].isdigit())


# -- the policy ---------------------------------------------------------------------------------

LOSSES = {1: 0.1, 2: 0.5, 3: 0.05, 4: 0.9, 5: 0.7, 6: 0.8}


@pytest.mark.parametrize(
    ("settings", "metrics", "kept"),
    [
        ({"max_to_keep": None}, {}, {1, 2, 3, 4, 5, 6}),
        ({"max_to_keep": 2}, {}, {5, 6}),
        ({"max_to_keep": 1, "keep_every_n_steps": 3}, {}, {3, 6}),
        ({"max_to_keep": 2, "keep_every_n_steps": 4}, {}, {4, 5, 6}),
        # the best two by loss, and always the newest
        ({"max_to_keep": 2, "best_metric": "loss"}, LOSSES, {1, 3, 6}),
        ({"max_to_keep": 2, "best_metric": "loss", "best_mode": "max"}, LOSSES, {4, 6}),
        # without the metric (or NaN): kept while among the newest two
        ({"max_to_keep": 2, "best_metric": "loss"}, {1: 0.1, 2: 0.2, 3: 0.3, 5: float("nan")}, {1, 2, 5, 6}),
        # ties: the newer wins
        ({"max_to_keep": 1, "best_metric": "loss"}, {2: 0.5, 4: 0.5}, {4, 6}),
        ({"max_to_keep": 1, "keep_every_n_steps": 2, "best_metric": "loss"}, {1: 0.0, 3: 1.0}, {1, 2, 4, 6}),
    ],
)
def test_each_retention_rule_and_their_combination(settings, metrics, kept):
    steps = {s: ({"loss": metrics[s]} if s in metrics else None) for s in range(1, 7)}
    assert retained_steps(steps, **settings) == kept


def test_save_policies_alone_and_composed():
    assert [s for s in range(7) if FixedInterval(3).should_save(s, preempted=False)] == [0, 3, 6]
    assert OnPreemption().should_save(5, preempted=True) and not OnPreemption().should_save(6, preempted=False)
    either = AnySave((FixedInterval(4), OnPreemption()))
    assert [s for s in range(9) if either.should_save(s, preempted=s == 5)] == [0, 4, 5, 8]
    invalid = (lambda: FixedInterval(0), lambda: LatestN(-1), lambda: EveryNSteps(1.5), lambda: BestN("l", 2, "mean"))
    for build in invalid:
        with pytest.raises(zdcp.UsageError):
            build()


def test_preservation_policies_alone_and_composed():
    steps = {s: ({"loss": LOSSES[s]} if s != 4 else None) for s in range(1, 7)}
    assert KeepAll().preserved(steps) == set(range(1, 7))
    assert LatestN(2).preserved(steps) == {5, 6}
    assert EveryNSteps(3).preserved(steps) == {3, 6}
    assert BestN("loss", 2).preserved(steps) == {1, 3}  # 4 has no loss and is not among the newest two
    assert BestN("loss", 3).preserved(steps) == {1, 2, 3, 4}  # ... and now it is
    assert BestN("loss", 1, "max").preserved(steps) == {6}
    assert AnyPreservation((LatestN(1), EveryNSteps(2))).preserved(steps) == {2, 4, 6}
    assert AnyPreservation(()).preserved(steps) == set() and LatestN(3).preserved({}) == set()


def test_the_step_index_forgets_what_the_policy_drops():
    index = StepIndex({1: {"loss": 0.5}, 2: None})
    assert index.record(3, {"loss": 0.1}, LatestN(2)) == [1]
    assert index.steps() == [2, 3] and index.latest() == 3 and 1 not in index
    assert index.record(1, None, LatestN(2)) == [] and index.steps() == [1, 2, 3]  # out of order: kept this once
    assert index.best("loss", "min") == 3 and index.metrics(3) == {"loss": 0.1} and index.metrics(1) is None
    index.forget(3)
    assert index.steps() == [1, 2] and index.best("loss", "min") is None


# -- one process --------------------------------------------------------------------------------


def test_a_run_keeps_what_its_policy_says_and_resumes_from_the_newest(tmp_path, layout):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "step_x").mkdir()
    with zdcp.CheckpointManager(run, save_interval_steps=2, max_to_keep=2, keep_every_n_steps=4,
                                layout=layout) as mgr:  # fmt: skip
        saved = [step for step in range(11) if mgr.save(step, _state(step))]
        assert saved == [0, 2, 4, 6, 8, 10]
        assert mgr.all_steps() == [0, 4, 8, 10] == _on_disk(run) and mgr.latest_step() == 10
        assert not mgr.save(11, _state(11))
        assert mgr.save(11, _state(11), force=True) and mgr.all_steps() == [0, 4, 8, 10, 11]
    assert (run / "notes.txt").read_text() == "mine" and (run / "step_x").is_dir()
    assert not [n for n in os.listdir(run) if n.startswith(".")], "nothing left behind"
    with zdcp.CheckpointManager(run) as again:  # a restarted job
        assert again.all_steps() == [0, 4, 8, 10, 11]
        state = _empty()
        assert again.restore(state) == 11
        _assert_restored(state, 11)
        assert again.restore(state, step=4) == 4
        _assert_restored(state, 4)
        with pytest.raises(zdcp.CheckpointNotFoundError, match="step 2 is not a committed checkpoint"):
            again.restore(state, step=2)
    assert zdcp.latest_checkpoint(run).name == "step_11"


def test_metrics_are_stored_with_the_checkpoint_and_rank_the_best(tmp_path):
    run = tmp_path / "run"
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.7}
    with zdcp.CheckpointManager(run, max_to_keep=2, best_metric="loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, _state(step), metrics={"loss": loss, "lr": 0.1})
        mgr.save(5, _state(5))  # no metrics: kept by recency only
        assert mgr.all_steps() == [2, 3, 5] and mgr.best_step() == 2
        assert mgr.metrics(2) == {"loss": 0.3, "lr": 0.1} and mgr.metrics(5) is None
    assert zdcp.open(run / "step_3").metadata == {"step": 3, "metrics": {"loss": 0.5, "lr": 0.1}}
    again = zdcp.CheckpointManager(run, max_to_keep=2, best_metric="loss")
    assert again.all_steps() == [2, 3, 5] and again.best_step() == 2 and again.metrics(3)["loss"] == 0.5
    again.save(6, _state(6), metrics={"loss": 0.1})
    assert again.all_steps() == [2, 5, 6]  # 5 is still among the newest two
    again.save(7, _state(7), metrics={"loss": 0.2})
    assert again.all_steps() == [6, 7] == _on_disk(run) and again.best_step() == 6
    again.close()


def test_a_step_saved_twice_needs_force(tmp_path):
    mgr = zdcp.CheckpointManager(tmp_path / "run")
    mgr.save(1, _state(1))
    with pytest.raises(zdcp.CheckpointExistsError, match="step 1 is committed"):
        mgr.save(1, _state(2))
    assert mgr.save(1, _state(2), force=True)
    state = _empty()
    mgr.restore(state)
    _assert_restored(state, 2)
    with zdcp.CheckpointManager(tmp_path / "run", overwrite=True) as replacing:
        assert replacing.save(1, _state(3))
    mgr.close()
    with pytest.raises(zdcp.UsageError, match="closed"):
        mgr.save(2, _state(2))


def test_a_directory_given_as_a_file_url(tmp_path):
    with zdcp.CheckpointManager(f"file://{tmp_path}/run", max_to_keep=1) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    assert _on_disk(tmp_path / "run") == [2] == zdcp.CheckpointManager(f"file://{tmp_path}/run").all_steps()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failed_save_over_a_committed_step(tmp_path, monkeypatch, where):
    """Locally the step it would have replaced stays; on an object store, where the save
    deleted it first, the manager forgets it: never a step it lists but cannot load."""
    import zdcp.writer

    run = str(tmp_path / "run") if where == "local" else f"memory://{uuid.uuid4().hex}/run"
    mgr = zdcp.CheckpointManager(run, max_to_keep=2)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    real = zdcp.writer.ZarrWriter._write_items
    monkeypatch.setattr(zdcp.writer.ZarrWriter, "_write_items", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(zdcp.StorageError, match="disk"):
        mgr.save(2, _state(3), force=True)
    monkeypatch.setattr(zdcp.writer.ZarrWriter, "_write_items", real)
    kept = [1, 2] if where == "local" else [1]
    assert mgr.all_steps() == kept
    state = _empty()
    assert mgr.restore(state) == kept[-1]
    _assert_restored(state, kept[-1])
    mgr.save(3, _state(3))
    mgr.save(4, _state(4))
    assert mgr.all_steps() == [3, 4] == zdcp.CheckpointManager(run).all_steps()


def test_on_an_object_store_the_manager_cleans_up_its_own_names_only():
    """What interrupted saves left is removed at the start under the manager's own names
    (step_<N>), never under others: another job may be saving there."""
    from zdcp.storage.location import Location

    run = f"memory://run-{uuid.uuid4().hex}"
    marker = {"session": "0" * 32, "owner": None}
    for name in ("final", "step_007", "checkpoint-5", "step_3"):  # each a save that has not committed
        place = Location(f"{run}/{name}")
        place.write_json("__zdcp_saving__", marker)
        place.kv.write("w/c.0", b"a chunk").result()
    zdcp.save(_state(1), f"{run}/step_1", layout="packed")
    with zdcp.CheckpointManager(run) as mgr:
        assert mgr.all_steps() == [1]
    left = {key.split("/")[0] for key in Location(run).keys()}
    assert left == {"final", "step_007", "checkpoint-5", "step_1"}, "step_3's leftovers go, the others stay"


def test_a_step_older_than_the_newest_needs_force(tmp_path):
    with zdcp.CheckpointManager(tmp_path / "run", max_to_keep=2) as mgr:
        mgr.save(200, _state(200))
        mgr.save(300, _state(300))
        with pytest.raises(zdcp.UsageError, match="step 100 is older than the newest committed step 300"):
            mgr.save(100, _state(100))
        assert mgr.save(100, _state(100), force=True) and mgr.all_steps() == [100, 200, 300]  # kept, this once
        mgr.save(400, _state(400))
        assert mgr.all_steps() == [300, 400]


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    for settings in ({"max_to_keep": 0}, {"save_interval_steps": -1}, {"best_mode": "mean"},
                     {"layout": "zip"}, {"metadata": {}}):  # fmt: skip
        with pytest.raises(zdcp.UsageError):
            zdcp.CheckpointManager(tmp_path / "run", **settings)
    assert not (tmp_path / "run").exists()


def test_async_saves_commit_in_order_and_their_errors_surface(tmp_path):
    run = tmp_path / "run"
    with zdcp.CheckpointManager(run, async_save=True, max_to_keep=1) as mgr:
        state = _state(1)
        assert mgr.save(1, state)
        state["w"].add_(1.0)  # staged: the checkpoint keeps what save() was given
        assert mgr.save(2, _state(2))  # waits for step 1 to commit first
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2] == _on_disk(run)
        restored = _empty()
        assert mgr.restore(restored) == 2
        _assert_restored(restored, 2)
        assert mgr.save(3, {"bad": object()})  # fails in the background
        with pytest.raises(zdcp.UnsupportedValueError, match="bad"):
            mgr.wait_until_finished()
        assert mgr.all_steps() == [2] and mgr.save(4, _state(4))
        mgr.save(5, {"bad": object()})
        with pytest.raises(zdcp.UnsupportedValueError):
            mgr.save(6, _state(6))  # the next save raises it
    assert _on_disk(run) == [4]
    mgr = zdcp.CheckpointManager(run, async_save=True)
    mgr.save(7, {"bad": object()})
    with pytest.raises(zdcp.UnsupportedValueError):
        mgr.close()


def test_preemption_in_one_process(tmp_path):
    with zdcp.CheckpointManager(tmp_path / "run", save_interval_steps=100,
                                preemption_signals=(signal.SIGUSR1,)) as mgr:  # fmt: skip
        for step in range(1, 10):
            if step == 4:
                os.kill(os.getpid(), signal.SIGUSR1)
            mgr.save(step, _state(step))
            if mgr.reached_preemption(step):
                break
        assert step == 4 and mgr.all_steps() == [4]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # put back


# -- several ranks ------------------------------------------------------------------------------


def _preempted_ranks(rank, world_size, run, out):
    mgr = zdcp.CheckpointManager(run, save_interval_steps=100, preemption_signals=(signal.SIGUSR1,))
    for step in range(1, 20):
        if step == 5 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
        mgr.save(step, {"w": torch.full((4,), float(step))})
        if mgr.reached_preemption(step):
            break
    mgr.close()
    torch.save({"step": step, "steps": mgr.all_steps()}, f"{out}.{rank}")


def test_a_signal_on_one_rank_makes_every_rank_save_and_stop(tmp_path):
    out = tmp_path / "out"
    run_ranks(2, _preempted_ranks, str(tmp_path / "run"), str(out))
    for rank in (0, 1):
        assert torch.load(f"{out}.{rank}") == {"step": 5, "steps": [5]}


def _one_rank_fails_in_the_background(rank, world_size, run, out):
    mgr = zdcp.CheckpointManager(run, async_save=True)
    mgr.save(1, {"w": torch.ones(4), "x": 1})
    mgr.save(2, {"w": torch.ones(4), "x": object() if rank == 1 else 2})  # rank 1's state is bad
    try:
        mgr.wait_until_finished()
    except zdcp.UnsupportedValueError as e:
        torch.save({"error": str(e), "steps": mgr.all_steps()}, f"{out}.{rank}")
    mgr.close()


def test_a_background_failure_on_one_rank_is_raised_on_every_rank(tmp_path):
    out = str(tmp_path / "out")
    run_ranks(2, _one_rank_fails_in_the_background, str(tmp_path / "run"), out)
    for rank in (0, 1):
        found = torch.load(f"{out}.{rank}")
        assert "'x'" in found["error"] and found["steps"] == [1], found


def _sharded_run(rank, world_size, run, step, out):
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(30 * 8, dtype=torch.float32).reshape(30, 8)
    with zdcp.CheckpointManager(run, max_to_keep=1, async_save=True) as mgr:
        if step is None:
            state = {"w": distribute_tensor(torch.zeros(30, 8), mesh, [Shard(0)]), "step": 0}
            restored = mgr.restore(state)
            torch.save({"step": restored, "w": state["w"].full_tensor(), "steps": mgr.all_steps()}, f"{out}.{rank}")
            return
        for s in (step - 1, step):
            mgr.save(s, {"w": distribute_tensor(full * s, mesh, [Shard(0)]), "step": s})


def test_restore_at_another_world_size(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    run_ranks(2, _sharded_run, run, 3, out)
    run_ranks(3, _sharded_run, run, None, out)
    for rank in range(3):
        found = torch.load(f"{out}.{rank}")
        assert found["step"] == 3 and found["steps"] == [3]
        assert torch.equal(found["w"], torch.arange(30 * 8, dtype=torch.float32).reshape(30, 8) * 3)


# -- kills ----------------------------------------------------------------------------------------


def _killed_run(run, die_in, layout):
    """Save steps 1 and 2 (max_to_keep=1, in ``layout``), and die by SIGKILL in ``die_in``: the
    commit of step 2's save, or the deletion of step 1 once it is un-committed."""
    import zdcp.storage.location as location
    import zdcp.storage.removal as removal
    import zdcp.storage.saving as saving

    target = {"save": (saving.LocalSave, "commit"), "removal": (removal.shutil, "rmtree"),
              "s3 removal": (location.Location, "delete_all_but_marker")}[die_in]  # fmt: skip
    mgr = zdcp.CheckpointManager(run, max_to_keep=1, layout=layout)
    mgr.save(1, _state(1))
    owner, name = target
    setattr(owner, name, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
    mgr.save(2, _state(2))


def _resume(rank, world_size, run, expected):
    """What a restarted job does, on every rank: resume from the newest step, save the next."""
    with zdcp.CheckpointManager(run, max_to_keep=1) as mgr:
        assert mgr.all_steps() == [expected], mgr.all_steps()
        state = _empty()
        assert mgr.restore(state) == expected
        _assert_restored(state, expected)
        mgr.save(3, _state(3))


@pytest.mark.parametrize("restart_ranks", [1, 2])
@pytest.mark.parametrize("die_in", ["save", "removal"])
def test_a_run_killed_mid_save_or_mid_removal_resumes_from_a_whole_checkpoint(tmp_path, die_in, restart_ranks,
                                                                               layout):  # fmt: skip
    """Killed by SIGKILL in a save's commit or in the removal of an old checkpoint, the run
    restarts, in one process or on two ranks, from the newest whole step, and what the kill
    left is gone."""
    run = tmp_path / "run"
    job = mp.get_context("spawn").Process(target=_killed_run, args=(str(run), die_in, layout))
    job.start()
    job.join(120)
    assert job.exitcode == -signal.SIGKILL
    assert [n for n in os.listdir(run) if n.startswith(".")], "the kill left something behind"
    resumed = 1 if die_in == "save" else 2  # a removal runs only after step 2 committed
    if restart_ranks == 1:
        _resume(0, 1, run, resumed)
    else:
        run_ranks(restart_ranks, _resume, str(run), resumed)
    assert sorted(os.listdir(run)) == ["step_3"]


def test_what_a_removal_on_another_host_left_is_deleted(tmp_path):
    """A removal is un-committed before it deletes anything, so what one left is garbage
    whoever owned it (a restarted job is often another container or host)."""
    import json

    run = tmp_path / "run"
    with zdcp.CheckpointManager(run) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    leftover = run / ".step_1.zdcp-0123456789abcdef0123456789abcdef"
    os.rename(run / "step_1", leftover)
    marker = {"owner": {"host": "another-host", "pid": 1}, "removing": True, "target": str(run / "step_1")}
    (leftover / "__zdcp_saving__").write_text(json.dumps(marker))
    assert zdcp.CheckpointManager(run).all_steps() == [2] and sorted(os.listdir(run)) == ["step_2"]


# -- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    boto3 = pytest.importorskip("boto3")
    with moto_server() as endpoint, environment(
        AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="t", AWS_SECRET_ACCESS_KEY="t"
    ):
        yield boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3):
    return new_bucket(s3, "run")


def _prefixes(s3, bucket):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted({o["Key"].split("/")[1] for page in pages for o in page.get("Contents", [])})


def test_the_same_flow_on_s3(s3, bucket, layout):
    run = f"s3://{bucket}/run"
    with zdcp.CheckpointManager(run, max_to_keep=2, keep_every_n_steps=3, best_metric="loss", async_save=True,
                                layout=layout) as mgr:  # fmt: skip
        for step in range(1, 7):
            mgr.save(step, _state(step), metrics={"loss": 1.0 / step})
    assert _prefixes(s3, bucket) == ["step_3", "step_5", "step_6"]
    with zdcp.CheckpointManager(run) as again:
        assert again.all_steps() == [3, 5, 6] and again.metrics(5) == {"loss": 0.2}
        state = _empty()
        assert again.restore(state) == 6
        _assert_restored(state, 6)


def test_a_removal_killed_on_s3_is_never_resumed_from(s3, bucket, layout):
    run = f"s3://{bucket}/run"
    job = mp.get_context("spawn").Process(target=_killed_run, args=(run, "s3 removal", layout))
    job.start()
    job.join(120)
    assert job.exitcode == -signal.SIGKILL
    assert "step_1" in _prefixes(s3, bucket), "un-committed, not yet deleted"
    with zdcp.CheckpointManager(run, max_to_keep=1) as mgr:
        assert mgr.all_steps() == [2] and _prefixes(s3, bucket) == ["step_2"]
        state = _empty()
        assert mgr.restore(state) == 2
        _assert_restored(state, 2)
