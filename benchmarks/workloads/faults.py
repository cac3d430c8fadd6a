"""``faults``: saves, loads and verifies on S3 while the store fails requests as object stores
do in production. A :class:`zdcp.testing.FaultProxy` in front of a moto server on loopback
answers a fraction of requests ``503 SlowDown`` (S3's throttling) or closes their connections
without an answer; zdcp's two layouts and DCP's ``FsspecWriter``/``FsspecReader`` (s3fs) save
200 small tensors and four of 1 MiB, each round under a new prefix, load them back (checked
bit for bit) and, zdcp, verify them. And an outage: every write answered ``503`` from halfway
through a save on, and how long the save takes to raise, and what.

The checkpoint operations run in a worker process of their own, one after another: one that
hangs (a client that never gives up) is killed after a deadline and reported as such, so the
benchmark always ends; the proxy and moto stay in this process. A fault-free run against a
faulty one of the same implementation says what the faults cost: the retries' waits, mostly.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import zdcp
from zdcp.storage.retries import BUDGET_VARIABLE
from zdcp.testing import FaultCounts, FaultProxy, environment, moto_server

from ..common import (
    DCP,
    HEADINGS,
    LAYOUTS,
    ZDCP_FILES,
    ZDCP_PACKED,
    empty_like,
    interleaved,
    median,
    mib,
    nbytes,
    tensors,
    timed,
    use_s3_endpoint,
)
from ..registry import Settings
from ..tables import markdown_table, ratio

BUCKET = "faults"
IMPLS = (ZDCP_FILES, ZDCP_PACKED, DCP)
NO_FAULT = "none"
#: The faults measured, each a FaultProxy's settings: none, then as a busy store throttles
#: (S3 answers 503 SlowDown), then as connections fail.
FAULTS: dict[str, dict[str, float]] = {
    NO_FAULT: {},
    "10% of requests throttled (503 SlowDown)": {"throttle": 0.10},
    "5% of connections dropped": {"drop": 0.05},
}
SEED = 0  # of the proxy's faults
#: Seconds every request is held: an object store's round trip (moto on loopback answers in
#: about a millisecond, against which a throttled request's backoff of 100-200 ms would weigh
#: as it never does on a real store).
ROUND_TRIP = 0.02
#: How long one save, load or verify may take before it is given up on (its process killed).
DEADLINE, DEADLINE_QUICK = 600.0, 180.0
#: How long the outage's save may take to raise before it is given up on.
OUTAGE_CAP, OUTAGE_CAP_QUICK = 1200.0, 120.0
#: zdcp's time budget for retries (seconds), set for the outage's save in a --quick run so that
#: it raises in seconds rather than minutes; a full run measures zdcp's default.
QUICK_BUDGET = "10"


def fault_state(quick: bool) -> dict[str, dict[str, torch.Tensor]]:
    """200 fp32 tensors of 1-4 KiB and 4 of 1 MiB; 50 and 4 x 256 KiB when ``quick``."""
    g = torch.Generator().manual_seed(0)
    small = {f"layers.{i}.norm": torch.randn(256 * (1 + i % 4), generator=g) for i in range(50 if quick else 200)}
    large = {f"layer{i}.weight": torch.randn(64 if quick else 256, 1024, generator=g) for i in range(4)}
    return {"small": small, "large": large}


# -- in the worker process ------------------------------------------------------------------------

_STATES: dict[bool, Any] = {}


def _state(quick: bool) -> Any:
    if quick not in _STATES:
        _STATES[quick] = fault_state(quick)
    return _STATES[quick]


def _check(loaded: Any, quick: bool) -> None:
    if not all(torch.equal(a, b) for a, b in zip(tensors(loaded), tensors(_state(quick)), strict=True)):
        raise AssertionError("the loaded values differ from the saved ones")


def save_zdcp(url: str, layout: str, quick: bool, env: dict[str, str]) -> float:
    with environment(**env):
        return timed(lambda: zdcp.save(_state(quick), url, layout=layout))


def load_zdcp(url: str, quick: bool) -> float:
    dest = empty_like(_state(quick))
    seconds = timed(lambda: zdcp.load(dest, url))
    _check(dest, quick)
    return seconds


def verify_zdcp(url: str) -> float:
    start = time.perf_counter()
    report = zdcp.verify(url)
    seconds = time.perf_counter() - start
    if not report.ok:
        raise AssertionError(f"verify found {len(report.faults)} faults, the first: {report.faults[0]}")
    return seconds


def save_dcp(url: str, fs: dict[str, Any], quick: bool) -> float:
    return timed(lambda: dcp.save(_state(quick), storage_writer=FsspecWriter(url, **fs), no_dist=True))


def load_dcp(url: str, fs: dict[str, Any], quick: bool) -> float:
    dest = empty_like(_state(quick))
    seconds = timed(lambda: dcp.load(dest, storage_reader=FsspecReader(url, **fs), no_dist=True))
    _check(dest, quick)
    return seconds


def warm_up(fs: dict[str, Any], quick: bool) -> float:
    """Save and load a tiny state with each implementation, so that the first measured
    operation pays no imports, client setups or first connections."""
    start = time.perf_counter()
    _state(quick)
    tiny = {"w": torch.zeros(4)}
    for layout in LAYOUTS.values():
        zdcp.save(tiny, f"s3://{BUCKET}/warm-up-{layout}", layout=layout)
        zdcp.load(empty_like(tiny), f"s3://{BUCKET}/warm-up-{layout}")
    dcp.save(tiny, storage_writer=FsspecWriter(f"s3://{BUCKET}/warm-up-dcp", **fs), no_dist=True)
    dcp.load(empty_like(tiny), storage_reader=FsspecReader(f"s3://{BUCKET}/warm-up-dcp", **fs), no_dist=True)
    return time.perf_counter() - start


def _serve(connection: Connection) -> None:
    """The worker: run each function sent, answer with its seconds or its error."""
    while True:
        fn, args = connection.recv()
        start = time.perf_counter()
        try:
            connection.send((fn(*args), None))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            connection.send((time.perf_counter() - start, described(e)))


def described(e: BaseException) -> str:
    """An exception's type and the first line of its message."""
    kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    lines = str(e).strip().splitlines()
    return f"{kind}: {lines[0]}" if lines else kind


