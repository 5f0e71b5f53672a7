"""The lane's usual case (a plain client on its own server connection) runs in C where the
extension is built (protocol/_scan.c: lane_requests, lane_serve, lane_replies), and in Python
otherwise or with SHOTOVER_G_LANE_IN_PYTHON set. Each test runs both ways: what a client gets,
byte for byte, and what the metrics count must not depend on which side served it, nor on
where the C part hands a case over to Python (a request split between reads, a command that
changes the session, a reply too large to relay at once, a screen in the chain)."""

from __future__ import annotations

import socket

import pytest

from helpers import (HOST, RawClient, encode, http_request, metric_value, passthrough_topology,
                     shared_topology, wait_for)
from shotover_gevent.upstream import LANE_IN_PYTHON_ENV


@pytest.fixture(params=["c", "python"])
def lane(request, monkeypatch):
    if request.param == "c":
        try:
            from shotover_gevent.protocol import _scan
        except ImportError:
            pytest.skip("the C part (shotover_gevent/protocol/_scan.c) is not built")
        assert hasattr(_scan, "lane_bind")
        monkeypatch.delenv(LANE_IN_PYTHON_ENV, raising=False)
    else:
        monkeypatch.setenv(LANE_IN_PYTHON_ENV, "1")
    return request.param


@pytest.mark.parametrize("upstream", ["own", "shared"])
def test_mixed_batches_split_anywhere_answer_as_redis_does(lane, upstream, proxy_factory,
                                                          redis_server):
    """Plain commands, a request cut in two, an inline command, a pipeline, SELECT and CLIENT
    SETNAME (the connection leaves the lane's plain state and comes back; a shared one moves
    to a connection of its own), a value too large to relay in one read: the same bytes as
    from Redis itself."""
    proxy = proxy_factory(shared_topology(redis_server.port) if upstream == "shared" else None)
    key = f"lane:{lane}:{upstream}"
    big = b"b" * 300_000
    stream = [
        encode("SET", f"{key}:a", "1") + encode("GET", f"{key}:a"),
        encode("INCR", f"{key}:n")[:7],  # the rest of this request comes next
        encode("INCR", f"{key}:n")[7:] + b"PING inline\r\n",
        encode("MGET", f"{key}:a", f"{key}:n", f"{key}:none") + encode("INCR", f"{key}:n") * 5,
        encode("SELECT", "1") + encode("SET", f"{key}:db1", "x") + encode("SELECT", "0"),
        encode("CLIENT", "SETNAME", "lane-test") + encode("CLIENT", "GETNAME"),
        encode("SET", f"{key}:big", big) + encode("GET", f"{key}:big"),
        encode("GET", f"{key}:db1") + encode("DEL", f"{key}:a", f"{key}:n", f"{key}:big"),
    ]
    with redis_server.client() as admin:
        admin.delete(f"{key}:a", f"{key}:n", f"{key}:big")
    direct = _read_all(redis_server.port, stream)
    with redis_server.client() as admin:
        admin.delete(f"{key}:a", f"{key}:n", f"{key}:big")
    proxied = _read_all(proxy.port, stream)
    assert proxied == direct
    assert big in proxied


def _read_all(port: int, stream) -> bytes:
    """The replies to `stream`, each chunk a write of its own, read up to the ECHO added
    after it."""
    chunks = list(stream) + [encode("ECHO", "end-of-stream")]
    with socket.create_connection((HOST, port), timeout=10) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
        received = b""
        while not received.endswith(b"$13\r\nend-of-stream\r\n"):
            data = sock.recv(1 << 20)
            assert data, f"the connection ended after {received[-200:]!r}"
            received += data
    return received


def test_every_batch_is_counted_once(lane, proxy_factory, redis_server):
    """The chain's batch count and latency count follow each batch served by the lane, and
    the screens' counters (QueryCounter) each command, whichever side served it."""
    topology = passthrough_topology(redis_server.port)
    topology["sources"][0]["Redis"]["chain"].insert(0, {"QueryCounter": {"name": "lanecount"}})
    proxy = proxy_factory(topology, observability=True)
    singles, pipelines = 37, 5
    with RawClient(proxy.port) as client:
        for index in range(singles):
            assert client.call("SET", f"lane:count:{index}", index) == b"OK"
        for _ in range(pipelines):
            client.send(encode("GET", "lane:count:1") * 4)
            assert client.read_replies(4) == [b"1"] * 4

    def counted():
        text = http_request(proxy.metrics_url)[1]
        return (metric_value(text, "shotover_chain_total_count", chain="redis"),
                metric_value(text, "shotover_query_count", name="lanecount", query="SET",
                             type="redis"),
                metric_value(text, "shotover_query_count", name="lanecount", query="GET",
                             type="redis"))

    wait_for(lambda: counted() == (singles + pipelines, singles, 4 * pipelines), 10,
             "the metrics to count every batch and command")


def test_a_filtered_write_is_refused_and_the_rest_served(lane, proxy_factory, redis_server):
    """A screen that refuses a command in the middle of a pipeline: the lane hands the batch to
    the greenlet, the other commands are served in order around the refusal."""
    topology = passthrough_topology(redis_server.port)
    topology["sources"][0]["Redis"]["chain"].insert(
        0, {"QueryTypeFilter": {"DenyList": ["Write"]}})
    proxy = proxy_factory(topology)
    with redis_server.client() as admin:
        admin.set("lane:filtered", "kept")
    with RawClient(proxy.port) as client:
        assert client.call("GET", "lane:filtered") == b"kept"
        client.send(encode("GET", "lane:filtered") + encode("SET", "lane:filtered", "lost") +
                    encode("GET", "lane:filtered"))
        first, refused, last = client.read_replies(3)
        assert first == last == b"kept"
        assert isinstance(refused, Exception)
        assert client.call("GET", "lane:filtered") == b"kept"
