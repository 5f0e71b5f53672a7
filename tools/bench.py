#!/usr/bin/env python3
"""Throughput and memory benchmarks of the proxy, next to Redis itself and HAProxy.

Throughput (the default): starts its own redis-server, the proxy (passthrough: RedisSinkSingle
only; shared: RedisSinkSingle with shared_connections: 1; filtered: QueryCounter +
QueryTypeFilter + RedisSinkSingle; shared-filtered: the same with the shared sink) and, when
installed, HAProxy in TCP mode with one thread, then runs

    redis-benchmark -h 127.0.0.1 -p PORT -t set,get -n N -c C [-P 16] --csv

against each of them in the same run, for every -c of --clients (50 and 500), without
pipelining and with -P 16, and prints one table: requests per second and the CPU time per
request (user and system) of the process redis-benchmark talks to, read from /proc/PID/stat
before and after each run; for the proxy, of its process tree (the proxy and any child
process). Ratio rows give proxy/HAProxy and filtered/passthrough (and the shared pairs) for
both figures. CPU time per request is the figure to compare on a shared machine: waiting for a
CPU lowers requests per second but not CPU time. A last, small run per target (redis-benchmark
-k 0) gives the CPU cost of one connection (connect, PING, close), which is inside every run's
figure too. With --repeat K every cell is the median of K runs; the runs of different targets
are interleaved, in an order rotated each time, so that a noisy neighbour hurts all of them
alike.

Cluster (--topology cluster): builds a Redis Cluster instead (six cluster-enabled
redis-servers, three masters with a replica each, made by `redis-cli --cluster create`) and
the proxy with a RedisSinkCluster chain over all six nodes, then compares, in the same run,

    redis-benchmark --cluster -p MASTER_PORT -t set,get ...   (cluster-direct)
    redis-benchmark -p PROXY_PORT -t set,get ...              (proxy[cluster], cluster hidden)

Both use -r 100000 (random keys, so the proxy's traffic is spread over all three masters as
the cluster-aware client's is); no HAProxy target. CPU us/req of cluster-direct is that of all
six redis-servers together (the cluster-aware client's own CPU is not counted anywhere), so
only requests per second compare between the two; proxy[cluster]'s is the proxy's.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    HAPROXY,
    HOST,
    REDIS_BENCHMARK,
    BenchError,
    Child,
    Stack,
    describe_load,
    format_table,
    log_tail,
    machine_load,
    median,
    percentile,
    proc_fd_count,
    proc_nofile_limit,
    proc_stat_ticks,
    proc_status_kib,
    process_tree,
    raise_nofile,
    tool_version,
    wait_until,
)

#: redis-benchmark tests run by default (-t).
DEFAULT_TESTS = ("SET", "GET")


# ---- CPU time -----------------------------------------------------------------------------------

#: Clock ticks a second: the unit of the times in /proc/<pid>/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: A CPU figure resting on fewer ticks than this is marked "~" (one tick more or less: > 2 %).
PRECISE_TICKS = 50

#: pid -> (user, system, waited-for children's user, their system), in clock ticks.
CpuSnapshot = Dict[int, Tuple[int, int, int, int]]


def cpu_snapshot(roots: Sequence[int]) -> CpuSnapshot:
    """The CPU times of every process in the trees under `roots` (a process's own times cover
    all its threads)."""
    snapshot: CpuSnapshot = {}
    for pid in process_tree(roots):
        try:
            snapshot[pid] = proc_stat_ticks(pid)[1:]
        except (OSError, ValueError, IndexError):
            pass  # exited meanwhile
    return snapshot


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> Tuple[int, int]:
    """(user, system) ticks the process trees used between two snapshots. A process started in
    between counts whole; one that ended in between counts through the children's times of the
    parent that waited for it, less what it had used before the first snapshot."""
    user = system = 0
    for pid, (u, s, cu, cs) in after.items():
        bu, bs, bcu, bcs = before.get(pid, (0, 0, 0, 0))
        user += u - bu + cu - bcu
        system += s - bs + cs - bcs
    for pid, (u, s, _cu, _cs) in before.items():
        if pid not in after:
            user -= u
            system -= s
    return max(0, user), max(0, system)


def settled_snapshot(roots: Sequence[int], step: float = 0.1, limit: float = 1.0) -> CpuSnapshot:
    """A snapshot taken once the processes stop using CPU (the connections the benchmark has
    just closed are torn down, and that is part of their cost), or after `limit` seconds."""
    deadline = time.monotonic() + limit
    last = cpu_snapshot(roots)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_snapshot(roots)
        if sum(map(sum, now.values())) == sum(map(sum, last.values())):
            return now
        last = now
    return last


# ---- throughput ---------------------------------------------------------------------------------


class Target:
    """Something redis-benchmark talks to, and the processes whose CPU time it costs."""

    __slots__ = ("name", "kind", "port", "pids", "cluster_mode")

    def __init__(self, name: str, kind: str, port: int, pids: List[int],
                 cluster_mode: bool = False) -> None:
        self.name = name
        self.kind = kind  # "redis", "cluster" (the nodes themselves), "haproxy" or "proxy"
        self.port = port
        self.pids = pids
        self.cluster_mode = cluster_mode  # redis-benchmark --cluster


def run_redis_benchmark(port: int, requests: int, clients: int, pipeline: int,
                        timeout: float, cpu_roots: Sequence[int] = (), cluster: bool = False,
                        key_range: Optional[int] = None, tests: Sequence[str] = DEFAULT_TESTS,
                        keepalive: bool = True) -> Dict[str, Any]:
    """One redis-benchmark run of `tests` (`requests` each).

    Returns {"tests": {"SET": {"rps", latencies...}, ...}, "rps": requests per second over all
    the tests together, "requests": their total} and, with `cpu_roots`, the CPU ticks the
    process trees under those pids used over the whole run ("cpu_user_ticks",
    "cpu_system_ticks"). `cluster` adds --cluster (a cluster-aware client, `port` being any
    node's); `key_range` adds -r (random keys); keepalive=False adds -k 0 (a new connection for
    every request)."""
    argv = [REDIS_BENCHMARK, "-h", HOST, "-p", str(port), "-t", ",".join(tests).lower(),
            "-n", str(requests), "-c", str(clients), "--csv"]
    if pipeline > 1:
        argv += ["-P", str(pipeline)]
    if cluster:
        argv.append("--cluster")
    if key_range:
        argv += ["-r", str(key_range)]
    if not keepalive:
        argv += ["-k", "0"]
    before = cpu_snapshot(cpu_roots) if cpu_roots else None
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark against port {port} took more than {timeout:g} s "
                         f"(raise --run-timeout or lower --requests)") from None
    after = settled_snapshot(cpu_roots) if cpu_roots else None
    out = done.stdout.decode("utf-8", "replace")
    err = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        raise BenchError(f"redis-benchmark exited with status {done.returncode}: "
                         f"{(err or out).strip()[-500:]}")
    # redis-benchmark 7.0 CSV: test, rps, avg/min/p50/p95/p99/max latency in ms.
    lines = [line for line in out.splitlines() if line.startswith('"')]
    wanted = {test.upper() for test in tests}
    results: Dict[str, Dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row.get("test", "").split()[0].upper()
        if name in wanted:
            results[name] = {
                "rps": float(row["rps"]),
                "avg_ms": float(row["avg_latency_ms"]),
                "p50_ms": float(row["p50_latency_ms"]),
                "p95_ms": float(row["p95_latency_ms"]),
                "p99_ms": float(row["p99_latency_ms"]),
                "max_ms": float(row["max_latency_ms"]),
            }
    missing = sorted(wanted - set(results))
    if missing or any(not row["rps"] for row in results.values()):
        raise BenchError(f"redis-benchmark printed no result for {', '.join(missing) or 'a test'}"
                         f":\n{out[-500:]}{err[-500:]}")
    if "error" in err.lower() and "could not fetch server config" not in err.lower():
        sys.stderr.write(f"redis-benchmark (port {port}) said: {err.strip()[-300:]}\n")
    # Over all the tests: the total requests over the time the tests took together.
    total = requests * len(results)
    result: Dict[str, Any] = {"tests": results, "requests": total,
                              "rps": total / sum(requests / row["rps"] for row in results.values())}
    if before is not None and after is not None:
        result["cpu_user_ticks"], result["cpu_system_ticks"] = cpu_used(before, after)
    return result



#: -r of the cluster topology's runs (random keys over every master).
CLUSTER_KEY_RANGE = 100000


def per_request_us(ticks: float, requests: int) -> float:
    return ticks / CLOCK_TICKS * 1e6 / requests


def start_targets(stack: Stack, options, topologies: List[str]
                  ) -> Tuple[List[Target], Dict[str, Any], Optional[Child]]:
    """Start what the runs compare: Redis (or a Redis Cluster), HAProxy, the proxies."""
    targets: List[Target] = []
    proxies: Dict[str, Any] = {}
    haproxy = None
    if options.topology == "cluster":
        cluster = stack.start_cluster()
        targets.append(Target("cluster-direct", "cluster", cluster.masters[0].port,
                              cluster.pids, cluster_mode=True))
        proxy = stack.start_proxy("cluster", None, contact_points=cluster.contact_points,
                                  workers=options.workers)
        proxies["cluster"] = proxy
        targets.append(Target("proxy[cluster]", "proxy", proxy.port, [proxy.pid]))
        return targets, proxies, None
    redis = stack.start_redis(max_clients=max(options.clients) * 4 + 1000)
    targets.append(Target("direct", "redis", redis.port, [redis.pid]))
    if not options.no_haproxy:
        haproxy = stack.start_haproxy(redis.port, threads=options.haproxy_threads,
                                      max_conn=max(4096, max(options.clients) * 2 + 100))
        if haproxy is None:
            stack.say("haproxy is not installed: no HAProxy rows")
        else:
            targets.append(Target("haproxy", "haproxy", haproxy.port, [haproxy.pid]))
    for topology in topologies:
        proxy = stack.start_proxy(topology, redis.port, workers=options.workers)
        proxies[topology] = proxy
        targets.append(Target(proxy.name, "proxy", proxy.port, [proxy.pid]))
        if options.baseline:
            proxy = stack.start_proxy(topology, redis.port, source_root=options.baseline,
                                      label="baseline", workers=options.workers)
            proxies[f"{topology}@baseline"] = proxy
            targets.append(Target(proxy.name, "proxy", proxy.port, [proxy.pid]))
    return targets, proxies, haproxy


def throughput(options) -> Dict[str, Any]:
    topologies = topology_kinds(options.topology)
    pipelines = [1] if options.pipeline <= 1 else [1, options.pipeline]
    if options.pipelined_only and options.pipeline > 1:
        pipelines = [options.pipeline]
    tests = options.tests
    key_range = CLUSTER_KEY_RANGE if options.topology == "cluster" else None
    requests = {1: options.requests}
    if options.pipeline > 1:
        requests[options.pipeline] = options.pipelined_requests
    timeout = options.run_timeout
    raise_nofile()
    load_before = machine_load()
    with Stack(keep=options.keep_logs, quiet=options.json and not options.verbose) as stack:
        targets, proxies, haproxy = start_targets(stack, options, topologies)

        def run(target: Target, count: int, clients: int, pipeline: int,
                **extra) -> Dict[str, Any]:
            try:
                return run_redis_benchmark(target.port, count, clients, pipeline, timeout,
                                           target.pids, cluster=target.cluster_mode,
                                           key_range=key_range, **extra)
            except BenchError as error:
                tails = "".join(server_log_tail(stack, pid) for pid in target.pids)
                raise BenchError(f"{target.name}, -c {clients} -P {pipeline}: {error}{tails}") \
                    from None

        # Warm every path (connections, caches, the proxy's slot map) once before measuring.
        for target in targets:
            run(target, 2000, min(options.clients), 1, tests=tests)

        samples: Dict[Tuple[str, int, int], List[Dict[str, Any]]] = {}
        for repeat in range(options.repeat):
            for clients in options.clients:
                for pipeline in pipelines:
                    # Rotate the order each time so that no target always runs first or last.
                    shift = (repeat + len(samples)) % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        stack.say(f"run {repeat + 1}/{options.repeat}: {target.name}, "
                                  f"-c {clients} -P {pipeline}")
                        result = run(target, requests[pipeline], clients, pipeline,
                                     tests=tests)
                        samples.setdefault((target.name, clients, pipeline), []).append(result)
                        for proxy in proxies.values():
                            proxy.check_alive()

        # What a connection costs, apart from its requests: open, one PING, close.
        connection_cost: Dict[str, Dict[str, Any]] = {}
        if options.connections:
            for target in targets:
                if target.cluster_mode:
                    continue  # a cluster-aware client's connections are not the proxy's
                stack.say(f"connection cost: {target.name}, {options.connections} connections")
                result = run(target, options.connections, min(50, options.connections), 1,
                             tests=("PING_MBULK",), keepalive=False)
                user, system = result["cpu_user_ticks"], result["cpu_system_ticks"]
                connection_cost[target.name] = {
                    "connections": options.connections,
                    "cpu_us": round(per_request_us(user + system, options.connections), 1),
                    "cpu_user_us": round(per_request_us(user, options.connections), 1),
                    "cpu_sys_us": round(per_request_us(system, options.connections), 1),
                    "cpu_ticks": user + system,
                    "connections_per_second": round(result["rps"], 1),
                }
        proxy_rss = {topology: proxy_kib(p.serving_pid) for topology, p in proxies.items()}
    load_after = machine_load()

    cells: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
    for (name, clients, pipeline), runs in samples.items():
        user = median([per_request_us(r["cpu_user_ticks"], r["requests"]) for r in runs])
        system = median([per_request_us(r["cpu_system_ticks"], r["requests"]) for r in runs])
        cells[(name, clients, pipeline)] = {
            "target": name, "clients": clients, "pipeline": pipeline,
            "requests": runs[0]["requests"], "runs": len(runs),
            "rps": round(median([r["rps"] for r in runs]), 1),
            "cpu_us": round(user + system, 2),
            "cpu_user_us": round(user, 2),
            "cpu_sys_us": round(system, 2),
            # The fewest ticks any run's figure rests on: its precision.
            "cpu_ticks": min(r["cpu_user_ticks"] + r["cpu_system_ticks"] for r in runs),
            "tests": {test: {key: round(median([r["tests"][test][key] for r in runs]), 3)
                             for key in ("rps", "p50_ms", "p99_ms")}
                      for test in runs[0]["tests"]},
        }

    ratios = []
    for numerator, denominator, label, with_cpu in ratio_pairs(
            [t.name for t in targets], topologies):
        for clients in options.clients:
            for pipeline in pipelines:
                top, bottom = cells[(numerator, clients, pipeline)], \
                    cells[(denominator, clients, pipeline)]
                ratios.append({
                    "name": label, "clients": clients, "pipeline": pipeline,
                    "rps": ratio(top["rps"], bottom["rps"]),
                    "cpu": ratio(top["cpu_us"], bottom["cpu_us"]) if with_cpu else None,
                })

    # Connection set-up is inside every run's CPU figure: redis-benchmark opens its -c
    # connections once per test (and a cluster-aware client, once per node).
    setup_share = {name: {str(clients): round(cost["cpu_us"] * clients / requests[1], 2)
                          for clients in options.clients}
                   for name, cost in connection_cost.items()}

    environment = {
        "cpus": os.cpu_count(),
        "clock_ticks_per_second": CLOCK_TICKS,
        "python": platform.python_version(),
        "redis_benchmark": tool_version([REDIS_BENCHMARK, "--version"]),
        "haproxy": tool_version([HAPROXY, "-v"]) if HAPROXY and haproxy else None,
        "haproxy_threads": options.haproxy_threads if haproxy else None,
        "proxy_workers": options.workers,
    }
    return {
        "mode": "throughput",
        "settings": {"tests": list(tests), "requests": requests[1],
                     "pipelined_requests": requests.get(options.pipeline),
                     "clients": options.clients, "pipelines": pipelines,
                     "repeat": options.repeat, "topology": options.topology,
                     "topologies": topologies, "key_range": key_range},
        "environment": environment,
        "machine_load": {"before": load_before, "after": load_after},
        "targets": [t.name for t in targets],
        "cells": [cells[(t.name, clients, pipeline)] for pipeline in pipelines
                  for t in targets for clients in options.clients],
        "ratios": ratios,
        "connection_cost": connection_cost,
        "connection_setup_us_per_request_p1": setup_share,
        "proxy_rss_kib_after": proxy_rss,
    }


def topology_kinds(topology: str) -> List[str]:
    """The proxy chains one --topology value stands for."""
    if topology == "both":
        return ["passthrough", "filtered"]
    if topology == "all":
        return ["passthrough", "shared", "filtered", "shared-filtered"]
    return [topology]


def ratio_pairs(names: List[str], topologies: List[str]) -> List[Tuple[str, str, str, bool]]:
    """(numerator, denominator, label, whether CPU per request compares) of the ratio rows."""
    pairs = []
    if "cluster-direct" in names:
        # The cluster-aware client's CPU is spent in the client and the six servers, not in a
        # process of its own: only requests per second compare.
        pairs.append(("proxy[cluster]", "cluster-direct", "proxy/cluster-direct", False))
        return pairs
    if "haproxy" in names:
        for topology in topologies:
            label = "proxy/haproxy" if len(topologies) == 1 else f"{topology}/haproxy"
            pairs.append((f"proxy[{topology}]", "haproxy", label, True))
    if "passthrough" in topologies and "filtered" in topologies:
        pairs.append(("proxy[filtered]", "proxy[passthrough]", "filtered/passthrough", True))
    if "shared" in topologies and "shared-filtered" in topologies:
        pairs.append(("proxy[shared-filtered]", "proxy[shared]", "shared-filtered/shared", True))
    if "passthrough" in topologies and "shared" in topologies:
        pairs.append(("proxy[shared]", "proxy[passthrough]", "shared/passthrough", True))
    for topology in topologies:
        if f"proxy[{topology}]@baseline" in names:
            label = "proxy/baseline" if len(topologies) == 1 else f"{topology}/baseline"
            pairs.append((f"proxy[{topology}]", f"proxy[{topology}]@baseline", label, True))
    return pairs


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


def ratio(value: float, reference: Optional[float]) -> Optional[float]:
    if not reference:
        return None
    return round(value / reference, 3)


def print_throughput(report: Dict[str, Any]) -> None:
    s = report["settings"]
    env = report["environment"]
    pipelined = [p for p in s["pipelines"] if p > 1]
    counts = f"-n {s['requests']:,} per test" + (
        f" (with -P {pipelined[0]}: -n {s['pipelined_requests']:,})" if pipelined else "") + \
        " for every target"
    haproxy = (f"HAProxy {env['haproxy'].split()[2] if len(env['haproxy'].split()) > 2 else ''}"
               f" mode tcp, {env['haproxy_threads']} thread(s)" if env["haproxy"]
               else "no HAProxy")
    print(f"redis-benchmark -t {','.join(s['tests']).lower()}"
          f"{' -r %d' % s['key_range'] if s.get('key_range') else ''} {counts}; "
          f"{'median of %d runs' % s['repeat'] if s['repeat'] > 1 else 'one run'} per cell; "
          f"{env['cpus']} CPU(s); {haproxy}"
          f"{'; %d workers per proxy' % env['proxy_workers'] if env.get('proxy_workers', 1) > 1 else ''}")
    headers = ["target", "-P"]
    for clients in s["clients"]:
        headers += [f"c{clients} req/s", "CPU us/req", "usr", "sys"]
    cells = {(c["target"], c["clients"], c["pipeline"]): c for c in report["cells"]}
    ratios = {(r["name"], r["clients"], r["pipeline"]): r for r in report["ratios"]}
    ratio_names = list(dict.fromkeys(r["name"] for r in report["ratios"]))
    rows: List[List[str]] = []
    imprecise = False
    for pipeline in s["pipelines"]:
        if rows:
            rows.append([""] * len(headers))
        for name in report["targets"]:
            row = [name, str(pipeline)]
            for clients in s["clients"]:
                cell = cells[(name, clients, pipeline)]
                mark = "~" if cell["cpu_ticks"] < PRECISE_TICKS else ""
                imprecise = imprecise or bool(mark)
                row += [f"{cell['rps']:,.0f}", f"{mark}{cell['cpu_us']:.2f}",
                        f"{cell['cpu_user_us']:.2f}", f"{cell['cpu_sys_us']:.2f}"]
            rows.append(row)
        for name in ratio_names:
            row = [name, str(pipeline)]
            for clients in s["clients"]:
                r = ratios[(name, clients, pipeline)]
                row += [fmt_ratio(r["rps"]), fmt_ratio(r["cpu"]), "", ""]
            rows.append(row)
    print(format_table(headers, rows, right=[False] + [True] * (len(headers) - 1)))
    if "cluster" in s["topologies"]:
        print("CPU us/req: CPU time per request of cluster-direct's six redis-servers together, "
              "of the proxy (and any child process of it) for proxy[cluster]")
    else:
        print("CPU us/req: CPU time per request of the process redis-benchmark talks to "
              "(redis-server, haproxy, the proxy and any child process of it)")
    print("  user + system from /proc/PID/stat over the whole run, connection set-up and "
          "every test included; usr and sys are its parts"
          + (f"; ~: fewer than {PRECISE_TICKS} clock ticks measured (1 tick = "
             f"{1000 // env['clock_ticks_per_second']} ms): raise -n" if imprecise else ""))
    print("a/b rows: a's requests per second (under req/s) and CPU per request (under CPU "
          "us/req) divided by b's in the same column")
    cost = report["connection_cost"]
    if cost:
        any_cost = next(iter(cost.values()))
        print(f"connection cost (connect, PING, close; redis-benchmark -k 0, "
              f"{any_cost['connections']:,} connections), CPU us per connection: "
              + ", ".join(f"{name} {'~' if c['cpu_ticks'] < PRECISE_TICKS else ''}"
                          f"{c['cpu_us']:.0f} ({c['cpu_user_us']:.0f} usr)"
                          for name, c in cost.items()))
        share = report["connection_setup_us_per_request_p1"]
        proxies = [name for name in share if name.startswith("proxy")]
        if proxies:
            print("  of which in the CPU us/req above without pipelining: "
                  + "; ".join(f"{name} " + ", ".join(f"{v:.2f} at -c {c}"
                                                     for c, v in share[name].items())
                              for name in proxies))
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
        serving = proxy.serving_pid  # the worker: it holds the connections
        proxy_limit = proc_nofile_limit(serving)
        if count + PROXY_FD_MARGIN > proxy_limit:
            raise BenchError(f"the proxy's open-file limit is {proxy_limit}: too low for "
                             f"{count} connections")
        time.sleep(0.5)
        rss_before = proc_status_kib(serving)
        fds_before = proc_fd_count(serving)
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
            rss_idle = proc_status_kib(serving)
            fds_idle = proc_fd_count(serving)
            per_idle = (rss_idle - rss_before) / count
            stack.say(f"{count} idle: RSS {rss_before} -> {rss_idle} KiB "
                      f"({per_idle:.1f} KiB per connection)")

            # Answered connections keep an upstream connection each; stay within the limit.
            keep_budget = max(0, proxy_limit - count - PING_WINDOW - PROXY_FD_MARGIN)
            snapshot: Dict[str, Any] = {}

            def on_budget_reached(kept: int) -> None:
                snapshot["rss"] = proc_status_kib(serving)
                snapshot["kept"] = kept

            ping_result = ping_all(clients, keep_budget,
                                   time.monotonic() + options.timeout, on_budget_reached)
            if "rss" not in snapshot:
                time.sleep(0.5)
                snapshot["rss"] = proc_status_kib(serving)
                snapshot["kept"] = ping_result["kept_open"]
            still = proxy.connections()
            proxy.check_alive()
        finally:
            for client in clients:
                client.sock.close()
        rss_final = proc_status_kib(serving)
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


def count_list(text: str) -> List[int]:
    """"50,500" -> [50, 500] (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1, got {text!r}")
    return list(dict.fromkeys(values))


def test_list(text: str) -> Tuple[str, ...]:
    """"set,get" -> ("SET", "GET") (argparse type)."""
    tests = tuple(dict.fromkeys(part.strip().upper() for part in text.split(",") if part.strip()))
    if not tests:
        raise argparse.ArgumentTypeError("expected redis-benchmark test names, e.g. set,get")
    return tests


#: Defaults of --requests: the cluster topology's proxy serves several times fewer requests/s.
DEFAULT_REQUESTS = {"cluster": 40000}
DEFAULT_REQUESTS_SINGLE = 200000


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", "-n", type=int, default=None,
                        help="requests per redis-benchmark test without pipelining, the "
                             "same for every target, so that each run's connection set-up is "
                             "shared out over as many requests (default "
                             f"{DEFAULT_REQUESTS_SINGLE}; {DEFAULT_REQUESTS['cluster']} with "
                             "--topology cluster)")
    parser.add_argument("--pipelined-requests", type=int, default=None, metavar="N",
                        help="requests per test of the pipelined runs (default: --requests "
                             "times P/2, so that the CPU time measured stays well above the "
                             "10 ms resolution of /proc/PID/stat)")
    parser.add_argument("--clients", "-c", type=count_list, default=[50, 500], metavar="C[,C...]",
                        help="redis-benchmark parallel connections, one column each "
                             "(default 50,500)")
    parser.add_argument("--pipeline", "-P", type=int, default=16,
                        help="pipeline depth of the pipelined runs, which follow the "
                             "non-pipelined ones; 1 runs only non-pipelined (default 16)")
    parser.add_argument("--tests", "-t", type=test_list, default=DEFAULT_TESTS,
                        metavar="TEST[,TEST...]",
                        help="redis-benchmark tests; CPU time covers them all (default set,get)")
    parser.add_argument("--topology",
                        choices=["passthrough", "shared", "filtered", "shared-filtered",
                                 "both", "all", "cluster"],
                        default=None,
                        help="proxy chain: RedisSinkSingle only (passthrough), RedisSinkSingle "
                             "with shared_connections: 1 (shared), QueryCounter + "
                             "QueryTypeFilter + RedisSinkSingle (filtered), the same with the "
                             "shared sink (shared-filtered), passthrough and filtered (both), "
                             "or the four (all: the default; passthrough with "
                             "--idle-connections); "
                             "cluster: a 3-master/3-replica Redis Cluster, direct "
                             "(redis-benchmark --cluster) and behind RedisSinkCluster")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per cell; the median is reported (default 1)")
    parser.add_argument("--connections", type=int, default=3000, metavar="N",
                        help="connection cost: N connections opened, each for one PING "
                             "(redis-benchmark -k 0); 0 skips it (default 3000)")
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy target")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="also run the proxy of another checkout (DIR holds its "
                             "shotover_gevent package, e.g. one made by `git worktree add`) as "
                             "proxy[...]@baseline, interleaved with this one's runs, with a "
                             "proxy/baseline ratio row")
    parser.add_argument("--pipelined-only", action="store_true",
                        help="only the runs with -P (skip those without pipelining)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes of each proxy (default 1; CPU per request "
                             "counts the supervisor and every worker)")
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
    if options.topology is None:
        options.topology = "all" if options.idle_connections is None else "passthrough"
    if options.requests is None:
        options.requests = DEFAULT_REQUESTS.get(options.topology, DEFAULT_REQUESTS_SINGLE)
    if options.pipelined_requests is None:
        options.pipelined_requests = options.requests * max(1, options.pipeline // 2)
    if options.requests < 1 or options.pipelined_requests < 1 or options.repeat < 1:
        parser.error("--requests, --pipelined-requests and --repeat must be at least 1")
    if options.connections < 0:
        parser.error("--connections must be 0 or more")
    if options.idle_connections is not None and options.idle_connections < 1:
        parser.error("--idle-connections must be at least 1")
    if options.idle_connections is not None and options.topology == "cluster":
        parser.error("--idle-connections does not support --topology cluster")
    return options


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_args(argv)
    if options.baseline is not None:
        options.baseline = os.path.abspath(options.baseline)
        if not os.path.isfile(os.path.join(options.baseline, "shotover_gevent", "__main__.py")):
            sys.stderr.write(f"bench: --baseline {options.baseline}: no shotover_gevent "
                             "package there\n")
            return 2
    try:
        if options.idle_connections is not None:
            topologies = topology_kinds(options.topology)
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
