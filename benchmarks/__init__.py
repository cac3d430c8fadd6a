"""zdcp's benchmarks: zdcp against its anchors, on the same state, in the same run.

    python -m benchmarks                                  # every workload, 3 rounds, under /tmp/zdcp-bench
    python -m benchmarks --workloads large,small --rounds 5 --dir /mnt/fast/bench
    python -m benchmarks --quick                          # every workload small, once: does it run?

A workload is one module of :mod:`benchmarks.workloads`, named in :mod:`benchmarks.registry`,
which measures and renders its own tables; :mod:`benchmarks.common` holds what they measure
with (timing, states, the anchors) and :mod:`benchmarks.tables` the tables they share.
docs/benchmarks.md keeps the latest tables, with the machine they ran on.
"""
