"""Helpers for zdcp's tests and benchmarks: run a function on W gloo ranks in fresh processes,
with a deadline; start an S3-compatible server (moto) on loopback.

Real multi-process runs, as in training: ``torch.multiprocessing`` spawns the ranks, each joins
a gloo process group over a file store, and a rank's exception fails the caller with that
rank's traceback. A run that outlives ``timeout`` is killed and fails, so a hang in a
collective shows up as a test failure instead of a stuck suite.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "ranks_running", "moto_server"]


def _entry(rank: int, world_size: int, init_method: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    faulthandler.enable(all_threads=True)  # a native crash in a rank prints its Python stacks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Reached on success only; a failure propagates to torch.multiprocessing as usual.
    # With FSDP/DTensor the gloo backend outlives destroy_process_group, and its worker thread
    # may free the tensors of finished collectives (held by the barrier's work object) after
    # interpreter finalization has begun: taking the GIL then kills the thread inside a
    # noexcept destructor, and the rank aborts ("terminate called without an active
    # exception") after all its work succeeded, with or without zdcp; skipping finalization
    # avoids it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def ranks_running(world_size: int, fn: Callable[..., Any], *args: Any) -> Iterator[list[Any]]:
    """Start ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and yield their
    processes without waiting for them, for tests that kill ranks; any still running at the end
    are killed."""
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'store')}"
        ctx = mp.get_context("spawn")
        processes = [
            ctx.Process(target=_entry, args=(rank, world_size, init_method, fn, args)) for rank in range(world_size)
        ]
        for p in processes:
            p.start()
        try:
            yield processes
        finally:
            for p in processes:
                if p.is_alive():
                    p.kill()
                p.join()


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise if any fails."""
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'store')}"
        ctx = mp.start_processes(
            _entry, args=(world_size, init_method, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world_size} ranks running {fn.__name__} did not finish in {timeout} s")


@contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """Run moto's S3 server (``pip install "moto[server]"``) on a free loopback port for the
    duration of the block, and yield its endpoint URL. ``env`` adds to the server's environment
    (``{"INITIAL_NO_AUTH_ACTION_COUNT": "1"}`` makes it check credentials after one request)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.kill()
        server.wait()
