"""One module per workload (``large`` and ``small``, and ``sharded`` and ``sharded4``, are the
same code at another size and share theirs). Each module's workload function measures under its
directory and renders its own tables; :mod:`benchmarks.registry` names them.
"""