# -- in the benchmark's process -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One operation: its seconds (until it returned, raised, or was given up on) and its
    error, if it failed; what the proxy saw meanwhile."""

    seconds: float
    error: str | None
    counts: FaultCounts

    @property
    def ok(self) -> bool:
        return self.error is None


class Worker:
    """The process the checkpoint operations run in (spawned, so it shares no threads or
    connections with this one), replaced by a new one after one is given up on (the new one
    is not warmed up: its first operation pays its setup)."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None

    def run(self, deadline: float, fn: Callable[..., float], *args: Any) -> Outcome:
        """``fn(*args)`` in the worker, given up on after ``deadline`` seconds."""
        if self.process is None:
            context = multiprocessing.get_context("spawn")
            self.connection, theirs = context.Pipe()
            self.process = context.Process(target=_serve, args=(theirs,), daemon=True)
            self.process.start()
            theirs.close()
        assert self.connection is not None
        before, start = self.proxy.counts, time.perf_counter()
        self.connection.send((fn, args))
        if self.connection.poll(deadline):
            seconds, error = self.connection.recv()
        else:
            seconds, error = time.perf_counter() - start, f"no answer after {deadline:.0f} s (killed)"
            self.close()
        return Outcome(seconds, error, self.proxy.counts - before)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.process = self.connection = None


@dataclass
class Run:
    """One round of one implementation under one fault: save, load, verify (zdcp only)."""

    steps: dict[str, Outcome] = field(default_factory=dict)  # "save", "load", "verify"

    @property
    def error(self) -> str | None:
        return next((f"{step}: {o.error}" for step, o in self.steps.items() if not o.ok), None)

    @property
    def total(self) -> float:
        return sum(o.seconds for o in self.steps.values())

    @property
    def counts(self) -> FaultCounts:
        return sum((o.counts for o in self.steps.values()), FaultCounts())


