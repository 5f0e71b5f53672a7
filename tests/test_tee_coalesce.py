"""Tee (mirroring to a second real redis-server, its behaviours and result-source switch) and
Coalesce (holding requests until a flush condition), through a real proxy process."""

from __future__ import annotations

import signal
import time
from typing import Any, Dict, List

import hiredis
import pytest

from helpers import (
    RawClient,
    encode,
    free_port,
    http_request,
    metric_value,
    sink,
    source_entry,
    wait_for,
)
from shotover_gevent.config import parse_topology


def tee_topology(main_port: int, tee_port: int, behavior: Any = "Ignore",
                 tee_chain_prefix: List[Any] = (), **tee_options: Any) -> Dict[str, Any]:
    tee = {"behavior": behavior, "chain": list(tee_chain_prefix) + [sink(tee_port)]}
    tee.update(tee_options)
    return {"sources": [source_entry("redis", free_port(), [{"Tee": tee}, sink(main_port)])]}


def test_ignore_mirrors_to_both_servers(proxy_factory, redis_server, redis_factory):
    mirror = redis_factory()
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port, buffer_size=100))
    client = proxy.client()
    for i in range(50):
        assert client.set(f"k{i}", i) is True
    pipe = client.pipeline(transaction=False)
    for i in range(50, 100):
        pipe.set(f"k{i}", i)
    assert pipe.execute() == [True] * 50
    with redis_server.client() as main:
        assert main.dbsize() == 100 and main.get("k99") == b"99"
    with mirror.client() as copy:
        wait_for(lambda: copy.dbsize() == 100, 10, "the mirror to hold every key")
        assert copy.mget([f"k{i}" for i in range(100)]) == [str(i).encode() for i in range(100)]


def test_ignore_returns_the_regular_chains_replies(proxy_factory, redis_server, redis_factory):
    mirror = redis_factory()
    with mirror.client() as copy:
        copy.set("only-on-mirror", "x")
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port))
    assert proxy.client().get("only-on-mirror") is None


def _seed(main, mirror, key: str, main_value: str, mirror_value: str) -> None:
    with main.client() as a, mirror.client() as b:
        a.set(key, main_value)
        b.set(key, mirror_value)


def test_fail_on_mismatch(proxy_factory, redis_server, redis_factory):
    mirror = redis_factory()
    _seed(redis_server, mirror, "differs", "main", "mirror")
    _seed(redis_server, mirror, "same", "v", "v")
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port, "FailOnMismatch"))
    with RawClient(proxy.port) as raw:
        reply = raw.call("GET", "differs")
        assert isinstance(reply, hiredis.ReplyError)
        assert "did not match" in str(reply) and "fail on mismatch" in str(reply)
        assert raw.call("GET", "same") == b"v"
        assert raw.call("SET", "new", "1") == b"OK"
        assert raw.call("GET", "new") == b"1"
    with mirror.client() as copy:
        assert copy.get("new") == b"1"


def test_log_warning_on_mismatch(proxy_factory, redis_server, redis_factory):
    mirror = redis_factory()
    _seed(redis_server, mirror, "differs", "main", "mirror")
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port, "LogWarningOnMismatch"))
    client = proxy.client()
    assert client.get("differs") == b"main"
    proxy.wait_log("Tee mismatch")
    log = proxy.log_text()
    assert "mirror" in log and "WARN" in log.upper()


def test_subchain_on_mismatch(proxy_factory, redis_server, redis_factory):
    mirror, mismatches = redis_factory(), redis_factory()
    _seed(redis_server, mirror, "counter", "5", "10")
    behavior = {"SubchainOnMismatch": [sink(mismatches.port)]}
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port, behavior))
    client = proxy.client()
    assert client.incr("counter") == 6  # the mirror said 11: a mismatch
    assert client.set("agree", "1") is True  # both say OK: no mismatch
    with mismatches.client() as third:
        assert third.get("counter") == b"1"  # the mismatched INCR went down the sub-chain
        assert third.get("agree") is None


def test_switch_port_chooses_whose_replies_win(proxy_factory, redis_server, redis_factory):
    mirror = redis_factory()
    _seed(redis_server, mirror, "who", "regular", "tee")
    switch = free_port()
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port, switch_port=switch))
    url = f"http://127.0.0.1:{switch}/transform/tee/result-source"
    client = proxy.client()
    assert http_request(url) == (200, "regular-chain")
    assert client.get("who") == b"regular"
    assert http_request(url, "PUT", b"tee-chain") == (200, "")
    assert http_request(url) == (200, "tee-chain")
    assert client.get("who") == b"tee"
    assert proxy.client().get("who") == b"tee"  # shared by every connection
    status, body = http_request(url, "PUT", b"neither")
    assert status == 400 and "tee-chain" in body
    assert http_request(f"http://127.0.0.1:{switch}/elsewhere")[0] == 404
    assert http_request(url, "PUT", b"regular-chain")[0] == 200
    assert client.get("who") == b"regular"


