"""``memory`` and ``huge``: peak resident memory above the state's own size while saving and
while loading, for zdcp's two layouts, DCP and ``torch.save``/``torch.load`` (``memory``: 16 fp32
tensors, 128 MiB); and the time and peak memory of saving and loading 4 GiB (``huge``: 16 x
8192 x 8192 fp32), for zdcp's two layouts and DCP.

Each case runs in a fresh process that resets its high-water mark (``VmHWM``) right before the
operation, so that nothing another case allocated counts; a load's process saves first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ..common import DCP, HEADINGS, TORCH, ZDCP_FILES, ZDCP_PACKED, MiB, interleaved, mib
from ..registry import Settings
from ..tables import TimedOp, markdown_table, timing_table

OPS = ("save", "load")
TENSORS = 16
# memory: 16 tensors of 8 MiB (128 MiB in all), or 256 KiB (4 MiB)
MEMORY_SHAPE, MEMORY_SHAPE_QUICK = (2048, 1024), (256, 256)
# huge: 16 tensors of 256 MiB (4 GiB in all), or 4 MiB (64 MiB)
HUGE_SHAPE, HUGE_SHAPE_QUICK = (8192, 8192), (1024, 1024)

# argv: implementation, op, path, tensors, shape ("AxB"); prints the operation's seconds and its
# peak RSS above the RSS before it, in bytes.
PROBE = r"""
import os, sys, time, warnings, torch
warnings.filterwarnings("ignore")
import torch.distributed.checkpoint as dcp, zdcp
impl, op, path, tensors = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shape = tuple(int(n) for n in sys.argv[5].split("x"))
state = {f"layer{i}.weight": torch.rand(shape) for i in range(tensors)}
def rss():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) * 1024
save = {"zdcp-files": lambda: zdcp.save(state, path, layout="files"),
        "zdcp-packed": lambda: zdcp.save(state, path, layout="packed"),
        "dcp": lambda: dcp.save(state, checkpoint_id=path, no_dist=True),
        "torch": lambda: torch.save(state, path)}[impl]
load = {"zdcp-files": lambda: zdcp.load(state, path),
        "zdcp-packed": lambda: zdcp.load(state, path),
        "dcp": lambda: dcp.load(state, checkpoint_id=path, no_dist=True),
        "torch": lambda: torch.load(path, weights_only=True)}[impl]
if op == "load":
    save()
os.sync()
before = rss()
# peak RSS from here on: reset the high-water mark
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = time.perf_counter()
(save if op == "save" else load)()
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    peak = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024
print(seconds, peak - before)
"""


def probe(path: Path, impl: str, op: str, shape: tuple[int, ...]) -> tuple[float, int]:
    """``op`` of ``impl`` on :data:`TENSORS` fp32 tensors of ``shape`` at ``path`` (deleted
    first), in a fresh process: its seconds and its peak RSS above the RSS before it."""
    shutil.rmtree(path, ignore_errors=True)
    path.unlink(missing_ok=True)
    argv = [sys.executable, "-c", PROBE, impl, op, str(path), str(TENSORS), "x".join(map(str, shape))]
    run = subprocess.run(argv, capture_output=True, text=True, check=True)
    seconds, extra = run.stdout.split()
    return float(seconds), int(extra)


def state_bytes(shape: tuple[int, ...]) -> int:
    return TENSORS * 4 * shape[0] * shape[1]


def memory(settings: Settings) -> str:
    impls = (ZDCP_FILES, ZDCP_PACKED, DCP, TORCH)
    shape = settings.sized(MEMORY_SHAPE, MEMORY_SHAPE_QUICK)
    state = state_bytes(shape)
    extra = {op: {k: probe(settings.directory / k, k, op, shape)[1] for k in impls} for op in OPS}
    rows = [[op, *(f"{extra[op][k] / MiB:.0f} MiB ({extra[op][k] / state:.0%})" for k in impls)] for op in OPS]
    return markdown_table([f"peak RSS above the state ({mib(state)})", *(HEADINGS[k] for k in impls)], rows)


#: How much memory above the state a save or load of ``huge`` may take: 10% + 64 MiB.
def huge_limit(state: int) -> int:
    return state // 10 + 64 * MiB


def huge(settings: Settings) -> str:
    """``settings.rounds`` interleaved rounds; the peak RSS is the largest of the rounds'."""
    impls = (ZDCP_FILES, ZDCP_PACKED, DCP)
    shape = settings.sized(HUGE_SHAPE, HUGE_SHAPE_QUICK)
    state = state_bytes(shape)
    peaks: dict[str, dict[str, int]] = {op: dict.fromkeys(impls, 0) for op in OPS}
    ops = []
    for op in OPS:

        def case(impl: str, op: str = op) -> float:
            seconds, extra = probe(settings.directory / impl, impl, op, shape)
            peaks[op][impl] = max(peaks[op][impl], extra)
            return seconds

        ops.append(TimedOp(op, interleaved(settings.rounds, {k: lambda k=k: case(k) for k in impls})))
    memory_rows = [[op, *(f"{peaks[op][k] / MiB:.0f} MiB ({peaks[op][k] / state:.1%})" for k in impls)] for op in OPS]
    return "\n\n".join([
        f"{TENSORS} x {shape[0]} x {shape[1]} fp32 ({state / MiB:,.0f} MiB), one process, each case in a fresh one.",
        timing_table(ops),
        markdown_table(["peak RSS above the state", *(HEADINGS[k] for k in impls)], memory_rows),
        f"The limit for the default layout: 10% of the state + 64 MiB = {huge_limit(state) / MiB:,.0f} MiB.",
    ])  # fmt: skip
