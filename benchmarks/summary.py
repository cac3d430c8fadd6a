"""The run's last section: the default layout against DCP on every workload that ran, beside
the targets it is held to (issue 19: one default layout that wins everywhere). A workload's
tables record their ratios (:func:`benchmarks.tables.record_ratio`); this renders those of the
implementation that saves in :data:`zdcp.storage.layout.DEFAULT_LAYOUT`.
"""

from __future__ import annotations

from zdcp.storage.layout import DEFAULT_LAYOUT

from .common import LAYOUTS
from .tables import markdown_table

#: (workload, op) -> the most the default layout may take, as a multiple of DCP's time.
TARGETS: dict[tuple[str, str], float] = {
    ("large", "save"): 0.70,
    ("large", "load"): 0.50,
    ("huge", "save"): 0.70,
    ("retention", "save"): 1.0,
    ("retention", "load"): 0.8,
    ("sharded", "save at 8"): 0.8,
    ("sharded", "load at 3"): 0.6,
    ("sharded", "load at 1"): 0.6,
    ("sharded4", "save at 4"): 0.8,
    ("sharded4", "load at 3"): 0.6,
    ("sharded4", "load at 1"): 0.6,
}

DEFAULT_IMPL = next(impl for impl, layout in LAYOUTS.items() if layout == DEFAULT_LAYOUT)


def default_layout_table(ratios: dict[str, list[tuple[str, str, float]]]) -> str:
    """One row per operation of each workload (``ratios``: workload -> its recorded ratios)
    timed for the default layout: its time over DCP's, the target and whether it is met."""
    rows = []
    for workload, recorded in ratios.items():
        for op, impl, value in recorded:
            if impl != DEFAULT_IMPL:
                continue
            target = TARGETS.get((workload, op))
            verdict = "" if target is None else ("yes" if value <= target else "**no**")
            rows.append([workload, op, f"{value:.2f}x", "-" if target is None else f"<= {target:.2f}x", verdict])
    if not rows:
        return "No workload of this run timed the default layout against DCP."
    heading = f"default layout ({DEFAULT_LAYOUT}) / DCP"
    return markdown_table(["workload", "op", heading, "target", "met"], rows)
