"""RedisSinkSingle with `shared_connections`: clients in the default session share upstream
connections; any client that changes or depends on its connection gets one of its own."""

from __future__ import annotations

import os
import signal
import socket
import time

import hiredis
import pytest

from helpers import HOST, RawClient, encode, shared_topology, wait_for
from upgrade_support import CounterLoad, status, upgrade_ok


def proxy_connections(server) -> int:
    """Connections on `server` other than the one asking."""
    with server.client() as admin:
        return len(admin.client_list()) - 1


def wait_for_connections(server, count: int, at_most: bool = False) -> None:
    """Wait until the server holds `count` connections besides the one asking (connections
    of earlier tests' proxies may still be closing)."""
    def matches() -> bool:
        held = proxy_connections(server)
        return held <= count if at_most else held == count

    wait_for(matches, 10, f"the server to hold {count} connection(s) from the proxy")


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
        wait_for_connections(redis_server, 1)
    finally:
        for client in clients:
            client.close()


def test_a_client_that_changes_its_connection_gets_its_own(shared_proxy, redis_server):
    with RawClient(shared_proxy.port) as plain, RawClient(shared_proxy.port) as own:
        assert plain.call("SET", "k", "db0") == b"OK"
        assert own.call("SET", "k", "db0-too") == b"OK"  # shared so far
        wait_for_connections(redis_server, 1)
        assert own.call("SELECT", "3") == b"OK"
        assert own.call("SET", "k", "db3") == b"OK"
        assert own.call("CLIENT", "SETNAME", "mine") == b"OK"
        assert own.call("CLIENT", "GETNAME") == b"mine"
        assert plain.call("GET", "k") == b"db0-too"
        assert own.call("GET", "k") == b"db3"
        wait_for_connections(redis_server, 2)
        # A transaction runs on the client's own connection, whatever the others send.
        own.send(encode("MULTI") + encode("INCR", "t") + encode("INCR", "t"))
        assert own.read_replies(3) == [b"OK", b"QUEUED", b"QUEUED"]
        assert plain.call("INCR", "t") == 1  # database 0: not the transaction's key
        assert own.call("EXEC") == [1, 2]
    assert redis_server.client(db=3).get("t") == b"2"


def test_a_command_redis_does_not_answer_never_shifts_the_replies(shared_proxy, redis_server):
    # REPLCONF ACK gets no reply from Redis: on a shared connection every later reply would
    # go to the client before (another client's value to the wrong client).
    with RawClient(shared_proxy.port) as first, RawClient(shared_proxy.port) as second:
        assert second.call("SET", "secret", "second's") == b"OK"
        first.send(encode("REPLCONF", "ACK", "0"))
        reply = first.read_reply()
        assert isinstance(reply, hiredis.ReplyError) and "REPLCONF" in str(reply), reply
        assert second.call("GET", "secret") == b"second's"
        assert first.call("PING") == b"PONG"
        assert second.call("PING") == b"PONG"


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
    wait_for_connections(redis_server, 1, at_most=True)


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
    with CounterLoad(proxy.port, "shared", 30) as load:
        for _ in range(3):
            result = upgrade_ok(proxy)
            assert "kept 30 connections" in result.stdout, result
            assert not load.failures(), load.failures()[:5]
        load.wait_for_more_batches(2)
        assert status(proxy.control_socket)["generation"] == 3
    assert not load.failures(), load.failures()[:5]
    assert load.counts_match(redis_server.client())
    # Two shared connections carried 30 clients.
    wait_for_connections(redis_server, 2)


def test_a_stalled_proxy_does_not_time_out_replies_that_came_meanwhile(proxy_factory,
                                                                        redis_factory):
    # The proxy itself stopped (a long GC pause, throttling): when it runs again, the replies
    # that arrived meanwhile are read before the request timeout is judged.
    upstream = redis_factory()
    proxy = proxy_factory(shared_topology(upstream.port, request_timeout_ms=300))
    worker = status(proxy.control_socket)["workers"][0]["pid"]
    with RawClient(proxy.port) as client:
        assert client.call("SET", "k", "v") == b"OK"
        upstream.process.send_signal(signal.SIGSTOP)
        try:
            client.send(encode("GET", "k") * 5)
            wait_for(lambda: sent_upstream(worker, upstream.port), 10,
                     "the GETs to be written to the stopped server")
            os.kill(worker, signal.SIGSTOP)
        finally:
            upstream.process.send_signal(signal.SIGCONT)
        try:
            wait_for(lambda: get_calls(upstream) >= 5, 10, "Redis to answer the GETs")
            stopped = time.monotonic()
            wait_for(lambda: time.monotonic() - stopped > 0.6, 5,
                     "the worker to stay stopped past the request timeout")
        finally:
            os.kill(worker, signal.SIGCONT)
        assert client.read_replies(5, timeout=10) == [b"v"] * 5


