#!/usr/bin/env python3
"""How long clients wait while the proxy upgrades itself in place.

Starts redis-server and the proxy, opens --connections client connections (default 1000) and
keeps every one of them busy with a paced request loop, recording each request's send time and
latency:

  * load: each connection sends one request, waits for its reply, and sends the next one
    --interval seconds (default 1) after the previous one was sent, or right away if the reply
    took longer than that. Requests alternate `SET bench:upgrade:paced:<n> <seq>` and
    `GET bench:upgrade:paced:<n>`; the GET must return the value that connection set just
    before, so a request lost, repeated or answered out of order across the upgrade shows up as
    an error.
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

Two other kinds of client can take a share of the connections, to check the upgrade hands over
connections in the middle of what they are doing:

  * blocked (--blocked-share): each connection waits in `BLPOP <own key> 0` or `BRPOP` (see
    --blocking-command) on `bench:upgrade:blocked:<n>`. A feeder on its own connection straight
    to Redis (so that its pushes do not wait for an upgrade) pushes one value, unique to that
    connection and push, to each waiting connection's key --interval after the last one;
    the connection must receive exactly [key, value] and then blocks again. A request here is
    one push; its latency runs from the push to the value arriving. Nearly all the time every
    blocked connection is waiting in Redis, so each upgrade hands them over mid-command.
  * transaction (--transaction-share): each connection runs MULTI (+OK), INCR
    `bench:upgrade:transaction:<n>` (+QUEUED), stays --transaction-pause seconds (default 0.5)
    inside the transaction, then EXEC, which must return exactly the connection's counter plus
    one; one transaction every --interval. A request here is one command. After a wrong reply
    the connection sends DISCARD and reads its counter again (neither is counted).

Any other reply, a reply nobody asked for, a missing reply (--request-timeout) or a closed
connection counts as an error or disconnect of that kind. For each kind and each phase it prints
requests, errors, disconnects and the p50, p99 and maximum latency, then the upgrade's own stage
timings (from the CLI's output and `status`'s last_upgrade) with how many connections were
handed over with a request in flight or inside a transaction, and whether the maximum latency of
every kind during the upgrade stayed under --target-ms (default 300).

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
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

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
    tree_cpu_seconds,
    raise_nofile,
)

STAGE_LINE = re.compile(r"^\[\s*([0-9.]+) ms\] ([a-z-]+): (.*)$")
# In the checkpoint stage's line: what was handed over in the state it was in.
IN_FLIGHT = re.compile(r"\(([0-9]+) with requests in flight\)")
IN_TRANSACTION = re.compile(r"([0-9]+) in a transaction")


# ---- the load ---------------------------------------------------------------------------------

#: The kinds of client connection, in the order they are reported.
PACED, BLOCKED, TRANSACTION = "paced", "blocked", "transaction"
KINDS = (PACED, BLOCKED, TRANSACTION)
KIND_TITLES = {
    PACED: "paced clients (SET / GET)",
    BLOCKED: "blocked clients (BLPOP / BRPOP <key> 0; latency from the push to the reply)",
    TRANSACTION: "transaction clients (MULTI, INCR, pause, EXEC; one request per command)",
}

# Where a transaction client is in its cycle (Conn.step).
IDLE, MULTI, INCR, IN_MULTI, EXEC, DISCARD, RESYNC_GET = (
    "idle", "MULTI", "INCR", "in MULTI", "EXEC", "DISCARD", "GET")


def command(*args: bytes) -> bytes:
    """One request in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Conn:
    __slots__ = ("index", "kind", "sock", "key", "seq", "expect", "sent_at", "buffer", "alive",
                 "busy", "blocking_command", "blocking", "pushed", "step", "counter",
                 "cycle_start", "token")

    def __init__(self, index: int, kind: str, sock: socket.socket,
                 blocking_command: bytes = b"BLPOP") -> None:
        self.index = index
        self.kind = kind
        self.sock = sock
        self.key = b"bench:upgrade:%s:%d" % (kind.encode(), index)
        self.seq = 0
        self.expect = b""
        self.sent_at = 0.0  # paced and transaction: the request's; blocked: the push's
        self.buffer = b""
        self.alive = True
        self.busy = False  # a reply is owed (blocked: a value was pushed, not yet received)
        # Blocked clients.
        self.blocking_command = blocking_command
        self.blocking = False  # its BLPOP/BRPOP was sent and has not returned yet
        self.pushed = b""  # the value the feeder pushed for it, until it arrives
        # Transaction clients.
        self.step = IDLE
        self.counter = 0  # the value of its key after its last EXEC
        self.cycle_start = 0.0
        self.token = 0  # names its one live entry in Load.schedule; older ones are stale