def measure_impl(worker: Worker, impl: str, url: str, fs: dict[str, Any], quick: bool, deadline: float) -> Run:
    """Save, then load and (zdcp) verify, at ``url``; what follows a failed step is skipped."""
    run = Run()
    if impl == DCP:
        steps: list[tuple[str, Callable[..., float], tuple[Any, ...]]] = [
            ("save", save_dcp, (url, fs, quick)), ("load", load_dcp, (url, fs, quick))]  # fmt: skip
    else:
        steps = [("save", save_zdcp, (url, LAYOUTS[impl], quick, {})), ("load", load_zdcp, (url, quick)),
                 ("verify", verify_zdcp, (url,))]  # fmt: skip
    for step, fn, args in steps:
        run.steps[step] = worker.run(deadline, fn, *args)
        if not run.steps[step].ok:
            break
    return run


def measure_faults(
    worker: Worker, proxy: FaultProxy, settings: Settings, fs: dict[str, Any]
) -> dict[str, dict[str, list[Run]]]:
    """Every implementation under every fault, ``settings.rounds`` interleaved rounds each."""
    deadline = settings.sized(DEADLINE, DEADLINE_QUICK)
    runs: dict[str, dict[str, list[Run]]] = {}
    for index, (fault, knobs) in enumerate(FAULTS.items()):
        proxy.throttle, proxy.drop = knobs.get("throttle", 0.0), knobs.get("drop", 0.0)
        runs[fault] = {impl: [] for impl in IMPLS}

        def case(impl: str, fault: str = fault, index: int = index) -> Callable[[], float]:
            def one() -> float:
                url = f"s3://{BUCKET}/{impl}-{index}-{len(runs[fault][impl])}"
                run = measure_impl(worker, impl, url, fs, settings.quick, deadline)
                runs[fault][impl].append(run)
                return run.total

            return one

        interleaved(settings.rounds, {impl: case(impl) for impl in IMPLS})
    proxy.throttle = proxy.drop = 0.0
    return runs


@dataclass(frozen=True)
class OutageRun:
    """A save that meets every write answered 503 from ``after`` writes on."""

    impl: str
    after: int
    writes: int  # of a fault-free save
    outcome: Outcome


