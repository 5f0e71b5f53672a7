"""The proxy as users run it: a real process in front of a real redis-server."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hiredis
import pytest
import redis

import shotover_gevent
from helpers import (
    REPO_ROOT,
    RawClient,
    encode,
    free_port,
    free_ports,
    http_request,
    metric_value,
    passthrough_topology,
    redis_client,
    shared_topology,
    sink,
    source_entry,
    terminal_topology,
    wait_for,
)

ALL_BYTES = bytes(range(256))


def is_error(reply, prefix: str = "ERR") -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith(prefix)


# ---- data types --------------------------------------------------------------------------------

def test_strings(proxy, redis_server):
    client = proxy.client()
    assert client.set("greeting", "hello") is True
    assert client.get("greeting") == b"hello"
    assert client.append("greeting", " world") == 11
    assert client.strlen("greeting") == 11
    assert client.getrange("greeting", 0, 4) == b"hello"
    assert client.incr("counter") == 1
    assert client.incrby("counter", 41) == 42
    assert client.incrbyfloat("float", 1.5) == 1.5
    assert client.mset({"a": "1", "b": "2"}) is True
    assert client.mget("a", "b", "missing") == [b"1", b"2", None]
    assert client.setnx("a", "x") is False
    assert client.set("temp", "v", ex=100) is True
    assert 0 < client.ttl("temp") <= 100
    assert client.exists("a", "b", "missing") == 2
    assert client.delete("a", "missing") == 1
    assert client.get("a") is None
    direct = redis_server.client()
    assert direct.get("greeting") == b"hello world"
    assert direct.get("counter") == b"42"


def test_resp2_client(proxy, redis_server):
    client = proxy.client(protocol=2)
    assert client.set("r2", "v") is True
    assert client.hset("r2h", mapping={"a": "1"}) == 1
    assert client.hgetall("r2h") == {b"a": b"1"}
    assert client.zadd("r2z", {"m": 1.5}) == 1
    assert client.zrange("r2z", 0, -1, withscores=True) == [(b"m", 1.5)]
    assert client.get("r2") == b"v"


def test_hashes(proxy, redis_server):
    client = proxy.client()
    assert client.hset("h", mapping={"f1": "v1", "f2": "v2", "f3": "3"}) == 3
    assert client.hget("h", "f1") == b"v1"
    assert client.hgetall("h") == {b"f1": b"v1", b"f2": b"v2", b"f3": b"3"}
    assert client.hincrby("h", "f3", 4) == 7
    assert sorted(client.hkeys("h")) == [b"f1", b"f2", b"f3"]
    assert client.hdel("h", "f2", "nope") == 1
    assert client.hlen("h") == 2
    assert client.hexists("h", "f2") is False
    assert redis_server.client().hgetall("h") == {b"f1": b"v1", b"f3": b"7"}


def test_lists(proxy, redis_server):
    client = proxy.client()
    assert client.rpush("l", "a", "b", "c") == 3
    assert client.lpush("l", "z") == 4
    assert client.lrange("l", 0, -1) == [b"z", b"a", b"b", b"c"]
    assert client.lpop("l") == b"z"
    assert client.rpop("l") == b"c"
    assert client.llen("l") == 2
    assert client.lindex("l", 1) == b"b"
    assert client.blpop(["empty", "l"], timeout=1) == (b"l", b"a")
    assert client.blpop(["empty"], timeout=0.1) is None
    assert redis_server.client().lrange("l", 0, -1) == [b"b"]


def test_sets(proxy, redis_server):
    client = proxy.client()
    assert client.sadd("s1", "a", "b", "c") == 3
    assert client.sadd("s2", "b", "c", "d") == 3
    assert client.smembers("s1") == {b"a", b"b", b"c"}
    assert client.sinter("s1", "s2") == {b"b", b"c"}
    assert client.sunion("s1", "s2") == {b"a", b"b", b"c", b"d"}
    assert client.sismember("s1", "a") == 1
    assert client.srem("s1", "a") == 1
    assert client.scard("s1") == 2
    assert redis_server.client().smembers("s1") == {b"b", b"c"}


def test_sorted_sets(proxy, redis_server):
    client = proxy.client()
    assert client.zadd("z", {"a": 1, "b": 2.5, "c": -3}) == 3
    assert client.zrange("z", 0, -1) == [b"c", b"a", b"b"]
    assert client.zrange("z", 0, -1, withscores=True) == [(b"c", -3.0), (b"a", 1.0), (b"b", 2.5)]
    assert client.zscore("z", "b") == 2.5
    assert client.zincrby("z", 10, "a") == 11.0
    assert client.zrevrank("z", "a") == 0
    assert client.zrangebyscore("z", 0, 5) == [b"b"]
    assert client.zrem("z", "c") == 1
    assert redis_server.client().zrange("z", 0, -1, withscores=True) == \
        [(b"b", 2.5), (b"a", 11.0)]


def test_binary_keys_and_values(proxy, redis_server):
    client = proxy.client()
    pipe = client.pipeline(transaction=False)
    expected = {}
    for byte in range(256):
        key = b"k\r\n" + bytes([byte]) + b"\r\n"
        value = ALL_BYTES[byte:] + b"\r\n$-1\r\n*1\r\n" + ALL_BYTES[:byte]
        expected[key] = value
        pipe.set(key, value)
    assert pipe.execute() == [True] * 256
    direct = redis_server.client()
    assert direct.dbsize() == 256
    for key, value in expected.items():
        assert client.get(key) == value
        assert direct.get(key) == value
    assert client.set(b"\r\n", b"\r\n") is True
    assert client.get(b"\r\n") == b"\r\n"
    assert client.set(b"", b"") is True
    assert client.get(b"") == b""


def test_ten_megabyte_value(proxy, redis_server):
    client = proxy.client(socket_timeout=30)
    value = random.Random(7).randbytes(10 * 1024 * 1024)
    assert client.set("big", value) is True
    assert client.get("big") == value
    assert redis_server.client().strlen("big") == len(value)


def test_pipeline_of_ten_thousand_commands(proxy, redis_server):
    client = proxy.client(socket_timeout=30)
    pipe = client.pipeline(transaction=False)
    for i in range(5000):
        pipe.set(f"key:{i}", f"value:{i}")
        pipe.incr("pipeline-counter")
    results = pipe.execute()
    assert len(results) == 10_000
    assert results[0::2] == [True] * 5000
    assert results[1::2] == list(range(1, 5001))
    pipe = client.pipeline(transaction=False)
    for i in range(0, 5000, 7):
        pipe.get(f"key:{i}")
    assert pipe.execute() == [f"value:{i}".encode() for i in range(0, 5000, 7)]
    assert redis_server.client().dbsize() == 5001


def test_transaction(proxy, redis_server):
    client = proxy.client()
    pipe = client.pipeline(transaction=True)
    pipe.set("tx:a", "1").incr("tx:a").get("tx:a").lpush("tx:l", "x")
    assert pipe.execute() == [True, 2, b"2", 1]
    assert redis_server.client().get("tx:a") == b"2"


def test_watch_conflict_aborts_transaction(proxy, redis_server):
    client = proxy.client()
    client.set("watched", "0")
    with client.pipeline(transaction=True) as pipe:
        pipe.watch("watched")
        assert pipe.get("watched") == b"0"
        redis_server.client().set("watched", "changed elsewhere")
        pipe.multi()
        pipe.set("watched", "mine")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get("watched") == b"changed elsewhere"


def test_select_database(proxy, redis_server):
    in_db3 = proxy.client(db=3)
    assert in_db3.set("where", "three") is True
    assert in_db3.get("where") == b"three"
    assert redis_server.client(db=3).get("where") == b"three"
    assert redis_server.client(db=0).get("where") is None
    assert proxy.client(db=0).get("where") is None


def test_hundred_concurrent_clients(proxy, redis_server):
    clients = 100
    barrier = threading.Barrier(clients, timeout=30)

    def work(n: int) -> int:
        client = proxy.client(single_connection_client=True)
        try:
            client.ping()
            barrier.wait()  # every client is connected before any starts its work
            checked = 0
            for i in range(20):
                key, value = f"c{n}:k{i}", f"{n}-{i}-" + "x" * (n % 17)
                assert client.set(key, value) is True
                assert client.get(key) == value.encode()
                checked += 1
            pipe = client.pipeline(transaction=False)
            for _ in range(20):
                pipe.incr(f"c{n}:counter")
            assert pipe.execute() == list(range(1, 21))
            assert client.get(f"c{n}:counter") == b"20"
            return checked
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(work, range(clients), timeout=60))
    assert results == [20] * clients
    direct = redis_server.client()
    assert direct.dbsize() == clients * 21
    assert direct.get("c42:k7") == b"42-7-" + b"x" * (42 % 17)


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub_single_channel(proxy, protocol):
    subscriber = proxy.client(protocol=protocol)
    pubsub = subscriber.pubsub()
    pubsub.subscribe("news")

    def confirmation():
        message = pubsub.get_message(timeout=0.2)
        return message if message and message["type"] == "subscribe" else None

    confirmed = wait_for(confirmation, 10, "the subscription to be confirmed")
    assert confirmed["channel"] == b"news"

    publisher = proxy.client(protocol=protocol)
    sent = [f"message {i}".encode() for i in range(5)] + [b"\r\n" + ALL_BYTES]
    for payload in sent:
        assert publisher.publish("news", payload) == 1
    assert publisher.publish("other", "ignored") == 0

    received = []
    deadline = time.monotonic() + 10
    while len(received) < len(sent) and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "message":
            received.append((message["channel"], message["data"]))
    assert received == [(b"news", payload) for payload in sent]
    pubsub.unsubscribe("news")
    pubsub.close()
    # The publisher's connection was never in subscribe mode and still answers normally.
    assert publisher.set("after", "pubsub") is True


def test_upstream_killed_and_restarted(proxy_factory, redis_factory):
    upstream = redis_factory()
    proxy = proxy_factory(passthrough_topology(upstream.port, free_port()))
    client = proxy.client()
    assert client.set("k", "v") is True

    upstream.kill()
    with RawClient(proxy.port) as raw:
        for _ in range(3):
            reply = raw.call("GET", "k")
            assert is_error(reply, "ERR"), reply
        # A pipelined batch gets one error per request, in order, and nothing more.
        raw.send(encode("SET", "a", "1") + encode("GET", "a") + b"PING\r\n" + encode("INCR", "n"))
        replies = raw.read_replies(4)
        assert all(is_error(reply, "ERR") for reply in replies), replies
        assert raw.no_reply_within(0.2)
        for _ in range(2):
            with pytest.raises(redis.ResponseError):
                client.get("k")
        assert proxy.running
        # A client that arrives while the server is down is served (with errors) too.
        with RawClient(proxy.port) as newcomer:
            assert is_error(newcomer.call("PING"), "ERR")

        upstream.start()
        wait_for(lambda: raw.call("SET", "k", "again") == b"OK", 15,
                 "requests to succeed after the server restarted")
        assert raw.call("GET", "k") == b"again"
    wait_for(lambda: client.get("k") == b"again", 15, "the redis-py client to recover")
    assert upstream.client().get("k") == b"again"
    assert "closed the connection" in proxy.log_text() or "unavailable" in proxy.log_text()


# ---- raw protocol ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    b"*1\r\n+PING\r\n",
    b"*1\r\n$abc\r\n",
    b"*2\r\n$3\r\nGET\r\n$-5\r\n",
    b"*abc\r\n",
    b"SET a \"unbalanced\r\n",
])
def test_malformed_request_closes_only_that_connection(proxy, bad):
    with RawClient(proxy.port) as bystander, RawClient(proxy.port) as offender:
        assert bystander.call("PING") == b"PONG"
        offender.send(bad)
        replies = offender.wait_eof(10)
        assert len(replies) == 1, replies
        assert is_error(replies[0], "ERR Protocol error"), replies
        assert bystander.call("SET", "still", "here") == b"OK"
        assert bystander.call("GET", "still") == b"here"
    assert proxy.running


def test_requests_before_a_protocol_error_are_answered(proxy):
    with RawClient(proxy.port) as raw:
        raw.send(encode("SET", "before", "1") + b"PING\r\n" + b"*1\r\n+PING\r\n" +
                 encode("SET", "after", "1"))
        replies = raw.wait_eof(10)
    assert replies[:2] == [b"OK", b"PONG"]
    assert len(replies) == 3 and is_error(replies[2], "ERR Protocol error")
    with RawClient(proxy.port) as check:
        assert check.call("GET", "before") == b"1"
        assert check.call("GET", "after") is None


def test_inline_commands(proxy):
    with RawClient(proxy.port) as raw:
        raw.send(b"PING\r\n")
        assert raw.read_reply() == b"PONG"
        raw.send(b"SET inline \"b c\"\r\nGET inline\r\n")
        assert raw.read_replies(2) == [b"OK", b"b c"]
        # Redis reads a line starting with '$' as an inline command named "$abc".
        raw.send(b"$abc\r\n")
        assert is_error(raw.read_reply(), "ERR unknown command")
        assert raw.call("PING") == b"PONG"


def test_inline_words_end_where_redis_ends_them(proxy, redis_server):
    # Between words Redis skips every isspace() byte; inside a word only a space, a tab, CR or
    # LF ends it: a vertical tab or form feed is part of the word.
    lines = [b"ECHO a\x0bb\r\n", b"SET vtkey\x0bvalue\r\n", b"PING\x0bhello\r\n",
             b"SET \"vtq\" a\x0bb\r\n", b"ECHO \x0c\x0b x\x0cy \x0b\r\n", b"ECHO 'q'\x0b\r\n",
             b"ECHO a\tb\r\n"]
    answers = []
    for port in (redis_server.port, proxy.port):
        redis_server.client().flushall()
        with RawClient(port) as raw:
            replies = []
            for line in lines:
                raw.send(line)
                reply = raw.read_reply()
                replies.append(("error", str(reply)) if isinstance(reply, Exception) else reply)
            answers.append(replies)
    assert answers[1] == answers[0]
    assert answers[0][0] == b"a\x0bb"


def test_pipeline_split_at_odd_offsets(proxy):
    commands = []
    expected = []
    for i in range(200):
        value = ALL_BYTES[i:] + b"\r\n" + str(i).encode()
        commands.append(encode("SET", f"split:{i}", value))
        expected.append(b"OK")
        commands.append(encode("GET", f"split:{i}"))
        expected.append(value)
        commands.append(encode("INCR", "split:counter"))
        expected.append(i + 1)
    commands.append(b"PING\r\n")
    expected.append(b"PONG")
    stream = b"".join(commands)
    sizes = [1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 997]
    with RawClient(proxy.port) as raw:
        offset = 0
        index = 0
        while offset < len(stream):
            size = sizes[index % len(sizes)]
            raw.send(stream[offset:offset + size])
            offset += size
            index += 1
        assert raw.read_replies(len(expected), 30) == expected


def test_redis_cli_ping(proxy):
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(proxy.port), "PING"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PONG"
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(proxy.port),
                             "SET", "from-cli", "yes"], capture_output=True, text=True, timeout=20)
    assert result.stdout.strip() == "OK"


# ---- observability -----------------------------------------------------------------------------

@pytest.mark.parametrize("upstream", ["own", "shared"])
def test_metrics_match_the_traffic(upstream, proxy_factory, redis_server):
    # The counter and the filter run as screens of the chain (not nested calls): each still
    # gets its count and its latency per batch, and a refused request never reaches the sink.
    # Shared: batches after the first are served by the event loop's callbacks.
    prefix = [{"QueryCounter": {"name": "main"}},
              {"QueryTypeFilter": {"DenyList": ["SchemaChange"]}}]
    if upstream == "shared":
        topology = shared_topology(redis_server.port, chain_prefix=prefix, name="metered")
    else:
        topology = passthrough_topology(redis_server.port, free_port(), chain_prefix=prefix,
                                        name="metered")
    proxy = proxy_factory(topology, observability=True)
    gets, sets = 7, 3
    with RawClient(proxy.port) as raw:
        for i in range(sets):
            assert raw.call("SET", f"m{i}", "v") == b"OK"
        for i in range(gets):
            assert raw.call("GET", f"m{i % sets}") == b"v"
        assert is_error(raw.call("FLUSHDB"), "ERR")  # refused: a batch the sink never sees
        raw.send(encode("GET", "m0") + encode("FLUSHALL") + encode("GET", "m1"))
        replies = raw.read_replies(3)
        assert replies[0] == b"v" and is_error(replies[1], "ERR") and replies[2] == b"v", \
            replies
        raw.send(encode("GET", "m0") * 3)  # a pipeline of one command: counted by its size
        assert raw.read_replies(3) == [b"v"] * 3
        # However a client spells a command, it is counted and screened as that command.
        raw.send(encode("get", "m0") * 2)
        assert raw.read_replies(2) == [b"v"] * 2
        raw.send(encode("get", "m0") + encode("Get", "m1"))
        assert raw.read_replies(2) == [b"v"] * 2
        assert is_error(raw.call("flushdb"), "ERR")
        assert redis_server.client().dbsize() == sets
        gets += 2 + 3 + 4
        sink_batches = gets - 9 + sets + 4  # one request at a time, then the four pipelines
        expected_batches = sink_batches + 2  # and the two FLUSHDB

        def scrape():
            status, text = http_request(proxy.metrics_url)
            assert status == 200
            return text

        def settled():
            text = scrape()
            if metric_value(text, "shotover_chain_total_count", chain="metered") == \
                    expected_batches:
                return text
            return None

        text = wait_for(settled, 10, "the chain counter to reach the number of requests")
        assert metric_value(text, "shotover_query_count", name="main", query="GET",
                            type="redis") == gets
        assert metric_value(text, "shotover_query_count", name="main", query="SET",
                            type="redis") == sets
        assert metric_value(text, "shotover_query_count", name="main", query="FLUSHDB",
                            type="redis") == 2
        for transform, batches in (("QueryCounter", expected_batches),
                                   ("QueryTypeFilter", expected_batches),
                                   ("RedisSinkSingle", sink_batches)):
            assert metric_value(text, "shotover_transform_total_count",
                                transform=transform) == batches, transform
            assert metric_value(text, "shotover_transform_latency_seconds_count",
                                transform=transform) == batches, transform
            assert metric_value(text, "shotover_transform_failures_count",
                                transform=transform) == 0, transform
        assert metric_value(text, "shotover_chain_failures_count", chain="metered") == 0
        assert metric_value(text, "shotover_failed_requests_count", chain="metered") == 0
        # One client is connected: the gauge reports the rest of the default limit of 512.
        assert metric_value(text, "shotover_available_connections_count",
                            source="metered") == 511
    wait_for(lambda: metric_value(scrape(), "shotover_available_connections_count",
                                  source="metered") == 512, 10,
             "the available connections gauge to go back up after the client left")


def test_failed_requests_are_counted(proxy_factory):
    dead_port, listen_port = free_ports(2)
    proxy = proxy_factory(passthrough_topology(dead_port, listen_port, name="nowhere"),
                          observability=True)
    with RawClient(proxy.port) as raw:
        for _ in range(4):
            assert is_error(raw.call("GET", "x"), "ERR")
    status, text = http_request(proxy.metrics_url)
    assert status == 200
    assert metric_value(text, "shotover_failed_requests_count", chain="nowhere") == 4


def test_log_filter_can_be_changed_at_run_time(proxy_factory):
    proxy = proxy_factory(observability=True)
    base = proxy.filter_url.rsplit("/", 1)[0]
    assert http_request(proxy.metrics_url)[0] == 200
    assert " DEBUG " not in proxy.log_text()

    status, body = http_request(proxy.filter_url, "PUT", b"debug")
    assert status == 200, body
    proxy.wait_log("log filter set to 'debug'")
    mark = len(proxy.log_text())
    assert http_request(base + "/metrics")[0] == 200
    proxy.wait_log(" DEBUG ", start=mark)  # the HTTP request is now logged at debug

    status, body = http_request(proxy.filter_url, "PUT", b"not-a-level")
    assert status == 400
    assert "not-a-level" in body
    assert http_request(proxy.filter_url, "GET")[0] == 405
    assert http_request(base + "/nothing-here")[0] == 404
    assert proxy.client().ping() is True


def test_json_log_format(proxy_factory):
    proxy = proxy_factory(log_format="json")
    assert proxy.client().ping() is True
    proxy.stop()
    lines = [line for line in proxy.log_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("accepting connections" in r["message"] for r in records)
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)


# ---- source options ----------------------------------------------------------------------------

def test_hard_connection_limit_refuses_extra_clients(proxy_factory, redis_server):
    proxy = proxy_factory(passthrough_topology(redis_server.port, free_port(),
                                               connection_limit=2, hard_connection_limit=True))
    first, second = RawClient(proxy.port), RawClient(proxy.port)
    try:
        assert first.call("PING") == b"PONG"
        assert second.call("PING") == b"PONG"
        with RawClient(proxy.port) as refused:
            assert refused.wait_eof(10) == []
        first.close()

        def newcomer_served():
            with RawClient(proxy.port) as newcomer:
                newcomer.send(encode("PING"))
                return newcomer.read_reply(2) == b"PONG"

        wait_for(newcomer_served, 10, "a slot to free up after a client left")
        assert second.call("PING") == b"PONG"
    finally:
        first.close()
        second.close()
    proxy.wait_log("connection limit")


def test_soft_connection_limit_makes_extra_clients_wait(proxy_factory, redis_server):
    proxy = proxy_factory(passthrough_topology(redis_server.port, free_port(),
                                               connection_limit=2))
    first, second = RawClient(proxy.port), RawClient(proxy.port)
    waiting = None
    try:
        assert first.call("PING") == b"PONG"
        assert second.call("PING") == b"PONG"
        waiting = RawClient(proxy.port)
        waiting.send(encode("PING"))
        assert waiting.no_reply_within(0.5), "the client over the limit was served at once"
        first.close()
        assert waiting.read_reply(10) == b"PONG"
        assert second.call("PING") == b"PONG"
    finally:
        for client in (first, second, waiting):
            if client is not None:
                client.close()


def test_idle_timeout_closes_idle_clients(proxy_factory, redis_server):
    proxy = proxy_factory(passthrough_topology(redis_server.port, free_port(), timeout=1))
    with RawClient(proxy.port) as idle, RawClient(proxy.port) as busy:
        assert idle.call("PING") == b"PONG"
        started = time.monotonic()
        # The busy client keeps talking for longer than the timeout and must stay connected.
        for _ in range(8):
            assert busy.call("PING") == b"PONG"
            time.sleep(0.25)
        assert idle.wait_eof(10) == []
        assert time.monotonic() - started >= 0.9
        assert busy.call("PING") == b"PONG"


def test_sigterm_with_a_client_connected(proxy):
    client = RawClient(proxy.port)
    idle = RawClient(proxy.port)
    try:
        assert client.call("SET", "x", "1") == b"OK"
        assert idle.call("PING") == b"PONG"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait_exit(15) == 0
        assert client.wait_eof(10) == []
        assert idle.wait_eof(10) == []
    finally:
        client.close()
        idle.close()
    log_text = proxy.log_text()
    assert "stopped" in log_text
    # Every connection is closed once, quietly: a connection paused for the stop and then closed
    # must not fail again in its own greenlet.
    assert "Traceback" not in log_text, log_text
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()


def test_sigint_stops_cleanly(proxy):
    proxy.signal(signal.SIGINT)
    assert proxy.wait_exit(15) == 0


def test_version_option():
    result = subprocess.run([sys.executable, "-m", "shotover_gevent", "--version"],
                            capture_output=True, text=True, timeout=30, cwd=str(REPO_ROOT))
    assert result.returncode == 0
    assert shotover_gevent.__version__ in result.stdout


def test_invalid_configuration_refuses_to_start(tmp_path):
    (tmp_path / "config.yaml").write_text("main_log_level: info\n")
    (tmp_path / "topology.yaml").write_text("sources:\n  - Redis:\n      name: r\n"
                                            "      listen_addr: nowhere\n      chain: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "shotover_gevent", "start", "-c", str(tmp_path / "config.yaml"),
         "-t", str(tmp_path / "topology.yaml"), "--control-socket", str(tmp_path / "c.sock")],
        capture_output=True, text=True, timeout=30, cwd=str(REPO_ROOT))
    assert result.returncode == 1
    assert "sources[0].Redis.listen_addr" in result.stderr
    assert "sources[0].Redis.chain" in result.stderr


def test_port_in_use_refuses_to_start(proxy_factory, redis_server):
    with socket.socket() as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen(1)
        port = occupier.getsockname()[1]
        proxy = proxy_factory(passthrough_topology(redis_server.port, port), start=False)
        with pytest.raises(AssertionError):
            proxy.start(timeout=20)
        assert proxy.returncode == 1
        assert str(port) in proxy.log_text()


# ---- transforms --------------------------------------------------------------------------------

def test_query_type_filter_denies_writes(proxy_factory, redis_server):
    topology = passthrough_topology(redis_server.port, free_port(),
                                    chain_prefix=[{"QueryTypeFilter": {"DenyList": ["Write"]}}])
    proxy = proxy_factory(topology)
    redis_server.client().set("existing", "value")
    with RawClient(proxy.port) as raw:
        reply = raw.call("SET", "blocked", "x")
        assert is_error(reply, "ERR"), reply
        assert raw.call("GET", "existing") == b"value"
        assert raw.call("INCR", "counter") == 1  # read-and-write is a different kind
        # A pipeline mixing allowed and denied requests keeps each reply in its place.
        raw.send(encode("GET", "existing") + encode("DEL", "existing") + encode("PING"))
        replies = raw.read_replies(3)
        assert replies[0] == b"value" and is_error(replies[1]) and replies[2] == b"PONG"
    client = proxy.client(protocol=2)
    with pytest.raises(redis.ResponseError):
        client.set("blocked", "y")
    assert client.get("existing") == b"value"
    assert redis_server.client().exists("blocked") == 0


def test_query_type_filter_lets_resp3_clients_connect(proxy_factory, redis_server):
    # Connection set-up (HELLO, CLIENT SETINFO, SELECT) changes no data, so a filter that
    # denies writes must still let a client with default settings connect.
    topology = passthrough_topology(redis_server.port, free_port(),
                                    chain_prefix=[{"QueryTypeFilter": {"DenyList": ["Write"]}}])
    proxy = proxy_factory(topology)
    redis_server.client().set("existing", "value")
    client = proxy.client(protocol=3, db=2)
    assert client.ping() is True
    assert proxy.client(protocol=3).get("existing") == b"value"
    with pytest.raises(redis.ResponseError):
        client.set("blocked", "y")


def test_debug_returner_value(proxy_factory):
    proxy = proxy_factory(terminal_topology({"DebugReturner": {"Redis": "42"}}))
    with RawClient(proxy.port) as raw:
        assert raw.call("GET", "anything") == b"42"
        raw.send(encode("SET", "a", "b") + encode("PING") + b"ECHO inline\r\n")
        assert raw.read_replies(3) == [b"42", b"42", b"42"]
    assert proxy.client(protocol=2).get("x") == b"42"


def test_debug_returner_fail(proxy_factory):
    proxy = proxy_factory(terminal_topology({"DebugReturner": "Fail"}))
    with RawClient(proxy.port) as raw:
        assert is_error(raw.call("GET", "x"), "ERR")
        assert is_error(raw.call("PING"), "ERR")


def test_null_sink(proxy_factory):
    proxy = proxy_factory(terminal_topology("NullSink"))
    with RawClient(proxy.port) as raw:
        assert raw.call("SET", "a", "b") is None
        assert raw.call("GET", "a") is None
    assert proxy.client(protocol=2).get("a") is None


def test_debug_printer_logs_traffic(proxy_factory, redis_server):
    topology = passthrough_topology(redis_server.port, free_port(), chain_prefix=["DebugPrinter"])
    proxy = proxy_factory(topology)
    with RawClient(proxy.port) as raw:
        assert raw.call("SET", "printed-key", "v") == b"OK"
    text = proxy.wait_log("printed-key")
    assert "OK" in text.split("printed-key", 1)[1]


def test_valkey_spelling_and_two_sources(proxy_factory, redis_server):
    first, second = free_ports(2)
    topology = {"sources": [
        source_entry("valkey", first, [sink(redis_server.port, kind="ValkeySinkSingle")],
                     kind="Valkey"),
        source_entry("returner", second, [{"DebugReturner": {"Redis": "fixed"}}]),
    ]}
    proxy = proxy_factory(topology)
    assert "valkey=127.0.0.1:%d" % first in proxy.log_text()
    assert redis_client(first).set("vk", "1") is True
    assert redis_server.client().get("vk") == b"1"
    assert redis_client(second, protocol=2).get("vk") == b"fixed"


def test_client_quit(proxy):
    with RawClient(proxy.port) as raw:
        assert raw.call("PING") == b"PONG"
        raw.send(encode("QUIT"))
        assert raw.wait_eof(10) == [b"OK"]


def test_many_connections_opened_and_closed(proxy, redis_server):
    # Connections that come and go must not leak: the proxy keeps serving new ones.
    for i in range(200):
        with RawClient(proxy.port) as raw:
            assert raw.call("INCR", "churn") == i + 1
    direct = redis_server.client()
    wait_for(lambda: len(direct.client_list()) <= 5, 10,
             "the proxy to close its upstream connections of departed clients")



# ---- sessions and special replies --------------------------------------------------------------

def test_session_restored_after_a_request_timeout(proxy_factory, redis_factory):
    # The proxy giving up on a stalled server (request_timeout_ms) is its own doing: the client
    # stays connected and its next request goes on a new upstream connection with its session.
    # (A server that closes the connection closes the client's: tests/test_upstream_faithful.py.)
    upstream = redis_factory()
    topology = passthrough_topology(upstream.port, free_port())
    topology["sources"][0]["Redis"]["chain"][-1]["RedisSinkSingle"]["request_timeout_ms"] = 300
    proxy = proxy_factory(topology)
    with RawClient(proxy.port) as raw:
        assert raw.call("SELECT", "5") == b"OK"
        assert raw.call("CLIENT", "SETNAME", "restored") == b"OK"
        assert raw.call("SET", "k", "before") == b"OK"
        upstream.process.send_signal(signal.SIGSTOP)
        try:
            assert is_error(raw.call("GET", "k"), "ERR")
        finally:
            upstream.process.send_signal(signal.SIGCONT)
        wait_for(lambda: raw.call("SET", "k", "after") == b"OK", 15,
                 "requests to succeed after the server answers again")
        # The new upstream connection was put back in database 5, with the client's name.
        assert raw.call("CLIENT", "GETNAME") == b"restored"
    assert upstream.client(db=5).get("k") == b"after"
    assert upstream.client(db=0).get("k") is None


def test_client_reply_skip_and_off(proxy, redis_server):
    with RawClient(proxy.port) as raw:
        raw.send(encode("CLIENT", "REPLY", "SKIP") + encode("SET", "skipped", "1") +
                 encode("PING"))
        assert raw.read_reply() == b"PONG"
        raw.send(encode("CLIENT", "REPLY", "OFF") + encode("SET", "off", "1") +
                 encode("INCR", "off-counter") + encode("CLIENT", "REPLY", "ON"))
        assert raw.read_reply() == b"OK"  # only CLIENT REPLY ON is answered
        assert raw.call("GET", "skipped") == b"1"
        assert raw.call("GET", "off-counter") == b"1"
        assert raw.no_reply_within(0.2)


def test_subscribed_client_can_ping_and_unsubscribe(proxy):
    with RawClient(proxy.port) as raw, RawClient(proxy.port) as publisher:
        raw.send(encode("SUBSCRIBE", "a", "b"))
        assert raw.read_replies(2) == [[b"subscribe", b"a", 1], [b"subscribe", b"b", 2]]
        assert raw.call("PING") == [b"pong", b""]
        assert publisher.call("PUBLISH", "b", "hi") == 1
        assert raw.read_reply() == [b"message", b"b", b"hi"]
        raw.send(encode("UNSUBSCRIBE"))
        replies = raw.read_replies(2)
        assert [r[0] for r in replies] == [b"unsubscribe"] * 2
        assert sorted(r[1] for r in replies) == [b"a", b"b"]
        assert [r[2] for r in replies] == [1, 0]
        assert raw.call("SET", "normal", "again") == b"OK"


def test_blocking_command_does_not_hold_up_other_clients(proxy, redis_server):
    blocked = proxy.client(socket_timeout=20)
    pusher = proxy.client()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(blocked.blpop, ["queue"], 15)
        direct = redis_server.client()
        wait_for(lambda: any(c.get("cmd") == "blpop" for c in direct.client_list()), 10,
                 "the client to block in BLPOP")
        assert pusher.set("unrelated", "1") is True  # another client is served meanwhile
        assert pusher.rpush("queue", "job") == 1
        assert future.result(timeout=15) == (b"queue", b"job")


def test_large_aggregate_reply(proxy, redis_server):
    client = proxy.client(socket_timeout=30)
    members = [f"member-{i}".encode() for i in range(100_000)]
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(members), 10_000):
        pipe.rpush("long", *members[start:start + 10_000])
    pipe.execute()
    assert client.lrange("long", 0, -1) == members
    assert redis_server.client().llen("long") == len(members)


def test_client_tracking_invalidation_arrives_without_another_request(proxy):
    with RawClient(proxy.port) as tracker, RawClient(proxy.port) as writer:
        assert tracker.call("HELLO", "3")[b"proto"] == 3
        assert tracker.call("CLIENT", "TRACKING", "ON") == b"OK"
        assert tracker.call("GET", "tracked") is None
        assert writer.call("SET", "tracked", "new") == b"OK"
        # Redis sends the invalidation push at once; the tracker sends nothing meanwhile.
        assert tracker.read_reply(5) == [b"invalidate", [b"tracked"]]
        assert tracker.call("GET", "tracked") == b"new"


def test_monitor(proxy):
    with RawClient(proxy.port) as monitor, RawClient(proxy.port) as other:
        assert monitor.call("MONITOR") == b"OK"
        assert other.call("SET", "watched-by-monitor", "1") == b"OK"

        def saw_set():
            line = monitor.read_reply(1)
            return isinstance(line, bytes) and b'"watched-by-monitor"' in line

        wait_for(saw_set, 10, "the MONITOR client to see the SET")
