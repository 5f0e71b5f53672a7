#!/usr/bin/env python3
"""How long clients wait while the proxy upgrades itself in place.

Starts redis-server and the proxy, opens --connections client connections (default 1000) and
keeps every one of them busy with a paced request loop, recording each request's send time and
latency:

  * load: each connection sends one request, waits for its reply, and sends the next one
    --interval seconds (default 0.5) after the previous one was sent, or right away if the reply
    took longer than that. Requests alternate `SET bench:upgrade:<n> <seq>` and
    `GET bench:upgrade:<n>`; the GET must return the value that connection set just before, so a
    request lost, repeated or answered out of order across the upgrade shows up as an error.
    With the defaults that is 1000 requests per second in total: a fraction of what the proxy
    serves without pipelining (it leaves room on a small shared machine, where the load
    generator, Redis and the proxy share the cores), so the latencies measure the upgrade, not
    an overload; about as many requests are sent during each second of blackout, and every
    connection sends at least one request while an upgrade is under way. Start times are
    spread at random over one interval.
  * phase 1 (steady): --duration seconds without an upgrade.
  * phase 2 (upgrade): `python -m shotover_gevent upgrade --control-socket SOCK` is run
    --upgrades times (default once) while the load goes on; the phase ends --settle seconds
    after the last upgrade returned.

For each phase it prints requests, errors, disconnects and the p50, p99 and maximum latency,
then the upgrade's own stage timings (from the CLI's output and `status`'s last_upgrade), and
whether the maximum latency during the upgrade stayed under --target-ms (default 300).

Every process started here listens on 127.0.0.1 only and is stopped on exit, on error, on
Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    HOST,
    REPO_ROOT,
    BenchError,
    Stack,
    describe_load,
    format_table,
    machine_load,
    percentile,
    proc_cpu_seconds,
    raise_nofile,
)

STAGE_LINE = re.compile(r"^\[\s*([0-9.]+) ms\] ([a-z-]+): (.*)$")


# ---- the load ---------------------------------------------------------------------------------


class Conn:
    __slots__ = ("index", "sock", "key", "seq", "expect", "sent_at", "buffer", "alive",
                 "busy")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.key = b"bench:upgrade:%d" % index
        self.seq = 0
        self.expect = b""
        self.sent_at = 0.0
        self.buffer = b""
        self.alive = True
        self.busy = False


def frame_end(buffer: bytes) -> int:
    """End offset of the one RESP reply at the start of `buffer` (line or bulk), or -1."""
    nl = buffer.find(b"\r\n")
    if nl < 0:
        return -1
    if buffer[:1] == b"$":
        length = int(buffer[1:nl])
        if length < 0:
            return nl + 2
        end = nl + 2 + length + 2
        return end if len(buffer) >= end else -1
    return nl + 2


class Load:
    """Paced request loops on many non-blocking sockets, driven by one selector."""

    def __init__(self, port: int, connections: int, interval: float, request_timeout: float,
                 seed: int = 1) -> None:
        self.port = port
        self.interval = interval
        self.request_timeout = request_timeout
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.conns: List[Conn] = []
        self.schedule: List = []  # heap of (when, index)
        # Every finished request: send time, latency (s), ok.
        self.sent_times: List[float] = []
        self.latencies: List[float] = []
        self.failures: List[tuple] = []  # (send time, reason)
        self.disconnects: List[tuple] = []  # (time, index, reason)
        self.sending = True
        self._open(connections)

    def _open(self, count: int) -> None:
        deadline = time.monotonic() + 60
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect((HOST, self.port))
            except OSError as error:
                sock.close()
                raise BenchError(f"connection {index} to the proxy failed: {error}") from None
            sock.setblocking(False)
            conn = Conn(index, sock)
            self.conns.append(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)
        start = time.monotonic()
        for conn in self.conns:
            heapq.heappush(self.schedule, (start + self.random.random() * self.interval,
                                           conn.index))

    @property
    def outstanding(self) -> int:
        return sum(1 for c in self.conns if c.busy)

    def _send(self, conn: Conn, now: float) -> None:
        if conn.seq % 2 == 0:
            value = b"%d" % (conn.seq + 1)
            request = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(conn.key), conn.key, len(value), value)
            conn.expect = b"+OK\r\n"
        else:
            value = b"%d" % conn.seq
            request = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(conn.key), conn.key)
            conn.expect = b"$%d\r\n%s\r\n" % (len(value), value)
        conn.seq += 1
        conn.sent_at = now
        conn.busy = True
        try:
            sent = conn.sock.send(request)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._drop(conn, now, f"send failed: {error.strerror or error}")
            return
        if sent != len(request):  # a few dozen bytes on an idle socket: never happens
            self._drop(conn, now, "send buffer full")

    def _drop(self, conn: Conn, now: float, reason: str) -> None:
        if conn.busy:
            self.failures.append((conn.sent_at, reason))
            conn.busy = False
        conn.alive = False
        self.disconnects.append((now, conn.index, reason))
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _receive(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            self._drop(conn, time.monotonic(), f"recv failed: {error.strerror or error}")
            return
        now = time.monotonic()
        if not data:
            self._drop(conn, now, "closed by the proxy")
            return
        conn.buffer += data
        end = frame_end(conn.buffer)
        if end < 0:
            return
        reply, conn.buffer = conn.buffer[:end], conn.buffer[end:]
        if not conn.busy or conn.buffer:
            self.failures.append((conn.sent_at, "reply nobody asked for"))
            conn.buffer = b""
            return
        conn.busy = False
        self.sent_times.append(conn.sent_at)
        self.latencies.append(now - conn.sent_at)
        if reply != conn.expect:
            self.failures.append((conn.sent_at, f"wrong reply {reply[:60]!r}, expected "
                                                f"{conn.expect[:60]!r}"))
        if self.sending:
            heapq.heappush(self.schedule, (max(now, conn.sent_at + self.interval), conn.index))

    def _check_timeouts(self, now: float) -> None:
        for conn in self.conns:
            if conn.alive and conn.busy and now - conn.sent_at > self.request_timeout:
                self._drop(conn, now, f"no reply within {self.request_timeout:g} s")

    def run_until(self, stop: float, done=None) -> None:
        """Drive the load until time `stop`, or until `done()` (checked every ~10 ms) is true."""
        next_check = time.monotonic() + 0.5
        while True:
            now = time.monotonic()
            if now >= stop:
                return
            while self.schedule and self.schedule[0][0] <= now:
                _when, index = heapq.heappop(self.schedule)
                conn = self.conns[index]
                if conn.alive and self.sending:
                    self._send(conn, now)
            wait = stop - now
            if self.schedule:
                wait = min(wait, self.schedule[0][0] - now)
            for key, _mask in self.selector.select(max(0.0, min(wait, 0.01))):
                self._receive(key.data)
            if done is not None and done():
                return
            if now >= next_check:
                self._check_timeouts(now)
                next_check = now + 0.5

    def finish(self) -> None:
        """Stop sending and wait (bounded) for every reply still owed."""
        self.sending = False
        self.schedule.clear()
        deadline = time.monotonic() + self.request_timeout + 1
        while self.outstanding and time.monotonic() < deadline:
            for key, _mask in self.selector.select(0.05):
                self._receive(key.data)
        self._check_timeouts(time.monotonic() + self.request_timeout + 1)

    def close(self) -> None:
        for conn in self.conns:
            if conn.alive:
                conn.sock.close()
        self.selector.close()

    def alive(self) -> int:
        return sum(1 for c in self.conns if c.alive)

    def summary(self, start: float, end: float) -> Dict[str, Any]:
        """Requests sent in [start, end): count, failures, disconnects and latency figures."""
        latencies = [lat for sent, lat in zip(self.sent_times, self.latencies)
                     if start <= sent < end]
        failures = [reason for sent, reason in self.failures if start <= sent < end]
        disconnects = [d for d in self.disconnects if start <= d[0] < end]
        worst_at = None
        if latencies:
            worst = max(range(len(self.latencies)),
                        key=lambda i: self.latencies[i] if start <= self.sent_times[i] < end
                        else -1.0)
            worst_at = self.sent_times[worst]
        reasons: Dict[str, int] = {}
        for reason in failures:
            reasons[reason] = reasons.get(reason, 0) + 1
        return {
            "requests": len(latencies) + sum(1 for r in failures if not r.startswith("wrong")),
            "replies": len(latencies),
            "errors": len(failures),
            "error_reasons": reasons,
            "disconnects": len(disconnects),
            "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)),
            "p999_ms": ms(percentile(latencies, 99.9)),
            "max_ms": ms(max(latencies)) if latencies else None,
            "worst_sent_at": worst_at,
            "seconds": round(end - start, 3),
        }


    def timeline(self, origin: float, start: float, end: float,
                 step: float = 0.1) -> List[Dict[str, Any]]:
        """Per `step` seconds of send time in [start, end): requests and worst latency."""
        buckets: Dict[int, List[float]] = {}
        for sent, latency in zip(self.sent_times, self.latencies):
            if start <= sent < end:
                buckets.setdefault(int((sent - origin) // step), []).append(latency)
        return [{"from_ms": round(k * step * 1000), "requests": len(v),
                 "p50_ms": ms(percentile(v, 50)), "max_ms": ms(max(v))}
                for k, v in sorted(buckets.items())]


def ms(seconds: float) -> Optional[float]:
    if seconds != seconds:  # NaN
        return None
    return round(seconds * 1000, 3)


# ---- the upgrade ------------------------------------------------------------------------------


class UpgradeRun(threading.Thread):
    """Runs one `shotover-g upgrade` and keeps its output and timing."""

    def __init__(self, control_path: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.control_path = control_path
        self.timeout = timeout
        self.started_at = 0.0
        self.ended_at = 0.0
        self.returncode: Optional[int] = None
        self.output = ""

    def run(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]]
                                                          if env.get("PYTHONPATH") else []))
        argv = [sys.executable, "-m", "shotover_gevent", "upgrade", "--control-socket",
                self.control_path, "--timeout", str(self.timeout)]
        self.started_at = time.monotonic()
        try:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, timeout=self.timeout + 30)
            self.returncode = done.returncode
            self.output = done.stdout.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as error:
            self.returncode = -1
            self.output = (error.output or b"").decode("utf-8", "replace") + "\n(timed out)"
        finally:
            self.ended_at = time.monotonic()


def stage_timings(output: str, last_upgrade: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The CLI prints `[elapsed ms] stage: detail` per stage; with the proxy's own report
    (status's last_upgrade) that gives each stage's duration."""
    events = []
    for line in output.splitlines():
        match = STAGE_LINE.match(line.strip())
        if match:
            events.append((float(match.group(1)), match.group(2), match.group(3)))
    at: Dict[str, float] = {}
    detail: Dict[str, str] = {}
    for elapsed, stage, text in events:
        at.setdefault(stage + ".first", elapsed)
        at[stage] = elapsed
        detail[stage] = text
    timings: Dict[str, Any] = {"stage_ms": {stage: elapsed for stage, elapsed in at.items()
                                            if not stage.endswith(".first")}}
    if "preflight" in at:
        timings["preflight_ms"] = round(at["preflight"] - at["preflight.first"], 1)
    drained = re.search(r" in ([0-9.]+) ms", detail.get("drain", ""))
    if drained:
        timings["drain_ms"] = float(drained.group(1))
    if "checkpoint" in at and "drain" in at:
        timings["checkpoint_ms"] = round(at["checkpoint"] - at["drain"], 1)
    if last_upgrade:
        blackout = last_upgrade.get("blackout_ms")
        timings["blackout_ms"] = blackout
        reported = last_upgrade.get("timings") or {}
        # From execv() until the new image asked for the checkpoint: its start-up and imports,
        # while the old version (the bridge process) still served every client.
        timings["new_image_startup_ms"] = reported.get("exec_to_ready_ms")
        # Inside the pause, after the checkpoint: the new image reads it and adopts every fd.
        timings["restore_ms"] = reported.get("restore_ms", last_upgrade.get("restore_ms"))
        if reported:
            timings["reported_timings"] = reported
        timings["kept"] = last_upgrade.get("kept")
        timings["closed"] = last_upgrade.get("closed")
        timings["closed_reasons"] = last_upgrade.get("closed_reasons")
        timings["generation"] = last_upgrade.get("generation")
    summary = [line for line in output.splitlines() if line.startswith(("upgraded", "rolled"))]
    timings["summary"] = summary[-1] if summary else output.strip().splitlines()[-1:]
    return timings


