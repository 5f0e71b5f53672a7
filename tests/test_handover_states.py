"""Upgrades hand every connection over in the state it is in: a blocked command, a transaction,
WATCHed keys, MONITOR, tracking, a pipeline cut anywhere, replies not yet written; and no
connection made at the moment of the switch is lost."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from feature_support import ByteClient, client_ssl_context, make_certificates, topology
from helpers import (HOST, RawClient, encode, free_port, http_request, metric_value,
                     passthrough_topology, sink, source_entry, wait_for)
from upgrade_support import (BackgroundUpgrade, interpreter_gated_at_restore,
                             ping_on_a_new_connection, status, upgrade, upgrade_ok)


def blocked_on(direct, command: str) -> int:
    """How many of the server's clients are blocked in `command` right now."""
    return sum(1 for c in direct.client_list()
               if c.get("cmd") == command and "b" in c.get("flags", ""))


class BusyClients:
    """Clients that each INCR their own key in a loop, checking every reply, and time it."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.errors: list = []
        self.worst = 0.0
        self.requests = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(count)]

    def __enter__(self) -> "BusyClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        key = f"busy:{index}"
        deadline = time.monotonic() + 120
        try:
            with RawClient(self.port, timeout=15) as client:
                assert client.call("DEL", key) in (0, 1)
                expected = 0
                while not self.stop.is_set() and time.monotonic() < deadline:
                    began = time.monotonic()
                    reply = client.call("INCR", key)
                    self.worst = max(self.worst, time.monotonic() - began)
                    expected += 1
                    self.requests += 1
                    if reply != expected:
                        self.errors.append(f"{key}: got {reply!r}, expected {expected}")
                        return
                    self.stop.wait(0.002)
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{key}: {error!r}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def test_every_kind_of_client_is_handed_over_as_it_is(proxy_factory, redis_server, certs,
                                                      capsys):
    plain = passthrough_topology(redis_server.port)["sources"][0]
    secure = topology(redis_server.port, source_tls={
        "certificate_path": certs.server_cert, "private_key_path": certs.server_key})
    secure["sources"][0]["Redis"]["name"] = "secure"
    proxy = proxy_factory({"sources": [plain, secure["sources"][0]]})
    direct = redis_server.client()
    clients = []
    tls_client = ByteClient(proxy.port_of(1), ssl_context=client_ssl_context(certs))
    assert tls_client.call("SET", "tls:key", "before") == b"+OK\r\n"

    def client() -> RawClient:
        made = RawClient(proxy.port, timeout=20)
        clients.append(made)
        return made

    try:
        blpop, xread, multi, watch, monitor, sub, track, mid = (client() for _ in range(8))
        blpop.send(encode("BLPOP", "q:jobs", 0))
        assert direct.xadd("s:events", {"n": "0"})
        xread.send(encode("XREAD", "BLOCK", 0, "STREAMS", "s:events", "$"))
        wait_for(lambda: blocked_on(direct, "blpop") == 1 and blocked_on(direct, "xread") == 1,
                 10, "BLPOP and XREAD to block in redis")
        assert multi.call("MULTI") == b"OK"
        assert multi.call("SET", "m:key", "1") == b"QUEUED"
        assert watch.call("WATCH", "w:key") == b"OK"
        assert monitor.call("MONITOR") == b"OK"
        assert sub.call("SUBSCRIBE", "news") == [b"subscribe", b"news", 1]
        assert track.call("HELLO", "3")[b"proto"] == 3
        assert track.call("CLIENT", "TRACKING", "ON") == b"OK"
        assert track.call("GET", "t:key") is None
        # Half a pipeline: a whole SET and the first bytes of a GET.
        pipeline = encode("SET", "mid:key", "v") + encode("GET", "mid:key")
        mid.send(pipeline[:-7])
        assert mid.read_reply() == b"OK"

        with BusyClients(proxy.port, 50) as busy:
            wait_for(lambda: busy.requests > 200 or busy.errors, 20, "the busy clients to run")
            for _ in range(5):
                result = upgrade_ok(proxy)
                assert "closed 0" in result.stdout, result
            busy.stop.set()
        assert not busy.errors, busy.errors[:5]
        with capsys.disabled():
            print(f"\n  busy clients: {busy.requests} requests over 5 upgrades, worst "
                  f"{busy.worst * 1000:.1f} ms")
        assert status(proxy.control_socket)["generation"] == 5

        # The blocked commands were handed over while blocked: their replies come now.
        assert direct.lpush("q:jobs", "job-1") == 1
        assert blpop.read_reply() == [b"q:jobs", b"job-1"]
        entry = direct.xadd("s:events", {"n": "1"})
        assert xread.read_reply() == [[b"s:events", [[entry, [b"n", b"1"]]]]]
        # The transaction goes on where it was: the command queued before the upgrades runs.
        assert multi.call("INCR", "m:key") == b"QUEUED"
        assert multi.call("EXEC") == [b"OK", 2]
        # The WATCH still guards the key: a conflicting write aborts the transaction.
        direct.set("w:key", "theirs")
        assert watch.call("MULTI") == b"OK"
        assert watch.call("SET", "w:key", "mine") == b"QUEUED"
        assert watch.call("EXEC") is None
        assert direct.get("w:key") == b"theirs"
        # MONITOR keeps streaming, the subscriber keeps receiving, tracking keeps invalidating.
        direct.set("monitored:key", "x")
        deadline = time.monotonic() + 20
        line = b""
        while b"monitored:key" not in line:  # after every INCR the busy clients sent
            line = monitor.read_reply(max(0.001, deadline - time.monotonic()))
        assert direct.publish("news", "hello") == 1
        assert sub.read_reply() == [b"message", b"news", b"hello"]
        direct.set("t:key", "changed")
        assert track.read_reply() == [b"invalidate", [b"t:key"]]
        # The TLS client is still served, by the previous version that kept it (a lame duck).
        assert tls_client.call("GET", "tls:key") == b"$6\r\nbefore\r\n"
        ducks = status(proxy.control_socket)["lame_ducks"]
        assert any(d["tls_connections"] == 1 for d in ducks), ducks
        # The pipeline cut before the upgrades is completed by the rest of its bytes.
        mid.send(pipeline[-7:])
        assert mid.read_reply() == b"v"
        for each in (blpop, xread, multi, watch, sub, mid):
            assert each.call("PING") in (b"PONG", [b"pong", b""]), each
    finally:
        tls_client.close()
        for each in clients:
            each.close()


def test_blocked_client_does_not_hold_up_the_upgrade_and_gets_its_value(proxy, redis_server):
    direct = redis_server.client()
    with RawClient(proxy.port, timeout=30) as worker, RawClient(proxy.port) as other:
        worker.send(encode("BRPOPLPUSH", "q:in", "q:out", 0))
        wait_for(lambda: blocked_on(direct, "brpoplpush") == 1, 10, "the BRPOPLPUSH to block")
        began = time.monotonic()
        result = upgrade_ok(proxy, "--drain-timeout", "30")
        # Nothing waited for the blocked client: far below the 30 s drain deadline.
        assert time.monotonic() - began < 20, result
        assert "kept 2 connections, closed 0" in result.stdout, result
        assert other.call("PING") == b"PONG"
        assert direct.lpush("q:in", "job") == 1
        assert worker.read_reply() == b"job"
        assert direct.lrange("q:out", 0, -1) == [b"job"]
        # Served once, by one version: nothing left blocked on the server.
        wait_for(lambda: blocked_on(direct, "brpoplpush") == 0, 10, "no blocked client")


def test_reply_arriving_during_the_switch_is_delivered_once(proxy, redis_server):
    """A pipeline whose replies are still being read when the snapshot is taken: each request
    runs once and gets exactly one reply, whichever side read it."""
    direct = redis_server.client()
    with RawClient(proxy.port, timeout=30) as client:
        for round_number in range(3):
            # A slow script holds the server while the upgrade happens; INCRs queue behind it.
            payload = encode("EVAL", "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
                             "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 > s + 0.3 "
                             "return 1", 0)
            payload += b"".join(encode("INCR", "counted") for _ in range(100))
            client.send(payload)
            result = upgrade_ok(proxy)
            assert "closed 0" in result.stdout, result
            replies = client.read_replies(101)
            base = round_number * 100
            assert replies == [1] + list(range(base + 1, base + 101))
    assert direct.get("counted") == b"300"


def test_subscriber_messages_owed_survive_a_topology_that_routes_elsewhere(
        proxy_factory, redis_server, redis_factory, tmp_path):
    """Messages read from the server but not yet written to a client that stopped reading are
    the client's, even when the new topology sends it to another server."""
    other_server = redis_factory()
    proxy = proxy_factory()
    publisher = redis_server.client()
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(20)
    stuck.connect((HOST, proxy.port))
    try:
        stuck.sendall(encode("SUBSCRIBE", "flood"))
        chunk = "x" * 32768
        published = 0

        def backed_up() -> bool:
            return any(int(c.get("sub", 0)) == 1 and int(c.get("omem", 0)) > 0
                       for c in publisher.client_list(_type="pubsub"))

        while published < 300 and not backed_up():
            published += publisher.publish("flood", chunk)
        assert backed_up(), "the flood never backed up"
        moved = yaml.safe_load(proxy.topology_path.read_text())
        moved["sources"][0]["Redis"]["chain"][-1]["RedisSinkSingle"]["remote_address"] = \
            f"127.0.0.1:{other_server.port}"
        proxy.topology_path.write_text(yaml.safe_dump(moved))
        result = upgrade_ok(proxy)
        assert "kept 1 connections" in result.stdout, result
        # What the old server had sent before the switch reaches the client, in order and
        # whole (what it had not yet sent went away with the old upstream connection).
        data = b""
        stuck.settimeout(20)
        while True:
            try:
                got = stuck.recv(1 << 20)
            except socket.timeout:
                break
            if not got:
                break
            data += got
            stuck.settimeout(1.0)  # once it flows, a second of silence means it is all here
        confirm = b"*3\r\n$9\r\nsubscribe\r\n$5\r\nflood\r\n:1\r\n"
        message = encode("message", "flood", chunk)
        assert data.startswith(confirm), data[:80]
        body = data[len(confirm):]
        whole = len(body) // len(message)
        assert whole >= 1 and body == message * whole, (len(body), len(message))
        # The proxy had read more than the kernel buffers hold for a client reading nothing.
        assert len(data) > 4096 * 4
        with RawClient(proxy.port) as check:
            assert check.call("PING") == b"PONG"
    finally:
        stuck.close()