def measure_outage(
    worker: Worker, proxy: FaultProxy, settings: Settings, fs: dict[str, Any], fault_free: dict[str, list[Run]]
) -> list[OutageRun]:
    """Each implementation's save with every write failing from half its fault-free writes on."""
    cap = settings.sized(OUTAGE_CAP, OUTAGE_CAP_QUICK)
    budget = settings.sized({}, {BUDGET_VARIABLE: QUICK_BUDGET})
    runs = []
    for impl in IMPLS:
        writes = int(median([run.steps["save"].counts.writes for run in fault_free[impl]]))
        url = f"s3://{BUCKET}/{impl}-outage"
        proxy.outage(of="writes", after=writes // 2)
        try:
            if impl == DCP:
                outcome = worker.run(cap, save_dcp, url, fs, settings.quick)
            else:
                outcome = worker.run(cap, save_zdcp, url, LAYOUTS[impl], settings.quick, budget)
        finally:
            proxy.recover()
        runs.append(OutageRun(impl, writes // 2, writes, outcome))
    return runs


def render_faults(runs: dict[str, dict[str, list[Run]]]) -> str:
    def seconds(impl_runs: list[Run], step: str) -> str:
        if step not in impl_runs[0].steps:
            return "-"
        return f"{median([r.steps[step].seconds for r in impl_runs]):.2f}"

    def injected(c: FaultCounts) -> str:
        kinds = [f"{n} {kind}" for kind, n in (("throttled", c.throttled), ("dropped", c.dropped)) if n]
        return ", ".join(kinds) or "0"

    rows = []
    for fault, by_impl in runs.items():
        for impl, impl_runs in by_impl.items():
            failed = [r for r in impl_runs if r.error]
            reference = [r.total for r in runs[NO_FAULT][impl] if not r.error]
            counts = impl_runs[-1].counts
            if failed:
                rows.append([fault, HEADINGS[impl], f"failed in {len(failed)} of {len(impl_runs)} rounds, after "
                             f"{failed[0].total:.1f} s: {failed[0].error}", "", "", "", "", f"{counts.requests:,}",
                             injected(counts)])  # fmt: skip
                continue
            total = median([r.total for r in impl_runs])
            rows.append([fault, HEADINGS[impl], seconds(impl_runs, "save"), seconds(impl_runs, "load"),
                         seconds(impl_runs, "verify"), f"{total:.2f}",
                         ratio(total, median(reference)) if reference else "n/a", f"{counts.requests:,}",
                         injected(counts)])  # fmt: skip
    header = ["fault", "implementation", "save s", "load s", "verify s", "total s", "/ fault-free",
              "requests (last round)", "faults injected (last round)"]  # fmt: skip
    return markdown_table(header, rows)


def render_outage(runs: list[OutageRun], budget: str) -> str:
    rows = []
    for run in runs:
        o = run.outcome
        what = o.error if o.error else "no error: the save returned"
        rows.append([HEADINGS[run.impl], f"{run.after:,} of {run.writes:,}", f"{o.seconds:.1f}", what,
                     f"{o.counts.outage:,}"])  # fmt: skip
    header = ["implementation", "writes let through (of a fault-free save's)", "s until the save ended",
              "what it raised (type: first line)", "writes answered 503"]  # fmt: skip
    table = markdown_table(header, rows)
    return f"Every write answered 503 (ServiceUnavailable) from halfway through a save on; {budget}.\n\n{table}"


def faults(settings: Settings) -> str:
    import boto3

    state = fault_state(settings.quick)
    described_state = f"{len(state['small'])} small tensors and 4 of {mib(nbytes(state['large']) / 4)}"
    with moto_server() as endpoint, FaultProxy(endpoint, seed=SEED, latency=ROUND_TRIP) as proxy:
        use_s3_endpoint(proxy.endpoint)  # the worker, started later, inherits it
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        fs = {"endpoint_url": proxy.endpoint, "key": "bench", "secret": "bench"}
        worker = Worker(proxy)
        try:
            warmed = worker.run(settings.sized(DEADLINE, DEADLINE_QUICK), warm_up, fs, settings.quick)
            if not warmed.ok:
                raise RuntimeError(f"warming up without faults failed: {warmed.error}")
            runs = measure_faults(worker, proxy, settings, fs)
            outage = measure_outage(worker, proxy, settings, fs, runs[NO_FAULT])
        finally:
            worker.close()
    if settings.quick:
        budget = f"zdcp's saves with {BUDGET_VARIABLE}={QUICK_BUDGET} (--quick)"
    elif BUDGET_VARIABLE in os.environ:
        budget = f"zdcp's saves with {BUDGET_VARIABLE}={os.environ[BUDGET_VARIABLE]} (from the environment)"
    else:
        budget = f"zdcp's saves with their default retry budget ({BUDGET_VARIABLE} unset)"
    rounds = settings.rounds
    return "\n\n".join([
        f"S3 (moto) behind a fault proxy, {ROUND_TRIP * 1000:.0f} ms per request; {described_state} fp32, saved, "
        "loaded and verified by one process.",
        render_faults(runs),
        f"Medians of {rounds} interleaved round{'s' * (rounds != 1)}; / fault-free: the total over the same "
        "implementation's without faults. DCP has no verify. An operation not done in "
        f"{settings.sized(DEADLINE, DEADLINE_QUICK):.0f} s is killed and counts as failed.",
        render_outage(outage, budget),
    ])  # fmt: skip