def sent_upstream(pid: int, port: int) -> bool:
    """Whether a socket of `pid` towards `port` has bytes the peer has not read."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            send_queue = int(fields[4].split(":")[0], 16)
            if remote_port == port and fields[9] in inodes and send_queue:
                return True
    return False


def get_calls(server) -> int:
    with server.client() as admin:
        return int(admin.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_clients_waiting_for_a_connection_share_its_failure(proxy_factory):
    # A server that does not answer connects: the clients that came while the proxy tried get
    # its failure, instead of one connect timeout each in turn.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        port = blackhole.getsockname()[1]
        # Fill the accept queue: further connects then wait for the timeout.
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            topology = shared_topology(port, connect_timeout_ms=2000)
            proxy = proxy_factory(topology)
            clients = [RawClient(proxy.port, timeout=30) for _ in range(8)]
            try:
                for client in clients:
                    client.send(encode("PING"))
                answers = [client.read_reply(timeout=30) for client in clients]
            finally:
                for client in clients:
                    client.close()
        finally:
            for filler in fillers:
                filler.close()
    assert all(isinstance(a, hiredis.ReplyError) and "unavailable" in str(a) for a in answers), \
        answers
    # One attempt answered all of them (attempts in turn: one connect timeout each).
    assert proxy.log_text().count("could not be opened") == 1, proxy.log_text()[-3000:]


def test_large_values_move_a_client_to_its_own_connection(shared_proxy, redis_server):
    big = b"x" * (128 * 1024)
    with RawClient(shared_proxy.port) as writer, RawClient(shared_proxy.port) as reader, \
            RawClient(shared_proxy.port) as plain:
        assert plain.call("SET", "small", "1") == b"OK"
        assert reader.call("GET", "small") == b"1"
        wait_for_connections(redis_server, 1)
        assert writer.call("SET", "big", big) == b"OK"  # a large request
        wait_for_connections(redis_server, 2)
        assert reader.call("GET", "big") == big  # a large reply: from now on its own
        assert reader.call("GET", "small") == b"1"
        assert plain.call("GET", "small") == b"1"
        wait_for_connections(redis_server, 3)


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_batch_of_large_replies_is_not_held_past_the_output_buffer_limit(proxy_factory,
                                                                          redis_server):
    """On a shared connection too, a client that pipelines GETs of large values and reads
    nothing is closed once the replies pass its output_buffer_limit: the rest is read and
    dropped as it comes instead of held (32 x 2 MiB here), and the others go on."""
    from helpers import http_request, metric_value

    topology = shared_topology(redis_server.port)
    topology["sources"][0]["Redis"]["output_buffer_limit"] = 4 * 1024 * 1024
    proxy = proxy_factory(topology, observability=True)
    worker = status(proxy.control_socket)["workers"][0]["pid"]
    with redis_server.client() as admin:
        admin.set("large", b"l" * (2 * 1024 * 1024))
    with RawClient(proxy.port) as client, RawClient(proxy.port) as other:
        assert client.call("PING") == b"PONG"
        assert other.call("PING") == b"PONG"
        peer = "%s:%d" % client.sock.getsockname()
        before = peak_rss_kib(worker)
        client.send(b"*2\r\n$3\r\nGET\r\n$5\r\nlarge\r\n" * 32)
        replies = client.wait_eof(30)
        assert len(replies) <= 2 and all(reply == b"l" * (2 * 1024 * 1024) for reply in replies)
        assert other.call("PING") == b"PONG"
        assert other.call("SET", "k", "v") == b"OK"
    grown = peak_rss_kib(worker) - before
    assert grown < 40 * 1024, f"peak RSS grew by {grown} KiB"
    text = http_request(proxy.metrics_url)[1]
    assert metric_value(text, "shotover_g_connections_closed_total", source="redis",
                        reason="output buffer limit") == 1
    # Said once (the sink judged the replies; the connection does not say it again).
    said = [line for line in proxy.log_text().splitlines()
            if f"closing connection from {peer}:" in line]
    assert len(said) == 1, said


# ---- served from the event loop's callbacks ---------------------------------------------------
#
# From its second batch on, a client on a shared connection is served by the event loop's
# callbacks (connection.py, _Lane); whatever they do not handle goes back to its greenlet.


def test_replies_that_do_not_fit_the_client_socket_are_all_written(shared_proxy, redis_server):
    value = b"v" * 60_000  # under the size that moves a client to its own connection
    redis_server.client().set("big", value)
    with RawClient(shared_proxy.port, timeout=30) as client:
        # A bounded receive window: the replies to one batch (128 of them, 7.7 MB) cannot be
        # written at once (the proxy's send buffer grows to 4 MiB at most); the rest goes out
        # as the client reads.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        assert client.call("PING") == b"PONG"
        count = 300
        client.send(encode("GET", "big") * count + encode("INCR", "after"))
        replies = client.read_replies(count + 1)
        assert replies[:count] == [value] * count
        assert replies[count] == 1
        assert client.call("INCR", "after") == 2
    wait_for_connections(redis_server, 1)  # still on the shared connection


def test_clients_that_leave_with_replies_owed_disturb_nobody(shared_proxy, redis_server):
    with RawClient(shared_proxy.port) as other:
        assert other.call("PING") == b"PONG"
        for index in range(30):
            leaving = socket.create_connection((HOST, shared_proxy.port))
            leaving.sendall(encode("PING"))
            assert leaving.recv(64) == b"+PONG\r\n"
            leaving.sendall(encode("SET", f"gone{index}", "x") + encode("GET", "gone0"))
            leaving.close()
            assert other.call("INCR", "n") == index + 1
        wait_for(lambda: redis_server.client().exists(*[f"gone{i}" for i in range(30)]) == 30,
                 10, "every request sent before its client left to have run")
    wait_for(lambda: status(shared_proxy.control_socket)["sources"]["redis"]["connections"] == 0, 10,
             "the proxy to have closed every client connection")


def test_a_protocol_error_after_plain_batches_is_answered_then_closed(shared_proxy):
    with RawClient(shared_proxy.port) as client:
        assert client.call("SET", "k", "v") == b"OK"
        assert client.call("GET", "k") == b"v"
        client.send(encode("GET", "k") + b"*1\r\n$abc\r\n")
        assert client.read_reply() == b"v"
        error = client.read_reply()
        assert str(error) == "ERR Protocol error: invalid bulk length", error
        with pytest.raises(EOFError):
            client.read_reply()


def test_requests_added_to_the_batch_queued_last_are_answered_with_it(redis_server):
    """SharedConnection.extend: what is added to the batch queued last, still owed replies, is
    answered with that batch, to its waiter, in order; a batch queued after it, or its
    answer, ends that (owes_last says whether it may still be added to)."""
    from gevent.hub import Waiter

    from shotover_gevent.shared_upstream import SharedConnection

    key = f"extended:{os.getpid()}:{time.monotonic_ns()}"
    connection = SharedConnection((HOST, redis_server.port), 5.0, None)
    try:
        first, second = Waiter(), Waiter()
        connection.submit(encode("SET", key, "1"), 1, None, first)
        assert connection.owes_last(first)
        assert connection.extend(first, encode("INCR", key) + encode("GET", key), 2)
        assert not connection.extend(second, encode("GET", key), 1)
        assert connection.owes_last(first) and not connection.owes_last(second)
        connection.submit(encode("DEL", key), 1, None, second)
        assert not connection.owes_last(first) and connection.owes_last(second)
        assert not connection.extend(first, encode("GET", key), 1)
        assert first.get() == ([b"+OK\r\n", b":2\r\n", b"$1\r\n2\r\n"], None)
        assert second.get() == ([b":1\r\n"], None)
        assert not connection.extend(second, encode("GET", key), 1)  # answered
    finally:
        connection.close()
