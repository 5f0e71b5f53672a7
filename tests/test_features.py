"""Redis features through the proxy: RESP3, pub/sub, transactions, blocking commands, MONITOR,
CLIENT REPLY/TRACKING, scripting, big values, each compared with Redis itself and across upgrades."""

from __future__ import annotations

import hashlib
import ssl

import pytest

from differential import harness
from feature_support import (ByteClient, client_ssl_context, make_certificates,
                             server_clients, topology, upgrade)
from helpers import encode, redis_client, wait_for

def reset_server(redis_server) -> None:
    with redis_server.client() as admin:
        admin.flushall()
        admin.script_flush()
        admin.execute_command("FUNCTION", "FLUSH")
        wait_for(lambda: len(server_clients(admin)) <= 1, 10,
                 "the server to have no client but the test's")


def same_as_redis(redis_server, proxy, script: str, protocols=(2, 3)) -> None:
    """Run `script` directly and through the proxy; every reply must match byte for byte."""
    steps = harness.parse_script(script)
    for protocol in protocols:
        reset_server(redis_server)
        direct = harness.run_script(redis_server.port, steps, protocol, redis_server.port)
        reset_server(redis_server)
        proxied = harness.run_script(proxy.port, steps, protocol, redis_server.port)
        problem = harness.compare(direct, proxied)
        assert problem is None, f"RESP{protocol}: {problem}"
    log = proxy.log_text()
    assert " ERROR " not in log and "Traceback" not in log, log[-4000:]


@pytest.fixture
def acl_user(redis_server):
    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "tester", "on", ">secret", "~*", "&*", "+@all")
    yield "tester", "secret"
    with redis_server.client() as admin:
        admin.execute_command("ACL", "DELUSER", "tester")


def blocked_clients(redis_server) -> int:
    with redis_server.client() as admin:
        return int(admin.info("clients")["blocked_clients"])


def wait_paused(client: ByteClient, attempts: int = 20) -> int:
    """Send PINGs until one stays unanswered (the proxy has paused this connection for an
    upgrade); return how many PINGs are still to be answered."""
    for _ in range(attempts):
        client.send("PING")
        if client.quiet_for(0.3):
            return 1
        assert client.read_frame() == b"+PONG\r\n"
    raise AssertionError("the connection was never paused")


def frames_equal(a: ByteClient, b: ByteClient, count: int) -> None:
    for number in range(count):
        expected, got = a.read_frame(), b.read_frame()
        assert got == expected, f"frame {number}: redis {expected!r}, proxy {got!r}"


# ---- RESP3 -------------------------------------------------------------------------------------


def test_hello_variants_and_resp3_types_match_redis(redis_server, proxy, acl_user):
    same_as_redis(redis_server, proxy, r"""
        HELLO 3
        HSET h a 1 b 2
        HGETALL h
        SADD s x
        SMEMBERS s
        ZADD z 1.5 m
        ZSCORE z m
        ZRANGE z 0 -1 WITHSCORES
        GET missing
        EVAL "redis.setresp(3); return redis.call('hgetall', KEYS[1])" 1 h
        EVAL "return true" 0
        HELLO 2
        HGETALL h
        ZSCORE z m
        HELLO 3 AUTH tester secret SETNAME named
        CLIENT GETNAME
        ACL WHOAMI
        HELLO 3 AUTH tester wrong
        ACL WHOAMI
        HELLO 2 AUTH default x SETNAME other
        ACL WHOAMI
        CLIENT GETNAME
    """)


def test_resp3_session_survives_upgrade(redis_server, proxy, acl_user):
    with ByteClient(proxy.port) as client:
        hello = client.call("HELLO", "3", "AUTH", "tester", "secret", "SETNAME", "named")
        assert hello.startswith(b"%7\r\n") and b"proto\r\n:3" in hello
        client.call("SELECT", "2")
        client.call("HSET", "h", "a", "1")
        result = upgrade(proxy)
        assert result["kept"] == 1 and result["closed"] == 0, result
        assert client.call("CLIENT", "GETNAME") == b"$5\r\nnamed\r\n"
        assert client.call("ACL", "WHOAMI") == b"$6\r\ntester\r\n"
        assert client.call("HGETALL", "h") == b"%1\r\n$1\r\na\r\n$1\r\n1\r\n"


