"""The upstream connection as Redis would have it: a server that closes a client's connection
closes it through the proxy too, replication commands are refused at once, CLIENT REPLY SKIP
and RESET are counted as the server counts them, and a hung server or a departed client never
holds a connection for good. Behaviours are compared with a client talking to Redis itself."""

from __future__ import annotations

import selectors
import signal
import socket
import threading
from typing import Dict, List, Optional

import pytest
import redis

from feature_support import ByteClient, mask_hello_id, server_clients, upgrade
from helpers import (HOST, encode, free_port, http_request, metric_value, redis_client,
                     source_entry, wait_for)
from shotover_gevent.config import Problems
from shotover_gevent.transforms import redis_sink_single

SYNC_REFUSED = b"-ERR SYNC is not supported through the proxy; connect replicas to the server " \
               b"directly\r\n"
PSYNC_REFUSED = SYNC_REFUSED.replace(b"SYNC", b"PSYNC", 1)


def single_topology(redis_port: int, **sink_options) -> Dict:
    settings = {"remote_address": f"{HOST}:{redis_port}", "connect_timeout_ms": 3000}
    settings.update(sink_options)
    return {"sources": [source_entry("redis", free_port(), [{"RedisSinkSingle": settings}])]}


def connections_open(proxy) -> Optional[float]:
    status, text = http_request(proxy.metrics_url)
    assert status == 200, text
    return metric_value(text, "shotover_g_connections_open", source="redis")


def client_id(client: ByteClient) -> int:
    reply = client.call("CLIENT", "ID")
    assert reply[:1] == b":", reply
    return int(reply[1:-2])