def test_log_warning_with_the_tee_chain_as_result_source(proxy_factory, redis_server,
                                                              redis_factory):
    mirror = redis_factory()
    _seed(redis_server, mirror, "who", "regular", "tee")
    switch = free_port()
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port, "LogWarningOnMismatch",
                                       switch_port=switch))
    url = f"http://127.0.0.1:{switch}/transform/tee/result-source"
    assert http_request(url, "PUT", b"tee-chain")[0] == 200
    assert proxy.client().get("who") == b"tee"
    proxy.wait_log("result-source (tee-chain)")


def test_ignore_drops_beyond_buffer_size(proxy_factory, redis_server, redis_factory):
    mirror = redis_factory()
    topology = tee_topology(redis_server.port, mirror.port, buffer_size=1)
    proxy = proxy_factory(topology, observability=True)
    client = proxy.client()
    with mirror.client() as copy:
        # With room for one batch, a SET can itself be dropped while the mirror is still busy
        # with the client's connection set-up commands: repeat it until the mirror has it.
        wait_for(lambda: client.set("before", "1") and copy.get("before") == b"1", 10,
                 "the mirror to be in use")
    mirror.process.send_signal(signal.SIGSTOP)  # the mirror stops answering: its queue fills
    try:
        for i in range(40):
            assert client.set(f"d{i}", i) is True  # the regular chain is not held up
        with redis_server.client() as main:
            assert main.dbsize() == 41

        def dropped() -> float:
            status, text = http_request(proxy.metrics_url)
            return metric_value(text, "shotover_tee_dropped_messages_count", chain="Tee") or 0

        wait_for(lambda: dropped() >= 38, 10, "dropped requests to be counted")
    finally:
        mirror.process.send_signal(signal.SIGCONT)


# ---- Coalesce ------------------------------------------------------------------------------------

def coalesce_topology(redis_port: int, **settings: Any) -> Dict[str, Any]:
    return {"sources": [source_entry("redis", free_port(),
                                     [{"Coalesce": settings}, sink(redis_port)])]}


def test_coalesce_count_threshold_on_a_pipeline(proxy_factory, redis_server):
    proxy = proxy_factory(coalesce_topology(redis_server.port,
                                            flush_when_buffered_message_count=20,
                                            flush_when_millis_since_last_flush=600))
    with RawClient(proxy.port) as raw:
        started = time.monotonic()
        raw.send(b"".join(encode("SET", f"c{i}", i) for i in range(20)))
        assert raw.read_replies(20) == [b"OK"] * 20
        assert time.monotonic() - started < 0.5  # the count was reached: no waiting
    with redis_server.client() as direct:
        assert direct.mget([f"c{i}" for i in range(20)]) == [str(i).encode() for i in range(20)]


def test_coalesce_holds_a_short_batch_until_the_time_threshold(proxy_factory, redis_server):
    proxy = proxy_factory(coalesce_topology(redis_server.port,
                                            flush_when_buffered_message_count=1000,
                                            flush_when_millis_since_last_flush=400))
    with RawClient(proxy.port) as raw:
        raw.call("SET", "warm", "up")  # flushes at the latest 400 ms after the connection
        started = time.monotonic()
        assert raw.call("SET", "held", "1") == b"OK"
        waited = time.monotonic() - started
    assert 0.3 <= waited < 3, waited


def test_coalesce_with_count_only_does_not_hang_a_lone_client(proxy_factory, redis_server):
    proxy = proxy_factory(coalesce_topology(redis_server.port,
                                            flush_when_buffered_message_count=50))
    client = proxy.client()
    assert client.set("lone", "1") is True
    assert client.get("lone") == b"1"
    proxy.wait_log("cannot reach flush_when_buffered_message_count=50")


def test_coalesce_in_a_mirror_buffers_across_requests(proxy_factory, redis_server,
                                                      redis_factory):
    mirror = redis_factory()
    coalesce = [{"Coalesce": {"flush_when_buffered_message_count": 3}}]
    proxy = proxy_factory(tee_topology(redis_server.port, mirror.port,
                                       tee_chain_prefix=coalesce))
    client = RawClient(proxy.port)  # no connection handshake: only these requests count
    with mirror.client() as copy, client:
        assert client.call("SET", "m1", "1") == b"OK"
        assert client.call("SET", "m2", "2") == b"OK"
        with redis_server.client() as main:
            assert main.mget("m1", "m2") == [b"1", b"2"]
        _stays_absent(copy, "m1", "m2")  # held: fewer than 3 requests buffered
        assert client.call("SET", "m3", "3") == b"OK"
        wait_for(lambda: copy.mget("m1", "m2", "m3") == [b"1", b"2", b"3"], 10,
                 "the mirror to receive the coalesced batch")
        assert client.call("SET", "m4", "4") == b"OK"
        _stays_absent(copy, "m4")


