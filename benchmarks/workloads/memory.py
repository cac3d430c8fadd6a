"""``memory``: peak resident memory above the state's own size while saving and while loading a
state of 16 fp32 tensors (128 MiB), for zdcp's two layouts, DCP and ``torch.save``/``torch.load``.

Each case runs in a fresh process that resets its high-water mark (``VmHWM``) right before the
operation, so that nothing another case allocated counts; a load's process saves first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..common import DCP, HEADINGS, TORCH, ZDCP_FILES, ZDCP_PACKED, MiB, mib
from ..registry import Settings
from ..tables import markdown_table

IMPLS = (ZDCP_FILES, ZDCP_PACKED, DCP, TORCH)
OPS = ("save", "load")
TENSORS = 16
ELEMENTS, ELEMENTS_QUICK = 2 * 1024 * 1024, 64 * 1024  # per tensor: 128 MiB in all, or 4 MiB

# argv: implementation, op, path, tensors, elements per tensor; prints the peak RSS above the
# RSS before the operation, in bytes.
PROBE = r"""
import sys, warnings, torch
warnings.filterwarnings("ignore")
import torch.distributed.checkpoint as dcp, zdcp
impl, op, path, tensors, elements = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
path = f"{path}-{impl}"
state = {f"layer{i}.weight": torch.randn(elements) for i in range(tensors)}
def rss():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) * 1024
save = {"zdcp-files": lambda: zdcp.save(state, path, overwrite=True, layout="files"),
        "zdcp-packed": lambda: zdcp.save(state, path, overwrite=True, layout="packed"),
        "dcp": lambda: dcp.save(state, checkpoint_id=path, no_dist=True),
        "torch": lambda: torch.save(state, path)}[impl]
load = {"zdcp-files": lambda: zdcp.load(state, path),
        "zdcp-packed": lambda: zdcp.load(state, path),
        "dcp": lambda: dcp.load(state, checkpoint_id=path, no_dist=True),
        "torch": lambda: torch.load(path, weights_only=True)}[impl]
if op == "load":
    save()
before = rss()
# peak RSS from here on: reset the high-water mark
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
(save if op == "save" else load)()
with open("/proc/self/status") as f:
    peak = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024
print(peak - before)
"""


def measure(directory: Path, elements: int) -> dict[str, dict[str, int]]:
    """op -> implementation -> bytes of peak RSS above the RSS before the operation."""
    extra: dict[str, dict[str, int]] = {}
    for op in OPS:
        extra[op] = {}
        for impl in IMPLS:
            run = subprocess.run(
                [sys.executable, "-c", PROBE, impl, op, str(directory / "state"), str(TENSORS), str(elements)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            extra[op][impl] = int(run.stdout.strip().splitlines()[-1])
    return extra


def memory(settings: Settings) -> str:
    elements = settings.sized(ELEMENTS, ELEMENTS_QUICK)
    state = TENSORS * elements * 4
    extra = measure(settings.directory, elements)
    rows = [[op, *(f"{extra[op][k] / MiB:.0f} MiB ({extra[op][k] / state:.0%})" for k in IMPLS)] for op in OPS]
    return markdown_table([f"peak RSS above the state ({mib(state)})", *(HEADINGS[k] for k in IMPLS)], rows)