# ---- the run ------------------------------------------------------------------------------------


def measure(options) -> Dict[str, Any]:
    raise_nofile()
    load_before = machine_load()
    with Stack(keep=options.keep_logs, quiet=options.json and not options.verbose) as stack:
        redis = stack.start_redis(max_clients=options.connections + 1000)
        proxy = stack.start_proxy(options.topology, redis.port,
                                  connection_limit=options.connections + 1000)
        pid = proxy.pid
        stack.say(f"opening {options.connections} connections, one request per connection "
                  f"every {options.interval:g} s")
        load = Load(proxy.port, options.connections, options.interval, options.request_timeout)
        try:
            t0 = time.monotonic()
            load.run_until(t0 + options.warmup)
            phase1 = (time.monotonic(), 0.0)
            stack.say(f"phase 1: {options.duration:g} s without upgrade")
            proxy_cpu = sum(proc_cpu_seconds(pid))
            own = resource.getrusage(resource.RUSAGE_SELF)
            load.run_until(phase1[0] + options.duration)
            phase1 = (phase1[0], time.monotonic())
            own_after = resource.getrusage(resource.RUSAGE_SELF)
            steady_cpu = {
                "proxy_percent": round(100 * (sum(proc_cpu_seconds(pid)) - proxy_cpu)
                                       / (phase1[1] - phase1[0]), 1),
                "load_generator_percent": round(
                    100 * (own_after.ru_utime + own_after.ru_stime - own.ru_utime - own.ru_stime)
                    / (phase1[1] - phase1[0]), 1),
            }
            stack.say(f"phase 2: {options.upgrades} upgrade(s) under load")
            phase2_start = phase1[1]
            upgrades: List[Dict[str, Any]] = []
            load.run_until(phase2_start + options.upgrade_delay)
            for number in range(options.upgrades):
                if number:
                    load.run_until(time.monotonic() + options.gap)
                run = UpgradeRun(proxy.control_path, options.upgrade_timeout)
                run.start()
                load.run_until(time.monotonic() + options.upgrade_timeout + 60,
                               done=lambda r=run: not r.is_alive())
                run.join(5)
                if run.is_alive():
                    raise BenchError("the upgrade command did not finish")
                status = proxy.status()
                record = stage_timings(run.output, status.get("last_upgrade"))
                record.update({
                    "number": number + 1, "returncode": run.returncode,
                    "cli_ms": round((run.ended_at - run.started_at) * 1000, 1),
                    "started_at": run.started_at, "ended_at": run.ended_at,
                    "pid_after": status.get("pid"), "output": run.output,
                    "connections_after": sum(s["connections"]
                                             for s in status["sources"].values()),
                })
                upgrades.append(record)
                stack.say(f"upgrade {number + 1}: exit {run.returncode}, "
                          f"{record['summary']}")
            load.run_until(time.monotonic() + options.settle)
            phase2_end = time.monotonic()
            load.finish()
            final_status = proxy.status()
            alive = load.alive()
        finally:
            load.close()
        proxy.check_alive()
    window_start = min(u["started_at"] for u in upgrades)
    window_end = max(u["ended_at"] for u in upgrades)
    phases = {
        "steady": load.summary(*phase1),
        "upgrade": load.summary(phase2_start, phase2_end),
        "upgrade window": load.summary(window_start, window_end),
    }
    for summary in phases.values():
        if summary["worst_sent_at"] is not None:
            summary["worst_at_ms_after_upgrade_start"] = round(
                (summary["worst_sent_at"] - window_start) * 1000, 1)
        summary.pop("worst_sent_at")
    for record in upgrades:
        record["started_at_ms"] = round((record.pop("started_at") - window_start) * 1000, 1)
        # When each stage was reported, on the timeline's clock.
        record["stage_at_ms"] = {stage: round(record["started_at_ms"] + elapsed, 1)
                                 for stage, elapsed in record.pop("stage_ms", {}).items()}
        record["ended_at_ms"] = round((record.pop("ended_at") - window_start) * 1000, 1)
    timeline = load.timeline(window_start, window_start - 0.5, window_end + 1.5,
                             options.timeline_step / 1000)
    upgrade_phase = phases["upgrade"]
    clean = (upgrade_phase["errors"] == 0 and upgrade_phase["disconnects"] == 0
             and phases["steady"]["errors"] == 0 and phases["steady"]["disconnects"] == 0
             and all(u["returncode"] == 0 for u in upgrades)
             and alive == options.connections)
    worst = upgrade_phase["max_ms"]
    return {
        "settings": {"connections": options.connections, "interval_s": options.interval,
                     "offered_rps": round(options.connections / options.interval, 1),
                     "duration_s": options.duration, "upgrades": options.upgrades,
                     "topology": options.topology, "target_ms": options.target_ms},
        "proxy_pid": pid,
        "phases": phases,
        "steady_cpu": steady_cpu,
        "upgrades": upgrades,
        "timeline": timeline,
        "connections_alive_at_end": alive,
        "proxy_connections_at_end": sum(s["connections"]
                                        for s in final_status["sources"].values()),
        "generation_at_end": final_status.get("generation"),
        "no_failures": clean,
        "target_met": bool(clean and worst is not None and worst < options.target_ms),
        "machine_load": {"before": load_before, "after": machine_load()},
    }