def frame_end(buffer: bytes, start: int = 0) -> int:
    """End offset of the one RESP2 reply at `start` in `buffer` (arrays included), or -1."""
    nl = buffer.find(b"\r\n", start)
    if nl < 0:
        return -1
    kind = buffer[start:start + 1]
    if kind == b"$":
        length = int(buffer[start + 1:nl])
        if length < 0:
            return nl + 2
        end = nl + 2 + length + 2
        return end if len(buffer) >= end else -1
    if kind == b"*":
        end = nl + 2
        for _ in range(max(0, int(buffer[start + 1:nl]))):
            end = frame_end(buffer, end)
            if end < 0:
                return -1
        return end
    return nl + 2


class Stats:
    """What the connections of one kind saw: every reply (by send time) and every failure."""

    def __init__(self) -> None:
        self.sent_times: List[float] = []
        self.latencies: List[float] = []
        # (send time, reason, whether it was a request that got no reply at all)
        self.failures: List[Tuple[float, str, bool]] = []
        self.disconnects: List[Tuple[float, int, str]] = []  # (time, index, reason)

    def reply(self, sent_at: float, latency: float) -> None:
        self.sent_times.append(sent_at)
        self.latencies.append(latency)

    def fail(self, sent_at: float, reason: str, unanswered: bool = False) -> None:
        self.failures.append((sent_at, reason, unanswered))

    def summary(self, start: float, end: float) -> Dict[str, Any]:
        """Requests sent in [start, end): count, failures, disconnects and latency figures."""
        latencies = [lat for sent, lat in zip(self.sent_times, self.latencies)
                     if start <= sent < end]
        failures = [(reason, unanswered) for sent, reason, unanswered in self.failures
                    if start <= sent < end]
        disconnects = [d for d in self.disconnects if start <= d[0] < end]
        worst_at = None
        if latencies:
            worst = max(range(len(self.latencies)),
                        key=lambda i: self.latencies[i] if start <= self.sent_times[i] < end
                        else -1.0)
            worst_at = self.sent_times[worst]
        reasons: Dict[str, int] = {}
        for reason, _unanswered in failures:
            reasons[reason] = reasons.get(reason, 0) + 1
        return {
            "requests": len(latencies) + sum(1 for _r, unanswered in failures if unanswered),
            "replies": len(latencies),
            "errors": len(failures),
            "error_reasons": reasons,
            "disconnects": len(disconnects),
            "disconnect_reasons": sorted({reason for _t, _i, reason in disconnects}),
            "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)),
            "p999_ms": ms(percentile(latencies, 99.9)),
            "max_ms": ms(max(latencies)) if latencies else None,
            "worst_sent_at": worst_at,
            "seconds": round(end - start, 3),
        }


