"""RedisSinkCluster and RedisClusterPortsRewrite against a real 6-node Redis Cluster, through a
real proxy process: routing, splitting, fan-out, resharding, failover, handling mode, upgrade."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import hiredis
import pytest
import redis
import redis.cluster

from cluster_support import Cluster, cluster_sink, start_cluster
from helpers import (HOST, ProxyProcess, RawClient, encode, free_port, redis_client,
                     source_entry, stop_proxies, wait_for)
from shotover_gevent.cluster import slots
from shotover_gevent.cluster.slotmap import SlotMap
from shotover_gevent.cluster.slots import key_slot, routing_table
from shotover_gevent.protocol.resp import ReplyFramer, encode_command


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    built = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield built
    built.stop()


@pytest.fixture
def clean_cluster(cluster: Cluster) -> Cluster:
    """The module's cluster, healthy (a node a test killed is back) and without data."""
    for node in cluster.nodes:
        if not node.running:
            node.start()
    cluster.wait_healthy()
    cluster.flushall()
    return cluster


@pytest.fixture
def make_proxy(tmp_path, clean_cluster):
    """make_proxy(chain=None, **sink_options) -> a started proxy whose chain ends in a
    RedisSinkCluster for the cluster; stopped at the end of the test (it must exit 0)."""
    proxies: List[ProxyProcess] = []
    counter = itertools.count()

    def make(chain_prefix=(), port: Optional[int] = None, **sink_options) -> ProxyProcess:
        port = port or free_port()
        chain = list(chain_prefix) + [cluster_sink(clean_cluster, **sink_options)]
        topology = {"sources": [source_entry("redis", port, chain)]}
        proxy = ProxyProcess(tmp_path / f"proxy-{next(counter)}", topology)
        proxies.append(proxy)
        return proxy.start()

    yield make
    stop_proxies(proxies)


def error_text(reply: Any) -> str:
    assert isinstance(reply, hiredis.ReplyError), f"expected an error, got {reply!r}"
    return str(reply)


