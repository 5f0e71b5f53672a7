"""The supervisor and its workers, as an operator runs them: `shotover-g start --workers 2`,
upgrades under load, a worker that dies, a new version that fails in each way, one status,
one metrics page, one log filter. Real redis-server, real clients, real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time

import pytest

import subprocess

import yaml

from helpers import HOST, RawClient, http_request, metric_value, wait_for
from upgrade_support import (
    BackgroundUpgrade,
    CounterLoad,
    children,
    interpreter_exiting_at_restore,
    interpreter_gated_at_restore,
    ping_on_a_new_connection,
    process_gone,
    status,
    tail,
    upgrade,
    upgrade_ok,
)

WORKERS = ("--workers", "2")


def worker_pids(control_socket: str) -> dict:
    return {w["index"]: w["pid"] for w in status(control_socket)["workers"]}


def clients_on_each_worker(proxy, count: int) -> list:
    """At least `count` connections (kept open), spread by the kernel over the workers, with
    one more at a time (up to 8x `count` in all) until each worker holds one: the kernel
    picks a worker by a hash of the addresses, so all of the first `count` may land on one
    (for 8 connections and 2 workers, once in 128)."""
    clients = [RawClient(proxy.port) for _ in range(count)]
    for client in clients:
        assert client.call("PING") == b"PONG"

    def spread() -> bool:
        workers = status(proxy.control_socket)["workers"]
        return all(w.get("sources", {}).get("redis", 0) > 0 for w in workers)

    while not spread() and len(clients) < count * 8:
        client = RawClient(proxy.port)
        clients.append(client)
        assert client.call("PING") == b"PONG"
    wait_for(spread, 10, "connections on every worker")
    return clients


class ConnectLoop(threading.Thread):
    """New connections, one after another (PING on each), counting every refusal, reset or
    wrong answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list = []

    def run(self) -> None:
        deadline = time.monotonic() + 150
        while not self.stop.is_set() and time.monotonic() < deadline and self.ok < 50000:
            try:
                answer = ping_on_a_new_connection(self.port)
                if answer == b"+PONG\r\n":
                    self.ok += 1
                else:
                    self.failures.append(f"answer {answer!r}")
            except OSError as error:
                self.failures.append(repr(error))
            self.stop.wait(0.01)


def test_two_workers_share_the_clients_and_survive_ten_upgrades_under_load(proxy_factory,
                                                                          redis_server):
    proxy = proxy_factory(extra_args=WORKERS)
    supervisor_pid = proxy.pid
    connector = ConnectLoop(proxy.port)
    try:
        with CounterLoad(proxy.port, "sv", 100) as load:
            first = status(proxy.control_socket)
            per_worker = [w["sources"]["redis"] for w in first["workers"]]
            assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker
            assert sum(per_worker) == 100
            connector.start()
            for round_number in range(1, 11):
                result = upgrade_ok(proxy)
                kept = [int(n) for n in re.findall(r"kept (\d+) connections", result.stdout)]
                # (the connect loop may have one more open at that moment)
                assert len(kept) == 2 and 100 <= sum(kept) <= 101, result
                assert "closed 0" in result.stdout, result
                assert not load.failures(), f"after upgrade {round_number}: {load.failures()[:5]}"
                assert not connector.failures, connector.failures[:5]
            load.wait_for_more_batches(2)
            after = status(proxy.control_socket)
    finally:
        connector.stop.set()
        if connector.is_alive() or connector.ident:
            connector.join(30)
    assert not load.failures(), load.failures()[:5]
    assert not connector.failures, connector.failures[:5]
    assert connector.ok > 0
    assert load.counts_match(redis_server.client())
    assert after["pid"] == supervisor_pid == proxy.pid and proxy.running
    assert [w["generation"] for w in after["workers"]] == [10, 10]
    assert after["supervisor"]["generation"] == 10
    # (the connect loop may have had one more open at that moment)
    assert after["sources"]["redis"]["connections"] in (100, 101)
    assert sorted(int(c.split()[0]) for c in children(supervisor_pid)) == \
        sorted(w["pid"] for w in after["workers"]), "only the workers are left as children"


