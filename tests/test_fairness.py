"""One client cannot hold the proxy: another client is served while it floods."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from helpers import HOST, RawClient, encode, shared_topology, wait_for


def test_flooding_client_does_not_freeze_the_others(proxy):
    """A client sends an endless multibulk (`*1000000000` then `$1 a` elements) as fast as it
    can. Another client's PING must be answered while the flood is still going on, not after
    it (the flooder's greenlet never had to wait for data, so it never let others run)."""
    flood_done = threading.Event()
    sent = {"bytes": 0}

    def flood() -> None:
        element = b"$1\r\na\r\n" * 9362  # about 64 KiB
        deadline = time.monotonic() + 8
        try:
            with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
                sock.sendall(b"*1000000000\r\n")
                while time.monotonic() < deadline and sent["bytes"] < 64 * 1024 * 1024:
                    sock.sendall(element)
                    sent["bytes"] += len(element)
        except OSError:
            pass
        finally:
            flood_done.set()

    flooder = threading.Thread(target=flood, daemon=True)
    with RawClient(proxy.port, timeout=30) as other:
        assert other.call("PING") == b"PONG"
        flooder.start()
        deadline = time.monotonic() + 5
        while sent["bytes"] < 4 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.01)  # let the flood get going (not synchronisation of the check)
        assert other.call("PING") == b"PONG"
        answered_during_flood = not flood_done.is_set()
        flooder.join(30)
    assert answered_during_flood, f"PING answered only after the flood ({sent['bytes']} bytes)"


def _worker_pid(proxy) -> int:
    """The proxy's one worker (the process started is its supervisor)."""
    with open(f"/proc/{proxy.pid}/task/{proxy.pid}/children") as children:
        pids = [int(pid) for pid in children.read().split()]
    assert len(pids) == 1, pids
    return pids[0]


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_holds_one_batch_not_its_whole_pipeline(proxy, redis_server):
    """A client pipelines 20,000 GETs of a 100 KB value and reads nothing: the proxy holds the
    replies of one batch at a time (it used to read thousands of requests at once and hold all
    their replies, hundreds of MB), and serves everyone else meanwhile."""
    direct = redis_server.client()
    direct.set("big", b"v" * 100_000)

    def processed() -> int:
        return int(direct.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

    with RawClient(proxy.port) as other:
        assert other.call("PING") == b"PONG"
        worker = _worker_pid(proxy)
        before = _rss_bytes(worker)
        greedy = socket.create_connection((HOST, proxy.port), timeout=10)
        try:
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            pipeline = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 20_000
            sender = threading.Thread(target=lambda: _send_quietly(greedy, pipeline), daemon=True)
            sender.start()
            # Wait until the proxy has stopped sending GETs upstream: it waits for the client.
            last = [processed(), time.monotonic()]

            def settled() -> bool:
                now = processed()
                if now != last[0]:
                    last[:] = [now, time.monotonic()]
                    return False
                return time.monotonic() - last[1] > 1.0

            wait_for(settled, 30, "the proxy to stop reading the client's pipeline")
            grown = _rss_bytes(worker) - before
            assert other.call("PING") == b"PONG"
            assert grown < 100 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
        finally:
            greedy.close()


def test_clients_that_reset_while_owed_large_replies_leave_nothing_behind(proxy_factory,
                                                                         redis_server):
    """Clients pipeline GETs of a large value and reset the connection (RST) without reading:
    the proxy serves what they sent, the write fails, and everything goes with the connection.
    It used to keep each such connection and the replies it was writing in a reference cycle
    through the write's error (its traceback), which only a full garbage collection frees: the
    worker grew by a gigabyte over a hundred such clients, and stayed there."""
    from helpers import http_request, metric_value

    proxy = proxy_factory(observability=True)
    with redis_server.client() as admin:
        admin.set("large", b"l" * 200_000)
    worker = _worker_pid(proxy)
    request = encode("GET", "large") * 40  # 8 MB of replies

    def open_connections():
        text = http_request(proxy.metrics_url)[1]
        return metric_value(text, "shotover_g_connections_open", source="redis")

    with RawClient(proxy.port) as other:
        assert other.call("PING") == b"PONG"
        before = _rss_bytes(worker)
        for _ in range(100):
            with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
                sock.sendall(request)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: open_connections() == 1, 60, "the clients that reset to be closed")
        assert other.call("PING") == b"PONG"
        grown = _rss_bytes(worker) - before
        assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_output_buffer_limit_closes_the_client_and_counts_it(proxy_factory, redis_server):
    from helpers import http_request, metric_value, passthrough_topology

    topology = passthrough_topology(redis_server.port)
    topology["sources"][0]["Redis"]["output_buffer_limit"] = 1024 * 1024
    proxy = proxy_factory(topology, observability=True)
    direct = redis_server.client()
    direct.set("small", b"s" * 1000)
    direct.set("large", b"l" * (2 * 1024 * 1024))
    with RawClient(proxy.port) as client, RawClient(proxy.port) as other:
        assert client.call("GET", "small") == b"s" * 1000
        client.send(b"*2\r\n$3\r\nGET\r\n$5\r\nlarge\r\n")
        assert client.wait_eof() == []
        assert other.call("GET", "small") == b"s" * 1000
    text = http_request(proxy.metrics_url)[1]
    assert metric_value(text, "shotover_g_connections_closed_total", source="redis",
                        reason="output buffer limit") == 1
    assert "over the source's output_buffer_limit" in proxy.log_text()