def test_no_connection_is_lost_at_the_switch(proxy, tmp_path):
    """Clients connecting while upgrades run: every one gets its PONG, whichever version
    accepted it (a connection accepted by the old side at the last moment used to die with
    it)."""
    stop = threading.Event()
    outcome = {"ok": 0, "failures": []}
    lock = threading.Lock()

    def connect_loop() -> None:
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline and outcome["ok"] < 200000:
            try:
                answer = ping_on_a_new_connection(proxy.port)
                with lock:
                    if answer == b"+PONG\r\n":
                        outcome["ok"] += 1
                    else:
                        outcome["failures"].append(f"answer {answer!r}")
            except OSError as error:
                with lock:
                    outcome["failures"].append(repr(error))

    workers = [threading.Thread(target=connect_loop, daemon=True) for _ in range(6)]
    for worker in workers:
        worker.start()
    # A client blocked in BLPOP throughout: the old side must not wait for it, and while it
    # did (yielding to its event loop), a client whose connection became readable in the same
    # turn as the new image's "ready" could still be accepted after the connections were listed.
    blocked = RawClient(proxy.port, timeout=60)
    try:
        blocked.send(encode("BLPOP", "never", 0))
        wait_for(lambda: outcome["ok"] > 20 or outcome["failures"], 10, "the first connections")
        for _ in range(50):
            upgrade(proxy.control_socket, "--drain-timeout", "0.2")
            if outcome["failures"]:
                break
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        blocked.close()
    assert not outcome["failures"], (outcome["failures"][:5], outcome["ok"])
    assert status(proxy.control_socket)["generation"] == 50


