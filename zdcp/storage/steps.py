"""A directory of checkpoints (a local directory, an object-store prefix), as training runs keep
them: one checkpoint per saved step, named after it (``step_100``); which of them are committed,
and the rule that gives a name its step, shared by :func:`zdcp.latest_checkpoint` and
:class:`zdcp.CheckpointManager`."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .contents import COMMITTED, pending_directories, root_kind
from .location import Location
from .removal import remove_dead_saves, remove_interrupted

__all__ = ["Step", "step_number", "step_name", "is_step_name", "step_names", "committed_steps"]


def step_name(step: int) -> str:
    """The name under which a :class:`~zdcp.CheckpointManager` saves step ``step``."""
    return f"step_{step}"


def is_step_name(name: str) -> bool:
    """Whether ``name`` is one a :class:`~zdcp.CheckpointManager` gives a step (``step_<N>``,
    no leading zeros): the only names of its directory it reads or cleans up."""
    number = step_number(name)
    return number is not None and name == step_name(number)


@dataclass(frozen=True)
class Step:
    """A committed checkpoint in a directory of checkpoints: its name there, the step its name
    gives (:func:`step_number`), and zdcp's record from its root document (format version,
    world size, the ``metadata`` it was saved with)."""

    name: str
    number: int | None
    info: dict[str, Any]


_NUMBER = re.compile(r"\d+")


def step_number(name: str) -> int | None:
    """The step a checkpoint's name in a directory of checkpoints gives: the last number in it
    (``step_100``, ``checkpoint-100``, ``100``); None when it has none."""
    numbers = _NUMBER.findall(name)
    return int(numbers[-1]) if numbers else None


def step_names(directory: Location, named: Callable[[str], bool] = lambda name: True) -> list[str]:
    """The names directly below ``directory`` that ``named`` accepts, oldest step first (names
    without a number first, then by name); hidden names (which pending directories have) are
    never among them. What saves whose process provably died left in a local directory is
    deleted first (:func:`~zdcp.storage.removal.remove_dead_saves`)."""
    if directory.local_dir is not None:
        remove_dead_saves(pending_directories(directory.local_dir))
    names = [name for name in directory.child_names() if not name.startswith(".") and named(name)]
    return sorted(names, key=_step_order)


def committed_steps(
    directory: Location, named: Callable[[str], bool] = lambda name: True, *, exclusive: bool = False
) -> list[Step]:
    """The committed zdcp checkpoints among :func:`step_names` of ``directory``, in the same
    order, each with zdcp's record of it (every root document is read, at once).

    With ``exclusive`` (the caller is the only one saving under the names ``named`` accepts,
    as a :class:`~zdcp.CheckpointManager` is under its own), what interrupted saves and
    removals left there on an object store is deleted too: there a marker cannot tell a dead
    save from a running one.
    """

    def committed(name: str) -> Step | None:
        location = directory.child(name)
        if exclusive and not location.is_local and remove_interrupted(location):
            return None
        kind, info = root_kind(location)
        return Step(name, step_number(name), info) if kind == COMMITTED and info is not None else None

    with ThreadPoolExecutor(8) as pool:
        return [step for step in pool.map(committed, step_names(directory, named)) if step is not None]


def _step_order(name: str) -> tuple[int, str]:
    number = step_number(name)
    return (-1 if number is None else number, name)