# ---- pub/sub -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_messages_arrive_while_the_subscriber_is_idle(redis_server, proxy, protocol):
    """Deliveries through the proxy are byte for byte what a direct subscriber gets."""
    direct, proxied = ByteClient(redis_server.port), ByteClient(proxy.port)
    with direct, proxied:
        for client in (direct, proxied):
            if protocol == 3:
                client.call("HELLO", "3")
        for command, frames in ((("SUBSCRIBE", "news", "weather"), 2),
                                (("PSUBSCRIBE", "n*"), 1), (("SSUBSCRIBE", "shard"), 1)):
            expected = direct.call(*command, frames=frames)
            assert proxied.call(*command, frames=frames) == expected
        with redis_client(redis_server.port) as publisher:
            for number in range(50):
                assert publisher.publish("news", f"item {number}") == 4
            publisher.publish("weather", b"\x00binary\r\n")
            publisher.execute_command("SPUBLISH", "shard", "sharded")
        # 50 x (message + pmessage), weather, the shard message: all without sending anything.
        frames_equal(direct, proxied, 102)
        assert proxied.quiet_for(0.05) and direct.quiet_for(0.05)
        # Subscribed-mode PING and RESET, then a plain command again.
        for command in (("PING",), ("PING", "hi"), ("RESET",), ("GET", "x")):
            assert proxied.call(*command) == direct.call(*command), command


@pytest.mark.parametrize("protocol", [2, 3])
def test_messages_keep_their_place_before_replies(redis_server, proxy, protocol):
    """A message Redis sent before a reply reaches the client before that reply, even when it
    was still on its way through the proxy when the client sent its request."""
    pong = b"+PONG\r\n" if protocol == 3 else b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    kind = b">" if protocol == 3 else b"*"
    with ByteClient(proxy.port) as subscriber, ByteClient(redis_server.port) as publisher:
        if protocol == 3:
            subscriber.call("HELLO", "3")
        subscriber.call("SUBSCRIBE", "c")
        for number in range(100):
            body = str(number).encode()
            assert publisher.call("PUBLISH", "c", body) == b":1\r\n"
            # Redis has sent the message before we ask; the PING's reply must come after it.
            assert subscriber.call("PING", frames=2) == (
                kind + b"3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$%d\r\n%s\r\n" % (len(body), body)
                + pong)


@pytest.mark.parametrize("protocol", [2, 3])
def test_subscriptions_survive_upgrade(redis_server, proxy, protocol):
    """The new image subscribes again at once; messages flow without the client doing a thing."""
    direct, proxied = ByteClient(redis_server.port), ByteClient(proxy.port)
    with direct, proxied, redis_server.client() as admin:
        for client in (direct, proxied):
            if protocol == 3:
                client.call("HELLO", "3")
            client.call("SUBSCRIBE", "a", "b", frames=2)
            client.call("PSUBSCRIBE", "p.*")
            client.call("SSUBSCRIBE", "s1")
        result = upgrade(proxy)
        assert result["kept"] == 1 and result["closed"] == 0, result

        def resubscribed() -> bool:
            # The new image subscribes in one batch: channels, then patterns, then shards.
            with ByteClient(redis_server.port) as probe:
                return (probe.call("PUBSUB", "NUMSUB", "a", "b")
                        == b"*4\r\n$1\r\na\r\n:2\r\n$1\r\nb\r\n:2\r\n"
                        and probe.call("PUBSUB", "SHARDNUMSUB", "s1")
                        == b"*2\r\n$2\r\ns1\r\n:2\r\n")

        wait_for(resubscribed, 10, "the new image to subscribe again")
        admin.publish("a", "after")
        admin.publish("p.x", "pattern")
        admin.publish("b", "last")
        admin.execute_command("SPUBLISH", "s1", "shard")
        frames_equal(direct, proxied, 4)
        assert proxied.call("PING") == direct.call("PING")
        assert proxied.call("UNSUBSCRIBE", "a") == direct.call("UNSUBSCRIBE", "a")


