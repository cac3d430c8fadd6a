"""The command line: ``python -m benchmarks [--workloads a,b] [--rounds N] [--dir PATH] [--quick]``.

Runs the chosen workloads one after another, in the registry's order, each in a directory of
its own under a new run directory, and prints each one's markdown as it finishes (its duration
on stderr), then the default layout's ratios to DCP against their targets
(:mod:`benchmarks.summary`). The run directory is deleted only when the run ends (see
:class:`benchmarks.common.NewPaths`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .registry import KNOWN_WORKLOADS, Settings, get_workload

DEFAULT_DIR = Path("/tmp/zdcp-bench")


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<10} {entry.description}" for name, entry in KNOWN_WORKLOADS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "zdcp against DCP, torch.save and raw I/O, on the same state in the same run:\n"
            "implementations alternate within each round, rounds repeat, and medians and ratios\n"
            "are printed as markdown, one section per workload."
        ),
        epilog=f"workloads, in the order a run measures them:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="runs go into a new directory here")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every case (default: 3)")
    p.add_argument("--workloads", default=",".join(KNOWN_WORKLOADS), help="comma-separated (default: all)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small states and 1 round, to check that the workloads run; not comparable with full runs",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    chosen = set(args.workloads.split(","))
    unknown = chosen - set(KNOWN_WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))} (known: {', '.join(KNOWN_WORKLOADS)})")
    rounds = 1 if args.quick else args.rounds

    import numpy as np
    import torch

    from .common import fresh, machine

    np.seterr(all="ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    run_dir = args.dir / time.strftime("run-%Y%m%d-%H%M%S")  # see NewPaths
    print(f"Machine: {machine()}. Storage: the filesystem under `{args.dir}`; page cache warm.")
    if args.quick:
        print("\n**Quick run** (`--quick`): small states, 1 round; not comparable with full runs.")
    from .summary import default_layout_table
    from .tables import take_ratios

    ratios = {}
    try:
        for name in KNOWN_WORKLOADS:
            if name in chosen:
                settings = Settings(directory=run_dir / name, rounds=rounds, quick=args.quick)
                settings.directory.mkdir(parents=True)
                start = time.perf_counter()
                section = get_workload(name)(settings)
                ratios[name] = take_ratios()
                print(f"\n## {name}\n\n{section}", flush=True)
                print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    finally:
        fresh(run_dir)
    print(f"\n## The default layout against its targets\n\n{default_layout_table(ratios)}")


if __name__ == "__main__":
    main()
