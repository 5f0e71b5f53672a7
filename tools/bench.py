#!/usr/bin/env python3
"""Throughput and memory benchmarks of the proxy, next to Redis itself and HAProxy.

Throughput (the default): starts its own redis-server, the proxy (one or both generated
topologies) and, when installed, HAProxy in TCP mode, then runs

    redis-benchmark -h 127.0.0.1 -p PORT -t set,get -n N -c C [-P 16] --csv

against each of them in the same run, without pipelining and with -P 16, and prints one
table: requests per second, p50 and p99 latency, the CPU time the server process (redis-server,
HAProxy or the proxy) spent per request, and the proxy's throughput relative to direct Redis
and to HAProxy. With --repeat K every cell is the median of K runs; the runs of different
targets are interleaved, in an order rotated each round, so that a noisy neighbour hurts all of
them alike. CPU time per request is the steadier figure on a shared machine: waiting for a CPU
lowers requests per second but not CPU time.

Cluster (--topology cluster): builds a Redis Cluster instead (six cluster-enabled
redis-servers, three masters with a replica each, made by `redis-cli --cluster create`) and
the proxy with a RedisSinkCluster chain over all six nodes, then compares, in the same run,

    redis-benchmark --cluster -p MASTER_PORT -t set,get ...   (cluster-direct)
    redis-benchmark -p PROXY_PORT -t set,get ...              (proxy[cluster], cluster hidden)

Both use -r 100000 (random keys, so the proxy's traffic is spread over all three masters as
the cluster-aware client's is); no HAProxy target. CPU us/req of cluster-direct is that of all
six redis-servers together.

Idle connections (--idle-connections [N], default N=10000): raises this process's open-file
limit (the proxy inherits it), opens N TCP connections to the proxy and leaves them idle, and
reports the proxy's resident memory (VmRSS) per connection. Then it checks that every one of
them answers PING, at most 500 waiting for their reply at a time (non-blocking sockets and a
selector, bounded in time). A PING makes the proxy open that connection's upstream connection,
so each answered connection costs the proxy a second file descriptor: answered connections
stay open while the proxy's open-file limit allows it, which also gives the memory an active
connection adds; beyond that each one is closed as soon as it has answered.

Every process started here listens on 127.0.0.1 only and is stopped on exit, on error, on
Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import os
import platform
import selectors
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    HAPROXY,
    HOST,
    REDIS_BENCHMARK,
    BenchError,
    Stack,
    describe_load,
    format_table,
    log_tail,
    machine_load,
    median,
    percentile,
    proc_cpu_seconds,
    proc_fd_count,
    proc_nofile_limit,
    proc_status_kib,
    raise_nofile,
    tool_version,
    wait_until,
)

TESTS = ("SET", "GET")


# ---- throughput ---------------------------------------------------------------------------------


def run_redis_benchmark(port: int, requests: int, clients: int, pipeline: int,
                        timeout: float, server_pid: Union[None, int, List[int]] = None,
                        cluster: bool = False, key_range: Optional[int] = None
                        ) -> Dict[str, Dict[str, float]]:
    """One redis-benchmark run; returns {"SET": {...}, "GET": {...}} from its CSV output.

    With `server_pid` (one pid or a list), each result also carries that process's (those
    processes' total) CPU time per request over the whole run (SET and GET together), in
    microseconds. `cluster` adds --cluster (a cluster-aware client, `port` being any node's);
    `key_range` adds -r (random keys)."""
    argv = [REDIS_BENCHMARK, "-h", HOST, "-p", str(port), "-t", "set,get", "-n", str(requests),
            "-c", str(clients), "--csv"]
    if pipeline > 1:
        argv += ["-P", str(pipeline)]
    if cluster:
        argv.append("--cluster")
    if key_range:
        argv += ["-r", str(key_range)]
    pids = [] if not server_pid else [server_pid] if isinstance(server_pid, int) else server_pid
    cpu_before = cpu_seconds(pids) if pids else None
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark against port {port} took more than {timeout:g} s "
                         f"(raise --run-timeout or lower --requests)") from None
    out = done.stdout.decode("utf-8", "replace")
    err = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        raise BenchError(f"redis-benchmark exited with status {done.returncode}: "
                         f"{(err or out).strip()[-500:]}")
    # redis-benchmark 7.0 CSV: test, rps, avg/min/p50/p95/p99/max latency in ms.
    lines = [line for line in out.splitlines() if line.startswith('"')]
    results: Dict[str, Dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row.get("test", "").split()[0].upper()
        if name in TESTS:
            results[name] = {
                "rps": float(row["rps"]),
                "avg_ms": float(row["avg_latency_ms"]),
                "p50_ms": float(row["p50_latency_ms"]),
                "p95_ms": float(row["p95_latency_ms"]),
                "p99_ms": float(row["p99_latency_ms"]),
                "max_ms": float(row["max_latency_ms"]),
            }
    if cpu_before is not None:
        user, system = cpu_seconds(pids)
        total = requests * len(TESTS)
        for row in results.values():
            row["cpu_us"] = (user - cpu_before[0] + system - cpu_before[1]) * 1e6 / total
            row["cpu_sys_us"] = (system - cpu_before[1]) * 1e6 / total
    missing = [t for t in TESTS if t not in results]
    if missing:
        raise BenchError(f"redis-benchmark printed no result for {', '.join(missing)}:\n"
                         f"{out[-500:]}{err[-500:]}")
    if "error" in err.lower() and "could not fetch server config" not in err.lower():
        sys.stderr.write(f"redis-benchmark (port {port}) said: {err.strip()[-300:]}\n")
    return results


def cpu_seconds(pids: List[int]) -> Tuple[float, float]:
    """(user, system) CPU seconds of `pids` together."""
    times = [proc_cpu_seconds(pid) for pid in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


#: -r of the cluster topology's runs (random keys over every master).
CLUSTER_KEY_RANGE = 100000


def throughput(options) -> Dict[str, Any]:
    topologies = ["passthrough", "filtered"] if options.topology == "both" else [options.topology]
    pipelines = [1] if options.pipeline <= 1 else [1, options.pipeline]
    timeout = options.run_timeout
    raise_nofile()
    with Stack(keep=options.keep_logs, quiet=options.json and not options.verbose) as stack:
        # target: (name, port, pid or pids whose CPU time is measured, redis-benchmark --cluster)
        targets: List[Tuple[str, int, Union[int, List[int]], bool]] = []
        haproxy = None
        proxies = {}
        key_range: Optional[int] = None
        if options.topology == "cluster":
            cluster = stack.start_cluster()
            load_before = machine_load()
            targets.append(("cluster-direct", cluster.masters[0].port, cluster.pids, True))
            proxy = stack.start_proxy("cluster", None, contact_points=cluster.contact_points)
            proxies["cluster"] = proxy
            targets.append(("proxy[cluster]", proxy.port, proxy.pid, False))
            key_range = CLUSTER_KEY_RANGE
        else:
            redis = stack.start_redis()
            load_before = machine_load()
            targets.append(("direct", redis.port, redis.pid, False))
        if not options.no_haproxy and options.topology != "cluster":
            haproxy = stack.start_haproxy(redis.port, threads=options.haproxy_threads)
            if haproxy is None:
                stack.say("haproxy is not installed: no HAProxy column")
            else:
                targets.append(("haproxy", haproxy.port, haproxy.pid, False))
        for topology in topologies:
            if topology == "cluster":
                continue  # started above, with the cluster
            proxy = stack.start_proxy(topology, redis.port)
            proxies[topology] = proxy
            targets.append((f"proxy[{topology}]", proxy.port, proxy.pid, False))

        # Warm every path (connections, caches, the proxy's slot map) once before measuring.
        for _name, port, _pid, cluster_mode in targets:
            run_redis_benchmark(port, 2000, options.clients, 1, timeout, cluster=cluster_mode,
                                key_range=key_range)

        samples: Dict[Tuple[str, str, int], List[Dict[str, float]]] = {}
        for repeat in range(options.repeat):
            # Rotate the order each round so that no target always runs first or last.
            shift = repeat % len(targets)
            order = targets[shift:] + targets[:shift]
            for pipeline in pipelines:
                for name, port, pid, cluster_mode in order:
                    stack.say(f"run {repeat + 1}/{options.repeat}: {name}, -P {pipeline}")
                    try:
                        result = run_redis_benchmark(port, options.requests, options.clients,
                                                     pipeline, timeout, pid,
                                                     cluster=cluster_mode, key_range=key_range)
                    except BenchError as error:
                        tails = "".join(server_log_tail(stack, p)
                                        for p in (pid if isinstance(pid, list) else [pid]))
                        raise BenchError(f"{name}, -P {pipeline}: {error}{tails}") from None
                    for test, row in result.items():
                        samples.setdefault((name, test, pipeline), []).append(row)
                    for proxy in proxies.values():
                        proxy.check_alive()

        cells: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
        for key, rows in samples.items():
            cells[key] = {
                "rps": median([r["rps"] for r in rows]),
                "p50_ms": median([r["p50_ms"] for r in rows]),
                "p99_ms": median([r["p99_ms"] for r in rows]),
                "cpu_us": median([r["cpu_us"] for r in rows]),
                "cpu_sys_us": median([r["cpu_sys_us"] for r in rows]),
                "runs": rows,
            }
        proxy_rss = {topology: proxy_kib(p.pid) for topology, p in proxies.items()}
        load_after = machine_load()

    environment = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis_benchmark": tool_version([REDIS_BENCHMARK, "--version"]),
        "haproxy": tool_version([HAPROXY, "-v"]) if HAPROXY and haproxy else None,
        "haproxy_threads": options.haproxy_threads if haproxy else None,
    }
    results = []
    for pipeline in pipelines:
        for test in TESTS:
            direct = cells.get(("direct", test, pipeline)) or cells.get(
                ("cluster-direct", test, pipeline))
            via_haproxy = cells.get(("haproxy", test, pipeline))
            passthrough = cells.get(("proxy[passthrough]", test, pipeline))
            for name, _port, _pid, _cluster in targets:
                cell = cells[(name, test, pipeline)]
                row: Dict[str, Any] = {"target": name, "test": test, "pipeline": pipeline,
                                       "rps": round(cell["rps"], 1),
                                       "p50_ms": round(cell["p50_ms"], 3), "p99_ms": round(cell["p99_ms"], 3),
                                       "server_cpu_us_per_request": round(cell["cpu_us"], 2),
                                       "server_sys_us_per_request": round(cell["cpu_sys_us"], 2),
                                       "runs": len(cell["runs"])}
                if name.startswith("proxy"):
                    row["vs_direct"] = ratio(cell["rps"], direct)
                    row["vs_haproxy"] = ratio(cell["rps"], via_haproxy)
                    if name == "proxy[filtered]" and passthrough is not None:
                        row["vs_passthrough"] = ratio(cell["rps"], passthrough)
                elif name == "haproxy":
                    row["vs_direct"] = ratio(cell["rps"], direct)
                results.append(row)
    return {
        "mode": "throughput",
        "settings": {"requests": options.requests, "clients": options.clients,
                     "pipelines": pipelines, "repeat": options.repeat,
                     "topologies": topologies, "key_range": key_range},
        "environment": environment,
        "machine_load": {"before": load_before, "after": load_after},
        "results": results,
        "proxy_rss_kib_after": proxy_rss,
    }


def server_log_tail(stack: Stack, pid: int) -> str:
    """The end of the log of the process with `pid`, for an error message."""
    for child in stack.children:
        if child.pid == pid:
            state = "running" if child.running else f"exited with {child.process.returncode}"
            return f"\n{child.name} ({state}), log tail:\n{log_tail(child.log_path, 2000)}"
    return ""


def proxy_kib(pid: int) -> Optional[int]:
    try:
        return proc_status_kib(pid)
    except (OSError, BenchError):
        return None


def ratio(value: float, reference: Optional[Dict[str, Any]]) -> Optional[float]:
    if reference is None or not reference["rps"]:
        return None
    return round(value / reference["rps"], 3)


def print_throughput(report: Dict[str, Any]) -> None:
    s = report["settings"]
    env = report["environment"]
    print(f"redis-benchmark -t set,get -n {s['requests']} -c {s['clients']} "
          f"{'-r %d ' % s['key_range'] if s.get('key_range') else ''}"
          f"(pipeline {' and '.join(str(p) for p in s['pipelines'])}); median of "
          f"{s['repeat']} run(s) per cell; {env['cpus']} CPU(s); "
          f"haproxy: {'%d thread(s)' % env['haproxy_threads'] if env['haproxy'] else 'not run'}")
    has_passthrough_ratio = any("vs_passthrough" in r for r in report["results"])
    has_haproxy = any(r["target"] == "haproxy" for r in report["results"])
    headers = ["target", "test", "pipeline", "rps", "p50 ms", "p99 ms", "CPU us/req",
               "rps/direct"] + (["rps/haproxy"] if has_haproxy else [])
    if has_passthrough_ratio:
        headers.append("filtered/passthrough")
    rows = []
    previous = None
    for r in report["results"]:
        group = (r["pipeline"], r["test"])
        if previous is not None and group != previous:
            rows.append([""] * len(headers))
        previous = group
        row = [r["target"], r["test"], r["pipeline"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.3f}",
               f"{r['p99_ms']:.3f}",
               f"{r['server_cpu_us_per_request']:.1f} ({r['server_sys_us_per_request']:.0f} sys)",
               fmt_ratio(r.get("vs_direct"))]
        if has_haproxy:
            row.append(fmt_ratio(r.get("vs_haproxy")))
        if has_passthrough_ratio:
            row.append(fmt_ratio(r.get("vs_passthrough")))
        rows.append(row)
    print(format_table(headers, rows, right=[False, False] + [True] * (len(headers) - 2)))
    print("CPU us/req: CPU time (user + system) of the process the benchmark talks to "
          "(redis-server, haproxy or the proxy) per request, SET and GET runs together")
    if "cluster" in s["topologies"]:
        print("cluster-direct: redis-benchmark --cluster against the six nodes (CPU us/req: "
              "all six redis-servers together); proxy[cluster]: through RedisSinkCluster, "
              "the cluster hidden (CPU us/req: the proxy only)")
        print("rps/direct: this row's requests per second divided by cluster-direct's in the "
              "same test")
    else:
        print("rps/direct and rps/haproxy: this row's requests per second divided by direct "
              "Redis's and HAProxy's in the same test")
    print(describe_load(report["machine_load"]["before"], report["machine_load"]["after"]))


def fmt_ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


# ---- idle connections ---------------------------------------------------------------------------

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"
#: At most this many connections wait for their PING reply at once.
PING_WINDOW = 500
#: At most this many connects in flight at once (the listen backlog is larger than this).
CONNECT_WINDOW = 1000
#: File descriptors the proxy needs besides client and upstream sockets (listeners, logs...).
PROXY_FD_MARGIN = 200


class IdleClient:
    __slots__ = ("sock", "state", "sent_at", "latency", "buffer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = "connecting"
        self.sent_at = 0.0
        self.latency = 0.0
        self.buffer = b""


def open_connections(port: int, count: int, deadline: float) -> List[IdleClient]:
    """Open `count` non-blocking connections, at most CONNECT_WINDOW connecting at a time."""
    selector = selectors.DefaultSelector()
    clients: List[IdleClient] = []
    connecting = 0
    try:
        while len(clients) < count or connecting:
            while len(clients) < count and connecting < CONNECT_WINDOW:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex((HOST, port))
                client = IdleClient(sock)
                clients.append(client)
                if code in (0,):
                    client.state = "idle"
                elif code in (errno.EINPROGRESS, errno.EAGAIN):
                    selector.register(sock, selectors.EVENT_WRITE, client)
                    connecting += 1
                else:
                    raise BenchError(f"connect #{len(clients)} failed: {os.strerror(code)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"could not open {count} connections in time "
                                 f"({len(clients) - connecting} connected)")
            for key, _mask in selector.select(min(remaining, 1.0)):
                client = key.data
                selector.unregister(client.sock)
                connecting -= 1
                code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise BenchError(f"a connection failed: {os.strerror(code)}")
                client.state = "idle"
    except BaseException:
        for client in clients:
            client.sock.close()
        raise
    finally:
        selector.close()
    return clients


def ping_all(clients: List[IdleClient], keep_budget: int, deadline: float,
             on_budget_reached) -> Dict[str, Any]:
    """Send PING on every connection (PING_WINDOW outstanding at most) and wait for +PONG.

    A connection that answered stays open while fewer than `keep_budget` do (each answered
    connection also holds an upstream connection in the proxy); after that, answered ones are
    closed right away so that the proxy stays below its open-file limit."""
    selector = selectors.DefaultSelector()
    pending = iter(clients)
    outstanding = 0
    answered = kept = 0
    failures: Dict[str, int] = {}
    exhausted = False
    budget_reported = False
    latencies: List[float] = []
    started = time.monotonic()
    try:
        while True:
            while not exhausted and outstanding < PING_WINDOW:
                client = next(pending, None)
                if client is None:
                    exhausted = True
                    break
                try:
                    client.sent_at = time.monotonic()
                    client.sock.send(PING)
                except OSError as error:
                    failures[f"send: {error.strerror}"] = failures.get(
                        f"send: {error.strerror}", 0) + 1
                    client.state = "failed"
                    continue
                client.state = "pinging"
                selector.register(client.sock, selectors.EVENT_READ, client)
                outstanding += 1
            if exhausted and not outstanding:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures["no reply in time"] = outstanding + sum(
                    1 for c in clients if c.state == "idle")
                break
            for key, _mask in selector.select(min(remaining, 1.0)):
                client = key.data
                try:
                    data = client.sock.recv(64)
                except BlockingIOError:
                    continue
                except OSError as error:
                    data = None
                    reason = f"recv: {error.strerror}"
                else:
                    reason = "connection closed"
                if data:
                    client.buffer += data
                    if len(client.buffer) < len(PONG) and PONG.startswith(client.buffer):
                        continue
                selector.unregister(client.sock)
                outstanding -= 1
                if data and client.buffer == PONG:
                    client.latency = time.monotonic() - client.sent_at
                    latencies.append(client.latency)
                    answered += 1
                    if kept < keep_budget:
                        client.state = "answered"
                        kept += 1
                    else:
                        if not budget_reported:
                            budget_reported = True
                            on_budget_reached(kept)
                        client.state = "closed"
                        client.sock.close()
                else:
                    if data:
                        reason = f"unexpected reply {client.buffer[:60]!r}"
                    failures[reason] = failures.get(reason, 0) + 1
                    client.state = "failed"
    finally:
        selector.close()
    return {"answered": answered, "kept_open": kept, "failures": failures,
            "seconds": round(time.monotonic() - started, 3),
            "latency_ms": {"p50": round(percentile(latencies, 50) * 1000, 3),
                           "p99": round(percentile(latencies, 99) * 1000, 3),
                           "max": round(max(latencies) * 1000, 3) if latencies else None}}


def idle_connections(options, topology: str) -> Dict[str, Any]:
    count = options.idle_connections
    our_limit = raise_nofile()
    if count + 64 > our_limit:
        raise BenchError(f"{count} connections need an open-file limit above {count + 64}; "
                         f"this process may use {our_limit}")
    load_before = machine_load()
    with Stack(keep=options.keep_logs, quiet=options.json and not options.verbose) as stack:
        redis = stack.start_redis(max_clients=count + 1000)
        proxy = stack.start_proxy(topology, redis.port, connection_limit=count + 1000)
        proxy_limit = proc_nofile_limit(proxy.pid)
        if count + PROXY_FD_MARGIN > proxy_limit:
            raise BenchError(f"the proxy's open-file limit is {proxy_limit}: too low for "
                             f"{count} connections")
        time.sleep(0.5)
        rss_before = proc_status_kib(proxy.pid)
        fds_before = proc_fd_count(proxy.pid)
        stack.say(f"opening {count} idle connections to {proxy.name}")
        started = time.monotonic()
        clients = open_connections(proxy.port, count, started + options.timeout)
        try:
            connect_seconds = time.monotonic() - started
            wait_until(lambda: proxy.connections() >= count,
                       max(1.0, started + options.timeout - time.monotonic()),
                       f"the proxy to accept {count} connections", interval=0.1)
            accept_seconds = time.monotonic() - started
            time.sleep(1.0)  # let the last greenlets settle into recv()
            rss_idle = proc_status_kib(proxy.pid)
            fds_idle = proc_fd_count(proxy.pid)
            per_idle = (rss_idle - rss_before) / count
            stack.say(f"{count} idle: RSS {rss_before} -> {rss_idle} KiB "
                      f"({per_idle:.1f} KiB per connection)")

            # Answered connections keep an upstream connection each; stay within the limit.
            keep_budget = max(0, proxy_limit - count - PING_WINDOW - PROXY_FD_MARGIN)
            snapshot: Dict[str, Any] = {}

            def on_budget_reached(kept: int) -> None:
                snapshot["rss"] = proc_status_kib(proxy.pid)
                snapshot["kept"] = kept

            ping_result = ping_all(clients, keep_budget,
                                   time.monotonic() + options.timeout, on_budget_reached)
            if "rss" not in snapshot:
                time.sleep(0.5)
                snapshot["rss"] = proc_status_kib(proxy.pid)
                snapshot["kept"] = ping_result["kept_open"]
            still = proxy.connections()
            proxy.check_alive()
        finally:
            for client in clients:
                client.sock.close()
        rss_final = proc_status_kib(proxy.pid)
    active = snapshot["kept"]
    return {
        "mode": "idle-connections",
        "topology": topology,
        "connections": count,
        "proxy_nofile_limit": proxy_limit,
        "benchmark_nofile_limit": our_limit,
        "connect_seconds": round(connect_seconds, 3),
        "all_accepted_seconds": round(accept_seconds, 3),
        "rss_kib_before": rss_before,
        "rss_kib_idle": rss_idle,
        "kib_per_idle_connection": round(per_idle, 2),
        "fds_before": fds_before,
        "fds_idle": fds_idle,
        "ping": {**ping_result, "connections": count,
                 "all_answered": ping_result["answered"] == count},
        "rss_kib_active": snapshot["rss"],
        "active_connections": active,
        # An active connection costs what an idle one does plus its upstream connection.
        "kib_per_upstream_connection": round((snapshot["rss"] - rss_idle) / active, 2)
        if active else None,
        "proxy_connections_after_ping": still,
        "rss_kib_after_close": rss_final,
        "machine_load": {"before": load_before, "after": machine_load()},
    }


def print_idle(report: Dict[str, Any]) -> None:
    ping = report["ping"]
    failures = ", ".join(f"{n} {why}" for why, n in ping["failures"].items()) or "none"
    rows = [
        ["topology", report["topology"]],
        ["idle connections", f"{report['connections']:,}"],
        ["open-file limit (proxy / benchmark)",
         f"{report['proxy_nofile_limit']} / {report['benchmark_nofile_limit']}"],
        ["connect / all accepted", f"{report['connect_seconds']:.2f} s / "
                                   f"{report['all_accepted_seconds']:.2f} s"],
        ["proxy RSS before", f"{report['rss_kib_before']:,} KiB"],
        ["proxy RSS with all idle", f"{report['rss_kib_idle']:,} KiB"],
        ["RSS per idle connection", f"{report['kib_per_idle_connection']:.1f} KiB"],
        ["PING answered", f"{ping['answered']:,} / {ping['connections']:,} "
                          f"({'ALL' if ping['all_answered'] else 'NOT ALL'}) in "
                          f"{ping['seconds']:.2f} s"],
        ["PING failures", failures],
        ["PING latency p50 / p99 / max", f"{ping['latency_ms']['p50']} / "
                                         f"{ping['latency_ms']['p99']} / "
                                         f"{ping['latency_ms']['max']} ms"],
        ["proxy RSS with active connections",
         f"{report['rss_kib_active']:,} KiB ({report['active_connections']:,} with an upstream "
         f"connection each)"],
        ["RSS added per upstream connection", "" if report["kib_per_upstream_connection"] is None
         else f"{report['kib_per_upstream_connection']:.1f} KiB (an active connection: "
              f"{report['kib_per_idle_connection'] + report['kib_per_upstream_connection']:.1f}"
              f" KiB)"],
    ]
    print(format_table(["measure", "value"], rows))
    print(describe_load(report["machine_load"]["before"], report["machine_load"]["after"]))


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", "-n", type=int, default=100000,
                        help="requests per redis-benchmark test (default 100000)")
    parser.add_argument("--clients", "-c", type=int, default=50,
                        help="redis-benchmark parallel connections (default 50)")
    parser.add_argument("--pipeline", "-P", type=int, default=16,
                        help="pipeline depth of the pipelined runs; 1 runs only "
                             "non-pipelined (default 16)")
    parser.add_argument("--topology", choices=["passthrough", "filtered", "both", "cluster"],
                        default="passthrough",
                        help="proxy chain: RedisSinkSingle only, or QueryCounter + "
                             "QueryTypeFilter + RedisSinkSingle, or both (default passthrough); "
                             "cluster: a 3-master/3-replica Redis Cluster, direct "
                             "(redis-benchmark --cluster) and behind RedisSinkCluster")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per cell; the median is reported (default 3)")
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy target")
    parser.add_argument("--haproxy-threads", type=int, default=1,
                        help="HAProxy nbthread (default 1, like the single-threaded proxy)")
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds one redis-benchmark run may take (default 300)")
    parser.add_argument("--idle-connections", type=int, nargs="?", const=10000, default=None,
                        metavar="N",
                        help="instead of throughput: RSS per idle connection with N idle "
                             "connections, then PING on all of them (N defaults to 10000)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="idle mode: seconds allowed for connecting, and again for the "
                             "PING check (default 120)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="progress on stderr even with --json")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with configs and logs")
    options = parser.parse_args(argv)
    if options.requests < 1 or options.clients < 1 or options.repeat < 1:
        parser.error("--requests, --clients and --repeat must be at least 1")
    if options.idle_connections is not None and options.idle_connections < 1:
        parser.error("--idle-connections must be at least 1")
    if options.idle_connections is not None and options.topology == "cluster":
        parser.error("--idle-connections does not support --topology cluster")
    return options


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_args(argv)
    try:
        if options.idle_connections is not None:
            topologies = (["passthrough", "filtered"] if options.topology == "both"
                          else [options.topology])
            reports = [idle_connections(options, topology) for topology in topologies]
            if options.json:
                print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
            else:
                for index, report in enumerate(reports):
                    if index:
                        print()
                    print_idle(report)
            ok = all(r["ping"]["all_answered"] for r in reports)
            return 0 if ok else 1
        report = throughput(options)
        if options.json:
            print(json.dumps(report, indent=2))
        else:
            print_throughput(report)
        return 0
    except BenchError as error:
        sys.stderr.write(f"bench: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: every process this benchmark started was stopped\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