@pytest.mark.parametrize("protocol", [2, 3])
def test_idle_subscriber_disconnected_when_the_server_goes_away(redis_factory, proxy_factory,
                                                                protocol):
    """As directly: the subscriber's connection ends with the server's, and nothing subscribes
    again behind its back; a subscriber that comes back once the server is up is served."""
    server = redis_factory()
    proxy = proxy_factory(topology(server.port))
    direct, subscriber = ByteClient(server.port), ByteClient(proxy.port)
    with direct, subscriber:
        for client in (direct, subscriber):
            if protocol == 3:
                client.call("HELLO", "3")
            client.call("SUBSCRIBE", "news")
            client.call("PSUBSCRIBE", "n*")
        server.kill()
        assert direct.wait_eof(10) == b""
        assert subscriber.wait_eof(10) == b""
    server.start()
    with ByteClient(server.port) as probe:
        assert probe.call("PUBSUB", "NUMSUB", "news") == b"*2\r\n$4\r\nnews\r\n:0\r\n"
    with ByteClient(proxy.port) as subscriber:
        if protocol == 3:
            subscriber.call("HELLO", "3")
        subscriber.call("SUBSCRIBE", "news")
        with ByteClient(server.port) as publisher:
            assert publisher.call("PUBLISH", "news", "back") == b":1\r\n"
        kind = b">" if protocol == 3 else b"*"
        assert subscriber.read_frame() == kind + b"3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$4\r\nback\r\n"
        assert subscriber.call("PING") == (b"+PONG\r\n" if protocol == 3
                                           else b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")


# ---- transactions ------------------------------------------------------------------------------


def test_watch_conflict_and_errors_in_transactions_match_redis(redis_server, proxy):
    same_as_redis(redis_server, proxy, """
        WATCH w
        @1 SET w changed
        MULTI
        SET w mine
        EXEC
        GET w
        MULTI
        SET w
        SET w ok
        EXEC
        MULTI
        SET w again
        LPUSH w x
        EXEC
        MULTI
        DISCARD
    """)


def test_client_reply_inside_multi_is_refused(proxy):
    """Redis would answer EXEC with a truncated reply; the proxy refuses the command instead."""
    with ByteClient(proxy.port) as client:
        client.send_raw(b"".join(harness._encode(args) for args in (
            [b"MULTI"], [b"CLIENT", b"REPLY", b"OFF"], [b"SET", b"k", b"v"], [b"EXEC"],
            [b"GET", b"k"])))
        assert client.read_frames(5) == (
            b"+OK\r\n-ERR CLIENT REPLY is not supported inside MULTI by the proxy\r\n"
            b"+QUEUED\r\n*1\r\n+OK\r\n$1\r\nv\r\n")


# ---- blocking commands ---------------------------------------------------------------------------


def test_blocked_client_holds_only_its_own_upstream_connection(redis_server, proxy):
    with ByteClient(proxy.port) as blocked, ByteClient(proxy.port) as other:
        blocked.send("BLPOP", "queue", "0")
        wait_for(lambda: blocked_clients(redis_server) == 1, 10, "BLPOP to block")
        for number in range(20):
            assert other.call("SET", f"k{number}", number) == b"+OK\r\n"
        with redis_server.client() as admin:
            commands = sorted(c["cmd"] for c in server_clients(admin) if c["cmd"] != "client|list")
        assert commands == ["blpop", "set"]
        other.call("RPUSH", "queue", "value")
        assert blocked.read_frame() == b"*2\r\n$5\r\nqueue\r\n$5\r\nvalue\r\n"


def test_thousand_blocked_clients_do_not_slow_the_others(redis_server, proxy_factory):
    proxy = proxy_factory(topology(redis_server.port, connection_limit=2000))
    clients = []
    try:
        for number in range(1000):
            client = ByteClient(proxy.port, timeout=30)
            clients.append(client)
            client.send("BLPOP", f"q{number}", "0")
        wait_for(lambda: blocked_clients(redis_server) == 1000, 60, "1000 blocked clients")
        with ByteClient(proxy.port) as other:
            for number in range(200):
                assert other.call("PING", str(number)) == b"$%d\r\n%d\r\n" % (
                    len(str(number)), number)
            assert blocked_clients(redis_server) == 1000
        with redis_server.client() as admin:
            pipe = admin.pipeline(transaction=False)
            for number in range(1000):
                pipe.rpush(f"q{number}", f"v{number}")
            pipe.execute()
        for number, client in enumerate(clients):
            key, value = f"q{number}".encode(), f"v{number}".encode()
            assert client.read_frame() == b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(key), key, len(value), value)
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("tls", [False, True])
def test_client_leaving_while_blocked_takes_no_value(redis_server, proxy_factory, tmp_path, tls):
    """As with Redis itself: a value pushed after the blocked client left stays in the list."""
    context, source_tls = None, None
    if tls:
        certs = make_certificates(tmp_path / "certs")
        context = client_ssl_context(certs)
        source_tls = {"certificate_path": certs.server_cert, "private_key_path": certs.server_key}
    proxy = proxy_factory(topology(redis_server.port, source_tls=source_tls))
    for command in (("BLPOP", "jobs", "0"), ("XREAD", "BLOCK", "0", "STREAMS", "s", "$")):
        with ByteClient(proxy.port, ssl_context=context) as client:
            if tls:
                assert client.call("PING") == b"+PONG\r\n"
            client.send(*command)
            wait_for(lambda: blocked_clients(redis_server) == 1, 10, "the command to block")
            if tls:  # a TLS client that says goodbye properly (close_notify) before leaving
                client.sock.setblocking(False)
                with pytest.raises(ssl.SSLWantReadError):
                    client.sock.unwrap()
        wait_for(lambda: blocked_clients(redis_server) == 0, 10,
                 "the proxy to end the blocked command of the client that left")
    with redis_server.client() as admin:
        admin.rpush("jobs", "job")
        assert admin.lrange("jobs", 0, -1) == [b"job"]
    # A pipelined request behind a blocking one is no reason to stop waiting.
    with ByteClient(proxy.port, ssl_context=context) as client:
        client.send_raw(harness._encode([b"BLPOP", b"jobs2", b"0"]) + harness._encode([b"PING"]))
        wait_for(lambda: blocked_clients(redis_server) == 1, 10, "BLPOP to block")
        with redis_server.client() as admin:
            admin.rpush("jobs2", "x")
        assert client.read_frames(2) == b"*2\r\n$5\r\njobs2\r\n$1\r\nx\r\n+PONG\r\n"


