"""`shotover-g upgrade` as operators use it: a real proxy process in front of a real redis-server
replaces itself in place while clients keep their connections, and rolls back when the new
version cannot take over."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import hiredis
import pytest
import yaml

import shotover_gevent
from helpers import (
    HOST,
    RawClient,
    encode,
    free_port,
    passthrough_topology,
    sink,
    source_entry,
    stop_proxies,
    wait_for,
)
from upgrade_support import (
    BackgroundUpgrade,
    CounterLoad,
    LaunchedProxy,
    children,
    cli,
    discard_checkpoints,
    fd_targets,
    inspect_checkpoint,
    interpreter_damaging_checkpoint,
    interpreter_failing_exec_after_preflight,
    interpreter_gated_at_restore,
    interpreter_exiting_at_restore,
    ping_on_a_new_connection,
    interpreter_hanging_at_restore,
    interpreter_vanishing_after_preflight,
    leftover_checkpoints,
    make_venv,
    process_gone,
    read_until,
    settled_fd_kinds,
    status,
    tail,
    terminate_pid,
    upgrade,
    upgrade_ok,
    wait_until_draining,
)

VERSION = shotover_gevent.__version__


def is_error(reply, prefix: str = "") -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith(prefix)


def local_peer(client: RawClient) -> str:
    """How the proxy names this client: its address as the proxy sees it."""
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


def serving_pid(proxy) -> int:
    return status(proxy.control_socket)["pid"]


def serving_pid_or_none(proxy):
    try:
        return serving_pid(proxy)
    except (AssertionError, OSError, ValueError):
        return None


def stop_successor(proxy, first_pid: int) -> None:
    """After the bridge process served on, a process the fixture does not know serves: stop it."""
    try:
        pid = wait_for(lambda: serving_pid_or_none(proxy), 15, "the control socket to answer")
    except AssertionError:
        return
    if pid != first_pid:
        terminate_pid(pid)


@pytest.fixture
def launch(tmp_path, redis_server):
    """Start proxies with a launcher of the test's choosing; each is stopped (SIGTERM, exit 0)
    at the end."""
    launched = []

    def make(launcher, use_checkout: bool = True, topology=None) -> LaunchedProxy:
        topology = topology or passthrough_topology(redis_server.port, free_port())
        proxy = LaunchedProxy(tmp_path / f"launched-{len(launched)}", topology, launcher,
                              use_checkout=use_checkout)
        launched.append(proxy)
        return proxy.start()

    yield make
    stop_proxies(launched)


# ---- under load ---------------------------------------------------------------------------------

def test_hundred_pipelining_clients_survive_ten_upgrades(proxy, redis_server):
    with CounterLoad(proxy.port, "counter", 100) as load:
        progress = []
        for round_number in range(1, 11):
            progress.append(load.received())
            result = upgrade_ok(proxy)
            assert "kept 100 connections" in result.stdout, result
            assert "closed 0" in result.stdout, result
            assert f"generation {round_number}" in result.stdout, result
            assert not load.failures(), f"after upgrade {round_number}: {load.failures()[:5]}"
        assert progress == sorted(set(progress)), f"no traffic between upgrades: {progress}"
        # Every client must also be served by the last image, not just have survived.
        load.wait_for_more_batches(2)
        after = status(proxy.control_socket)
        assert after["sources"]["redis"]["connections"] == 100
    assert not load.stuck(), "a client thread is stuck"
    assert not load.failures(), load.failures()[:5]
    assert load.counts_match(redis_server.client())
    assert load.received() > 0
    assert after["pid"] == proxy.pid, "the proxy must upgrade in place, keeping its PID"
    assert after["generation"] == 10
    assert after["last_upgrade"]["ok"] is True
    assert leftover_checkpoints(proxy.pid) == []


# ---- request boundaries -------------------------------------------------------------------------

def test_half_sent_command_and_pipeline_spanning_the_pause(proxy, redis_server, tmp_path):
    half = b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n$5\r\nva"
    # Long enough for the proxy to remember how far it has scanned an unfinished request.
    long_command = encode("RPUSH", "long", *range(300))
    long_half = long_command[:len(long_command) // 2]
    incr = encode("INCR", "piped")
    cut = len(incr) - 3
    kept = tmp_path / "kept.cbor"
    with RawClient(proxy.port) as half_client, RawClient(proxy.port) as piper, \
            RawClient(proxy.port) as long_client:
        # The PING's reply shows that the proxy has read this write, half command included.
        half_client.send(encode("PING") + half)
        assert half_client.read_reply() == b"PONG"
        long_client.send(encode("PING") + long_half)
        assert long_client.read_reply() == b"PONG"
        piper.send(incr * 50 + incr[:cut])
        assert piper.read_replies(50) == list(range(1, 51))

        offset = len(proxy.log_text())
        run = BackgroundUpgrade(proxy.control_socket, tmp_path, "--keep-checkpoint", str(kept))
        try:
            wait_until_draining(proxy, offset)
            # The rest of the cut command, then more, while connections are paused, while the
            # checkpoint is written and while the new image starts.
            piper.send(incr[cut:])
            sent = 51
            for _ in range(300):
                if not run.running:
                    break
                piper.send(incr * 5)
                sent += 5
                time.sleep(0.01)
            result = run.wait()
        finally:
            run.kill()
        assert result.returncode == 0, f"{result!r}\n{tail(proxy.log_path)}"
        assert "kept 3 connections" in result.stdout, result
        piper.send(incr * 5)
        sent += 5
        assert sent > 56, "the upgrade ended before anything was sent during it"
        assert piper.read_replies(sent - 50, timeout=30) == list(range(51, sent + 1))

        half_client.send(b"lue\r\n")
        assert half_client.read_reply() == b"OK"
        assert half_client.call("GET", "half") == b"value"
        assert redis_server.client().get("half") == b"value"
        assert int(redis_server.client().get("piped")) == sent
        long_client.send(long_command[len(long_half):])
        assert long_client.read_reply() == 300
        assert redis_server.client().lrange("long", 0, -1) == [str(i).encode()
                                                               for i in range(300)]

        shown = inspect_checkpoint(kept, "--json")
        assert shown.returncode == 0, shown.stderr
        records = {c["peer"]: c for c in json.loads(shown.stdout)["connections"]}
        assert records[local_peer(half_client)]["unread"].encode("latin-1") == half
        assert records[local_peer(long_client)]["unread"].encode("latin-1") == long_half
        assert local_peer(piper) in records


# ---- session state ------------------------------------------------------------------------------

def test_session_state_is_carried_over(proxy_factory, redis_server, redis_factory):
    protected = redis_factory()
    with protected.client() as admin:
        admin.config_set("requirepass", "door-pw")
    with_acl = redis_factory()
    with with_acl.client() as admin:
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all")
        admin.config_set("requirepass", "not-alices")
    ports = [free_port() for _ in range(3)]
    topology = {"sources": [source_entry("plain", ports[0], [sink(redis_server.port)]),
                            source_entry("protected", ports[1], [sink(protected.port)]),
                            source_entry("acl", ports[2], [sink(with_acl.port)])]}
    proxy = proxy_factory(topology)

    with RawClient(ports[0]) as plain, RawClient(ports[1]) as door, \
            RawClient(ports[2]) as alice, RawClient(ports[1]) as stranger:
        assert plain.call("SELECT", 5) == b"OK"
        assert plain.call("CLIENT", "SETNAME", "keeper") == b"OK"
        hello = plain.call("HELLO", 3)
        assert isinstance(hello, dict) and hello[b"proto"] == 3, hello
        assert plain.call("HSET", "h", "field", "value") == 1
        assert door.call("AUTH", "door-pw") == b"OK"
        assert alice.call("AUTH", "alice", "alice-pw") == b"OK"
        # The passwords matter: without one, the servers refuse.
        assert is_error(stranger.call("GET", "k"), "NOAUTH"), "the server needs no password?"

        result = upgrade_ok(proxy)
        assert "kept 4 connections" in result.stdout, result

        # None of them says anything to restore its state: the next commands just work.
        assert plain.call("CLIENT", "GETNAME") == b"keeper"
        assert plain.call("HGETALL", "h") == {b"field": b"value"}, "not a RESP3 map"
        assert plain.call("SET", "written-after", "1") == b"OK"
        assert redis_server.client(db=5).get("written-after") == b"1"
        assert redis_server.client(db=0).exists("written-after") == 0
        assert door.call("SET", "k", "v") == b"OK"
        assert door.call("ACL", "WHOAMI") == b"default"
        assert alice.call("ACL", "WHOAMI") == b"alice"
        assert alice.call("SET", "k", "v") == b"OK"
        assert is_error(stranger.call("GET", "k"), "NOAUTH")


def test_select_queued_in_a_transaction_that_never_ran_is_not_carried_over(proxy,
                                                                           redis_server):
    with RawClient(proxy.port) as discarded, RawClient(proxy.port) as aborted:
        assert discarded.call("MULTI") == b"OK"
        assert discarded.call("SELECT", 3) == b"QUEUED"
        assert discarded.call("DISCARD") == b"OK"
        assert aborted.call("MULTI") == b"OK"
        assert aborted.call("SELECT", 4) == b"QUEUED"
        assert is_error(aborted.call("SET", "missing-value"))
        assert is_error(aborted.call("EXEC"), "EXECABORT")
        for client, key in ((discarded, "discarded"), (aborted, "aborted")):
            assert client.call("SET", f"{key}:before", "1") == b"OK"
            assert redis_server.client(db=0).get(f"{key}:before") == b"1"

        upgrade_ok(proxy)

        for client, key in ((discarded, "discarded"), (aborted, "aborted")):
            assert client.call("SET", f"{key}:after", "1") == b"OK"
    for key in ("discarded", "aborted"):
        assert redis_server.client(db=0).get(f"{key}:after") == b"1", \
            f"the {key} client's write after the upgrade went to another database"


def test_client_reply_off_is_carried_over(proxy, redis_server):
    direct = redis_server.client()
    with RawClient(proxy.port) as quiet:
        quiet.send(encode("CLIENT", "REPLY", "OFF") + encode("SET", "quiet", "1"))
        wait_for(lambda: direct.get("quiet") == b"1", 10, "the first write")
        assert quiet.no_reply_within(0.2)

        upgrade_ok(proxy)

        quiet.send(encode("SET", "quiet", "2"))
        wait_for(lambda: direct.get("quiet") == b"2", 10, "the write after the upgrade")
        assert quiet.no_reply_within(0.3), "replies the client had turned off are back"
        quiet.send(encode("CLIENT", "REPLY", "ON"))
        assert quiet.read_reply() == b"OK"
        assert quiet.call("GET", "quiet") == b"2"


def test_subscribers_keep_receiving_after_an_upgrade(proxy, redis_server):
    publisher = redis_server.client()
    with RawClient(proxy.port) as plain, RawClient(proxy.port) as by_pattern, \
            socket.create_connection((HOST, proxy.port), timeout=10) as resp3:
        assert plain.call("SUBSCRIBE", "news") == [b"subscribe", b"news", 1]
        assert by_pattern.call("PSUBSCRIBE", "news*") == [b"psubscribe", b"news*", 1]
        resp3.sendall(encode("HELLO", 3) + encode("SUBSCRIBE", "news"))
        read_until(resp3, b">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
        assert publisher.publish("news", "before") == 3
        assert plain.read_reply() == [b"message", b"news", b"before"]
        assert by_pattern.read_reply() == [b"pmessage", b"news*", b"news", b"before"]
        read_until(resp3, b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$6\r\nbefore\r\n")

        upgrade_ok(proxy)

        # The subscribers send nothing; their subscriptions must still be there upstream.
        def resubscribed() -> bool:
            return (publisher.pubsub_numsub("news") == [(b"news", 2)]
                    and publisher.pubsub_numpat() == 1)

        try:
            wait_for(resubscribed, 10, "the subscriptions to be re-established upstream")
        except AssertionError as error:
            raise AssertionError(f"{error}: PUBLISH after the upgrade reaches "
                                 f"{publisher.publish('news', 'lost')} of 3 subscribers") from None
        for text in ("after-1", "after-2"):
            assert publisher.publish("news", text) == 3
            assert plain.read_reply(timeout=10) == [b"message", b"news", text.encode()]
            assert by_pattern.read_reply(timeout=10) == [b"pmessage", b"news*", b"news",
                                                         text.encode()]
            # Still a RESP3 push, not a RESP2 array: the protocol version came back first.
            got = read_until(resp3, f"$4\r\nnews\r\n$7\r\n{text}\r\n".encode())
            assert got == f">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$7\r\n{text}\r\n".encode()
        assert plain.no_reply_within(0.2) and by_pattern.no_reply_within(0.01)


def test_subscribers_lose_no_message_published_across_upgrades(proxy, redis_server, tmp_path):
    publisher = redis_server.client()
    stop = threading.Event()
    reached: list = []

    def publish() -> None:
        # Paced so that the messages are spread over the upgrades; bounded in count and time.
        deadline = time.monotonic() + 60
        for number in range(1, 20001):
            if stop.is_set() or time.monotonic() > deadline:
                return
            reached.append(publisher.publish("seq", number))
            time.sleep(0.001)

    with RawClient(proxy.port) as plain, RawClient(proxy.port) as by_pattern, \
            RawClient(proxy.port) as resp3:
        assert plain.call("SUBSCRIBE", "seq") == [b"subscribe", b"seq", 1]
        assert by_pattern.call("PSUBSCRIBE", "se?") == [b"psubscribe", b"se?", 1]
        assert resp3.call("HELLO", "3")[b"proto"] == 3
        assert resp3.call("SUBSCRIBE", "seq") == [b"subscribe", b"seq", 1]
        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(reached) >= 50, 30, "messages to flow")
            kept = tmp_path / "kept.cbor"
            for extra in ([], ["--keep-checkpoint", str(kept)]):
                result = upgrade_ok(proxy, *extra)
                assert "kept 3 connections" in result.stdout, result
            marks = len(reached)
            wait_for(lambda: len(reached) >= marks + 50, 30, "messages after the upgrades")
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        total = len(reached)
        # The subscribers' upstream connections were handed over, never closed: every message
        # reached all three of them at Redis...
        assert set(reached) == {3}, [i for i, n in enumerate(reached) if n != 3][:10]
        # ...and through the proxy, each gets every one, in order.
        for client, prefix in ((plain, [b"message", b"seq"]),
                               (by_pattern, [b"pmessage", b"se?", b"seq"]),
                               (resp3, [b"message", b"seq"])):
            got = [client.read_reply(timeout=10) for _ in range(total)]
            expected = [prefix + [str(n).encode()] for n in range(1, total + 1)]
            if got != expected:
                first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                raise AssertionError(f"{prefix[0]!r} subscriber: message {first + 1} of {total} "
                                     f"is {got[first]!r}, expected {expected[first]!r}")
            assert client.no_reply_within(0.2)
    shown = inspect_checkpoint(kept)
    assert shown.returncode == 0, shown
    assert shown.stdout.count("handed over subscribed to 1 channels/patterns") == 3, shown.stdout


def test_subscriber_that_stopped_reading_is_handed_over_with_what_it_is_owed(proxy, redis_server,
                                                                           tmp_path):
    publisher = redis_server.client()
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(10)
    stuck.connect((HOST, proxy.port))
    try:
        stuck.sendall(encode("SUBSCRIBE", "flood"))
        read_until(stuck, b"$5\r\nflood\r\n:1\r\n")
        with RawClient(proxy.port) as steady, RawClient(proxy.port) as other:
            assert steady.call("SUBSCRIBE", "seq") == [b"subscribe", b"seq", 1]
            assert other.call("INCR", "other") == 1

            # Flood the client that reads nothing until the proxy's writes to it block and
            # Redis itself starts buffering for the proxy's subscriber connection.
            def backed_up() -> bool:
                return any(int(c.get("sub", 0)) == 1 and int(c.get("omem", 0)) > 0
                           for c in publisher.client_list(_type="pubsub"))

            chunk = "x" * 65536
            flooded = 0
            for _ in range(300):
                flooded += publisher.publish("flood", chunk)
                if backed_up():
                    break
            assert backed_up(), "the flood never backed up"

            sent = 0
            upgrading = BackgroundUpgrade(proxy.control_socket, tmp_path, "--drain-timeout", "1")
            # Messages keep coming for the subscriber that reads (bounded: the upgrade ends
            # within seconds).
            while upgrading.running and sent < 20000:
                sent += 1
                assert publisher.publish("seq", sent) == 1
            result = upgrading.wait()
            assert result.returncode == 0, result
            # Nobody waited for it and nobody closed it: what it is owed travelled with it.
            assert "kept 3 connections, closed 0" in result.output, result
            for _ in range(20):
                sent += 1
                assert publisher.publish("seq", sent) == 1
            got = [steady.read_reply(timeout=10) for _ in range(sent)]
            assert got == [[b"message", b"seq", str(n).encode()] for n in range(1, sent + 1)]
            assert other.call("INCR", "other") == 2
            # Once it reads again, it gets every message of the flood, whole and in order.
            message = encode("message", "flood", chunk)
            expected = message * flooded
            received = read_exactly(stuck, len(expected), timeout=30)
            assert received == expected
    finally:
        stuck.close()


def read_exactly(sock: socket.socket, size: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = bytearray()
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(min(1 << 20, size - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


# ---- roll-back paths ----------------------------------------------------------------------------

def _break_topology(proxy) -> None:
    """An operator's typo: the sink's address loses its port."""
    broken = yaml.safe_load(proxy.topology_path.read_text())
    chain = broken["sources"][0]["Redis"]["chain"]
    chain[-1]["RedisSinkSingle"]["remote_address"] = "no-port-here"
    proxy.topology_path.write_text(yaml.safe_dump(broken))


ROLL_BACKS = {
    # kind: (what the CLI must say, whether another process serves afterwards)
    "broken-interpreter": (["upgrade aborted", "still serving", "cannot run"], False),
    "invalid-config": (["upgrade aborted", "preflight failed", "remote_address"], False),
    "vanishes-after-preflight": (["upgrade aborted", "still serving", "No such file"], False),
    "exec-fails": (["upgrade aborted", "still serving", "No such file"], False),
    "damaged-checkpoint": (["rolled back", "checksum mismatch"], False),
    "exits-at-start": (["rolled back", "exited before adopting"], True),
    "hangs-at-start": (["rolled back", "did not adopt"], True),
}


def _prepare_failure(kind: str, proxy, tmp_path: Path) -> list:
    """Arrange for the next upgrade to fail the way `kind` says; returns its CLI arguments."""
    if kind == "broken-interpreter":
        return ["--python", str(tmp_path / "no-such-dir" / "python3")]
    if kind == "invalid-config":
        _break_topology(proxy)
        return []
    if kind == "vanishes-after-preflight":
        return ["--python", interpreter_vanishing_after_preflight(tmp_path)]
    if kind == "exec-fails":
        return ["--python", interpreter_failing_exec_after_preflight(tmp_path)]
    if kind == "damaged-checkpoint":
        return ["--python", interpreter_damaging_checkpoint(tmp_path)]
    if kind == "exits-at-start":
        return ["--python", interpreter_exiting_at_restore(tmp_path)]
    if kind == "hangs-at-start":
        # The bridge process gives the new image this long to adopt the connections.
        return ["--python", interpreter_hanging_at_restore(tmp_path), "--timeout", "3"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", list(ROLL_BACKS))
def test_failed_upgrade_rolls_back_and_keeps_serving(kind, proxy, redis_server, tmp_path):
    expected, moves = ROLL_BACKS[kind]
    first_pid = proxy.pid
    first_worker = status(proxy.control_socket)["workers"][0]["pid"]
    get = encode("GET", "before")
    try:
        with RawClient(proxy.port) as kept:
            assert kept.call("SET", "before", kind) == b"OK"
            # Half a command is waiting in the proxy when the upgrade starts.
            kept.send(encode("PING") + get[:-4])
            assert kept.read_reply() == b"PONG"
            args = _prepare_failure(kind, proxy, tmp_path)

            result = upgrade(proxy.control_socket, *args)
            assert result.returncode == 1, f"{result!r}\n{tail(proxy.log_path)}"
            for text in expected:
                assert text in result.output, (f"{text!r} missing from {result!r}\nproxy log:\n"
                                               f"{tail(proxy.log_path)}")

            kept.send(get[-4:])
            assert kept.read_reply() == kind.encode()
            assert kept.call("INCR", "after") == 1
            with RawClient(proxy.port) as newcomer:
                assert newcomer.call("INCR", "after") == 2
            now = status(proxy.control_socket)
            assert now["version"] == VERSION
            assert now["generation"] == 0
            assert now["sources"]["redis"]["connections"] == 1
            # The service's PID (the supervisor's) never changes.
            assert now["pid"] == first_pid and proxy.running
            if moves:
                # The worker's bridge process, the previous version, serves on with its own
                # PID, adopted by the supervisor as that worker.
                assert now["workers"][0]["pid"] != first_worker
                assert process_gone(first_worker)
                assert now["last_upgrade"]["ok"] is False
                assert expected[-1] in now["last_upgrade"]["reason"]
            else:
                assert now["workers"][0]["pid"] == first_worker
            # Checkpoints hold passwords: none may be left behind, whatever went wrong.
            assert leftover_checkpoints(first_pid) == []
    finally:
        stop_successor(proxy, first_pid)
        discard_checkpoints(first_pid)


@pytest.mark.parametrize("order", [("damaged-checkpoint", "exits-at-start"),
                                   ("exits-at-start", "damaged-checkpoint")])
def test_second_roll_back_in_a_row_still_restores(order, proxy, redis_server, tmp_path):
    first_pid = proxy.pid
    try:
        with RawClient(proxy.port) as kept:
            for attempt, kind in enumerate(order, 1):
                expected, _moves = ROLL_BACKS[kind]
                args = _prepare_failure(kind, proxy, tmp_path)
                result = upgrade(proxy.control_socket, *args)
                assert result.returncode == 1, f"{result!r}\n{tail(proxy.log_path)}"
                for text in expected:
                    assert text in result.output, (f"roll-back {attempt} ({kind}): {text!r} "
                                                   f"missing from {result!r}\nproxy log:\n"
                                                   f"{tail(proxy.log_path)}")
                assert kept.call("INCR", "survivor") == attempt
            assert status(proxy.control_socket)["version"] == VERSION
    finally:
        stop_successor(proxy, first_pid)
        discard_checkpoints(first_pid)


# ---- the bridge -------------------------------------------------------------------------------

def _bridge_pid(proxy) -> int:
    """Once the exec has happened, the forked bridge answers for the worker."""
    def found():
        now = status(proxy.control_socket)
        return now["workers"][0].get("bridge_pid")
    return wait_for(found, 30, "the bridge process to serve")


def test_clients_are_served_by_the_bridge_while_the_new_version_starts(proxy, redis_server,
                                                                       tmp_path):
    gate = tmp_path / "start-now"
    offset = len(proxy.log_text())
    with RawClient(proxy.port) as kept:
        assert kept.call("INCR", "bridge") == 1
        running = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python",
                                    interpreter_gated_at_restore(tmp_path, gate))
        try:
            bridge = _bridge_pid(proxy)
            assert bridge != proxy.pid
            # The original process has exec'ed and waits at the gate: only the bridge can answer.
            during = status(proxy.control_socket)
            assert during["pid"] == proxy.pid and during["upgrade_in_progress"] is True
            for expected in range(2, 12):
                assert kept.call("INCR", "bridge") == expected
            with RawClient(proxy.port) as newcomer:
                # Accepted and served by the bridge as well; its socket goes to the new version
                # with the checkpoint.
                assert newcomer.call("INCR", "bridge") == 12
                assert newcomer.call("CLIENT", "SETNAME", "newcomer") == b"OK"
                assert "the new image is ready" not in proxy.log_text()[offset:]
                gate.touch()
                result = running.wait()
                assert result.returncode == 0, result
                assert "kept 2 connections" in result.output, result
                assert newcomer.call("INCR", "bridge") == 13
                assert newcomer.call("CLIENT", "GETNAME") == b"newcomer"
            assert kept.call("INCR", "bridge") == 14
            wait_for(lambda: process_gone(bridge), 10, "the bridge process to leave")
            after = status(proxy.control_socket)
            assert (after["pid"], after["generation"]) == (proxy.pid, 1)
            assert "bridge_pid" not in after["workers"][0]
        finally:
            gate.touch()
            running.wait()
    assert int(redis_server.client().get("bridge")) == 14


def test_hundreds_of_clients_connecting_while_the_new_version_starts_are_kept(proxy, tmp_path):
    gate = tmp_path / "start-now"
    running = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python",
                                interpreter_gated_at_restore(tmp_path, gate))
    newcomers = []
    try:
        _bridge_pid(proxy)
        # More than one message's worth of sockets (the kernel passes at most 253 at a time),
        # each with an upstream connection of its own: both go to the new image.
        for number in range(300):
            client = RawClient(proxy.port)
            newcomers.append(client)
            assert client.call("SET", f"newcomer:{number}", number) == b"OK"
        gate.touch()
        result = running.wait()
        assert result.returncode == 0, result
        assert "kept 300 connections" in result.output, result
        assert "300 connections with 300 upstream connections" in result.output, result
        for number, client in enumerate(newcomers):
            assert client.call("INCR", f"newcomer:{number}") == number + 1
        assert status(proxy.control_socket)["sources"]["redis"]["connections"] == 300
    finally:
        gate.touch()
        running.wait()
        for client in newcomers:
            client.close()


def test_metrics_endpoint_answers_through_upgrades(proxy_factory, tmp_path):
    import urllib.request

    proxy = proxy_factory(observability=True)

    def scrape() -> str:
        with urllib.request.urlopen(proxy.metrics_url, timeout=10) as response:
            return response.read().decode()

    gate = tmp_path / "start-now"
    with RawClient(proxy.port) as kept:
        for generation in (1, 2):
            gate.unlink(missing_ok=True)
            running = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python",
                                        interpreter_gated_at_restore(tmp_path, gate))
            try:
                _bridge_pid(proxy)
                # While the new version starts, the bridge serves the endpoint.
                assert f"shotover_g_generation {generation - 1}" in scrape()
            finally:
                gate.touch()
            result = running.wait()
            assert result.returncode == 0, result
            # The new image opens the endpoint a moment after it serves clients.
            wait_for(lambda g=generation: f"shotover_g_generation {g}.0" in scrape(), 30,
                     f"generation {generation} in the metrics")
            assert f"shotover_g_upgrades_total {generation}.0" in scrape()
            assert kept.call("INCR", "metrics") == generation


def test_lost_bridge_leaves_the_new_version_serving_new_clients(proxy, redis_server, tmp_path):
    gate = tmp_path / "start-now"
    with RawClient(proxy.port) as kept:
        assert kept.call("SET", "lost", "1") == b"OK"
        running = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python",
                                    interpreter_gated_at_restore(tmp_path, gate))
        try:
            bridge = _bridge_pid(proxy)
            os.kill(bridge, signal.SIGKILL)
            wait_for(lambda: process_gone(bridge), 10, "the bridge to die")
        finally:
            gate.touch()
        result = running.wait()
        # Nobody could tell the CLI how it ended, and it says so.
        assert result.returncode == 1, result
        # The kept client's state died with the bridge: its connection is closed, not hung.
        assert kept.wait_eof(30) == []
    # The service itself goes on, in the same process, from a fresh start.
    proxy.wait_log("starting afresh", timeout=30)
    with RawClient(proxy.port) as newcomer:
        assert wait_for(lambda: newcomer.call("GET", "lost"), 30, "a reply") == b"1"
    after = status(proxy.control_socket)
    assert after["pid"] == proxy.pid and after["generation"] == 0
    assert leftover_checkpoints(proxy.pid) == []


# ---- configuration changes ----------------------------------------------------------------------

def test_new_topology_applies_to_kept_connections(proxy, redis_server):
    with RawClient(proxy.port) as kept:
        assert kept.call("SET", "key", "old") == b"OK"
        topology = yaml.safe_load(proxy.topology_path.read_text())
        chain = topology["sources"][0]["Redis"]["chain"]
        chain.insert(0, {"QueryTypeFilter": {"DenyList": ["Write"]}})
        proxy.topology_path.write_text(yaml.safe_dump(topology))

        upgrade_ok(proxy)

        assert is_error(kept.call("SET", "key", "new")), "the write went through"
        assert kept.call("GET", "key") == b"old"
        assert redis_server.client().get("key") == b"old"


def test_idle_upstream_connections_are_handed_over_as_they_are(proxy, redis_server):
    """No reconnect after an upgrade: the server still sees the same connection (same client
    id, same name), and a new topology that sends a client elsewhere gets a fresh one."""
    direct = redis_server.client()
    with RawClient(proxy.port) as kept, RawClient(proxy.port) as other:
        assert kept.call("CLIENT", "SETNAME", "kept-one") == b"OK"
        assert kept.call("SELECT", "2") == b"OK"
        client_id = kept.call("CLIENT", "ID")
        assert other.call("PING") == b"PONG"
        before = {c["id"] for c in direct.client_list()}

        for _ in range(2):
            result = upgrade_ok(proxy)
            assert "2 connections with 2 upstream connections" in result.stdout, result
            assert kept.call("CLIENT", "ID") == client_id
            assert kept.call("CLIENT", "GETNAME") == b"kept-one"
            assert kept.call("SET", "where", "db2") == b"OK"
            assert other.call("PING") == b"PONG"
        assert redis_server.client(db=2).get("where") == b"db2"
        # Nothing new was opened towards the server: the same connections carry on.
        after = {c["id"] for c in direct.client_list()}
        assert after - before <= {str(direct.client_id())}, (before, after)


def test_changed_listen_address_applies(proxy_factory, redis_server):
    port = free_port()
    proxy = proxy_factory(passthrough_topology(redis_server.port, port))
    moved = f"127.0.0.2:{port}"  # another loopback address, same port
    with RawClient(port) as kept:
        assert kept.call("SET", "key", "value") == b"OK"
        topology = yaml.safe_load(proxy.topology_path.read_text())
        topology["sources"][0]["Redis"]["listen_addr"] = moved
        proxy.topology_path.write_text(yaml.safe_dump(topology))

        upgrade_ok(proxy)

        assert kept.call("GET", "key") == b"value"
        assert status(proxy.control_socket)["sources"]["redis"]["address"] == moved
        with socket.create_connection(("127.0.0.2", port), timeout=10) as newcomer:
            newcomer.sendall(encode("PING"))
            assert read_until(newcomer, b"\r\n") == b"+PONG\r\n"


# ---- other versions -----------------------------------------------------------------------------

def test_upgrade_to_another_version_and_back(launch, tmp_path):
    python_a = make_venv(tmp_path / "venv-a", "0.1.1")
    python_b = make_venv(tmp_path / "venv-b", "0.2.0.dev0")
    proxy = launch([python_a, "-m", "shotover_gevent"], use_checkout=False)
    first = status(proxy.control_socket)
    assert (first["version"], first["python"]) == ("0.1.1", python_a)

    with RawClient(proxy.port) as kept:
        assert kept.call("INCR", "skew") == 1
        result = upgrade_ok(proxy, "--python", python_b)
        assert "0.1.1 -> 0.2.0.dev0" in result.stdout, result
        now = status(proxy.control_socket)
        assert (now["version"], now["python"], now["pid"]) == ("0.2.0.dev0", python_b, proxy.pid)
        assert kept.call("INCR", "skew") == 2

        result = upgrade_ok(proxy, "--python", python_a)
        assert "0.2.0.dev0 -> 0.1.1" in result.stdout, result
        now = status(proxy.control_socket)
        assert (now["version"], now["python"], now["pid"]) == ("0.1.1", python_a, proxy.pid)
        assert now["generation"] == 2
        assert kept.call("INCR", "skew") == 3


# ---- file descriptors ---------------------------------------------------------------------------

FD_WRAPPER = """\
import os, runpy, sys
fd = os.open("/dev/null", os.O_RDONLY)
os.set_inheritable(fd, True)
sys.stderr.write(f"extra inheritable fd {fd}\\n")
sys.argv = ["shotover-g"] + sys.argv[1:]
runpy.run_module("shotover_gevent", run_name="__main__", alter_sys=True)
"""


def _dev_null_fds(pid: int) -> list:
    return sorted(fd for fd, target in fd_targets(pid).items() if fd > 2 and
                  target == os.devnull)


def test_upgrades_leak_no_file_descriptors(launch):
    proxy = launch([sys.executable, "-c", FD_WRAPPER])
    pid = proxy.pid
    worker = status(proxy.control_socket)["workers"][0]["pid"]
    assert len(_dev_null_fds(pid)) == 1, "the wrapper's extra fd is not there to begin with"
    assert _dev_null_fds(worker) == [], "the supervisor passed a stray fd on to its worker"
    with RawClient(proxy.port) as kept:
        assert kept.call("PING") == b"PONG"
        before = {p: settled_fd_kinds(p) for p in (pid, worker)}
        upgrade_ok(proxy)
        assert _dev_null_fds(pid) == [], "an fd the supervisor's state does not name was inherited"
        assert _dev_null_fds(worker) == [], "an fd the checkpoint does not name was inherited"
        assert kept.call("PING") == b"PONG"  # its upstream connection is open again
        baseline = {p: settled_fd_kinds(p) for p in (pid, worker)}
        before[pid].remove(os.devnull)
        assert baseline == before, "a new image holds other fds than the old one did"
        for _ in range(3):
            upgrade_ok(proxy)
            assert kept.call("PING") == b"PONG"
            assert {p: settled_fd_kinds(p) for p in (pid, worker)} == baseline
    now = status(proxy.control_socket)
    assert now["pid"] == pid and now["workers"][0]["pid"] == worker
    # Nor processes: every bridge process and preflight check has been waited for; the
    # supervisor's only child is its worker.
    wait_for(lambda: children(worker) == [], 15, f"no children of the worker (has "
                                                 f"{children(worker)})")
    wait_for(lambda: [int(c.split()[0]) for c in children(pid)] == [worker], 15,
             f"the worker as the supervisor's only child (has {children(pid)})")


# ---- listeners ----------------------------------------------------------------------------------

def test_new_connections_are_never_refused_during_upgrades(proxy, tmp_path):
    stop = threading.Event()
    outcome = {"ok": 0, "failures": [], "times": []}

    def connect_loop() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and outcome["ok"] < 20000:
            began = time.monotonic()
            try:
                answer = ping_on_a_new_connection(proxy.port)
                if answer != b"+PONG\r\n":
                    outcome["failures"].append(f"answer {answer!r}")
                else:
                    outcome["ok"] += 1
                    outcome["times"].append(began)
            except OSError as error:
                outcome["failures"].append(repr(error))
            stop.wait(0.005)

    worker = threading.Thread(target=connect_loop, daemon=True)
    worker.start()
    windows = []
    try:
        wait_for(lambda: outcome["ok"] > 5 or outcome["failures"], 10, "the first connections")
        for round_number in range(1, 6):
            began = time.monotonic()
            if round_number == 5:
                # The last one is asked for the way a service manager would: with SIGUSR2.
                proxy.signal(signal.SIGUSR2)
                wait_for(lambda: status(proxy.control_socket)["generation"] == 5, 30,
                         "the SIGUSR2 upgrade to finish")
            else:
                upgrade_ok(proxy)
            windows.append((began, time.monotonic()))
        stop.wait(0.2)
    finally:
        stop.set()
        worker.join(30)
    assert not outcome["failures"], outcome["failures"][:5]
    for began, ended in windows:
        assert any(began <= t <= ended for t in outcome["times"]), \
            "no connection was made while an upgrade was running"
    final = status(proxy.control_socket)
    assert final["generation"] == 5 and final["pid"] == proxy.pid
    assert final["last_upgrade"]["ok"] is True


# ---- the control socket -------------------------------------------------------------------------

def test_control_socket_is_private_and_status_answers(proxy, tmp_path):
    mode = os.stat(proxy.control_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    first = status(proxy.control_socket)
    assert (first["version"], first["pid"], first["generation"]) == (VERSION, proxy.pid, 0)
    assert first["sources"]["redis"]["connections"] == 0

    upgrade_ok(proxy)
    mode = os.stat(proxy.control_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert status(proxy.control_socket)["generation"] == 1

    nowhere = str(tmp_path / "nobody-listens.sock")
    result = upgrade(nowhere)
    assert result.returncode == 2, result
    assert "cannot reach" in result.stderr, result
    result = cli("status", "--control-socket", nowhere)
    assert result.returncode == 2 and "cannot reach" in result.stderr, result
    assert status(proxy.control_socket)["generation"] == 1


# ---- the checkpoint tool ------------------------------------------------------------------------

def test_inspect_checkpoint_shows_peers_and_hides_passwords(proxy_factory, redis_factory,
                                                            tmp_path):
    server = redis_factory()
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret-Pw", "~*", "+@all")
    proxy = proxy_factory(passthrough_topology(server.port, free_port()))
    kept_file = tmp_path / "kept.cbor"
    with RawClient(proxy.port) as alice:
        assert alice.call("AUTH", "alice", "s3cret-Pw") == b"OK"
        upgrade_ok(proxy, "--keep-checkpoint", str(kept_file))
        assert alice.call("ACL", "WHOAMI") == b"alice"
        assert stat.S_IMODE(kept_file.stat().st_mode) == 0o600
        assert leftover_checkpoints(proxy.pid) == []

        as_json = inspect_checkpoint(kept_file, "--json")
        assert as_json.returncode == 0, as_json.stderr
        records = json.loads(as_json.stdout)["connections"]
        assert [r["peer"] for r in records] == [local_peer(alice)]
        assert records[0]["session"]["auth"] == {"username": "alice", "password": "<redacted>"}
        as_text = inspect_checkpoint(kept_file)
        assert as_text.returncode == 0, as_text.stderr
        assert local_peer(alice) in as_text.stdout
        for shown in (as_json, as_text):
            assert "s3cret-Pw" not in shown.stdout + shown.stderr
        # It was in there all along: only the display hides it.
        revealed = inspect_checkpoint(kept_file, "--json", "--show-secrets")
        assert "s3cret-Pw" in revealed.stdout


def test_checkpoint_that_cannot_be_kept_is_reported_and_not_left_behind(proxy, tmp_path):
    target = tmp_path / "no-such-dir" / "kept.cbor"
    try:
        with RawClient(proxy.port) as kept:
            assert kept.call("SET", "key", "value") == b"OK"
            result = upgrade(proxy.control_socket, "--keep-checkpoint", str(target))
            assert kept.call("GET", "key") == b"value"
        # Whether the upgrade refuses the path or goes ahead, the operator must hear of it...
        assert str(target) in result.output, f"nothing says it was not kept: {result!r}"
        # ...and the checkpoint (sessions, passwords) must not stay in the default directory.
        assert leftover_checkpoints(proxy.pid) == []
    finally:
        discard_checkpoints(proxy.pid)