def _stays_absent(client, *keys: str, seconds: float = 0.3) -> None:
    """None of `keys` shows up on `client`'s server during `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert client.exists(*keys) == 0
        time.sleep(0.03)


# ---- configuration -------------------------------------------------------------------------------

def _problems(chain: List[Any]) -> List[str]:
    topology, problems = parse_topology({"sources": [source_entry("r", 6390, chain)]})
    return problems.items


def test_config_errors():
    problems = _problems([{"Coalesce": {}}, {"NullSink": None}])
    assert any("flush_when_buffered_message_count" in p and
               "flush_when_millis_since_last_flush" in p for p in problems), problems
    problems = _problems([{"Tee": {"behavior": "Sometimes", "chain": ["NullSink"]}}, "NullSink"])
    assert any("behavior" in p and "Sometimes" in p for p in problems), problems
    problems = _problems([{"Tee": {"chain": [{"DebugPrinter": None}]}}, "NullSink"])
    assert any("Tee.chain" in p and "terminating" in p for p in problems), problems
    problems = _problems([{"Tee": {"behavior": {"SubchainOnMismatch": ["NullSink"]},
                                   "chain": ["NullSink"], "switch_port": 1234,
                                   "buffer_size": 3, "timeout_micros": 1000}}, "NullSink"])
    assert problems == []
    problems = _problems([{"RedisClusterPortsRewrite": {"new_port": 0}},
                          {"RedisSinkCluster": {"first_contact_points": ["nowhere"]}}])
    assert any("new_port" in p for p in problems) and \
        any("first_contact_points[0]" in p for p in problems), problems


@pytest.mark.parametrize("name", ["cluster-hiding", "cluster-ports-rewrite", "dr-mirroring"])
def test_example_topologies_load(name):
    import subprocess
    import sys

    from helpers import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "shotover_gevent", "check", "-c",
                             "conf/config.yaml", "-t", f"conf/examples/{name}.yaml"],
                            cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- RedisClusterPortsRewrite on canned replies --------------------------------------------------

def test_ports_rewrite_reply_shapes():
    from shotover_gevent.transforms.cluster_ports_rewrite import rewrite, rewrite_node_line

    line = b"abc 10.0.0.1:7000@17000,host-a myself,master - 0 0 1 connected 0-5460"
    assert rewrite_node_line(line, 6380) == (b"abc 10.0.0.1:6380@17000,host-a myself,master - 0 0 "
                                             b"1 connected 0-5460")
    assert rewrite_node_line(b"def :0@0 master,noaddr - 0 0 1 disconnected", 1234) == \
        b"def :1234@0 master,noaddr - 0 0 1 disconnected"
    text = b"abc 10.0.0.1:7000@17000 master - 0 0 1 connected 0-5460\n"
    verbatim = b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
    out = rewrite("nodes", verbatim, 6380)
    assert out == b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text.replace(b":7000@", b":6380@"))
    slots = (b"*1\r\n*4\r\n:0\r\n:16383\r\n*3\r\n$8\r\n10.0.0.1\r\n:7000\r\n$3\r\nid1\r\n"
             b"*4\r\n$8\r\n10.0.0.2\r\n:7001\r\n$3\r\nid2\r\n%1\r\n$8\r\nhostname\r\n$1\r\nh\r\n")
    assert hiredis_parse(rewrite("slots", slots, 6380)) == [
        [0, 16383, [b"10.0.0.1", 6380, b"id1"], [b"10.0.0.2", 6380, b"id2", {b"hostname": b"h"}]]]
    shards = (b"*1\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n"
              b"%3\r\n$2\r\nid\r\n$3\r\nid1\r\n$4\r\nport\r\n:7000\r\n$2\r\nip\r\n$8\r\n10.0.0.1\r\n")
    parsed = hiredis_parse(rewrite("shards", shards, 6380))
    assert parsed[0][b"nodes"][0][b"port"] == 6380
    assert rewrite("slots", b"*0\r\n", 6380) is None  # nothing to change: passed on as it was


def hiredis_parse(raw: bytes):
    reader = hiredis.Reader()
    reader.feed(raw)
    return reader.gets()


def test_cluster_aliases_load():
    chain = [{"ValkeyClusterPortsRewrite": {"new_port": 6380}},
             {"ValkeySinkCluster": {"first_contact_points": ["127.0.0.1:7000"],
                                    "direct_destination": "127.0.0.1:7000",
                                    "connection_count": 2}}]
    assert _problems(chain) == []
    chain = [{"RedisSinkCluster": {"first_contact_points": ["127.0.0.1:7000"],
                                   "connection_count": 0, "direct_connection": "x"}}]
    problems = _problems(chain)
    assert any("connection_count" in p for p in problems)
    assert any("direct_connection" in p for p in problems)