def test_a_worker_that_dies_is_restarted_and_the_others_clients_never_notice(proxy_factory):
    proxy = proxy_factory(extra_args=WORKERS, observability=True)
    clients = clients_on_each_worker(proxy, 16)
    try:
        for index, client in enumerate(clients):
            assert client.call("SET", f"k{index}", index) == b"OK"
        before = status(proxy.control_socket)
        victim = before["workers"][0]
        counted = metric_value(http_request(proxy.metrics_url)[1],
                               "shotover_chain_total_count", chain="redis")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: status(proxy.control_socket)["workers"][0]["pid"] != victim["pid"] and
                 status(proxy.control_socket)["workers"][0].get("version"), 20,
                 "the worker to be restarted")
        after = status(proxy.control_socket)
        assert after["pid"] == proxy.pid and proxy.running
        assert after["workers"][0]["restarts"] == 1
        assert after["workers"][1]["pid"] == before["workers"][1]["pid"]
        lost = served = 0
        for index, client in enumerate(clients):
            try:
                assert client.call("GET", f"k{index}") == str(index).encode()
                served += 1
            except (OSError, EOFError, AssertionError):
                lost += 1
        assert lost == victim["sources"]["redis"] and served == 16 - lost, (lost, served)
        # New clients reach both workers (the restarted one accepts on the same socket).
        wait_for(lambda: ping_on_a_new_connection(proxy.port) == b"+PONG\r\n", 10, "PONG")
        page = http_request(proxy.metrics_url)[1]
        assert metric_value(page, "shotover_g_worker_restarts_total", worker="1") == 1
        assert metric_value(page, "shotover_chain_total_count", chain="redis") >= counted, \
            "a counter went back when its worker restarted"
    finally:
        for client in clients:
            client.close()
    assert "worker 1 (pid" in proxy.log_text() and "restarting it" in proxy.log_text()


def test_new_version_dying_at_start_stops_the_roll_out_and_keeps_the_pid(proxy_factory,
                                                                        tmp_path):
    proxy = proxy_factory(extra_args=WORKERS)
    clients = clients_on_each_worker(proxy, 12)
    before = worker_pids(proxy.control_socket)
    try:
        result = upgrade(proxy.control_socket, "--python",
                         interpreter_exiting_at_restore(tmp_path))
        assert result.returncode == 1, f"{result!r}\n{tail(proxy.log_path)}"
        assert "rolled back" in result.output and "exited before adopting" in result.output
        assert "upgrade stopped at worker 1" in result.output, result
        assert "worker 2: previous version" in result.output, result
        # The same client sockets, on both workers, are served.
        for client in clients:
            assert client.call("INCR", "after-failure") is not None
        now = status(proxy.control_socket)
        assert now["pid"] == proxy.pid and proxy.running
        pids = {w["index"]: w["pid"] for w in now["workers"]}
        # Worker 1's bridge (the previous version) serves on as worker 1, a child of the
        # supervisor; worker 2 was not touched.
        assert pids[1] != before[1] and process_gone(before[1])
        assert pids[2] == before[2]
        assert str(pids[1]) in " ".join(children(proxy.pid))
        assert [w["generation"] for w in now["workers"]] == [0, 0]
        assert now["last_upgrade"]["ok"] is False
        # A later upgrade finishes the job, on the same sockets.
        upgrade_ok(proxy)
        for client in clients:
            assert client.call("PING") == b"PONG"
        assert [w["generation"] for w in status(proxy.control_socket)["workers"]] == [1, 1]
    finally:
        for client in clients:
            client.close()


def test_new_worker_image_killed_after_adopting(proxy_factory, tmp_path):
    """The worst case: the new version takes over a worker's clients, then crashes. That
    worker's clients lose their connections (nothing else holds them any more), the
    supervisor restarts it on the same listening socket, and every other client is served."""
    proxy = proxy_factory(extra_args=WORKERS)
    clients = clients_on_each_worker(proxy, 12)
    try:
        upgrade_ok(proxy)
        now = status(proxy.control_socket)
        doomed = now["workers"][0]
        os.kill(doomed["pid"], signal.SIGKILL)
        wait_for(lambda: status(proxy.control_socket)["workers"][0]["restarts"] == 1 and
                 status(proxy.control_socket)["workers"][0].get("version"), 20,
                 "the worker to be restarted")
        survivors = 0
        for client in clients:
            try:
                if client.call("PING") == b"PONG":
                    survivors += 1
            except (OSError, EOFError, AssertionError):
                pass
        assert survivors == now["workers"][1]["sources"]["redis"]
        assert status(proxy.control_socket)["pid"] == proxy.pid and proxy.running
        for _ in range(10):
            assert ping_on_a_new_connection(proxy.port) == b"+PONG\r\n"
    finally:
        for client in clients:
            client.close()