def test_a_batch_of_large_replies_is_not_read_past_the_output_buffer_limit(proxy_factory,
                                                                          redis_server):
    """A client pipelines 64 GETs of a 1 MiB value and reads nothing, with a 4 MiB
    output_buffer_limit: the proxy stops reading the batch's replies once they pass the limit
    and closes the client, rather than holding all 64 MiB first (a pipeline of larger values
    made gigabytes)."""
    from helpers import http_request, metric_value, passthrough_topology

    topology = passthrough_topology(redis_server.port)
    topology["sources"][0]["Redis"]["output_buffer_limit"] = 4 * 1024 * 1024
    proxy = proxy_factory(topology, observability=True)
    with redis_server.client() as admin:
        admin.set("large", b"l" * (1024 * 1024))
        sent_before = int(admin.info("stats")["total_net_output_bytes"])
    with RawClient(proxy.port) as client, RawClient(proxy.port) as other:
        assert client.call("PING") == b"PONG"
        client.send(b"*2\r\n$3\r\nGET\r\n$5\r\nlarge\r\n" * 64)
        client.wait_eof(30)
        assert other.call("PING") == b"PONG"
    with redis_server.client() as admin:
        sent = int(admin.info("stats")["total_net_output_bytes"]) - sent_before
    # Redis wrote what the limit let through plus what the sockets held when the proxy hung
    # up: far from the 64 MiB the batch asked for.
    assert sent < 32 * 1024 * 1024, sent
    text = http_request(proxy.metrics_url)[1]
    assert metric_value(text, "shotover_g_connections_closed_total", source="redis",
                        reason="output buffer limit") == 1
    assert "over the source's output_buffer_limit" in proxy.log_text()


@pytest.mark.parametrize("upstream", ["own", "shared"])
def test_a_client_that_sends_its_whole_pipeline_before_reading_gets_every_reply(
        upstream, proxy_factory, redis_server):
    """redis-py's pipelines write every request before reading any reply. With replies too big
    for the sockets in between, Redis reads on and keeps the replies; the proxy used to stop
    reading until the client read, and the client was still writing: both waited for ever."""
    proxy = proxy_factory(shared_topology(redis_server.port) if upstream == "shared" else None)
    value = b"v" * 60_000  # under 64 KiB: a shared client stays on its shared connection
    count = 300
    pipeline = b"".join(encode("SET", f"pipe:{i}", value) + encode("GET", f"pipe:{i}")
                        for i in range(count))
    sock = socket.create_connection((HOST, proxy.port), timeout=30)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert sock.sendall(encode("PING")) is None and sock.recv(64) == b"+PONG\r\n"
        sent = threading.Event()
        sender = threading.Thread(target=lambda: (_send_quietly(sock, pipeline), sent.set()),
                                  daemon=True)
        sender.start()
        assert sent.wait(20), "the proxy stopped reading a client that had not read yet"
        expected = (b"+OK\r\n" + b"$60000\r\n" + value + b"\r\n") * count
        received = bytearray()
        deadline = time.monotonic() + 30
        while len(received) < len(expected) and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        assert bytes(received) == expected
    finally:
        sock.close()