@pytest.mark.parametrize("protocol", [2, 3])
def test_blocking_commands_match_redis(redis_server, proxy, protocol):
    script = harness.load_script("blocking")
    reset_server(redis_server)
    direct = harness.run_script(redis_server.port, script, protocol, redis_server.port)
    reset_server(redis_server)
    proxied = harness.run_script(proxy.port, script, protocol, redis_server.port)
    assert harness.compare(direct, proxied) is None


# ---- MONITOR, CLIENT REPLY, QUIT, RESET, CLIENT TRACKING -----------------------------------------


def test_monitor_streams_while_idle_until_the_client_leaves(redis_server, proxy):
    with ByteClient(proxy.port) as monitor, ByteClient(proxy.port) as other:
        assert monitor.call("MONITOR") == b"+OK\r\n"
        for number in range(20):
            other.call("SET", "key", number)
        for number in range(20):
            line = monitor.read_frame()
            assert line.startswith(b"+") and line.endswith(
                b'"SET" "key" "%d"\r\n' % number), line
    with redis_server.client() as admin:
        wait_for(lambda: not any("O" in c["flags"] for c in server_clients(admin)), 10,
                 "the proxy to end its MONITOR connection")


def test_client_reply_keeps_replies_matched_to_requests(redis_server, proxy):
    """Pipelined, so that replies and the requests they answer are matched by counting."""
    steps = "\n".join(["!pipeline on", "CLIENT REPLY OFF | frames=0", "SET a 1 | frames=0",
                       "INCR a | frames=0", "CLIENT REPLY ON", "GET a",
                       "CLIENT REPLY SKIP | frames=0", "INCR a | frames=0", "GET a",
                       "CLIENT REPLY SKIP | frames=0", "CLIENT REPLY OFF | frames=0",
                       "GET a | frames=0", "CLIENT REPLY ON", "INCRBY a 10"] * 3)
    same_as_redis(redis_server, proxy, steps)


def test_quit_replies_then_closes(redis_server, proxy):
    for port in (redis_server.port, proxy.port):
        with ByteClient(port) as client:
            client.send_raw(harness._encode([b"PING"]) + harness._encode([b"QUIT"])
                            + harness._encode([b"PING"]))
            assert client.wait_eof() == b"+PONG\r\n+OK\r\n"


