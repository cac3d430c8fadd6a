"""Python's cyclic garbage collector, paused while zdcp builds many objects that all live.

A save's planning allocates several objects per tensor and shard (plans, items, metadata) that
live until the save ends, and parsing a root document with thousands of nodes allocates a
container per JSON object; with the collector on, these allocations trigger collections that
scan every object the process holds (hundreds of thousands once torch is imported). The objects
are freed by reference counting when they are done with, so pausing the collector skips that
work rather than deferring it; torch's ``get_state_dict`` pauses it for the same reason.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused"]


@contextmanager
def paused() -> Iterator[None]:
    """The collector off inside the block, and as it was after (a caller's ``gc.disable()``
    stays)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
