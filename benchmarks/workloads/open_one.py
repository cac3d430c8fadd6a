"""``open``: one tensor of a checkpoint with many keys. ``zdcp.open(path)[...][key][:]`` on
files-layout checkpoints of 2,000 to 100,000 small tensors, against reading and parsing the root
document alone (``json.loads``, garbage collector on, as a plain program does) and against DCP's
load of that one tensor (``allow_partial_load=True``).

The root ``zarr.json`` holds every node's metadata, so opening costs what parsing it costs and
grows with the number of keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import zdcp

from ..common import interleaved, median, timed
from ..registry import Settings
from ..tables import markdown_table

KEYS, KEYS_QUICK = (2_000, 20_000, 100_000), (100, 1_000)
ROUNDS = 3  # whatever --rounds says; a quick run's 1
NAMES = ("q.weight", "k.weight", "v.weight", "o.weight", "up.weight", "down.weight", "gate.weight",
         "norm.weight", "norm.bias", "ln.weight")  # fmt: skip
CASES = ("root document", "zdcp.open + read", "dcp.load of one")


def measure(directory: Path, keys: int, rounds: int) -> tuple[int, dict[str, float]]:
    """The root document's size in bytes, and each case's median seconds."""
    state = {"model": {f"layers.{i // 10}.{NAMES[i % 10]}": torch.full((4,), float(i)) for i in range(keys)}}
    zpath, dpath = directory / f"zdcp-files-{keys}", directory / f"dcp-{keys}"
    zdcp.save(state, zpath, sync_files=False, layout="files")
    dcp.save(state, checkpoint_id=dpath, no_dist=True)
    key = f"layers.0.{NAMES[0]}"
    dest = {"model": {key: torch.empty(4)}}
    times = interleaved(
        rounds,
        {
            CASES[0]: lambda: timed(lambda: json.loads((zpath / "zarr.json").read_bytes())),
            CASES[1]: lambda: timed(lambda: zdcp.open(zpath)["model"][key][:]),
            CASES[2]: lambda: timed(
                lambda: dcp.load(
                    dest,
                    checkpoint_id=dpath,
                    planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
                    no_dist=True,
                )
            ),
        },
    )
    return (zpath / "zarr.json").stat().st_size, {k: median(v) for k, v in times.items()}


def open_one(settings: Settings) -> str:
    rows = []
    for keys in settings.sized(KEYS, KEYS_QUICK):
        root_bytes, seconds = measure(settings.directory, keys, settings.sized(ROUNDS, settings.rounds))
        rows.append([f"{keys:,}", f"{root_bytes / 1e6:.1f} MB", *(f"{seconds[c]:.3f}" for c in CASES)])
    return markdown_table(["keys", "root zarr.json", *(f"{c} s" for c in CASES)], rows)