def test_one_metrics_page_and_one_filter_for_every_worker(proxy_factory):
    proxy = proxy_factory(extra_args=WORKERS, observability=True)
    clients = clients_on_each_worker(proxy, 12)
    try:
        for client in clients:
            for _ in range(5):
                assert client.call("PING") == b"PONG"
        page = http_request(proxy.metrics_url)[1]
        # 12 connections, each: PING when connected (clients_on_each_worker) + 5 more.
        assert metric_value(page, "shotover_chain_total_count", chain="redis") >= 72
        assert metric_value(page, "shotover_g_workers") == 2
        upgrade_ok(proxy)
        after = http_request(proxy.metrics_url)[1]
        assert metric_value(after, "shotover_chain_total_count", chain="redis") >= \
            metric_value(page, "shotover_chain_total_count", chain="redis"), \
            "a counter went back across an upgrade"
        code, body = http_request(proxy.filter_url, "PUT", b"debug")[:2]
        assert code == 200, body
        code, body = http_request(proxy.filter_url, "PUT", b"no-such-level")[:2]
        assert code == 400, body
        mark = len(proxy.log_text())
    finally:
        for client in clients:
            client.close()
    # Each worker logs its clients' departures at debug level: all 12 means both got it.
    wait_for(lambda: proxy.log_text()[mark:].count("closed: client closed") >= 12,
             10, "a debug line for every departed client")


def test_sigterm_to_the_supervisor_stops_every_worker(proxy_factory):
    proxy = proxy_factory(extra_args=WORKERS)
    pids = list(worker_pids(proxy.control_socket).values())
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait_exit(30) == 0
    for pid in pids:
        assert process_gone(pid), f"worker pid {pid} outlived its supervisor"
    assert not os.path.exists(proxy.control_socket)


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_bad_worker_count_is_refused(proxy_factory, value):
    proxy = proxy_factory(extra_args=("--workers", value), start=False)
    import subprocess

    done = subprocess.run(proxy.command(), capture_output=True, text=True, timeout=60,
                          env=proxy.environment(), cwd=str(proxy.directory))
    assert done.returncode == 2, done
    assert "--workers" in done.stderr and "auto" in done.stderr, done.stderr


BREAK_SUPERVISOR = """\
import sys
import shotover_gevent.supervisor as supervisor

def broken(cls, *args, **kwargs):
    raise RuntimeError("stand-in: this supervisor image cannot take over")

supervisor.Supervisor.restore = classmethod(broken)
from shotover_gevent.cli import main
sys.argv = ["shotover-g"] + sys.argv[1:]
main()
"""


def interpreter_breaking_the_new_supervisor(directory) -> str:
    """The real interpreter, except that a supervisor image it starts after an exec (its state
    in the environment, not a roll-back) fails to take over."""
    hook = directory / "break_supervisor.py"
    hook.write_text(BREAK_SUPERVISOR)
    path = directory / "python-breaking-supervisor"
    path.write_text(f"""#!/bin/sh
case "$SHOTOVER_G_SUPERVISOR" in
  "") ;;
  *rolled_back*) ;;
  *) [ "$1" = "-m" ] && shift 2; exec "{sys.executable}" "{hook}" "$@" ;;
esac
exec "{sys.executable}" "$@"
""")
    path.chmod(0o755)
    return str(path)


def test_a_new_supervisor_image_that_cannot_take_over_rolls_back_in_place(proxy_factory,
                                                                         tmp_path):
    proxy = proxy_factory(extra_args=WORKERS)
    clients = clients_on_each_worker(proxy, 8)
    try:
        result = upgrade(proxy.control_socket, "--python",
                         interpreter_breaking_the_new_supervisor(tmp_path))
        assert result.returncode == 1, f"{result!r}\n{tail(proxy.log_path)}"
        assert "the supervisor rolled back" in result.output, result
        assert "cannot take over" in result.output, result
        now = status(proxy.control_socket)
        assert now["pid"] == proxy.pid and proxy.running
        assert now["supervisor"]["generation"] == 0
        assert [w["generation"] for w in now["workers"]] == [1, 1]
        for client in clients:
            assert client.call("PING") == b"PONG"
        # It still supervises: a worker that dies is replaced.
        os.kill(now["workers"][1]["pid"], signal.SIGKILL)
        wait_for(lambda: status(proxy.control_socket)["workers"][1]["restarts"] == 1, 20,
                 "the worker to be restarted")
    finally:
        for client in clients:
            client.close()


