"""RedisSinkSingle with `shared_connections`: clients in the default session share upstream
connections; any client that changes or depends on its connection gets one of its own."""

from __future__ import annotations

import signal
import threading

import hiredis
import pytest

from helpers import RawClient, encode, free_port, passthrough_topology, wait_for
from upgrade_support import CounterClient, status, upgrade_ok


def shared_topology(redis_port: int, count: int = 1, **sink_options):
    topology = passthrough_topology(redis_port, free_port())
    settings = topology["sources"][0]["Redis"]["chain"][-1]["RedisSinkSingle"]
    settings["shared_connections"] = count
    settings.update(sink_options)
    return topology


def proxy_connections(server) -> int:
    """Connections on `server` other than the one asking."""
    with server.client() as admin:
        return len(admin.client_list()) - 1


@pytest.fixture
def shared_proxy(proxy_factory, redis_server):
    return proxy_factory(shared_topology(redis_server.port))


def test_plain_clients_share_one_upstream_connection(shared_proxy, redis_server):
    clients = [RawClient(shared_proxy.port) for _ in range(20)]
    try:
        for round_number in range(3):
            # Every client's pipeline goes out before any reply is read: their batches meet on
            # the shared connection, and each must get exactly its own replies back.
            for index, client in enumerate(clients):
                client.send(encode("SET", f"k{index}", f"{index}-{round_number}") +
                            encode("GET", f"k{index}") + encode("INCR", f"n{index}"))
            for index, client in enumerate(clients):
                assert client.read_replies(3) == [b"OK", f"{index}-{round_number}".encode(),
                                                  round_number + 1]
        assert proxy_connections(redis_server) == 1
    finally:
        for client in clients:
            client.close()


def test_a_client_that_changes_its_connection_gets_its_own(shared_proxy, redis_server):
    with RawClient(shared_proxy.port) as plain, RawClient(shared_proxy.port) as own:
        assert plain.call("SET", "k", "db0") == b"OK"
        assert own.call("SET", "k", "db0-too") == b"OK"  # shared so far
        assert proxy_connections(redis_server) == 1
        assert own.call("SELECT", "3") == b"OK"
        assert own.call("SET", "k", "db3") == b"OK"
        assert own.call("CLIENT", "SETNAME", "mine") == b"OK"
        assert own.call("CLIENT", "GETNAME") == b"mine"
        assert plain.call("GET", "k") == b"db0-too"
        assert own.call("GET", "k") == b"db3"
        assert proxy_connections(redis_server) == 2
        # A transaction runs on the client's own connection, whatever the others send.
        own.send(encode("MULTI") + encode("INCR", "t") + encode("INCR", "t"))
        assert own.read_replies(3) == [b"OK", b"QUEUED", b"QUEUED"]
        assert plain.call("INCR", "t") == 1  # database 0: not the transaction's key
        assert own.call("EXEC") == [1, 2]
    assert redis_server.client(db=3).get("t") == b"2"


def test_a_blocked_client_does_not_hold_the_shared_connection(shared_proxy, redis_server):
    with RawClient(shared_proxy.port) as waiting, RawClient(shared_proxy.port) as other:
        assert waiting.call("PING") == b"PONG"  # on the shared connection until now
        waiting.send(encode("BLPOP", "queue", "0"))
        wait_for(lambda: redis_server.client().info("clients")["blocked_clients"] == 1, 10,
                 "the BLPOP to block on the server")
        for number in range(20):
            assert other.call("INCR", "busy") == number + 1
        assert other.call("RPUSH", "queue", "job") == 1
        assert waiting.read_reply() == [b"queue", b"job"]


def test_a_shared_connection_the_server_closes_is_opened_again(shared_proxy, redis_server):
    with RawClient(shared_proxy.port) as client:
        assert client.call("SET", "k", "v") == b"OK"
        with redis_server.client() as admin:
            killed = admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed == 1
        # Requests that meet the closing connection get an error (the client's connection
        # stays: other clients' requests were on it too); the next ones go on a new one.
        wait_for(lambda: client.call("GET", "k") == b"v", 10,
                 "requests to be answered on a new shared connection")
        assert [client.call("GET", "k") for _ in range(20)] == [b"v"] * 20
    assert proxy_connections(redis_server) <= 1


def test_a_hung_server_fails_shared_requests_after_the_request_timeout(proxy_factory,
                                                                       redis_factory):
    upstream = redis_factory()
    proxy = proxy_factory(shared_topology(upstream.port, request_timeout_ms=300))
    with RawClient(proxy.port) as first, RawClient(proxy.port) as second:
        assert first.call("SET", "k", "v") == b"OK"
        upstream.process.send_signal(signal.SIGSTOP)
        try:
            first.send(encode("GET", "k"))
            second.send(encode("GET", "k"))
            for client in (first, second):
                reply = client.read_reply(timeout=10)
                assert isinstance(reply, hiredis.ReplyError), reply
                assert "did not answer within 300 ms" in str(reply), reply
        finally:
            upstream.process.send_signal(signal.SIGCONT)
        wait_for(lambda: first.call("GET", "k") == b"v", 15,
                 "requests to succeed once the server answers again")
        assert second.call("GET", "k") == b"v"


def test_clients_on_shared_connections_keep_every_reply_across_upgrades(proxy_factory,
                                                                        redis_server):
    proxy = proxy_factory(shared_topology(redis_server.port, count=2))
    stop = threading.Event()
    clients = [CounterClient(proxy.port, f"shared:{i}", stop, seed=i) for i in range(30)]
    for client in clients:
        client.start()
    try:
        for client in clients:
            assert client.connected.wait(15), f"{client.key} could not connect"
        wait_for(lambda: all(c.batches > 0 or c.error for c in clients), 30,
                 "every client to complete a batch")
        for _ in range(3):
            result = upgrade_ok(proxy)
            assert "kept 30 connections" in result.stdout, result
            failed = [f"{c.key}: {c.error}" for c in clients if c.error]
            assert not failed, failed[:5]
        marks = {client.key: client.batches for client in clients}
        wait_for(lambda: all(c.batches >= marks[c.key] + 2 or c.error for c in clients), 60,
                 "every client to complete two more batches after the last upgrade")
        assert status(proxy.control_socket)["generation"] == 3
    finally:
        stop.set()
        for client in clients:
            client.join(40)
    failed = [f"{c.key}: {c.error}" for c in clients if c.error]
    assert not failed, failed[:5]
    counts = redis_server.client().mget([client.key for client in clients])
    assert [int(n or 0) for n in counts] == [client.received for client in clients]
    # Two shared connections carried 30 clients.
    assert proxy_connections(redis_server) == 2