def test_upgrade_writes_nothing_to_disk(proxy, redis_server, tmp_path, monkeypatch):
    """The checkpoint lives in a sealed memory file: nothing under /tmp or $XDG_RUNTIME_DIR."""
    with RawClient(proxy.port) as client:
        assert client.call("SET", "k", "v") == b"OK"
        places = [Path("/tmp"), Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")]
        before = {p: set(os.listdir(p)) for p in places}
        upgrade_ok(proxy)
        upgrade_ok(proxy)
        after = {p: set(os.listdir(p)) for p in places}
        created = {p: sorted(after[p] - before[p]) for p in places}
        assert all(not names or all(not n.startswith(("shotover-g", "checkpoint"))
                                    for n in names) for names in created.values()), created
        assert client.call("GET", "k") == b"v"


@pytest.mark.parametrize("victim", ["bridge", "main"])
def test_killing_a_process_mid_upgrade_leaves_nothing_behind(victim, proxy, redis_server,
                                                             tmp_path):
    """A process killed while the new image starts leaves no checkpoint anywhere (there is no
    file: it lives in memory), and a working version serves."""
    gate = tmp_path / "gate"
    python = interpreter_gated_at_restore(tmp_path, gate)
    places = {"/tmp", os.environ.get("XDG_RUNTIME_DIR") or "/tmp"}
    before = {p: set(os.listdir(p)) for p in places}
    worker = status(proxy.control_socket)["workers"][0]["pid"]
    with RawClient(proxy.port) as client:
        assert client.call("SET", "k", "v") == b"OK"
        offset = len(proxy.log_text())
        run = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python", python,
                                "--timeout", "20")
        try:
            proxy.wait_log("serves every client until it is ready", start=offset)
            bridge_pid = int(proxy.log_text()[offset:].split("; pid ")[1].split()[0])
            os.kill(bridge_pid if victim == "bridge" else worker, 9)
            gate.touch()
            run.wait()
        finally:
            run.kill()
        if victim == "main":
            # The bridge serves on as the previous version; this client is still served.
            assert client.call("GET", "k") == b"v"
    created = {p: sorted(set(os.listdir(p)) - before[p]) for p in places}
    assert not any(n.startswith(("shotover-g", "checkpoint")) for names in created.values()
                   for n in names), created
    pid = wait_for(lambda: _serving_pid(proxy), 30, "a version to answer")
    with RawClient(proxy.port) as again:
        assert again.call("GET", "k") == b"v"
    assert pid == proxy.pid  # the service's PID, the supervisor's, stays
    serving = status(proxy.control_socket)["workers"][0]["pid"]
    if victim == "main":
        # The bridge serves on as the worker, adopted by the supervisor.
        assert serving == bridge_pid
    else:
        assert serving == worker  # the new image started afresh in the same process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _serving_pid(proxy):
    try:
        return status(proxy.control_socket)["pid"]
    except (AssertionError, OSError, ValueError):
        return None