def test_a_second_start_of_the_same_service_is_refused_and_harms_nothing(proxy_factory):
    proxy = proxy_factory(extra_args=WORKERS)
    with RawClient(proxy.port) as kept:
        assert kept.call("SET", "k", "v") == b"OK"
        again = subprocess.run(proxy.command(), capture_output=True, text=True, timeout=60,
                               env=proxy.environment(), cwd=str(proxy.directory))
        assert again.returncode == 1, again
        assert "in use" in again.stdout + again.stderr, again
        # The running service keeps its control socket and its clients.
        assert os.path.exists(proxy.control_socket)
        assert status(proxy.control_socket)["pid"] == proxy.pid
        assert kept.call("GET", "k") == b"v"


def test_another_service_on_the_same_port_is_refused(proxy_factory, redis_server):
    first = proxy_factory()
    topology = yaml.safe_load(first.topology_path.read_text())
    second = proxy_factory(topology_dict=topology, start=False)
    done = subprocess.run(second.command(), capture_output=True, text=True, timeout=60,
                          env=second.environment(), cwd=str(second.directory))
    assert done.returncode == 1, done
    assert "cannot listen on" in done.stdout + done.stderr, done
    assert ping_on_a_new_connection(first.port) == b"+PONG\r\n"


def test_a_restarted_worker_runs_the_configuration_the_service_runs(proxy_factory, redis_server,
                                                                    redis_factory):
    other = redis_factory()
    proxy = proxy_factory(extra_args=WORKERS)
    # The file changes on disk; nothing reloads it.
    changed = yaml.safe_load(proxy.topology_path.read_text())
    chain = changed["sources"][0]["Redis"]["chain"]
    chain[-1]["RedisSinkSingle"]["remote_address"] = f"127.0.0.1:{other.port}"
    proxy.topology_path.write_text(yaml.safe_dump(changed))
    victim = status(proxy.control_socket)["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: status(proxy.control_socket)["workers"][0]["restarts"] == 1 and
             status(proxy.control_socket)["workers"][0].get("version"), 20,
             "the worker to be restarted")
    for number in range(40):
        with RawClient(proxy.port) as client:
            assert client.call("SET", f"drift{number}", 1) == b"OK"
    assert len(redis_server.client().keys("drift*")) == 40
    assert other.client().keys("drift*") == []


def test_workers_of_a_killed_supervisor_serve_their_clients_then_make_room(proxy_factory,
                                                                           redis_server):
    proxy = proxy_factory(extra_args=WORKERS)
    workers = list(worker_pids(proxy.control_socket).values())
    with RawClient(proxy.port) as kept:
        assert kept.call("SET", "k", "v") == b"OK"
        proxy.kill()
        proxy.process.wait(10)
        wait_for(lambda: proxy.log_text().count("the supervisor (pid") == 2, 15,
                 "both workers to notice their supervisor is gone")
        assert kept.call("GET", "k") == b"v"  # its clients are still served
        # New connections are not accepted by a worker nobody supervises.
        with pytest.raises(OSError):
            socket.create_connection((HOST, proxy.port), timeout=2).close()
    # Its last client left: it is gone, and the service starts again on the same port.
    wait_for(lambda: all(process_gone(pid) for pid in workers), 20, "the orphaned workers to exit")
    again = proxy_factory(topology_dict=yaml.safe_load(proxy.topology_path.read_text()),
                          extra_args=WORKERS)
    assert again.port == proxy.port
    assert ping_on_a_new_connection(again.port) == b"+PONG\r\n"


def test_a_stop_during_an_upgrade_wins(proxy_factory, tmp_path):
    proxy = proxy_factory(extra_args=WORKERS)
    gate = tmp_path / "gate"
    offset = len(proxy.log_text())
    run = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python",
                            interpreter_gated_at_restore(tmp_path, gate))
    try:
        proxy.wait_log("[worker 1/2] exec:", start=offset, timeout=30)
        proxy.signal(signal.SIGTERM)
        gate.touch()
        result = run.wait(60)
    finally:
        gate.touch()
        run.kill()
    assert result.returncode == 1, result
    assert proxy.wait_exit(40) == 0
    assert "supervisor: exec" not in proxy.log_text()[offset:]
    assert children(proxy.pid) == []


