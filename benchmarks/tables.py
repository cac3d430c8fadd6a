"""Markdown tables the workloads share: times against DCP, files or objects per checkpoint, and
read amplification. A workload's own measures (memory, requests, step times) are rendered in its
module with :func:`markdown_table`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .common import DCP, HEADINGS, IMPLEMENTATIONS, ZDCP_FILES, ZDCP_PACKED, median, mib


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x"


@dataclass(frozen=True)
class TimedOp:
    """One operation (a save, a load, a delete) timed for several implementations."""

    op: str
    seconds: dict[str, list[float]]  # implementation -> one time per round

    @property
    def rounds(self) -> int:
        return len(next(iter(self.seconds.values())))


#: Every ratio to DCP's time shown by this run's tables so far, as (op, implementation, ratio):
#: what the run's summary of the default layout is made of (:func:`take_ratios`).
_RATIOS: list[tuple[str, str, float]] = []


def record_ratio(op: str, impl: str, value: float) -> None:
    """Note ``impl``'s time for ``op`` over DCP's, for the run's summary."""
    _RATIOS.append((op, impl, value))


def take_ratios() -> list[tuple[str, str, float]]:
    """The ratios recorded since the last call (those of the workload that just ran)."""
    taken = list(_RATIOS)
    _RATIOS.clear()
    return taken


def timing_table(ops: Sequence[TimedOp]) -> str:
    """Each operation's median time per implementation, and its ratio to DCP's in the same rounds."""
    rows = []
    for timed_op in ops:
        medians = {k: median(v) for k, v in timed_op.seconds.items()}
        reference = medians[DCP]
        for impl in IMPLEMENTATIONS:
            if impl != DCP and impl in medians:
                value = medians[impl]
                record_ratio(timed_op.op, impl, value / reference)
                rows.append([timed_op.op, HEADINGS[impl], f"{value:.3f}", f"{reference:.3f}", ratio(value, reference)])
    table = markdown_table(["op", "implementation", "s", "DCP s", "/ DCP"], rows)
    rounds = ops[0].rounds
    return f"{table}\n\nMedians of {rounds} interleaved round{'s' * (rounds != 1)}; DCP's time is from the same rounds."


def count_table(what: str, counts: Sequence[tuple[str, dict[str, int]]]) -> str:
    """``what`` (files, objects) in one checkpoint of each state, per implementation."""
    impls = [k for k in IMPLEMENTATIONS if any(k in c for _, c in counts)]
    rows = [[label, *(f"{c[k]:,}" for k in impls)] for label, c in counts]
    return markdown_table([f"{what} in one checkpoint", *(HEADINGS[k] for k in impls)], rows)


@dataclass(frozen=True)
class Amplification:
    """What loading processes read (``read``, bytes per implementation; None where not
    measured) for a destination of ``needed`` bytes."""

    case: str
    needed: float
    read: dict[str, float | None]


def amplification_table(cases: Sequence[Amplification]) -> str:
    """Bytes read over bytes needed, per implementation."""
    impls = (ZDCP_FILES, ZDCP_PACKED, DCP)
    rows = []
    for a in cases:
        read = [a.read.get(k) for k in impls]
        cells = ["n/a" if r is None else f"{r / a.needed:.2f}" for r in read]
        rows.append([f"{a.case} ({mib(a.needed)} needed)", *cells])
    return markdown_table(["read amplification (bytes read / bytes needed)", *(HEADINGS[k] for k in impls)], rows)