def keys_per_master(cluster: Cluster, keys: List[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for key in keys:
        master = cluster.master_for_slot(key_slot(key.encode())).address
        counts[master] = counts.get(master, 0) + 1
    return counts


# ---- hiding mode: a plain client sees one server -------------------------------------------------

def test_set_get_across_many_keys(make_proxy, clean_cluster):
    proxy = make_proxy()
    client = proxy.client()
    keys = [f"key:{i}" for i in range(300)]
    for index, key in enumerate(keys):
        assert client.set(key, f"value-{index}") is True
    for index, key in enumerate(keys):
        assert client.get(key) == f"value-{index}".encode()
    spread = keys_per_master(clean_cluster, keys)
    assert len(spread) == 3 and min(spread.values()) > 50, spread
    direct = clean_cluster.client()
    try:
        assert direct.get("key:7") == b"value-7"
    finally:
        direct.close()
    assert client.incr("counter") == 1 and client.incrby("counter", 9) == 10
    assert client.hset("hash", mapping={"a": "1", "b": "2"}) == 2
    assert client.hgetall("hash") == {b"a": b"1", b"b": b"2"}
    assert client.rpush("list", "x", "y", "z") == 3 and client.lrange("list", 0, -1) == [
        b"x", b"y", b"z"]
    assert client.ping() is True and client.echo("hi") == b"hi"


def test_resp2_client(make_proxy):
    proxy = make_proxy()
    client = redis_client(proxy.port, protocol=2)
    assert client.set("r2", "v") is True
    assert client.mget("r2", "missing-1", "missing-2") == [b"v", None, None]
    assert client.client_getname() is None
    assert client.client_setname("tester") is True
    assert client.client_getname() in ("tester", b"tester")
    with RawClient(proxy.port) as raw:
        assert raw.call("HELLO", "3")[b"proto"] == 3
        assert raw.call("MGET", "r2", "nope-a", "nope-b") == [b"v", None, None]
        hello = raw.call("HELLO", "2")
        assert hello[hello.index(b"proto") + 1] == 2
        assert "NOPROTO" in error_text(raw.call("HELLO", "4"))


def test_hash_tags_keep_keys_together(make_proxy, clean_cluster):
    client = make_proxy().client()
    keys = [f"{{user:42}}.field{i}" for i in range(20)]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert client.mset({k: str(i) for i, k in enumerate(keys)}) is True
    assert client.rename(keys[0], "{user:42}.renamed") is True
    assert client.get("{user:42}.renamed") == b"0"
    assert client.sadd("{tag}a", "1", "2") == 2 and client.sadd("{tag}b", "2", "3") == 2
    assert client.sunionstore("{tag}dest", ["{tag}a", "{tag}b"]) == 3
    assert client.smembers("{tag}dest") == {b"1", b"2", b"3"}
    # Keys of different slots in one command that cannot be split: the node says CROSSSLOT.
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        client.rename("plain-a-key", "another-plain-key-in-another-slot")
    owner = clean_cluster.master_for_slot(key_slot(b"user:42"))
    with owner.client() as direct:
        assert direct.get("{user:42}.field5") == b"5"


def test_multi_key_commands_across_slots(make_proxy):
    client = make_proxy().client()
    mapping = {f"mk:{i}": f"v{i}" for i in range(60)}
    assert len({key_slot(k.encode()) for k in mapping}) > 50
    assert client.mset(mapping) is True
    wanted = []
    for i in range(60):
        wanted.append(f"mk:{i}")
        if i % 7 == 0:
            wanted.append(f"absent:{i}")
    expected = [mapping.get(k, None) for k in wanted]
    assert client.mget(wanted) == [None if v is None else v.encode() for v in expected]
    assert client.exists(*wanted) == 60
    assert client.touch(*[f"mk:{i}" for i in range(10)], "absent:x") == 10
    assert client.delete(*[f"mk:{i}" for i in range(0, 60, 2)], "absent:y") == 30
    assert client.unlink(*[f"mk:{i}" for i in range(60)]) == 30
    assert client.exists(*mapping) == 0
    # Within one slot the command goes whole.
    assert client.mset({"{s}1": "a", "{s}2": "b"}) is True
    assert client.mget("{s}1", "{s}2", "{s}3") == [b"a", b"b", None]


def test_fan_out_commands(make_proxy, clean_cluster):
    client = make_proxy().client()
    keys = [f"fan:{i}" for i in range(90)]
    client.mset({k: "1" for k in keys})
    assert client.dbsize() == 90 == clean_cluster.dbsize()
    assert sorted(client.keys("fan:*")) == sorted(k.encode() for k in keys)
    assert client.keys("nothing-matches-*") == []
    assert client.randomkey() in {k.encode() for k in keys}
    sha = client.script_load("return redis.call('GET', KEYS[1])")
    assert client.script_exists(sha, "0" * 40) == [True, False]
    # The script exists on every master, so EVALSHA works for keys of every slot.
    for key in keys[:30]:
        assert client.evalsha(sha, 1, key) == b"1"
    assert client.eval("return 7", 0) == 7
    assert client.flushall() is True
    assert client.dbsize() == 0 == clean_cluster.dbsize()
    assert client.script_flush() is True
    assert client.script_exists(sha) == [False]


def test_pipeline_of_a_thousand_commands(make_proxy, clean_cluster):
    client = make_proxy().client()
    pipe = client.pipeline(transaction=False)
    for i in range(1000):
        if i % 3 == 0:
            pipe.set(f"pipe:{i}", i)
        elif i % 3 == 1:
            pipe.incr(f"pipe:{i - 1}")
        else:
            pipe.get(f"pipe:{i - 2}")
    replies = pipe.execute()
    assert len(replies) == 1000
    for i, reply in enumerate(replies):
        base = i - i % 3
        if i % 3 == 0:
            assert reply is True
        elif i % 3 == 1:
            assert reply == base + 1
        else:
            assert reply == str(base + 1).encode()
    assert clean_cluster.dbsize() == 334


def test_key_slots_are_the_clusters(clean_cluster, monkeypatch):
    """The proxy routes by its own key-to-slot function: it must agree with the nodes'."""
    keys = [b"", b"a", b"key:1", b"{user:42}.name", b"x{user:42}", b"{}", b"{}abc", b"{{a}}",
            b"a{b}c{d}", b"{a", b"a}b{", bytes(range(256)), b"\xff" * 3000, "ключ".encode()]
    keys += [f"key:{i}".encode() for i in range(200)]
    node = clean_cluster.masters()[0]
    with node.client() as direct:
        expected = [direct.execute_command("CLUSTER", "KEYSLOT", key) for key in keys]
    assert [key_slot(key) for key in keys] == expected
    # Taken from requests as they were framed: in C where it is built, and in Python.
    framed = [(encode_command([b"GET", key, b"more"][: 2 + n % 2]), b"GET")
              for n, key in enumerate(keys)]
    compiled = slots.request_key_slots(framed)
    monkeypatch.setattr(slots, "_key_slots", None)
    assert slots.request_key_slots(framed) == expected
    assert compiled == expected
    assert slots.request_key_slots([(b"*1\r\n$4\r\nPING\r\n", b"PING"), (b"PING\r\n", None),
                                    (b"*2\r\n$3\r\nGET\r\n:1\r\n", b"GET")]) == [-1, -1, -1]


def node_frames(port: int, payload: bytes, count: int) -> List[bytes]:
    """The `count` reply frames a node sends for `payload`, each as its bytes."""
    framer = ReplyFramer()
    frames: List[bytes] = []
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(payload)
        while len(frames) < count:
            data = sock.recv(65536)
            assert data, "the node closed the connection"
            framer.feed(data)
            frames += framer.take(count - len(frames))
    return frames


@pytest.mark.parametrize("implementation", ["c", "py"])
def test_a_batch_cut_per_node_and_its_replies_put_back(clean_cluster, implementation):
    """route_batch cuts a batch per node as the cluster's slot map says (in C where it is
    built, and in Python), and merge_replies puts what each node answers back in request
    order, or says that one of the replies sends its request again."""
    if implementation == "c":
        if slots._route_batch is None:
            pytest.skip("the C part (shotover_gevent/protocol/_scan.c) is not built")
        route, merge = slots._route_batch, slots._merge_replies
    else:
        route, merge = slots.route_requests, slots.merge_frames
    node = clean_cluster.masters()[0]
    with node.client() as direct:
        slot_map = SlotMap.from_cluster_slots(direct.execute_command("CLUSTER", "SLOTS"),
                                              (HOST, node.port))
    table, nodes = slot_map.routing()
    keys = [b"k:%d" % i for i in range(12)] + [b"{k:3}.tagged", b"x" * 300]
    with clean_cluster.client() as client:
        for i, key in enumerate(keys[::2]):
            client.set(key, b"v%d" % i)
    # Each request answers the same whenever it runs: GETs, and SETs of what a key holds.
    framed = [(encode("GET", key) if i % 3 else encode("SET", key, "v%d" % (i // 2)),
               b"GET" if i % 3 else b"SET") for i, key in enumerate(keys)]
    groups, payloads, order = route(framed, table, 65536)
    assert len(groups) == len(payloads) == 3 and len(order) == len(framed)
    owners = [nodes[groups[group]] for group in order]
    assert owners == [slot_map.owners[key_slot(key)] for key in keys]
    assert [b"".join(raw for (raw, _), group in zip(framed, order) if group == index)
            for index in range(3)] == payloads
    results = [node_frames(nodes[node][1], payload, order.count(index))
               for index, (node, payload) in enumerate(zip(groups, payloads))]
    assert merge(order, results) == b"".join(
        node_frames(nodes[groups[group]][1], raw, 1)[0] for (raw, _), group in
        zip(framed, order))
    same_node = [pair for pair, group in zip(framed, order) if group == order[0]]
    assert route(same_node, table, 65536) == groups[0]
    # A request with no key, one over the length limit, or a slot no node serves: None.
    assert route(framed + [(encode("PING"), b"PING")], table, 65536) is None
    assert route(framed, table, 100) is None
    moved = slot_map.moved(key_slot(keys[0]), ("127.0.0.1", 1)).owners
    assert route(framed, routing_table([None if owner is None or owner[1] == 1 else 0
                                        for owner in moved]), 65536) is None
    # A redirection, or too few frames, among the replies: None.
    redirected = [list(frames) for frames in results]
    redirected[1][-1] = b"-MOVED 3999 127.0.0.1:6381\r\n"
    assert merge(order, redirected) is None
    assert merge(order, [results[0], results[1], results[2][:-1]]) is None


@pytest.mark.parametrize("connection_count", [1, 3])
@pytest.mark.parametrize("protocol", [2, 3])
def test_clients_pipelining_across_nodes_each_get_their_own_replies(make_proxy, clean_cluster,
                                                                    protocol, connection_count):
    """Many clients' batches in flight at once on the nodes' shared connections, each batch
    cut across the three masters and put back together (from the event loop's callbacks for
    RESP2 clients): every reply is the client's own, in its order. With several connections
    per node, the batches of one turn of the event loop share one of them whatever client
    they are from."""
    proxy = make_proxy(connection_count=connection_count)
    failures: List[str] = []

    def traffic(n: int) -> None:
        try:
            with redis_client(proxy.port, protocol=protocol) as client:
                for round_ in range(40):
                    pipe = client.pipeline(transaction=False)
                    for i in range(5):
                        pipe.set(f"lane:{n}:{i}", f"{n}.{round_}.{i}")
                        pipe.get(f"lane:{n}:{(i + 1) % 5}")
                        pipe.incr(f"lane:{n}:count:{i}")
                    replies = pipe.execute()
                    for i in range(5):
                        assert replies[3 * i] is True
                        previous = round_ - 1 if i < 4 else round_
                        expected = None if previous < 0 else f"{n}.{previous}.{(i + 1) % 5}"
                        assert replies[3 * i + 1] == (expected and expected.encode()), \
                            (n, round_, i, replies)
                        assert replies[3 * i + 2] == round_ + 1
                    assert client.get(f"lane:{n}:{round_ % 5}") == \
                        f"{n}.{round_}.{round_ % 5}".encode()
        except Exception as error:  # reported below, in the test's thread
            failures.append(repr(error))

    threads = [threading.Thread(target=traffic, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert len(keys_per_master(clean_cluster, [f"lane:{n}:{i}" for n in range(12)
                                               for i in range(5)])) == 3


def unread_bytes(port: int, peer: str) -> int:
    """What the socket of a server listening on `port` has received from `peer` ("host:port")
    and the server has not read (Recv-Q, from /proc/net/tcp)."""
    host, peer_port = peer.rsplit(":", 1)
    local = f"0100007F:{port:04X}"
    remote = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:" \
             f"{int(peer_port):04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[4].split(":")[1], 16)
    return 0


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_read_is_not_sent_again_after_a_write_pipelined_behind_it(make_proxy, clean_cluster,
                                                                    protocol):
    """GET k, SET k new in one pipeline; the node runs both, then the proxy's connection to it
    breaks before the replies come. Sending the GET again would answer it with the SET's value,
    which no client of Redis can see: both get an error instead."""
    proxy = make_proxy()
    key = b"overtaken"
    node = clean_cluster.master_for_slot(key_slot(key))
    with RawClient(proxy.port) as client, node.client() as admin:
        client.call("HELLO", str(protocol))
        assert client.call("SET", key, "old") == b"OK"
        assert client.call("GET", key) == b"old"  # from here served by the callbacks (RESP2)
        mine = admin.client_id()
        links = [entry["addr"] for entry in admin.client_list() if int(entry["id"]) != mine]
        assert links
        killer = RawClient(node.port)
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            client.send(encode("GET", key) + encode("SET", key, "new"))
            wait_for(lambda: any(unread_bytes(node.port, link) for link in links), 10,
                     "the pipeline to reach the node")
            killer.send(b"".join(encode("CLIENT", "KILL", "ADDR", link) for link in links))
            killer_address = "%s:%d" % killer.sock.getsockname()
            wait_for(lambda: unread_bytes(node.port, killer_address), 10,
                     "the CLIENT KILL to reach the node")
        finally:
            os.kill(node.process.pid, signal.SIGCONT)
        got = client.read_replies(2, timeout=30)
        killer.close()
    assert got[0] == b"old" or "not sent again" in error_text(got[0]), got
    assert got[1] == b"OK" or "may or may not have run" in error_text(got[1]), got


def test_a_redirection_inside_a_pipeline_cut_across_nodes(make_proxy, clean_cluster):
    """A pipeline served from the event loop's callbacks, cut across the three masters, with a
    key whose slot moved since the proxy read the slot map: that key's requests follow the
    MOVED, and every reply comes back in its place."""
    proxy = make_proxy()
    moving = b"{moving}:key"
    slot = key_slot(moving)
    source = clean_cluster.master_for_slot(slot)
    target = next(m for m in clean_cluster.masters() if m.address != source.address)
    keys: Dict[str, bytes] = {}  # one key per master
    for i in range(1000):
        key = f"spread:{i}".encode()
        keys.setdefault(clean_cluster.master_for_slot(key_slot(key)).address, key)
        if len(keys) == 3:
            break
    with RawClient(proxy.port) as client:
        assert client.call("SET", moving, "before") == b"OK"
        for key in keys.values():  # from the second batch on, served by the callbacks
            assert client.call("SET", key, "old") == b"OK"
        clean_cluster.migrate_slot(slot, target)
        requests: List[tuple] = []
        expected: List[Any] = []
        for key in keys.values():
            requests += [("GET", key), ("SET", key, "new"), ("GET", moving)]
            expected += [b"old", b"OK", b"before"]
        requests += [("SET", moving, "after"), ("GET", moving)]
        expected += [b"OK", b"after"]
        client.send(b"".join(encode(*request) for request in requests))
        assert client.read_replies(len(requests), timeout=30) == expected
        assert client.call("GET", moving) == b"after"
    with target.client() as direct:
        assert direct.get(moving) == b"after"


def test_large_values_beside_small_ones(make_proxy, clean_cluster):
    """A request or reply over 64 KiB goes through the pool, a connection per batch; the
    small ones of other clients go on at the same time."""
    proxy = make_proxy()
    big = b"v" * 300_000
    small = redis_client(proxy.port, protocol=2)
    large = redis_client(proxy.port, protocol=2)
    for round_ in range(5):
        pipe = large.pipeline(transaction=False)
        pipe.set(f"big:{round_}", big + str(round_).encode())
        pipe.set(f"small:{round_}", round_)
        pipe.get(f"big:{round_}")
        assert pipe.execute() == [True, True, big + str(round_).encode()]
        assert small.set(f"other:{round_}", round_) is True
        assert small.get(f"big:{round_}") == big + str(round_).encode()
        assert small.get(f"small:{round_}") == str(round_).encode()


def test_upstream_connections_are_pooled_across_clients(make_proxy, clean_cluster):
    before: Dict[str, set] = {}
    for master in clean_cluster.masters():
        with master.client() as direct:
            before[master.address] = {int(c["id"]) for c in direct.client_list()}
    proxy = make_proxy(connection_count=2)
    threads = []
    failures: List[str] = []

    def traffic(n: int) -> None:
        try:
            with redis_client(proxy.port) as client:
                for round_ in range(20):
                    pipe = client.pipeline(transaction=False)
                    for i in range(30):
                        pipe.set(f"pool:{n}:{i}", round_)
                    assert pipe.execute() == [True] * 30
        except Exception as error:  # reported below, in the test's thread
            failures.append(repr(error))

    for n in range(8):
        threads.append(threading.Thread(target=traffic, args=(n,)))
        threads[-1].start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert clean_cluster.dbsize() == 8 * 30
    for master in clean_cluster.masters():
        with master.client() as direct:
            me = direct.client_id()
            normal = [c for c in direct.client_list() if c["flags"] == "N" and
                      int(c["id"]) != me and int(c["id"]) not in before[master.address]]
        assert 1 <= len(normal) <= 2, normal


def test_unsupported_commands_are_named(make_proxy):
    proxy = make_proxy()
    with RawClient(proxy.port) as raw:
        for command in (["MULTI"], ["EXEC"], ["WATCH", "k"], ["SELECT", "1"], ["SCAN", "0"],
                        ["SUBSCRIBE", "channel"], ["MOVE", "k", "1"], ["SWAPDB", "0", "1"],
                        ["MONITOR"], ["CLIENT", "KILL", "ID", "1"],
                        ["BLPOP", "list-one", "list-two", "1"]):
            text = error_text(raw.call(*command))
            assert text.startswith("ERR") and command[0] in text, text
        # The connection is still fine afterwards.
        assert raw.call("SELECT", "0") == b"OK"
        assert raw.call("SET", "still", "ok") == b"OK"
        assert raw.call("GET", "still") == b"ok"


def test_blocking_commands_do_not_hold_shared_connections(make_proxy, clean_cluster):
    proxy = make_proxy()
    owner = clean_cluster.master_for_slot(key_slot(b"queue:a"))
    result: Dict[str, Any] = {}

    def blocked() -> None:
        with redis_client(proxy.port) as client:
            result["value"] = client.blpop(["queue:a", "{queue:a}b"], timeout=10)

    waiter = threading.Thread(target=blocked)
    waiter.start()
    try:
        other = proxy.client()
        with owner.client() as direct:
            wait_for(lambda: int(direct.info("clients")["blocked_clients"]) >= 1, 10,
                     "BLPOP to block on its node")
        # The pooled connection to that node still serves everybody else.
        started = time.monotonic()
        for i in range(50):
            assert other.set(f"{{queue:a}}free:{i}", i) is True
        assert time.monotonic() - started < 5
        assert other.rpush("queue:a", "job") == 1
        waiter.join(10)
        assert result["value"] == (b"queue:a", b"job")
    finally:
        waiter.join(15)


def test_auth_uses_connections_with_the_clients_credentials(make_proxy, clean_cluster):
    for node in clean_cluster.nodes:
        with node.client() as direct:
            direct.execute_command("ACL", "SETUSER", "alice", "on", ">secret", "~*", "+@all")
    try:
        proxy = make_proxy()
        with RawClient(proxy.port) as raw:
            assert raw.call("ACL", "WHOAMI") == b"default"
            text = error_text(raw.call("AUTH", "alice", "wrong"))
            assert text.startswith("WRONGPASS"), text
            assert raw.call("ACL", "WHOAMI") == b"default"  # a failed AUTH changes nothing
            assert raw.call("AUTH", "alice", "secret") == b"OK"
            assert raw.call("ACL", "WHOAMI") == b"alice"
            assert raw.call("SET", "authed", "yes") == b"OK"
            for i in range(20):
                assert raw.call("SET", f"authed:{i}", i) == b"OK"
            assert raw.call("HELLO", "3", "AUTH", "alice", "secret")[b"proto"] == 3
            assert raw.call("ACL", "WHOAMI") == b"alice"
        with RawClient(proxy.port) as other:
            assert other.call("ACL", "WHOAMI") == b"default"
            assert other.call("GET", "authed") == b"yes"
    finally:
        for node in clean_cluster.nodes:
            with node.client() as direct:
                direct.execute_command("ACL", "DELUSER", "alice")


# ---- topology changes ----------------------------------------------------------------------------

class Writer(threading.Thread):
    """Writes keys through the proxy until stopped; remembers what was acknowledged."""

    def __init__(self, port: int, prefix: str, keys_per_round: int = 1,
                 protocol: int = 3) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.protocol = protocol
        self.prefix = prefix
        self.acknowledged: List[str] = []
        self.errors: List[tuple] = []
        self.stop_event = threading.Event()
        self.keys_per_round = keys_per_round

    def run(self) -> None:
        client = redis_client(self.port, socket_timeout=30, protocol=self.protocol)
        i = 0
        deadline = time.monotonic() + 120
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            key = f"{self.prefix}{i}"
            try:
                if client.set(key, i) is True:
                    self.acknowledged.append(key)
            except redis.RedisError as error:
                self.errors.append((time.monotonic(), key, repr(error)))
                if isinstance(error, redis.ConnectionError):
                    client = redis_client(self.port, socket_timeout=30, protocol=self.protocol)
            i += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert not self.is_alive()


@pytest.mark.parametrize("protocol", [2, 3])
def test_moved_and_ask_during_resharding(make_proxy, clean_cluster, protocol):
    proxy = make_proxy()
    client = proxy.client()
    prefix = "{migrating}:"
    slot = key_slot(b"migrating")
    source = clean_cluster.master_for_slot(slot)
    target = next(m for m in clean_cluster.masters() if m.address != source.address)
    for i in range(300):
        client.set(f"{prefix}seed{i}", i)
    writer = Writer(proxy.port, prefix, protocol=protocol)
    writer.start()
    try:
        wait_for(lambda: len(writer.acknowledged) > 50, 10, "writes before the migration")
        seen = len(writer.acknowledged)

        def let_writes_interleave() -> None:
            wait_for(lambda: len(writer.acknowledged) > let_writes_interleave.count + 3, 10,
                     "writes during the migration")
            let_writes_interleave.count = len(writer.acknowledged)

        let_writes_interleave.count = seen
        moved = clean_cluster.migrate_slot(slot, target, batch=40,
                                           between_batches=let_writes_interleave)
        assert moved >= 300
        after = len(writer.acknowledged)
        wait_for(lambda: len(writer.acknowledged) > after + 50, 10, "writes after the migration")
    finally:
        writer.stop()
    assert writer.errors == []
    assert clean_cluster.master_for_slot(slot).address == target.address
    reader = proxy.client()
    keys = writer.acknowledged
    values = reader.mget(keys)
    assert all(v is not None for v in values), "an acknowledged write is missing"
    with target.client() as direct:
        assert direct.exists(*keys[:100]) == 100
        assert direct.get(f"{prefix}seed7") == b"7"
    with source.client() as direct:
        assert direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


def test_handling_mode_with_direct_destination(make_proxy, clean_cluster):
    direct_node = clean_cluster.masters()[0]
    proxy = make_proxy(direct_destination=direct_node.address)
    client = proxy.client()
    keys = [f"handled:{i}" for i in range(100)]
    for key in keys:
        assert client.set(key, key) is True
    assert client.get("handled:42") == b"handled:42"
    # Keyless commands go to the direct destination only.
    assert client.execute_command("CLUSTER", "MYID").decode() == direct_node.node_id()
    with direct_node.client() as direct:
        assert client.dbsize() == direct.dbsize() < 100
    # Multi-key commands are not split: like redis-cli -c, the node refuses other slots.
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        client.mget("handled:1", "handled:2", "handled:3", "handled:4")
    assert client.mget("{h}1", "{h}2") == [None, None]


def test_ports_rewrite_with_a_cluster_aware_client(make_proxy, clean_cluster):
    port = free_port()
    proxy = make_proxy(chain_prefix=[{"RedisClusterPortsRewrite": {"new_port": port}}],
                       port=port)
    plain = proxy.client()
    slots = plain.execute_command("CLUSTER", "SLOTS")
    ports = {int(node[1]) for entry in slots for node in entry[2:]}
    assert ports == {port}
    assert sum(int(e[1]) - int(e[0]) + 1 for e in slots) == 16384
    nodes_text = plain.execute_command("CLUSTER", "NODES")
    nodes_text = nodes_text.decode() if isinstance(nodes_text, bytes) else nodes_text
    if isinstance(nodes_text, dict):  # redis-py may parse the text itself
        addresses = list(nodes_text)
    else:
        addresses = [line.split()[1] for line in nodes_text.splitlines() if line.strip()]
    bus_ports = {node.bus_port for node in clean_cluster.nodes}
    assert len(addresses) == 6
    for address in addresses:
        client_part, _, bus_part = address.partition("@")
        assert client_part.rsplit(":", 1)[1] == str(port), address
        if bus_part:
            assert int(bus_part.split(",")[0]) in bus_ports, address
    with RawClient(port) as raw:
        shards = raw.call("CLUSTER", "SHARDS")
        shard_ports = set()
        for shard in shards:
            shard = dict(zip(shard[::2], shard[1::2])) if isinstance(shard, list) else shard
            for node in shard[b"nodes"]:
                node = dict(zip(node[::2], node[1::2])) if isinstance(node, list) else node
                shard_ports.add(node[b"port"])
        assert shard_ports == {port}
        replicas = raw.call("CLUSTER", "REPLICAS", clean_cluster.masters()[0].node_id())
        assert replicas and all(f":{port}@" in line.decode() for line in replicas)
    aware = redis.cluster.RedisCluster(host=HOST, port=port, socket_timeout=10)
    try:
        assert {node.port for node in aware.get_nodes()} == {port}
        for i in range(100):
            assert aware.set(f"aware:{i}", i) is True
        assert [aware.get(f"aware:{i}") for i in range(100)] == [
            str(i).encode() for i in range(100)]
        assert aware.mget_nonatomic([f"aware:{i}" for i in range(20)]) == [
            str(i).encode() for i in range(20)]
    finally:
        aware.close()
    assert clean_cluster.dbsize() == 100


def test_upgrade_while_cluster_traffic_runs(make_proxy, clean_cluster):
    proxy = make_proxy()
    pid = proxy.pid
    writers = [Writer(proxy.port, f"upgrade:{n}:", protocol=2 + n % 2) for n in range(4)]
    for writer in writers:
        writer.start()
    try:
        wait_for(lambda: all(len(w.acknowledged) > 20 for w in writers), 15,
                 "traffic before the upgrade")
        result = subprocess.run([sys.executable, "-m", "shotover_gevent", "upgrade",
                                 "--control-socket", proxy.control_socket],
                                capture_output=True, text=True, timeout=120,
                                cwd=str(proxy.directory))
        assert result.returncode == 0, (result.stdout, result.stderr, proxy.log_text()[-4000:])
        marks = [len(w.acknowledged) for w in writers]
        wait_for(lambda: all(len(w.acknowledged) > m + 20 for w, m in zip(writers, marks)), 15,
                 "traffic after the upgrade")
    finally:
        for writer in writers:
            writer.stop()
    assert proxy.running and proxy.pid == pid
    assert "generation 1" in proxy.log_text()
    print("upgrade log tail:", proxy.log_text()[-1500:])
    for writer in writers:
        assert writer.errors == [], writer.errors[:5]
    keys = [key for writer in writers for key in writer.acknowledged]
    reader = clean_cluster.client()
    try:
        values = reader.mget_nonatomic(keys)
    finally:
        reader.close()
    missing = [k for k, v in zip(keys, values) if v is None]
    assert missing == []


def test_failover_after_a_master_dies(make_proxy, clean_cluster):
    proxy = make_proxy()
    # Through the callbacks and the pipelined connections (RESP2) and through the pool (RESP3).
    clients = [redis_client(proxy.port, socket_timeout=30, protocol=2 + n) for n in range(2)]
    client = clients[1]
    victim_key = "failover:victim"
    slot = key_slot(victim_key.encode())
    victim = clean_cluster.master_for_slot(slot)
    replica = clean_cluster.replicas_of(victim)[0]
    keys = [f"failover:{i}" for i in range(60)] + [victim_key]
    for key in keys:
        client.set(key, "before")
    clean_cluster.wait_replicated()
    victim.kill()
    killed_at = time.monotonic()
    outcomes: List[tuple] = []
    successes_in_a_row = 0
    deadline = killed_at + 40
    while time.monotonic() < deadline and successes_in_a_row < 3 * len(keys):
        for index, key in enumerate(keys):
            client = clients[index % 2]
            try:
                client.set(key, "after")
                assert client.get(key) == b"after"
                outcomes.append((time.monotonic(), True, ""))
                successes_in_a_row += 1
            except redis.RedisError as error:
                outcomes.append((time.monotonic(), False, str(error)))
                successes_in_a_row = 0
                if isinstance(error, redis.ConnectionError):
                    clients[index % 2] = redis_client(proxy.port, socket_timeout=30,
                                                      protocol=2 + index % 2)
    assert successes_in_a_row >= 3 * len(keys), outcomes[-5:]
    errors = [(t - killed_at, text) for t, ok, text in outcomes if not ok]
    print("failover: errors", len(errors), errors[:3], "first success at",
          next((t - killed_at for t, ok, _ in outcomes if ok), None), "ops", len(outcomes))
    assert all(t < 20 for t, _text in errors), errors[:5]
    assert clean_cluster.master_for_slot(slot).address == replica.address
    assert client.get(victim_key) == b"after"
    # Errors, if any, say what went wrong rather than being a closed connection.
    assert all("RedisSinkCluster" in text or "CLUSTERDOWN" in text for _t, text in errors)
    victim.start()
    clean_cluster.wait_healthy()
    assert victim.role() == "slave"