class SilentServer:
    """A TCP server that accepts connections and reads whatever comes, never answering (a hung
    server); it counts connections accepted and connections its peers closed."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.closed = 0
        self.received = bytearray()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                sock = key.fileobj
                if sock is self.listener:
                    peer, _address = self.listener.accept()
                    peer.setblocking(False)
                    self._selector.register(peer, selectors.EVENT_READ)
                    self.accepted += 1
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self.received += data
                else:
                    self._selector.unregister(sock)
                    sock.close()
                    self.closed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.stop()


# ---- 3. the server closes the connection --------------------------------------------------------


def test_client_kill_of_the_upstream_connection_closes_the_client(redis_server, proxy):
    """Directly, a killed client sees its connection end at once; through the proxy too (the
    proxy's upstream connection is the one CLIENT ID names and CLIENT KILL kills)."""
    with redis_server.client() as admin:
        for port in (redis_server.port, proxy.port):
            with ByteClient(port) as client:
                assert client.call("SET", "k", "v") == b"+OK\r\n"
                assert admin.execute_command("CLIENT", "KILL", "ID", client_id(client)) == 1
                assert client.wait_eof(5) == b""


def test_redis_py_reconnects_after_a_kill_as_it_does_directly(redis_server, proxy):
    """redis-py takes a closed connection for what it is and reconnects; an error reply in its
    place it would hand to the application."""
    with redis_server.client() as admin:
        for port in (redis_server.port, proxy.port):
            client = redis.Redis(host=HOST, port=port, socket_timeout=10)
            try:
                assert client.set("k", "v") is True
                assert admin.execute_command("CLIENT", "KILL", "ID", client.client_id()) == 1
                assert client.get("k") == b"v"
            finally:
                client.close()


def test_replies_before_the_server_closed_are_written_then_the_connection_closes(
        redis_server, proxy):
    """A client that kills its own connection in the middle of a pipeline gets the replies
    Redis sent before closing it, then the end of the connection; the rest is not run."""
    received = []
    for port in (redis_server.port, proxy.port):
        with ByteClient(port) as client:
            own = client_id(client)
            client.send_raw(encode("SET", "a", "1") + encode("CLIENT", "KILL", "ID", own,
                                                           "SKIPME", "no")
                            + encode("SET", "a", "2") + encode("PING"))
            received.append(client.wait_eof(5))
        with redis_server.client() as admin:
            assert admin.get("a") == b"1"
            admin.delete("a")
    assert received[1] == received[0] == b"+OK\r\n:1\r\n"


@pytest.mark.parametrize("first", ["plain", "select"])
def test_a_client_that_pipelines_then_closes_gets_every_request_run(redis_server, proxy, first):
    """A client that writes a long pipeline (more than one batch of the proxy's) and closes
    without reading gets every request run, as Redis runs what it has read: the replies that
    cannot be written any more go nowhere, the rest of what it sent is still served.
    `select`: the pipeline begins with a command the client's greenlet serves."""
    count = 600
    head = encode("SELECT", "0") if first == "select" else b""
    with redis_server.client() as admin:
        for port in (redis_server.port, proxy.port):
            admin.delete("n")
            for _ in range(3):
                with socket.create_connection((HOST, port)) as client:
                    client.sendall(head + encode("INCR", "n") * count)
            wait_for(lambda: admin.get("n") == str(3 * count).encode(), 10,
                     f"{3 * count} INCRs run through port {port}: {admin.get('n')}")


@pytest.mark.parametrize("protocol", [2, 3])
def test_killed_subscriber_is_disconnected_not_resubscribed(redis_server, proxy, protocol):
    direct, proxied = ByteClient(redis_server.port), ByteClient(proxy.port)
    with direct, proxied, redis_server.client() as admin:
        for client in (direct, proxied):
            if protocol == 3:
                client.call("HELLO", "3")
            client.call("SUBSCRIBE", "news")
        assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 2
        assert direct.wait_eof(5) == b""
        assert proxied.wait_eof(5) == b""
        # Nobody subscribed again behind the client's back.
        assert admin.execute_command("PUBSUB", "NUMSUB", "news") == [b"news", 0]
        assert admin.publish("news", "lost") == 0


def test_kill_after_an_upgrade_closes_the_client(redis_server, proxy):
    """The upstream connection handed over in an upgrade is watched in the new image too."""
    with ByteClient(proxy.port) as client, redis_server.client() as admin:
        assert client.call("SET", "k", "v") == b"+OK\r\n"
        own = client_id(client)
        result = upgrade(proxy)
        assert result["kept"] == 1 and result["closed"] == 0, result
        assert client_id(client) == own  # the same upstream connection
        assert admin.execute_command("CLIENT", "KILL", "ID", own) == 1
        assert client.wait_eof(5) == b""


def test_server_idle_timeout_closes_the_client_as_directly(redis_factory, proxy_factory):
    server = redis_factory(extra_args=["--timeout", "1"])
    proxy = proxy_factory(single_topology(server.port))
    direct, proxied = ByteClient(server.port), ByteClient(proxy.port)
    with direct, proxied:
        for client in (direct, proxied):
            assert client.call("PING") == b"+PONG\r\n"
        assert direct.wait_eof(10) == b""
        assert proxied.wait_eof(10) == b""
    # A new client is served as usual.
    with ByteClient(proxy.port) as client:
        assert client.call("PING") == b"+PONG\r\n"


def test_maxclients_reached_as_directly(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(single_topology(server.port))
    with server.client() as admin:
        admin.ping()
        admin.config_set("maxclients", len(server_clients(admin)))
        try:
            with ByteClient(server.port) as direct:
                expected = direct.wait_eof(5)
            assert expected == b"-ERR max number of clients reached\r\n"
            with ByteClient(proxy.port) as proxied:
                proxied.send_raw(encode("PING") + encode("PING"))
                assert proxied.wait_eof(5) == expected
        finally:
            admin.config_set("maxclients", 10000)


# ---- 4. replication commands ---------------------------------------------------------------------


def test_sync_and_psync_are_refused_at_once(redis_server, proxy):
    with ByteClient(proxy.port) as client:
        assert client.call("SYNC") == SYNC_REFUSED
        assert client.call("PSYNC", "?", "-1") == PSYNC_REFUSED
        assert client.call("PING") == b"+PONG\r\n"
        # In a pipeline, with CLIENT REPLY SKIP (the refusal is skipped, as a reply would be).
        client.send_raw(encode("SET", "k", "v") + encode("SYNC") + encode("CLIENT", "REPLY", "SKIP")
                        + encode("PSYNC", "?", "-1") + encode("GET", "k"))
        assert client.read_frames(3) == b"+OK\r\n" + SYNC_REFUSED + b"$1\r\nv\r\n"
        assert client.quiet_for(0.2)
    with redis_server.client() as admin:
        assert admin.info("replication")["connected_slaves"] == 0


def test_replconf_is_refused_at_once(redis_server, proxy):
    # Redis answers REPLCONF ACK/GETACK from a client that is not a replica with nothing at all:
    # forwarded, the next reply would answer the wrong request.
    refused = SYNC_REFUSED.replace(b"SYNC", b"REPLCONF", 1)
    with ByteClient(proxy.port) as client:
        client.send_raw(encode("REPLCONF", "ACK", "0") + encode("PING") +
                        encode("REPLCONF", "GETACK", "*") + encode("REPLCONF", "listening-port", "1")
                        + encode("ECHO", "after"))
        assert client.read_frames(5) == refused + b"+PONG\r\n" + refused + refused + \
            b"$5\r\nafter\r\n"
        # Inside MULTI Redis would queue it and leave a hole in the EXEC reply.
        client.send_raw(encode("MULTI") + encode("REPLCONF", "ACK", "0") + encode("INCR", "n") +
                        encode("EXEC"))
        assert client.read_frames(4) == b"+OK\r\n" + refused + b"+QUEUED\r\n*1\r\n:1\r\n"
        assert client.quiet_for(0.2)


def test_sync_inside_multi_is_refused_by_the_server_as_directly(redis_server, proxy):
    received = []
    for port in (redis_server.port, proxy.port):
        with ByteClient(port) as client:
            client.send_raw(encode("MULTI") + encode("SYNC") + encode("EXEC"))
            received.append(client.read_frames(3))
    assert received[1] == received[0]
    assert received[0].startswith(b"+OK\r\n-ERR Command not allowed inside a transaction")


def test_sync_refused_by_the_cluster_sink(tmp_path, proxy_factory):
    from cluster_support import ClusterNode

    node = ClusterNode(tmp_path / "node").start()
    try:
        with node.client() as admin:
            admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: node.info().get("cluster_state") == "ok", 20, "the cluster to be ok")
        sink = {"RedisSinkCluster": {"first_contact_points": [node.address],
                                     "connect_timeout_ms": 3000}}
        proxy = proxy_factory({"sources": [source_entry("redis", free_port(), [sink])]})
        with ByteClient(proxy.port) as client:
            assert client.call("SET", "k", "v") == b"+OK\r\n"
            assert client.call("SYNC") == SYNC_REFUSED
            assert client.call("PSYNC", "?", "-1") == PSYNC_REFUSED
            assert client.call("GET", "k") == b"$1\r\nv\r\n"
    finally:
        node.kill()


# ---- 8. CLIENT REPLY ------------------------------------------------------------------------------

REPLY_SEQUENCES = [
    ["CLIENT REPLY SKIP", "RESET", "PING"],
    ["CLIENT REPLY OFF", "RESET", "PING"],
    ["CLIENT REPLY SKIP", "CLIENT REPLY SKIP", "PING", "PING"],
    ["CLIENT REPLY SKIP", "CLIENT REPLY ON", "PING"],
    ["CLIENT REPLY SKIP", "CLIENT REPLY OFF", "PING", "CLIENT REPLY ON", "PING"],
    ["CLIENT REPLY OFF", "CLIENT REPLY SKIP", "PING", "CLIENT REPLY ON", "PING"],
    ["CLIENT REPLY SKIP", "RESET", "CLIENT REPLY SKIP", "RESET", "ECHO x"],
    ["SELECT 1", "SET k one", "CLIENT REPLY SKIP", "RESET", "GET k", "SELECT 1", "GET k"],
    ["HELLO 3", "CLIENT REPLY SKIP", "RESET", "PING", "HGETALL nothing"],
    ["HELLO 3", "CLIENT REPLY SKIP", "SUBSCRIBE a b", "PING", "CLIENT REPLY SKIP", "RESET",
     "PING"],
    ["MULTI", "SET k v", "RESET", "EXEC", "GET k"],
    ["CLIENT REPLY SKIP", "MULTI", "SET k v", "EXEC", "GET k"],
    ["CLIENT REPLY OFF", "SET k v", "RESET", "GET k"],
]


def run_reply_sequence(port: int, commands: List[str], split: bool) -> bytes:
    """Every byte a connection receives for `commands` followed by CLIENT REPLY ON and an
    ECHO that marks the end."""
    marker = b"$12\r\nend-of-batch\r\n"
    payloads = [encode(*command.split()) for command in commands]
    payloads += [encode("CLIENT", "REPLY", "ON"), encode("ECHO", "end-of-batch")]
    with ByteClient(port) as client:
        if split:
            for payload in payloads:
                client.send_raw(payload)
        else:
            client.send_raw(b"".join(payloads))
        received = b""
        while not received.endswith(marker):
            received += client.read_frame(5)
        assert client.call("FLUSHALL") == b"+OK\r\n"
    return mask_hello_id(received)


@pytest.mark.parametrize("split", [False, True], ids=["pipelined", "one-write-each"])
@pytest.mark.parametrize("commands", REPLY_SEQUENCES, ids=[" / ".join(s) for s in REPLY_SEQUENCES])
def test_client_reply_sequences_match_redis(redis_server, proxy, commands, split):
    direct = run_reply_sequence(redis_server.port, commands, split)
    proxied = run_reply_sequence(proxy.port, commands, split)
    assert proxied == direct
    log = proxy.log_text()
    assert " ERROR " not in log and "Traceback" not in log, log[-4000:]


def test_skip_then_quit_gets_no_reply(redis_server, proxy):
    """Redis writes nothing for a skipped QUIT (and, being a skipped reply, leaves the
    connection open); the proxy writes nothing either, and closes it as QUIT asks."""
    with ByteClient(redis_server.port) as direct:
        direct.send_raw(encode("CLIENT", "REPLY", "SKIP") + encode("QUIT") + encode("PING"))
        assert direct.quiet_for(0.3)
    with ByteClient(proxy.port) as proxied:
        proxied.send_raw(encode("CLIENT", "REPLY", "SKIP") + encode("QUIT") + encode("PING"))
        assert proxied.wait_eof(5) == b""


def test_skip_then_reset_leaves_the_connection_usable_and_uncounted(redis_server,
                                                                    proxy_factory):
    proxy = proxy_factory(observability=True)
    with ByteClient(proxy.port) as client:
        client.send_raw(encode("CLIENT", "REPLY", "SKIP") + encode("RESET"))
        assert client.call("PING") == b"+PONG\r\n"
        client.send_raw(encode("CLIENT", "REPLY", "SKIP") + encode("RESET") + encode("PING"))
        assert client.read_frame() == b"+PONG\r\n"
    wait_for(lambda: connections_open(proxy) == 0, 10, "the connection to be counted closed")


# ---- 9. timeouts and departed clients ----------------------------------------------------------------


def test_request_timeout_answers_and_drops_the_upstream_connection(silent_server,
                                                                   proxy_factory):
    proxy = proxy_factory(single_topology(silent_server.port, request_timeout_ms=300))
    expected = (f"-ERR upstream {HOST}:{silent_server.port} did not answer within 300 ms\r\n"
                ).encode()
    with ByteClient(proxy.port) as client:
        client.send_raw(encode("GET", "a") + encode("GET", "b"))
        assert client.read_frames(2, timeout=5) == expected * 2
        wait_for(lambda: silent_server.closed == 1, 5, "the upstream connection to be dropped")
        # The client stays connected; its next request goes on a new upstream connection.
        assert client.call("PING") == expected
        assert silent_server.accepted == 2
    assert "did not answer within 300 ms" in proxy.log_text()


def test_request_timeout_then_the_session_is_replayed(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(single_topology(server.port, request_timeout_ms=300))
    with ByteClient(proxy.port) as client:
        assert client.call("SELECT", "2") == b"+OK\r\n"
        assert client.call("SET", "k", "in-db-2") == b"+OK\r\n"
        server.process.send_signal(signal.SIGSTOP)
        try:
            reply = client.call("GET", "k", frames=1)
            assert reply.startswith(b"-ERR upstream ") and b"did not answer within" in reply
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert client.call("GET", "k") == b"$7\r\nin-db-2\r\n"


def test_request_timeout_for_a_subscriber_then_it_is_subscribed_again(redis_factory,
                                                                        proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(single_topology(server.port, request_timeout_ms=300))
    with ByteClient(proxy.port) as subscriber, server.client() as admin:
        subscriber.call("SUBSCRIBE", "news")
        server.process.send_signal(signal.SIGSTOP)
        try:
            reply = subscriber.call("PING")
            assert reply.startswith(b"-ERR upstream ") and b"did not answer within" in reply
        finally:
            server.process.send_signal(signal.SIGCONT)
        # The proxy's own decision: the subscriber stays, subscribed again on a new connection.
        wait_for(lambda: admin.execute_command("PUBSUB", "NUMSUB", "news") == [b"news", 1], 10,
                 "the subscriber to be subscribed again")
        assert admin.publish("news", "again") == 1
        assert subscriber.read_frame() == b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nagain\r\n"


def test_blocking_commands_are_not_cut_by_the_request_timeout(redis_server, proxy_factory):
    proxy = proxy_factory(single_topology(redis_server.port, request_timeout_ms=200))
    with ByteClient(proxy.port) as client, redis_server.client() as admin:
        # Its own timeout (1 s) runs out, not the proxy's: a null reply, not an error.
        assert client.call("BLPOP", "queue", "1") == b"*-1\r\n"
        assert client.call("XREAD", "BLOCK", "700", "STREAMS", "s", "$") == b"*-1\r\n"
        client.send("BLPOP", "queue", "0")
        assert client.quiet_for(0.6)  # three request timeouts: still waiting, as it should
        admin.lpush("queue", "job")
        assert client.read_frame() == b"*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n"
        assert client.call("PING") == b"+PONG\r\n"


def test_client_leaving_while_its_request_waits_is_noticed(silent_server, proxy_factory):
    topology = single_topology(silent_server.port, request_timeout_ms=0)  # no request timeout
    proxy = proxy_factory(topology, observability=True)
    client = ByteClient(proxy.port)
    client.send("GET", "k")
    wait_for(lambda: b"GET" in silent_server.received, 5, "the request to reach the server")
    assert connections_open(proxy) == 1
    client.close()
    wait_for(lambda: connections_open(proxy) == 0, 10, "the connection to be counted closed")
    wait_for(lambda: silent_server.closed == 1, 5, "the upstream connection to be closed")


def test_request_timeout_option_is_checked():
    problems = Problems()
    config = redis_sink_single.parse({"remote_address": "127.0.0.1:6379"}, "sink", problems)
    assert config.request_timeout_ms == redis_sink_single.DEFAULT_REQUEST_TIMEOUT_MS
    assert not problems.items
    redis_sink_single.parse({"remote_address": "127.0.0.1:6379", "request_timeout_ms": -1},
                            "sink", problems)
    assert problems.items == ["sink.request_timeout_ms: must be a number of milliseconds, or 0 "
                              "for no request timeout"]


def test_redis_py_client_times_out_cleanly(silent_server, proxy_factory):
    """What an application sees: a ResponseError naming the timeout, and the same client goes
    on working once the server answers again (here: never, so the error again)."""
    proxy = proxy_factory(single_topology(silent_server.port, request_timeout_ms=200))
    with redis_client(proxy.port) as client:
        for _ in range(2):
            with pytest.raises(redis.ResponseError, match="did not answer within 200 ms"):
                client.get("k")


# ---- own connections served from the event loop's callbacks -----------------------------------
#
# From its second batch on, a client whose own upstream connection is in the plain state has its
# batches written and their replies read by callbacks of the event loop (connection.py, _Lane;
# UpstreamConnection.lane_call); its greenlet finishes whatever they cannot.


def test_a_batch_the_server_does_not_take_at_once_is_written_whole(redis_factory):
    """A batch written from the event loop that the socket does not take at once (the server
    has stopped reading): the client's greenlet writes the rest, then reads every reply."""
    import gevent

    from shotover_gevent.message import Message
    from shotover_gevent.session import Session
    from shotover_gevent.upstream import UpstreamConnection

    server = redis_factory()
    value = b"w" * 150_000
    requests = [Message(encode("SET", f"w{index}", value)) for index in range(200)]

    class Waiter:
        outcome = None

        def switch(self, replies):
            self.outcome = ("replies", replies)

        def trouble(self):
            self.outcome = ("trouble", None)

    upstream = UpstreamConnection((HOST, server.port), 3.0, Session(), lambda frame: None)
    waiter = Waiter()
    try:
        assert upstream.lane_ready()
        server.process.send_signal(signal.SIGSTOP)
        try:
            # 30 MB: more than the socket and the stopped server's take (4 + 6 MiB at most).
            upstream.lane_call(requests, b"".join(r.raw for r in requests), waiter)
            with gevent.Timeout(10, AssertionError("no word from the batch")):
                while waiter.outcome is None:
                    gevent.sleep(0.01)
            assert waiter.outcome[0] == "trouble"
        finally:
            server.process.send_signal(signal.SIGCONT)
        with gevent.Timeout(30, AssertionError("the rest of the batch was not written")):
            replies = upstream.resume_lane()
        assert [reply.raw for reply in replies] == [b"+OK\r\n"] * 200
    finally:
        upstream.close()
    assert server.client().get("w199") == value


def test_the_request_timeout_tick_leaves_a_batch_served_by_callbacks_as_it_is(redis_factory):
    """The request timeout's look at a connection that owes replies (every tick, for every such
    connection) reads the request owed without turning the callbacks' batch into Message
    objects, which would send its replies down the general path instead of relaying them."""
    import time

    import gevent

    from shotover_gevent.session import Session
    from shotover_gevent.upstream import UpstreamConnection

    server = redis_factory()
    framed = [(encode("GET", "k"), b"GET"), (encode("PING"), b"PING")]

    class Waiter:
        replies = None

        def relay_fd(self):
            return -1

        def switch(self, replies):
            self.replies = replies

        def trouble(self):
            self.replies = "trouble"

    upstream = UpstreamConnection((HOST, server.port), 3.0, Session(), lambda frame: None,
                                  request_timeout=5.0)
    waiter = Waiter()
    try:
        server.process.send_signal(signal.SIGSTOP)
        try:
            assert upstream.lane_ready()
            upstream.lane_call(framed, b"".join(raw for raw, _name in framed), waiter)
            upstream._check_wait(time.monotonic())  # what the tick does: replies are owed
            assert upstream._batch is framed and framed[0] == (encode("GET", "k"), b"GET")
        finally:
            server.process.send_signal(signal.SIGCONT)
        with gevent.Timeout(10, AssertionError("no replies")):
            while waiter.replies is None:
                gevent.sleep(0.01)
        assert waiter.replies == [b"$-1\r\n", b"+PONG\r\n"]
    finally:
        upstream.close()


def test_a_request_timeout_during_a_batch_served_by_callbacks(redis_factory, proxy_factory):
    server = redis_factory()
    proxy = proxy_factory(single_topology(server.port, request_timeout_ms=300))
    with ByteClient(proxy.port) as client:
        assert client.call("SET", "k", "v") == b"+OK\r\n"
        assert client.call("GET", "k") == b"$1\r\nv\r\n"
        server.process.send_signal(signal.SIGSTOP)
        try:
            reply = client.call("GET", "k", frames=1)
            assert reply == (f"-ERR upstream {HOST}:{server.port} did not answer within 300 "
                             "ms\r\n").encode()
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert client.call("GET", "k") == b"$1\r\nv\r\n"  # on a new upstream connection


# ---- opening the upstream connection ------------------------------------------------------------


def test_an_upstream_connection_that_is_refused_or_never_accepted_gives_its_error(
        redis_factory, proxy_factory):
    """Opening the upstream connection: over loopback the handshake is done within connect()
    and the proxy goes on without waiting; a refused connection and one the server never
    completes still give the client their error, the latter after connect_timeout_ms."""
    import time

    server = redis_factory()
    refused_port = free_port()
    # A server whose accept queue is full: the handshake of the next connection never ends.
    stuck = socket.socket()
    stuck.bind((HOST, 0))
    stuck.listen(0)
    filler = socket.create_connection(stuck.getsockname())
    try:
        proxies = {name: proxy_factory(single_topology(port, connect_timeout_ms=400))
                   for name, port in (("up", server.port), ("refused", refused_port),
                                      ("stuck", stuck.getsockname()[1]))}
        with ByteClient(proxies["up"].port) as client:
            assert client.call("SET", "k", "v") == b"+OK\r\n"
        with ByteClient(proxies["refused"].port) as client:
            reply = client.call("GET", "k")
            assert reply.startswith(b"-ERR") and b"refused" in reply, reply
        with ByteClient(proxies["refused"].port) as client:
            # A first batch of several requests: each gets the error, in one answer, and the
            # connection carries on (its next request tries the server again).
            client.send_raw(encode("GET", "k") + encode("PING") + encode("INCR", "n"))
            replies = [client.read_frame() for _ in range(3)]
            assert replies == [reply] * 3, replies
            assert client.call("PING") == reply
        with ByteClient(proxies["stuck"].port) as client:
            began = time.monotonic()
            reply = client.call("GET", "k")
            waited = time.monotonic() - began
            assert reply.startswith(b"-ERR") and b"timed out" in reply, reply
            assert waited >= 0.35, waited  # it did wait for the handshake
    finally:
        filler.close()
        stuck.close()