def test_connection_that_cannot_be_handed_over_is_closed_and_counted(proxy_factory, redis_server,
                                                                     redis_factory):
    """A batch inside a transform that keeps its own state (a Tee mirroring it) cannot be
    taken over mid-way: the old side waits for it (here a BLPOP that never ends) until the
    drain deadline, serving everyone else, then closes it cleanly; the summary and a counter
    that survives later upgrades say why."""
    mirror = redis_factory()
    topology = {"sources": [source_entry("redis", free_port(), [
        {"Tee": {"behavior": "Ignore", "chain": [sink(mirror.port)]}}, sink(redis_server.port)])]}
    proxy = proxy_factory(topology, observability=True)
    direct = redis_server.client()

    def closed_count():
        text = http_request(proxy.metrics_url)[1]
        return metric_value(text, "shotover_g_upgrade_closed_connections_total",
                            reason="busy (command in flight)")

    with RawClient(proxy.port) as blocked, RawClient(proxy.port) as idle:
        blocked.send(encode("BLPOP", "never", 0))
        wait_for(lambda: blocked_on(direct, "blpop") == 1, 10, "the BLPOP to block")
        assert idle.call("SET", "k", "v") == b"OK"
        result = upgrade_ok(proxy, "--drain-timeout", "0.5")
        assert "kept 1 connections, closed 1 (busy (command in flight): 1)" in result.stdout, result
        assert blocked.wait_eof() == []
        wait_for(lambda: blocked_on(direct, "blpop") == 0, 10, "the abandoned BLPOP to go")
        assert idle.call("GET", "k") == b"v"
        wait_for(lambda: closed_count() == 1, 15, "the closed-connections counter")
        upgrade_ok(proxy)
        wait_for(lambda: closed_count() == 1, 15, "the counter after another upgrade")


