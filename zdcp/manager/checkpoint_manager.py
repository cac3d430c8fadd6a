"""``zdcp.CheckpointManager``: when a training run saves, which checkpoints it keeps, and where it
resumes; its parts are the policies (:mod:`~zdcp.manager.policies`), the preemption watcher
(:mod:`~zdcp.manager.preemption`), the step index (:mod:`~zdcp.manager.step_index`) and the
directory of steps in storage (:mod:`zdcp.storage.steps`).

The manager owns a directory (a local path or an object-store URL) of checkpoints named
``step_<N>``, as :func:`zdcp.latest_checkpoint` reads them. It decides whether a step is saved
(an interval, ``force``, a preemption signal), saves through :func:`zdcp.save` or
:func:`zdcp.async_save` with the step and its metrics as the checkpoint's ``metadata``, and
after each commit removes the checkpoints its retention policy no longer keeps, each
un-committed before anything of it is deleted (:func:`zdcp.storage.removal.remove_committed`).

What it knows of the directory (the committed steps and their metrics) is read once, by the
coordinator, when the manager is created, and shared with every rank; from then on every rank
updates it alike, so that the queries (:meth:`~CheckpointManager.latest_step` and the like) are
local and agree across ranks. One manager (one job) writes a directory at a time: saves that
never committed, and removals that never finished, are deleted when the next manager starts.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch.distributed as dist

from ..api import async_save, load, save
from ..collectives import Collectives, attempt
from ..errors import CheckpointExistsError, CheckpointNotFoundError, UsageError
from ..format.documents import user_metadata
from ..options import SaveOptions
from ..storage.failures import storage_access
from ..storage.location import Location
from ..storage.removal import remove_committed
from ..storage.steps import committed_steps, is_step_name, step_name
from .policies import MODES, AnySave, FixedInterval, OnPreemption, preservation_policy
from .preemption import PreemptionWatcher
from .step_index import StepIndex

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Saves, keeps and restores the checkpoints of a training run in ``directory``.

    Args:
        directory: a local path or URL (``s3://``, ``gs://``, ``memory://``); step ``N`` is
            saved to ``directory/step_<N>``. Entries of other names are left alone.
        save_interval_steps: :meth:`save` saves when ``step % save_interval_steps == 0``, and
            otherwise only with ``force`` or at a preemption.
        max_to_keep: keep the newest ``max_to_keep`` committed checkpoints (None: all).
        keep_every_n_steps: also keep, forever, every step that is a multiple of it.
        best_metric: the name of a metric in :meth:`save`'s ``metrics``; with ``max_to_keep``,
            keep the ``max_to_keep`` best checkpoints by it instead of the newest. A checkpoint
            saved without the metric (or with a non-number, or NaN) is kept by recency only:
            while it is among the newest ``max_to_keep``.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
        async_save: :meth:`save` returns once the state is staged in host memory, and the
            checkpoint is written in the background (over a process group of the manager's
            own, so that training's collectives may run meanwhile: every process of the
            default group creates the manager then, as torch's ``new_group`` requires); one
            save is in flight at a time.
        preemption_signals: signals (``signal.SIGTERM``) that mark a preemption: a signal on
            any rank makes every rank save at its next :meth:`save` call, whatever the
            interval, after which :meth:`reached_preemption` is True. Installed in place of the
            current handlers until :meth:`close`; only from the main thread.
        process_group: the ranks that save (the default group when None).
        **save_options: the fields of :class:`~zdcp.SaveOptions` (``layout``,
            ``compression``, ``sync_files``...). With
            ``overwrite=True`` a step already committed is saved again over itself; without
            it, only with ``force``.

    In every rule the newest committed checkpoint is kept. A checkpoint being written, or one
    being restored, is never removed: removals run after a save commits, and a restore waits
    for them.

    :meth:`save`, :meth:`restore`, :meth:`wait_until_finished` and :meth:`close` are
    collective (every rank calls them, in the same order); the queries are not. They agree
    across ranks, except that with ``async_save`` each rank counts a background save's step
    once it sees it commit: call :meth:`wait_until_finished` first where ranks must agree.

    Steps are ordered by number: saving a step older than the newest committed one (a run that
    went back) needs ``force``, since a restart would resume from the newer one.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_interval_steps: int = 1,
        max_to_keep: int | None = None,
        keep_every_n_steps: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = False,
        preemption_signals: Iterable[int] = (),
        process_group: dist.ProcessGroup | None = None,
        **save_options: Any,
    ):
        for name, value in (("save_interval_steps", save_interval_steps), ("max_to_keep", max_to_keep),
                            ("keep_every_n_steps", keep_every_n_steps)):  # fmt: skip
            if value is not None and (type(value) is not int or value < 1):
                raise UsageError(f"{name} must be a positive int or None, got {value!r}")
        if best_mode not in MODES:
            raise UsageError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if "metadata" in save_options:
            raise UsageError("the manager stores each checkpoint's step and metrics as its metadata itself")
        self.directory = os.fspath(directory).rstrip("/")
        self._location = Location(self.directory)
        SaveOptions.of(save_options)  # refused here, not at the first save
        self.save_interval_steps = save_interval_steps
        self.max_to_keep = max_to_keep
        self.keep_every_n_steps = keep_every_n_steps
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._options = save_options
        self._saves = AnySave((FixedInterval(save_interval_steps), OnPreemption()))
        self._retention = preservation_policy(
            max_to_keep=max_to_keep, keep_every_n_steps=keep_every_n_steps, best_metric=best_metric, best_mode=best_mode
        )
        self._collectives = Collectives(process_group)
        self._index = StepIndex(self._read_directory())
        self._async = async_save
        self._save_group = process_group
        if async_save and not self._collectives.no_dist:
            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            self._save_group = dist.new_group(ranks=ranks, backend="gloo")
        self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zdcp-manager")
        self._in_flight: concurrent.futures.Future[None] | None = None
        self._closed = False
        try:  # last: what was set up before is let go if it fails
            self._preemption = PreemptionWatcher(preemption_signals, self._collectives)
        except BaseException:
            self._shut_down()
            raise

    # -- queries (local: every rank knows the same steps) ------------------------------------

    def checkpoint_path(self, step: int) -> str:
        """Where step ``step`` is (or would be) saved."""
        return f"{self.directory}/{step_name(step)}"

    def all_steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return self._index.steps()

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._index.latest()

    def best_step(self) -> int | None:
        """The committed step with the best ``best_metric`` (the newest among equals), or None
        without ``best_metric`` or when no checkpoint has it."""
        return self._index.best(self.best_metric, self.best_mode) if self.best_metric is not None else None

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics step ``step`` was saved with; None when it was saved without, or is not
        a committed step."""
        return self._index.metrics(step)

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` would save ``step`` by the interval alone."""
        return self._saves.should_save(step, preempted=False)

    def reached_preemption(self, step: int) -> bool:
        """True once every rank has agreed on a preemption, at ``step`` or before: the loop
        should then stop (after :meth:`wait_until_finished` when saving asynchronously)."""
        return self._preemption.reached(step)

    # -- collective operations -------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], *, metrics: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:  # fmt: skip
        """Save ``state`` as step ``step`` if the interval, ``force`` or a preemption says so;
        True if it saved. Call it every step: with ``preemption_signals`` it is where the ranks
        agree on a preemption (one all-reduce of a flag).

        ``metrics`` (a dict of plain values, the coordinator's) are stored with the checkpoint.
        A step already committed is saved again over itself with ``force`` (or the manager's
        ``overwrite``); otherwise :class:`~zdcp.CheckpointExistsError`. Synchronous: returns
        once committed and the old checkpoints are removed. Asynchronous: returns once the state
        is staged, after the previous save has committed; an error of a background save is
        raised by the next ``save``, :meth:`wait_until_finished` or :meth:`close`, on every rank.
        """
        self._check_open()
        if type(step) is not int or step < 0:
            raise UsageError(f"step must be a non-negative int, got {step!r}")
        preempted = self._preemption.check(step)
        if not (force or self._saves.should_save(step, preempted=preempted)):
            return False
        self.wait_until_finished()
        # The coordinator's metrics: the checkpoint stores those, and every rank's retention
        # must rank the steps alike.
        metrics = self._collectives.from_coordinator(dict(metrics) if metrics is not None else None)
        exists, latest = step in self._index, self._index.latest()
        if exists and not (force or self._options.get("overwrite", False)):
            raise CheckpointExistsError(
                f"Checkpoint already exists: step {step} is committed at {self.checkpoint_path(step)}; "
                "pass force=True to save it again"
            )
        if latest is not None and step < latest and not force:
            raise UsageError(
                f"step {step} is older than the newest committed step {latest} in {self.directory}, which a "
                "restart would resume from; pass force=True to save it anyway (or use another directory)"
            )
        # The place the manager resolved at its start (a relative path stays where it was).
        path = self._location.child(step_name(step)).spec
        # On an object store a save over a committed step deletes it first: if the save then
        # fails, the step is gone.
        loses_step = exists and not self._location.is_local
        options = {**self._options, "overwrite": exists, "metadata": {"step": step, "metrics": metrics}}
        if self._async:
            staged = async_save(state, path, process_group=self._save_group, **options)
            self._in_flight = self._finisher.submit(self._after_background_save, staged, step, metrics, loses_step)
            return True
        try:
            save(state, path, process_group=self._collectives.group, **options)
        except BaseException:
            if loses_step:
                self._index.forget(step)
            raise
        self._collectives.run("removing old checkpoints", lambda: self._committed(step, metrics))
        return True

    def restore(self, state: dict[str, Any], step: int | None = None) -> int | None:
        """Load the newest committed step (or ``step``) into ``state``, in place, at any world
        size; the step loaded, or None when there is none (``state`` is left as it is)."""
        self._check_open()
        self.wait_until_finished()
        if step is None:
            step = self._index.latest()
            if step is None:
                return None
        elif step not in self._index:
            raise CheckpointNotFoundError(
                f"step {step} is not a committed checkpoint in {self.directory} (committed: {self._index.steps()})"
            )
        load(state, self._location.child(step_name(step)).spec, process_group=self._collectives.group)
        return step

    def wait_until_finished(self) -> None:
        """Wait for the save in flight (and its removals); raise its error on every rank."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        self._collectives.agree(in_flight.exception(), "the background save")

    def close(self) -> None:
        """Wait for the save in flight (raising its error), and put back the signal handlers
        the manager replaced."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.close()
            return
        # Leaving on an error, perhaps on this rank only: no collective, which the other ranks
        # might never join; the save in flight still ends before the manager lets go.
        if self._in_flight is not None:
            self._in_flight.exception()
            self._in_flight = None
        self._release()

    # -- internals ---------------------------------------------------------------------------

    def _release(self) -> None:
        self._closed = True
        self._shut_down()
        self._preemption.close()

    def _shut_down(self) -> None:
        """Let go of the background thread and the process group of the saves."""
        self._finisher.shutdown(wait=True)
        if self._save_group is not self._collectives.group:
            dist.destroy_process_group(self._save_group)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"the CheckpointManager of {self.directory} is closed")

    def _after_background_save(self, staged: concurrent.futures.Future[None], step: int,
                               metrics: dict[str, Any] | None, loses_step: bool) -> None:  # fmt: skip
        try:
            staged.result()
        except BaseException:
            if loses_step:
                self._index.forget(step)
            raise
        self._committed(step, metrics)

    def _committed(self, step: int, metrics: dict[str, Any] | None) -> None:
        """Record ``step`` as committed, and remove what the policy no longer keeps (the
        coordinator removes; every rank forgets them alike)."""
        removed = self._index.record(step, metrics, self._retention)
        if not self._collectives.is_coordinator:
            return
        errors = []
        for old in removed:  # each one, whatever became of the others
            location = self._location.child(step_name(old))
            try:
                with storage_access(location.url):
                    remove_committed(location)
            except CheckpointNotFoundError:
                pass  # gone already
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _read_directory(self) -> dict[int, dict[str, Any] | None]:
        """The committed steps and their metrics: read by the coordinator (which first removes
        what killed saves and removals left), then shared with every rank."""
        found, error = attempt(self._scan) if self._collectives.is_coordinator else ({}, None)
        self._collectives.agree(error, f"reading {self.directory}")
        return self._collectives.from_coordinator(found)

    def _scan(self) -> dict[int, dict[str, Any] | None]:
        """The committed steps of the directory (of the manager's names) and their metrics;
        what killed saves and removals left is removed first (the manager is the only one that
        saves there)."""
        steps = committed_steps(self._location, is_step_name, exclusive=True)
        return {step.number: _metrics_of(user_metadata(step.info)) for step in steps if step.number is not None}


def _metrics_of(metadata: Any) -> dict[str, Any] | None:
    metrics = metadata.get("metrics") if isinstance(metadata, dict) else None
    return metrics if isinstance(metrics, dict) else None