def test_reset_in_every_state_matches_redis(redis_server, proxy):
    same_as_redis(redis_server, proxy, """
        SELECT 3
        CLIENT SETNAME someone
        HELLO 3
        SUBSCRIBE ch
        RESET
        CLIENT GETNAME
        HGETALL nothing
        MULTI
        SET x 1
        RESET
        EXEC
        CLIENT REPLY OFF | frames=0
        RESET
        GET x
        WATCH x
        RESET
        PSUBSCRIBE p*
        RESET
        @1 PUBLISH pa nobody
    """)


def test_tracking_invalidations_arrive_while_idle(redis_server, proxy):
    """RESP3 CLIENT TRACKING (default and BCAST), and RESP2 with REDIRECT to a subscriber."""
    same_as_redis(redis_server, proxy, """
        {3} CLIENT TRACKING ON
        {3} GET tracked
        {3} @1 SET tracked changed
        {3} READ 1
        {3} CLIENT TRACKING OFF
        {3} CLIENT TRACKING ON BCAST PREFIX user:
        {3} @1 SET user:1 x
        {3} READ 1
        {3} @1 MSET user:2 y other z
        {3} READ 1
        {3} GET tracked
        {3} PING
    """, protocols=(3,))
    with ByteClient(proxy.port) as listener, ByteClient(proxy.port) as tracked, \
            ByteClient(proxy.port) as writer:
        client_id = listener.call("CLIENT", "ID")
        listener.call("SUBSCRIBE", "__redis__:invalidate")
        assert tracked.call("CLIENT", "TRACKING", "ON", "REDIRECT",
                            client_id[1:-2].decode()) == b"+OK\r\n"
        tracked.call("GET", "k")
        writer.call("SET", "k", "v")
        assert listener.read_frame() == (b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n"
                                         b"*1\r\n$1\r\nk\r\n")