def test_a_stranger_on_a_workers_address_is_not_believed(proxy_factory, tmp_path):
    """Abstract Unix socket names have no permissions: another user could bind a worker's
    address. The supervisor only talks to processes of its own user."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the stranger as another user")
    from shotover_gevent.lifecycle import worker_control_address

    proxy = proxy_factory(extra_args=WORKERS, start=False)
    address = worker_control_address(proxy.control_socket, 1)
    stranger = subprocess.Popen([sys.executable, "-c", STRANGER, address],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert stranger.stdout.readline().strip() == "listening"
        done = subprocess.run(proxy.command(), capture_output=True, text=True, timeout=60,
                              env=proxy.environment(), cwd=str(proxy.directory))
        assert done.returncode == 1, done
        assert "still holds" in done.stdout + done.stderr, done
    finally:
        stranger.kill()
        stranger.wait(10)


STRANGER = """\
import json, os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("\\0" + sys.argv[1][1:])
listener.listen(8)
os.setgid(65534)
os.setuid(65534)
print("listening", flush=True)
listener.settimeout(60)
while True:
    client, _ = listener.accept()
    client.recv(65536)
    client.sendall(json.dumps({"event": "status", "pid": 1, "version": "EVIL"}).encode() + b"\\n")
    client.close()
"""


def test_a_stopped_bridge_does_not_hold_the_new_image_forever(proxy_factory, tmp_path):
    """The new image waits for the checkpoint only as long as the bridge gave itself (drain
    timeout + --timeout); then it gives up, and the bridge, once it runs again, serves on as
    that worker."""
    proxy = proxy_factory()
    gate = tmp_path / "gate"
    worker = status(proxy.control_socket)["workers"][0]["pid"]
    with RawClient(proxy.port) as kept:
        assert kept.call("SET", "k", "v") == b"OK"
        offset = len(proxy.log_text())
        run = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python",
                                interpreter_gated_at_restore(tmp_path, gate),
                                "--drain-timeout", "0", "--timeout", "3")
        bridge = None
        try:
            proxy.wait_log("[worker 1/1] exec:", start=offset, timeout=30)
            bridge = int(proxy.log_text()[offset:].split("; pid ")[1].split()[0])
            os.kill(bridge, signal.SIGSTOP)
            gate.touch()
            wait_for(lambda: process_gone(worker), 30, "the new image to give up")
            assert "did not hand over within 3 s" in proxy.log_text()[offset:]
        finally:
            if bridge is not None:
                os.kill(bridge, signal.SIGCONT)
            gate.touch()
        result = run.wait(120)
        assert result.returncode == 1, result
        wait_for(lambda: status(proxy.control_socket)["workers"][0]["pid"] == bridge, 60,
                 "the bridge to be adopted as the worker")
        assert kept.call("GET", "k") == b"v"
        assert status(proxy.control_socket)["pid"] == proxy.pid


def test_workers_start_with_no_signal_blocked():
    """The supervisor blocks its control signals across its own exec; a worker it starts in
    that window must not inherit the mask (it would ignore SIGTERM)."""
    from shotover_gevent.supervisor import spawn

    read_end, write_end = os.pipe()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        pid = spawn([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                    dict(os.environ), stdout=write_end)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(write_end)
    with os.fdopen(read_end) as output:
        text = output.read()
    os.waitpid(pid, 0)
    blocked = next(line for line in text.splitlines() if line.startswith("SigBlk:"))
    assert int(blocked.split()[1], 16) == 0, blocked


def test_a_new_image_dying_soon_after_taking_over_fails_the_upgrade(proxy_factory, tmp_path):
    proxy = proxy_factory(extra_args=WORKERS)
    clients = clients_on_each_worker(proxy, 8)
    wrapper = tmp_path / "python-dies-after-taking-over"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in
  *" --restore "*)
    case "$SHOTOVER_G_WORKER" in
      *'"index": 1,'*) (sleep 1; kill -9 $$) & ;;
      *) sleep 3 ;;
    esac ;;
esac
exec "{sys.executable}" "$@"
""")
    wrapper.chmod(0o755)
    try:
        result = upgrade(proxy.control_socket, "--python", str(wrapper))
        assert result.returncode == 1, f"{result!r}\n{tail(proxy.log_path)}"
        assert status(proxy.control_socket)["pid"] == proxy.pid
        assert "supervisor: exec" not in result.output, result
    finally:
        for client in clients:
            client.close()