class Feeder:
    """One connection straight to Redis (not through the proxy, so that its own requests do not
    wait for an upgrade) that pushes the values the blocked clients wait for. Every push must
    answer :1, the list holding only that value: a higher count means an earlier value was never
    taken."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.pending: Deque[Tuple[Conn, float]] = deque()  # (blocked client, push time)
        self.output = b""
        self.buffer = b""

    def push(self, conn: Conn, value: bytes, now: float) -> None:
        self.output += command(b"RPUSH", conn.key, value)
        self.pending.append((conn, now))
        self.flush()

    def flush(self) -> None:
        if not self.output:
            return
        try:
            sent = self.sock.send(self.output)
        except BlockingIOError:
            return
        except OSError as error:
            raise BenchError(f"the feeder's connection to Redis failed: {error}") from None
        self.output = self.output[sent:]


class Load:
    """Request loops on many non-blocking sockets, driven by one selector.

    A connection's next step of its own (a paced request, the push a blocked client waits for,
    a transaction's EXEC or its next MULTI) is an entry in `schedule`; only its latest entry
    counts."""

    def __init__(self, port: int, redis_port: int, kinds: Dict[str, int], interval: float,
                 request_timeout: float, transaction_pause: float = 0.5,
                 blocking_command: str = "both", seed: int = 1) -> None:
        self.port = port
        self.interval = interval
        self.request_timeout = request_timeout
        self.transaction_pause = transaction_pause
        self.blocking_command = blocking_command
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.conns: List[Conn] = []
        self.schedule: List = []  # heap of (when, index, token)
        self.stats: Dict[str, Stats] = {kind: Stats() for kind in KINDS}
        self.transactions: List[float] = []  # MULTI send time of every transaction committed
        self.sending = True
        self.feeder: Optional[Feeder] = None
        if kinds.get(BLOCKED):
            self.feeder = Feeder(redis_port)
            self.selector.register(self.feeder.sock, selectors.EVENT_READ, self.feeder)
        self._open(kinds)

    def _open(self, kinds: Dict[str, int]) -> None:
        deadline = time.monotonic() + 60
        blocked = 0
        for kind in KINDS:
            for _ in range(kinds.get(kind, 0)):
                index = len(self.conns)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock.connect((HOST, self.port))
                except OSError as error:
                    sock.close()
                    raise BenchError(f"connection {index} to the proxy failed: {error}") \
                        from None
                sock.setblocking(False)
                name = self.blocking_command
                if name == "both":
                    name = "BRPOP" if blocked % 2 else "BLPOP"
                blocked += kind == BLOCKED
                conn = Conn(index, kind, sock, name.encode())
                self.conns.append(conn)
                self.selector.register(sock, selectors.EVENT_READ, conn)
        start = time.monotonic()
        for conn in self.conns:
            self._schedule(conn, start + self.random.random() * self.interval)

    def _schedule(self, conn: Conn, when: float) -> None:
        conn.token += 1
        heapq.heappush(self.schedule, (when, conn.index, conn.token))

    @property
    def outstanding(self) -> int:
        """Replies still owed, transactions still open and pushes not yet answered."""
        owed = sum(1 for c in self.conns if c.alive and (c.busy or c.step == IN_MULTI))
        return owed + (len(self.feeder.pending) if self.feeder else 0)

    # -- sending

    def _write(self, conn: Conn, request: bytes, now: float) -> None:
        try:
            sent = conn.sock.send(request)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._drop(conn, now, f"send failed: {error.strerror or error}")
            return
        if sent != len(request):  # a few dozen bytes on an idle socket: never happens
            self._drop(conn, now, "send buffer full")

    def _request(self, conn: Conn, request: bytes, expect: bytes, now: float) -> None:
        conn.expect = expect
        conn.sent_at = now
        conn.busy = True
        self._write(conn, request, now)

    def _send_paced(self, conn: Conn, now: float) -> None:
        if conn.seq % 2 == 0:
            value = b"%d" % (conn.seq + 1)
            self._request(conn, command(b"SET", conn.key, value), b"+OK\r\n", now)
        else:
            value = b"%d" % conn.seq
            self._request(conn, command(b"GET", conn.key), bulk(value), now)
        conn.seq += 1

    def _block(self, conn: Conn, now: float) -> None:
        conn.blocking = True
        self._write(conn, command(conn.blocking_command, conn.key, b"0"), now)

    def _due(self, conn: Conn, now: float) -> None:
        """The scheduled next step of `conn`."""
        if conn.kind == PACED:
            if self.sending:
                self._send_paced(conn, now)
        elif conn.kind == BLOCKED:
            if not self.sending:
                return
            if not conn.blocking:  # first time, or its last BLPOP returned something unasked
                self._block(conn, now)
                self._schedule(conn, now + self.interval)
                return
            conn.seq += 1
            conn.pushed = b"%d:%d" % (conn.index, conn.seq)
            conn.expect = b"*2\r\n" + bulk(conn.key) + bulk(conn.pushed)
            conn.sent_at = now
            conn.busy = True
            assert self.feeder is not None
            self.feeder.push(conn, conn.pushed, now)
        elif conn.step == IN_MULTI:  # the pause is over (even when no longer sending)
            conn.step = EXEC
            self._request(conn, command(b"EXEC"), b"*1\r\n:%d\r\n" % (conn.counter + 1), now)
        elif self.sending:
            conn.step = MULTI
            conn.cycle_start = now
            self._request(conn, command(b"MULTI"), b"+OK\r\n", now)

    # -- receiving

    def _drop(self, conn: Conn, now: float, reason: str) -> None:
        stats = self.stats[conn.kind]
        if conn.busy:
            stats.fail(conn.sent_at, reason, unanswered=True)
            conn.busy = False
        elif conn.step == IN_MULTI:
            stats.fail(now, f"{reason} inside MULTI", unanswered=False)
        conn.alive = False
        stats.disconnects.append((now, conn.index, reason))
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
        while conn.alive:
            end = frame_end(conn.buffer)
            if end < 0:
                return
            reply, conn.buffer = conn.buffer[:end], conn.buffer[end:]
            if conn.kind == PACED:
                self._paced_reply(conn, reply, now)
            elif conn.kind == BLOCKED:
                self._blocked_reply(conn, reply, now)
            else:
                self._transaction_reply(conn, reply, now)

    def _check(self, conn: Conn, reply: bytes, now: float, what: str = "") -> bool:
        """Record the reply to `conn`'s request; True if it is the one expected."""
        stats = self.stats[conn.kind]
        stats.reply(conn.sent_at, now - conn.sent_at)
        if reply == conn.expect:
            return True
        stats.fail(conn.sent_at, f"{what}wrong reply {reply[:80]!r}, expected "
                                 f"{conn.expect[:80]!r}")
        return False

    def _unasked(self, conn: Conn, reply: bytes, now: float) -> None:
        self.stats[conn.kind].fail(now, f"reply nobody asked for {reply[:80]!r}")

    def _paced_reply(self, conn: Conn, reply: bytes, now: float) -> None:
        if not conn.busy:
            self._unasked(conn, reply, now)
            return
        conn.busy = False
        self._check(conn, reply, now)
        if self.sending:
            self._schedule(conn, max(now, conn.sent_at + self.interval))

    def _blocked_reply(self, conn: Conn, reply: bytes, now: float) -> None:
        conn.blocking = False  # whatever came, its BLPOP/BRPOP is over
        if not conn.busy:
            # Nothing was pushed for it: its next scheduled step blocks it again.
            self._unasked(conn, reply, now)
            return
        conn.busy = False
        conn.pushed = b""
        self._check(conn, reply, now, f"{conn.blocking_command.decode()}: ")
        if self.sending:
            self._block(conn, now)
            self._schedule(conn, max(now, conn.sent_at + self.interval))

    def _transaction_reply(self, conn: Conn, reply: bytes, now: float) -> None:
        if not conn.busy:
            self._unasked(conn, reply, now)
            if conn.step == IN_MULTI:  # the transaction can no longer be trusted
                self._resync(conn, now)
            return
        conn.busy = False
        step = conn.step
        if step == DISCARD:  # ends a transaction gone wrong, if one is open; any reply will do
            conn.step = RESYNC_GET
            self._request(conn, command(b"GET", conn.key), b"", now)
            return
        if step == RESYNC_GET:  # learn the counter again, then start afresh
            value = reply.split(b"\r\n")[1] if reply.startswith(b"$") and \
                not reply.startswith(b"$-1") else b"0"
            conn.counter = int(value) if value.isdigit() else 0
            self._next_transaction(conn, now)
            return
        if not self._check(conn, reply, now, f"{step}: "):
            self._resync(conn, now)
            return
        if step == MULTI:
            conn.step = INCR
            self._request(conn, command(b"INCR", conn.key), b"+QUEUED\r\n", now)
        elif step == INCR:
            conn.step = IN_MULTI
            self._schedule(conn, now + self.transaction_pause)
        elif step == EXEC:
            conn.counter += 1
            self.transactions.append(conn.cycle_start)
            self._next_transaction(conn, now)

    def _next_transaction(self, conn: Conn, now: float) -> None:
        conn.step = IDLE
        if self.sending:
            self._schedule(conn, max(now, conn.cycle_start + self.interval))

    def _resync(self, conn: Conn, now: float) -> None:
        """After a wrong reply: DISCARD (ends a transaction still open, else an error reply,
        both fine), then GET the counter. Neither is counted as a request."""
        conn.token += 1  # its EXEC, if one is scheduled, is not sent
        conn.step = DISCARD
        conn.expect = b""
        conn.busy = True
        conn.sent_at = now
        self._write(conn, command(b"DISCARD"), now)

    def _feeder_reply(self, now: float) -> None:
        feeder = self.feeder
        assert feeder is not None
        try:
            data = feeder.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            raise BenchError(f"the feeder's connection to Redis failed: {error}") from None
        if not data:
            raise BenchError("Redis closed the feeder's connection")
        feeder.buffer += data
        while True:
            end = frame_end(feeder.buffer)
            if end < 0:
                return
            reply, feeder.buffer = feeder.buffer[:end], feeder.buffer[end:]
            if not feeder.pending:
                raise BenchError(f"Redis sent the feeder a reply nobody asked for: {reply!r}")
            conn, pushed_at = feeder.pending.popleft()
            if reply != b":1\r\n":
                self.stats[BLOCKED].fail(
                    pushed_at, f"RPUSH {conn.key.decode()} answered {reply[:40]!r}, expected "
                               f":1 (an earlier value was not taken)")

    def _check_timeouts(self, now: float) -> None:
        for conn in self.conns:
            if conn.alive and conn.busy and now - conn.sent_at > self.request_timeout:
                what = "the pushed value did not arrive" if conn.kind == BLOCKED else "no reply"
                self._drop(conn, now, f"{what} within {self.request_timeout:g} s")
        if self.feeder and self.feeder.pending and \
                now - self.feeder.pending[0][1] > self.request_timeout:
            raise BenchError(f"Redis did not answer the feeder within {self.request_timeout:g} s")

    def _tick(self, now: float, stop: float) -> None:
        while self.schedule and self.schedule[0][0] <= now:
            _when, index, token = heapq.heappop(self.schedule)
            conn = self.conns[index]
            if conn.alive and token == conn.token:
                self._due(conn, now)
        if self.feeder:
            self.feeder.flush()
        wait = stop - now
        if self.schedule:
            wait = min(wait, self.schedule[0][0] - now)
        for key, _mask in self.selector.select(max(0.0, min(wait, 0.01))):
            if key.data is self.feeder:
                self._feeder_reply(time.monotonic())
            else:
                self._receive(key.data)

    def run_until(self, stop: float, done=None) -> None:
        """Drive the load until time `stop`, or until `done()` (checked every ~10 ms) is true."""
        next_check = time.monotonic() + 0.5
        while True:
            now = time.monotonic()
            if now >= stop:
                return
            self._tick(now, stop)
            if done is not None and done():
                return
            if now >= next_check:
                self._check_timeouts(now)
                next_check = now + 0.5

    def finish(self) -> None:
        """Stop starting anything new; wait (bounded) for every reply still owed and for the
        transactions still open to commit."""
        self.sending = False
        deadline = time.monotonic() + self.transaction_pause + self.request_timeout + 1
        next_check = time.monotonic() + 0.5
        while self.outstanding and time.monotonic() < deadline:
            now = time.monotonic()
            self._tick(now, min(deadline, now + 0.05))
            if now >= next_check:
                self._check_timeouts(now)
                next_check = now + 0.5
        self._check_timeouts(time.monotonic() + self.request_timeout + 1)
        for conn in self.conns:
            if conn.alive and conn.step == IN_MULTI:
                self._drop(conn, time.monotonic(), "transaction still open at the end")

    def close(self) -> None:
        for conn in self.conns:
            if conn.alive:
                conn.sock.close()
        if self.feeder:
            self.feeder.sock.close()
        self.selector.close()

    def count(self, kind: str) -> int:
        return sum(1 for c in self.conns if c.kind == kind)

    def alive(self) -> int:
        return sum(1 for c in self.conns if c.alive)

    def summary(self, start: float, end: float, kind: str = PACED) -> Dict[str, Any]:
        result = self.stats[kind].summary(start, end)
        if kind == TRANSACTION:
            result["transactions"] = sum(1 for t in self.transactions if start <= t < end)
        return result

    def timeline(self, origin: float, start: float, end: float,
                 step: float = 0.1) -> List[Dict[str, Any]]:
        """Per `step` seconds of send time in [start, end): requests and worst latency, of
        every kind (a blocked client's by push time)."""
        buckets: Dict[int, List[float]] = {}
        for stats in self.stats.values():
            for sent, latency in zip(stats.sent_times, stats.latencies):
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
    for name, pattern in (("in_flight", IN_FLIGHT), ("in_transaction", IN_TRANSACTION)):
        found = pattern.search(detail.get("checkpoint", ""))
        timings[name] = int(found.group(1)) if found else (0 if "checkpoint" in detail else None)
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
            # The bridge's stage lines restart the CLI's clock, so the stage differences above
            # say nothing there; the proxy's own figures do.
            if reported.get("settle_ms") is not None:
                timings["drain_ms"] = reported["settle_ms"]
            if reported.get("drain_and_checkpoint_ms") is not None:
                # From the snapshot's start until the new image has the checkpoint: describing
                # every connection, writing, handing it over.
                timings["checkpoint_ms"] = round(
                    reported["drain_and_checkpoint_ms"] + (reported.get("handover_ms") or 0), 1)
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
                                  connection_limit=options.connections + 1000,
                                  workers=options.workers)
        pid = proxy.pid
        kinds = connection_kinds(options)
        stack.say(f"opening {options.connections} connections ("
                  + ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n)
                  + f"), one request, push or transaction per connection every "
                    f"{options.interval:g} s")
        load = Load(proxy.port, redis.port, kinds, options.interval, options.request_timeout,
                    options.transaction_pause, options.blocking_command)
        try:
            t0 = time.monotonic()
            load.run_until(t0 + options.warmup)
            phase1 = (time.monotonic(), 0.0)
            stack.say(f"phase 1: {options.duration:g} s without upgrade")
            proxy_cpu = tree_cpu_seconds(pid)
            own = resource.getrusage(resource.RUSAGE_SELF)
            load.run_until(phase1[0] + options.duration)
            phase1 = (phase1[0], time.monotonic())
            own_after = resource.getrusage(resource.RUSAGE_SELF)
            steady_cpu = {
                "proxy_percent": round(100 * (tree_cpu_seconds(pid) - proxy_cpu)
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
    by_kind: Dict[str, Dict[str, Any]] = {}
    for kind, count in kinds.items():
        if not count:
            continue
        by_kind[kind] = {
            "steady": load.summary(*phase1, kind=kind),
            "upgrade": load.summary(phase2_start, phase2_end, kind=kind),
            "upgrade window": load.summary(window_start, window_end, kind=kind),
        }
        for summary in by_kind[kind].values():
            if summary["worst_sent_at"] is not None:
                summary["worst_at_ms_after_upgrade_start"] = round(
                    (summary["worst_sent_at"] - window_start) * 1000, 1)
            summary.pop("worst_sent_at")
    phases = by_kind.get(PACED, {})
    whole_run = {kind: load.stats[kind].summary(float("-inf"), float("inf")) for kind in by_kind}
    for summary in whole_run.values():
        summary.pop("worst_sent_at")
    for record in upgrades:
        record["started_at_ms"] = round((record.pop("started_at") - window_start) * 1000, 1)
        # When each stage was reported, on the timeline's clock.
        record["stage_at_ms"] = {stage: round(record["started_at_ms"] + elapsed, 1)
                                 for stage, elapsed in record.pop("stage_ms", {}).items()}
        record["ended_at_ms"] = round((record.pop("ended_at") - window_start) * 1000, 1)
    timeline = load.timeline(window_start, window_start - 0.5, window_end + 1.5,
                             options.timeline_step / 1000)
    # Every failure of any kind, in either phase or after them (load.finish()), counts.
    clean = (all(not stats.failures and not stats.disconnects for stats in load.stats.values())
             and all(u["returncode"] == 0 for u in upgrades)
             and alive == options.connections)
    worst_by_kind = {kind: p["upgrade"]["max_ms"] for kind, p in by_kind.items()
                     if p["upgrade"]["max_ms"] is not None}
    worst = max(worst_by_kind.values()) if worst_by_kind else None
    return {
        "settings": {"connections": options.connections, "interval_s": options.interval,
                     "offered_rps": round(options.connections / options.interval, 1),
                     "duration_s": options.duration, "upgrades": options.upgrades,
                     "topology": options.topology, "target_ms": options.target_ms,
                     "kinds": kinds, "transaction_pause_s": options.transaction_pause,
                     "blocking_command": options.blocking_command},
        "proxy_pid": pid,
        "phases": phases,
        "kinds": by_kind,
        "whole_run": whole_run,
        "worst_upgrade_ms_by_kind": worst_by_kind,
        "steady_cpu": steady_cpu,
        "upgrades": upgrades,
        "timeline": timeline,
        "connections_alive_at_end": alive,
        "proxy_connections_at_end": sum(s["connections"]
                                        for s in final_status["sources"].values()),
        "generation_at_end": final_status.get("generation"),
        "no_failures": clean,
        "target_met": bool(clean and worst is not None and worst < options.target_ms),
        "worst_upgrade_ms": worst,
        "machine_load": {"before": load_before, "after": machine_load()},
    }


def print_report(report: Dict[str, Any], show_timeline: bool = False) -> None:
    s = report["settings"]
    print(f"{s['connections']} connections, one request each every {s['interval_s']:g} s "
          f"({s['offered_rps']:,.0f} requests/s offered), topology {s['topology']}, "
          f"{s['upgrades']} upgrade(s)")
    kinds = s["kinds"]
    if kinds.get(BLOCKED) or kinds.get(TRANSACTION):
        print(f"  {kinds[PACED]} paced, {kinds[BLOCKED]} blocked ({s['blocking_command']}), "
              f"{kinds[TRANSACTION]} in transactions ({s['transaction_pause_s']:g} s "
              f"inside each MULTI)")
    for kind, phases in report["kinds"].items():
        print()
        print(KIND_TITLES[kind])
        rows = []
        for name, p in phases.items():
            row = [name, f"{p['seconds']:.1f}", f"{p['requests']:,}", p["errors"],
                   p["disconnects"], fmt_ms(p["p50_ms"]), fmt_ms(p["p99_ms"]),
                   fmt_ms(p["max_ms"])]
            if kind == TRANSACTION:
                row.insert(3, f"{p['transactions']:,}")
            rows.append(row)
        headers = ["phase", "seconds", "requests", "errors", "disconnects", "p50 ms", "p99 ms",
                   "max ms"]
        if kind == TRANSACTION:
            headers.insert(3, "EXECs ok")
        print(format_table(headers, rows, right=[False] + [True] * (len(headers) - 1)))
        for name, p in phases.items():
            if p["error_reasons"]:
                print(f"{name} errors: " + ", ".join(f"{n} x {why}"
                                                    for why, n in p["error_reasons"].items()))
            if p["disconnect_reasons"]:
                print(f"{name} disconnects: " + ", ".join(p["disconnect_reasons"]))
    for kind, whole in report["whole_run"].items():
        if whole["errors"] or whole["disconnects"]:
            print(f"{kind}, whole run (warm-up and the final wait included): {whole['errors']} "
                  f"errors, {whole['disconnects']} disconnects"
                  + "".join(f"; {n} x {why}" for why, n in whole["error_reasons"].items())
                  + "".join(f"; {why}" for why in whole["disconnect_reasons"]))
    print()
    stage_rows = []
    for u in report["upgrades"]:
        stage_rows.append([u["number"], fmt_ms(u.get("preflight_ms")),
                           fmt_ms(u.get("new_image_startup_ms")), fmt_ms(u.get("drain_ms")),
                           fmt_ms(u.get("checkpoint_ms")), fmt_ms(u.get("restore_ms")),
                           fmt_ms(u.get("blackout_ms")), fmt_ms(u["cli_ms"]),
                           f"{u.get('kept')}/{u.get('closed')}", fmt_count(u.get("in_flight")),
                           fmt_count(u.get("in_transaction"))])
    print(format_table(["upgrade", "preflight", "start+imports", "drain", "checkpoint",
                        "restore", "blackout", "CLI total", "kept/closed", "in flight",
                        "in MULTI"],
                       stage_rows, right=[True] * 11))
    print("(milliseconds, from the proxy's own clock. start+imports: the new image starting "
          "while the old version\n still serves from its bridge process; drain: until the "
          "snapshot is taken (the connections that cannot\n be handed over at once reaching a "
          "point where they can, the others served meanwhile, then the\n snapshot itself); "
          "blackout: from the snapshot's start to the new image serving = checkpoint\n (the "
          "snapshot, writing it, handing it over) + restore. in flight, in MULTI: connections "
          "handed\n over with a request in flight (a waiting BLPOP/BRPOP is one) or inside a "
          "transaction, as the\n checkpoint stage reports)")
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
    by_kind = ", ".join(f"{kind} {fmt_ms(worst)}"
                        for kind, worst in report["worst_upgrade_ms_by_kind"].items())
    print(f"target: max latency during upgrade < {s['target_ms']:g} ms -> {verdict} "
          f"(max {fmt_ms(report['worst_upgrade_ms'])} ms: {by_kind})")


def fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_count(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


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
    parser.add_argument("--blocked-share", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of --connections that are blocked clients: each waits in "
                             "BLPOP/BRPOP <own key> 0, gets one value pushed (straight to Redis) "
                             "every --interval, checks it and blocks again (default 0)")
    parser.add_argument("--blocking-command", choices=["BLPOP", "BRPOP", "both"],
                        default="both",
                        help="what blocked clients wait in; both: every other one (default)")
    parser.add_argument("--transaction-share", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of --connections that are transaction clients: each "
                             "runs MULTI, INCR <own key>, waits --transaction-pause, EXEC and "
                             "checks the counter, one transaction every --interval (default 0)")
    parser.add_argument("--transaction-pause", type=float, default=0.5, metavar="SECONDS",
                        help="how long a transaction client stays inside MULTI before EXEC, so "
                             "that upgrades land inside transactions (default 0.5)")
    parser.add_argument("--topology", choices=["passthrough", "filtered"], default="passthrough")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (default 1)")
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
    shares = (options.blocked_share, options.transaction_share)
    if any(not 0 <= share <= 1 for share in shares) or sum(shares) > 1:
        parser.error("--blocked-share and --transaction-share must be between 0 and 1, and "
                     "their sum at most 1")
    if not 0 <= options.transaction_pause < options.request_timeout:
        parser.error("--transaction-pause must be at least 0 and less than --request-timeout")
    kinds = connection_kinds(options)
    if kinds[BLOCKED] + kinds[TRANSACTION] > options.connections:
        parser.error(f"--connections {options.connections} is too few for one blocked and one "
                     f"transaction client")
    return options


def connection_kinds(options) -> Dict[str, int]:
    """How many connections of each kind: a share above 0 gives at least one connection."""
    def share(fraction: float) -> int:
        return max(1, round(options.connections * fraction)) if fraction > 0 else 0

    blocked, transaction = share(options.blocked_share), share(options.transaction_share)
    return {PACED: max(0, options.connections - blocked - transaction), BLOCKED: blocked,
            TRANSACTION: transaction}


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