def test_invalidations_redirected_to_a_resp3_client_come_between_its_replies(redis_server,
                                                                             proxy):
    """A RESP3 client whose upstream connection gets invalidations another connection
    redirects there, while its plain requests are served from the event loop's callbacks:
    each push comes whole, before the next reply, and every reply is its request's."""
    with ByteClient(proxy.port) as listener, redis_server.client() as tracker, \
            redis_server.client() as writer:
        assert listener.call("HELLO", "3")[:1] == b"%"
        upstream_id = int(listener.call("CLIENT", "ID")[1:-2])
        tracker.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", upstream_id)
        for round_ in range(3):  # plain batches: the callbacks serve it from here
            assert listener.call("SET", "mine", f"v{round_}") == b"+OK\r\n"
        for round_ in range(20):
            tracker.get(f"tracked:{round_}")
            writer.set(f"tracked:{round_}", round_)  # an invalidation for the listener, now
            listener.send("GET", "mine")
            expected = [b"$2\r\nv2\r\n"]
            if round_ % 2:
                listener.send("INCR", "count")
                expected.append(b":%d\r\n" % (round_ // 2 + 1))
            # As directly: the invalidation came before the replies.
            key = f"tracked:{round_}".encode()
            assert listener.read_frame() == (b">2\r\n$10\r\ninvalidate\r\n*1\r\n$%d\r\n%s\r\n"
                                             % (len(key), key))
            assert [listener.read_frame() for _ in expected] == expected, round_


def test_an_invalidation_redirected_to_an_idle_resp3_client_comes_at_once(redis_server, proxy):
    """A client-side cache must not keep a stale value while its client sends nothing."""
    with ByteClient(proxy.port) as listener, redis_server.client() as tracker, \
            redis_server.client() as writer:
        assert listener.call("HELLO", "3")[:1] == b"%"
        upstream_id = int(listener.call("CLIENT", "ID")[1:-2])
        assert listener.call("GET", "cached") == b"_\r\n"
        tracker.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", upstream_id)
        for round_ in range(3):
            tracker.get("cached")
            writer.set("cached", round_)  # the listener is idle
            assert listener.read_frame(timeout=5) == (
                b">2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\ncached\r\n")
            assert listener.call("GET", "cached") == b"$1\r\n%d\r\n" % round_
    assert "sent bytes while nothing was asked" not in proxy.log_text()


@pytest.mark.parametrize("last", [None, ("CLIENT", "GETNAME")], ids=["callbacks", "greenlet"])
def test_an_invalidation_read_with_the_last_reply_of_a_batch_comes_at_once(redis_server, proxy,
                                                                            last):
    """Redis sends a BCAST invalidation right after the replies of the batch that changed the
    key, in the same write: it must reach the client then, not with its next request's reply."""
    with ByteClient(proxy.port) as listener, ByteClient(proxy.port) as tracker:
        assert listener.call("HELLO", "3")[:1] == b"%"
        upstream_id = listener.call("CLIENT", "ID")[1:-2].decode()
        assert tracker.call("CLIENT", "TRACKING", "ON", "REDIRECT", upstream_id,
                            "BCAST") == b"+OK\r\n"
        assert listener.call("GET", "other") == b"_\r\n"  # plain batches from here
        batch = [("GET", "other"), ("SET", "cached", "v")] + ([last] if last else [])
        listener.send_raw(b"".join(encode(*command) for command in batch))
        expected = [b"_\r\n", b"+OK\r\n", b"_\r\n"][:len(batch)]  # GETNAME: no name
        assert [listener.read_frame() for _ in batch] == expected
        assert listener.read_frame(timeout=3) == (
            b">2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\ncached\r\n")


def test_scripts_and_functions(redis_server, proxy):
    library = ("#!lua name=features\n"
               "redis.register_function{function_name='hello', callback=function(keys, args) "
               "return 'hello ' .. args[1] end, flags={'no-writes'}}\n"
               "redis.register_function{function_name='count', callback=function(keys, args) "
               "return redis.call('incr', keys[1]) end}")
    with proxy.client() as client:
        assert client.execute_command("FUNCTION", "LOAD", library) == b"features"
        assert client.fcall("hello", 0, "world") == b"hello world"
        assert [client.fcall("count", 1, "n") for _ in range(3)] == [1, 2, 3]
        assert client.fcall_ro("hello", 0, "ro") == b"hello ro"
        sha = client.script_load("return {KEYS[1], ARGV[1]}")
        assert client.evalsha(sha, 1, "k", "a") == [b"k", b"a"]
        assert client.eval("return redis.call('get', KEYS[1])", 1, "n") == b"3"
    same_as_redis(redis_server, proxy, """
        FUNCTION LOAD "#!lua name=lib\\nredis.register_function('f', function() return {1, {err='x'}} end)"
        FCALL f 0
        EVAL "return {1.5, 'a', false, nil}" 0
    """)


def test_select_is_kept_across_upgrade_even_inside_multi(redis_server, proxy):
    with ByteClient(proxy.port) as plain, ByteClient(proxy.port) as in_multi, \
            ByteClient(proxy.port) as discarded:
        plain.call("SELECT", "3")
        for command in (("MULTI",), ("SELECT", "4"), ("SET", "k", "four"), ("EXEC",)):
            in_multi.call(*command)
        for command in (("MULTI",), ("SELECT", "5"), ("DISCARD",)):
            discarded.call(*command)
        plain.call("SET", "k", "three")
        discarded.call("SET", "k", "zero")
        result = upgrade(proxy)
        assert result["kept"] == 3 and result["closed"] == 0, result
        assert plain.call("GET", "k") == b"$5\r\nthree\r\n"
        assert in_multi.call("GET", "k") == b"$4\r\nfour\r\n"
        assert discarded.call("GET", "k") == b"$4\r\nzero\r\n"


def test_hundred_megabyte_value_round_trip(redis_server, proxy):
    value = hashlib.sha256(b"seed").digest() * (100 * 1024 * 1024 // 32)
    with proxy.client(socket_timeout=60) as client:
        assert client.set("huge", value) is True
        got = client.get("huge")
    assert len(got) == len(value) and got == value
    with redis_server.client() as admin:
        assert admin.strlen("huge") == len(value)
        admin.delete("huge")


# ---- upgrades with work in flight ------------------------------------------------------------------


def test_transaction_and_blocking_command_handed_over_in_flight(redis_server, proxy):
    with ByteClient(proxy.port) as in_multi, ByteClient(proxy.port) as blocked, \
            ByteClient(proxy.port) as idle:
        assert in_multi.call("MULTI") == b"+OK\r\n"
        assert in_multi.call("SET", "k", "v") == b"+QUEUED\r\n"
        blocked.send("BLPOP", "queue", "0")
        wait_for(lambda: blocked_clients(redis_server) == 1, 10, "BLPOP to block")
        idle.call("PING")
        # Nothing to wait for: the upgrade finishes while both are in the middle of things.
        result = upgrade(proxy, "--drain-timeout", "30")
        assert result["kept"] == 3 and result["closed"] == 0, result
        assert result["timings"]["settle_ms"] < 5000, result
        assert in_multi.call("EXEC") == b"*1\r\n+OK\r\n"
        with redis_server.client() as admin:
            admin.rpush("queue", "pushed")
        assert blocked.read_frame() == b"*2\r\n$5\r\nqueue\r\n$6\r\npushed\r\n"
        assert in_multi.call("GET", "k") == b"$1\r\nv\r\n"
        assert blocked.call("PING") == b"+PONG\r\n"
        assert idle.call("PING") == b"+PONG\r\n"


def test_unfinished_work_is_handed_over_not_closed(redis_server, proxy):
    with ByteClient(proxy.port) as in_multi, ByteClient(proxy.port) as watching, \
            ByteClient(proxy.port) as blocked, ByteClient(proxy.port) as idle:
        in_multi.call("MULTI")
        watching.call("WATCH", "w")
        blocked.send("BLPOP", "never", "0")
        wait_for(lambda: blocked_clients(redis_server) == 1, 10, "BLPOP to block")
        idle.call("SET", "idle", "1")
        result = upgrade(proxy, "--drain-timeout", "1")
        assert result["kept"] == 4 and result["closed_reasons"] == {}, result
        assert in_multi.call("SET", "x", "1") == b"+QUEUED\r\n"
        assert in_multi.call("EXEC") == b"*1\r\n+OK\r\n"
        with redis_server.client() as admin:
            admin.set("w", "changed")
            admin.rpush("never", "now")
        assert watching.call("MULTI") == b"+OK\r\n"
        assert watching.call("SET", "w", "mine") == b"+QUEUED\r\n"
        assert watching.call("EXEC") == b"*-1\r\n"
        assert blocked.read_frame() == b"*2\r\n$5\r\nnever\r\n$3\r\nnow\r\n"
        assert idle.call("GET", "idle") == b"$1\r\n1\r\n"


def test_monitor_and_tracking_connections_are_handed_over(redis_server, proxy):
    with ByteClient(proxy.port) as monitor, ByteClient(proxy.port) as tracking, \
            ByteClient(proxy.port) as plain:
        monitor.call("MONITOR")
        tracking.call("HELLO", "3")
        tracking.call("CLIENT", "TRACKING", "ON")
        tracking.call("GET", "k")
        result = upgrade(proxy, "--drain-timeout", "2")
        assert result["kept"] == 3 and result["closed_reasons"] == {}, result
        plain.call("SET", "k", "v")
        # The invalidation for the key read before the upgrade comes on the handed-over
        # connection; MONITOR streams the SET.
        assert tracking.read_frame() == b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
        while b'"SET" "k" "v"' not in monitor.read_frame():
            pass
        assert plain.call("GET", "k") == b"$1\r\nv\r\n"


def test_client_reply_modes_survive_upgrade(proxy):
    with ByteClient(proxy.port) as off, ByteClient(proxy.port) as skip_pending, \
            ByteClient(proxy.port) as skip_used:
        off.send("CLIENT", "REPLY", "OFF")
        off.send("SET", "a", "1")
        skip_pending.send("CLIENT", "REPLY", "SKIP")
        skip_used.send("CLIENT", "REPLY", "SKIP")
        skip_used.send("SET", "c", "3")
        assert skip_used.call("GET", "c") == b"$1\r\n3\r\n"
        result = upgrade(proxy)
        assert result["kept"] == 3, result
        off.send("SET", "b", "2")
        off.send("CLIENT", "REPLY", "SKIP")
        assert off.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"
        assert off.call("MGET", "a", "b") == b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n"
        skip_pending.send("SET", "skipped", "x")
        assert skip_pending.call("GET", "skipped") == b"$1\r\nx\r\n"
        assert skip_used.call("PING") == b"+PONG\r\n"