def test_a_subscriber_leaving_its_channels_during_the_switch_gets_every_reply(proxy, redis_server):
    """UNSUBSCRIBE in flight (a slow script holds the server) when the snapshot is taken: the
    new version reads its reply, and the client, out of pub/sub, gets its next replies too."""
    busy = encode("EVAL", "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
                  "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 > s + 0.3 "
                  "return 1", 0)
    with RawClient(proxy.port, timeout=30) as sub, RawClient(proxy.port, timeout=30) as slow:
        assert sub.call("SET", "after", "value") == b"OK"
        for round_number in range(3):
            channel = f"leaving{round_number}"
            assert sub.call("SUBSCRIBE", channel) == [b"subscribe", channel.encode(), 1]
            slow.send(busy)
            sub.send(encode("UNSUBSCRIBE", channel) + encode("GET", "after"))
            result = upgrade_ok(proxy)
            assert "closed 0" in result.stdout, result
            assert slow.read_reply() == 1
            assert sub.read_replies(2) == [[b"unsubscribe", channel.encode(), 0], b"value"]


@pytest.mark.parametrize("push", [False, True])
def test_a_batch_handed_over_with_every_reply_read_is_answered_at_once(push, redis_server):
    """The snapshot can come after the last reply of a batch was read (by the reader of a
    connection that had subscriptions, in the same turn as the snapshot) and before the
    client's greenlet took it: the next image must answer from the record, not wait for a
    reply that came already (it waited forever, and so did the client)."""
    import gevent
    from gevent import socket as gevent_socket

    from shotover_gevent.handover.checkpoint import InflightRecord, UpstreamRecord
    from shotover_gevent.message import Message
    from shotover_gevent.session import Session
    from shotover_gevent.upstream import UpstreamConnection

    redis_server.client().set("handed", "over")
    sock = gevent_socket.create_connection((HOST, redis_server.port))
    request = encode("GET", "handed")
    record = UpstreamRecord(fd=sock.fileno(), sink="RedisSinkSingle",
                            address=f"{HOST}:{redis_server.port}", push=push,
                            inflight=InflightRecord([request], [b"$4\r\nover\r\n"]))
    upstream = UpstreamConnection.adopt(sock, (HOST, redis_server.port), record, Session(),
                                        lambda frame: None)
    try:
        with gevent.Timeout(5, AssertionError("the reply read before the switch never came")):
            replies = upstream.resume([Message(request)])
            assert [reply.raw for reply in replies] == [b"$4\r\nover\r\n"]
            # The connection goes on as one in step with the server.
            assert [r.raw for r in upstream.call([Message(encode("PING"))])] == [b"+PONG\r\n"]
    finally:
        upstream.close()