def print_report(report: Dict[str, Any], show_timeline: bool = False) -> None:
    s = report["settings"]
    print(f"{s['connections']} connections, one request each every {s['interval_s']:g} s "
          f"({s['offered_rps']:,.0f} requests/s offered), topology {s['topology']}, "
          f"{s['upgrades']} upgrade(s)")
    rows = []
    for name, p in report["phases"].items():
        rows.append([name, f"{p['seconds']:.1f}", f"{p['requests']:,}", p["errors"],
                     p["disconnects"], fmt_ms(p["p50_ms"]), fmt_ms(p["p99_ms"]),
                     fmt_ms(p["max_ms"])])
    print(format_table(["phase", "seconds", "requests", "errors", "disconnects", "p50 ms",
                        "p99 ms", "max ms"], rows,
                       right=[False, True, True, True, True, True, True, True]))
    for name, p in report["phases"].items():
        if p["error_reasons"]:
            print(f"{name} errors: " + ", ".join(f"{n} x {why}"
                                                for why, n in p["error_reasons"].items()))
    print()
    stage_rows = []
    for u in report["upgrades"]:
        stage_rows.append([u["number"], fmt_ms(u.get("preflight_ms")),
                           fmt_ms(u.get("new_image_startup_ms")), fmt_ms(u.get("drain_ms")),
                           fmt_ms(u.get("checkpoint_ms")), fmt_ms(u.get("restore_ms")),
                           fmt_ms(u.get("blackout_ms")), fmt_ms(u["cli_ms"]),
                           f"{u.get('kept')}/{u.get('closed')}"])
    print(format_table(["upgrade", "preflight", "start+imports", "drain", "checkpoint",
                        "restore", "blackout", "CLI total", "kept/closed"],
                       stage_rows, right=[True] * 9))
    print("(milliseconds, from the proxy's own clock. start+imports: the new image starting "
          "while the old version\n still serves from its bridge process; blackout: from the "
          "start of the drain to the new image serving = drain + checkpoint + restore)")
    for u in report["upgrades"]:
        print(f"upgrade {u['number']}: {u['summary']}")
    if show_timeline:
        print()
        print("requests by send time, relative to the start of the (first) upgrade command (the "
              "upgrade's own stages: started_at_ms in --json):")
        marks = sorted((at, f"{u['number']}:{stage}") for u in report["upgrades"]
                       for stage, at in u.get("stage_at_ms", {}).items())
        rows = []
        timeline = report["timeline"]
        for i, t in enumerate(timeline):
            end = timeline[i + 1]["from_ms"] if i + 1 < len(timeline) else float("inf")
            here = [name for at, name in marks if t["from_ms"] <= at < end]
            rows.append([t["from_ms"], t["requests"], fmt_ms(t["p50_ms"]), fmt_ms(t["max_ms"]),
                         " ".join(here)])
        print(format_table(["sent at ms", "requests", "p50 ms", "max ms",
                            "upgrade stages reported (number:stage)"], rows,
                           right=[True] * 4 + [False]))
    print()
    upgrade = report["phases"]["upgrade"]
    print(f"connections alive at the end: {report['connections_alive_at_end']} of "
          f"{s['connections']} (proxy reports {report['proxy_connections_at_end']}, generation "
          f"{report['generation_at_end']})")
    print(f"failed requests or dropped connections: "
          f"{'none' if report['no_failures'] else 'SOME (see above)'}")
    cpu = report["steady_cpu"]
    print(f"CPU during phase 1: proxy {cpu['proxy_percent']:.0f}% of one core, load generator "
          f"{cpu['load_generator_percent']:.0f}%")
    print(describe_load(report["machine_load"]["before"], report["machine_load"]["after"]))
    verdict = "MET" if report["target_met"] else "NOT MET"
    print(f"target: max latency during upgrade < {s['target_ms']:g} ms -> {verdict} "
          f"(max {fmt_ms(upgrade['max_ms'])} ms)")


def fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000,
                        help="client connections (default 1000)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between two requests of one connection (default 1)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of phase 1, without upgrade (default 10)")
    parser.add_argument("--upgrades", type=int, default=1, help="upgrades in phase 2 (default 1)")
    parser.add_argument("--upgrade-delay", type=float, default=1.0,
                        help="seconds into phase 2 before the first upgrade (default 1)")
    parser.add_argument("--gap", type=float, default=2.0,
                        help="seconds between upgrades (default 2)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds phase 2 goes on after the last upgrade (default 3)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of load before phase 1, not reported (default 2)")
    parser.add_argument("--request-timeout", type=float, default=10.0,
                        help="a request without reply for this long fails (default 10)")
    parser.add_argument("--upgrade-timeout", type=float, default=60.0,
                        help="--timeout given to the upgrade command (default 60)")
    parser.add_argument("--topology", choices=["passthrough", "filtered"], default="passthrough")
    parser.add_argument("--target-ms", type=float, default=300.0,
                        help="the maximum latency allowed during an upgrade (default 300)")
    parser.add_argument("--timeline", action="store_true",
                        help="also print requests and worst latency per --timeline-step of send "
                             "time around the upgrade(s)")
    parser.add_argument("--timeline-step", type=float, default=100.0, metavar="MS",
                        help="width of one --timeline row in milliseconds (default 100)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="progress on stderr even with --json")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with configs and logs")
    options = parser.parse_args(argv)
    if options.connections < 1 or options.upgrades < 1 or options.interval <= 0:
        parser.error("--connections and --upgrades must be at least 1, --interval positive")
    return options


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_args(argv)
    try:
        report = measure(options)
    except BenchError as error:
        sys.stderr.write(f"bench_upgrade: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: every process this benchmark started was stopped\n")
        return 130
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, options.timeline)
    return 0 if report["no_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
