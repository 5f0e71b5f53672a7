#!/usr/bin/env python3
"""Soak test: many kinds of client through one proxy while it upgrades itself in place every few
seconds, for --minutes minutes (default 10).

Starts one redis-server and the proxy in front of it (127.0.0.1 only, on free ports), then runs
these clients side by side, one greenlet each, every reply checked:

  * pipeliners: pipelines of 10-50 `INCR soak:pipeline:<n>` every --pipeline-every seconds;
    each reply must be the connection's counter plus one more than the reply before it.
  * paced: one request every --interval seconds, alternating `SET soak:paced:<n> <value>` (+OK)
    and `GET` of the same key, which must return the value just set.
  * subscribers and one publisher: each subscriber SUBSCRIBEs to one of --channels channels; the
    publisher (through the proxy too) publishes `<sequence>:<time>` on every channel every
    --publish-every seconds. Every subscriber must receive every number of its channel in
    order, none missing, none twice; every PUBLISH must reach exactly the subscribers of its
    channel.
  * blocking workers: each waits in `BLPOP` (even n) or `BRPOP` (odd n) `soak:blocking:<n> 0`;
    a feeder on its own connection straight to Redis pushes one value, unique to that worker and
    push, while it waits (RPUSH must answer :1); the worker must receive exactly that value.
  * transactions: MULTI (+OK), `INCR soak:transaction:<n>` (+QUEUED), a pause of 0.05-0.3 s
    inside the transaction, EXEC, which must return exactly [counter + 1].
  * slow readers: a small receive buffer; `SET` a fresh 10 KB value and pipeline --slow-gets
    GETs of it (default 600: 6 MB), read 4 KB at a time with a pause after each read, so that
    the proxy holds replies not yet written when an upgrade comes; every reply must be that
    value. At the end the rest is read at full speed.
  * garbage: mutated RESP (flipped, inserted or deleted bytes, lying lengths, truncated frames,
    junk, overlong inline lines, on keys and channels of their own), a short wait for whatever
    comes back, then a new connection. Nothing they get is checked, but they must never
    disturb the others.

Meanwhile `python -m shotover_gevent upgrade --control-socket ...` runs --upgrade-every
seconds after the previous one ended; each must exit 0 and report "closed 0" (and keep the pid).

Every --report-every seconds one line: elapsed time, requests (total and in the window), errors
and disconnects of the well-behaved kinds, the worst latency in the window and overall, upgrades
done, the RSS and open fds of the proxy's processes. At the end: a table per kind, the
upgrades, the proxy's resources, final checks against Redis itself (counters, leftover list
values, last sequence numbers), then every failure recorded (kind, client, reply, which
upgrade it was near) with the proxy's log lines around it.

A connection that fails is reconnected after 0.5 s and picks up where it can, so that the run
goes on testing; the failure still counts. Exit status: 0 when no well-behaved client saw an
error or a disconnect and every upgrade succeeded, 1 otherwise, 2 when the soak could not run,
130 / 143 after Ctrl-C / SIGTERM (summary printed; a second Ctrl-C stops at once). Every
process started here is stopped on exit, on error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.lock
from gevent import socket as green_socket
from greenlet import getcurrent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    HOST,
    REPO_ROOT,
    BenchError,
    Proxy,
    Stack,
    describe_load,
    format_table,
    machine_load,
    proc_cpu_seconds,
    proc_fd_count,
    proc_status_kib,
    tree_cpu_seconds,
    process_tree,
    raise_nofile,
    redis_call,
)
from bench_upgrade import command  # noqa: E402

PIPELINE, PACED, PUBLISHER, SUBSCRIBER = "pipeliner", "paced", "publisher", "subscriber"
BLOCKING, TRANSACTION, SLOW, GARBAGE = "blocking", "transaction", "slow reader", "garbage"
#: Every kind, in report order; all but the garbage clients are checked.
KINDS = (PIPELINE, PACED, PUBLISHER, SUBSCRIBER, BLOCKING, TRANSACTION, SLOW, GARBAGE)
WELL_BEHAVED = KINDS[:-1]
#: A slow reader's latency is mostly its own slowness: kept out of "worst latency".
LATENCY_KINDS = tuple(kind for kind in WELL_BEHAVED if kind != SLOW)

RECONNECT_DELAY = 0.5
SLOW_VALUE_BYTES = 10 * 1024
SLOW_READ_BYTES = 4096
SLOW_READ_PAUSE = 0.01
#: Failures kept in full (all are counted); the report prints them with the proxy's log.
MAX_FAILURE_RECORDS = 300
#: Redis commands no mutated byte string may reach: they would disturb every client.
DANGEROUS_COMMANDS = ("FLUSHALL", "FLUSHDB", "SHUTDOWN", "DEBUG", "SWAPDB", "REPLICAOF",
                      "SLAVEOF", "FAILOVER", "CONFIG")
#: One worker's line of an upgrade's summary.
UPGRADED_LINE = re.compile(r"upgraded (\S+) -> (\S+): kept (\d+) connections, closed (\d+) "
                           r"\(([^)]*)\), blackout (\d+) ms, pid (\d+)")
#: The supervisor's line of an upgrade's summary.
SUPERVISOR_LINE = re.compile(r"\(supervisor pid (\d+), generation (\d+)\)")
LOG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# ---- replies ------------------------------------------------------------------------------------


class Status(bytes):
    """A simple-string reply (+OK)."""


class ErrorReply(bytes):
    """An error reply (-ERR ...)."""


class Incomplete(Exception):
    """The buffer ends inside a reply."""


class Disconnected(Exception):
    """The proxy closed or reset the connection."""


class NoReply(Exception):
    """No (whole) reply within the deadline."""


class BadBytes(Exception):
    """Bytes that are no RESP2 reply."""


class Restart(Exception):
    """Start again on a new connection; the reason was counted already."""


def parse_reply(buffer: bytearray, start: int) -> Tuple[Any, int]:
    """One RESP2 reply at `start`: (value, end offset). Raises Incomplete or BadBytes."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        raise Incomplete()
    kind = buffer[start]
    line = bytes(buffer[start + 1:line_end])
    try:
        if kind == 0x2B:  # +
            return Status(line), line_end + 2
        if kind == 0x2D:  # -
            return ErrorReply(line), line_end + 2
        if kind == 0x3A:  # :
            return int(line), line_end + 2
        if kind == 0x24:  # $
            length = int(line)
            if length < 0:
                return None, line_end + 2
            end = line_end + 2 + length
            if len(buffer) < end + 2:
                raise Incomplete()
            if buffer[end:end + 2] != b"\r\n":
                raise BadBytes(f"bulk string of {length} bytes not followed by CRLF")
            return bytes(buffer[line_end + 2:end]), end + 2
        if kind == 0x2A:  # *
            count = int(line)
            if count < 0:
                return None, line_end + 2
            items = []
            position = line_end + 2
            for _ in range(count):
                item, position = parse_reply(buffer, position)
                items.append(item)
            return items, position
    except ValueError:
        raise BadBytes(f"bad length or integer {bytes(buffer[start:line_end + 2])[:60]!r}") \
            from None
    raise BadBytes(f"unknown reply type {bytes(buffer[start:start + 60])!r}")


def same(reply: Any, expected: Any) -> bool:
    """Equal and of the same RESP type (a status +OK is not the bulk string "OK")."""
    if type(reply) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(reply) == len(expected) and all(same(r, e) for r, e in zip(reply, expected))
    return reply == expected


def describe(reply: Any, limit: int = 160) -> str:
    if isinstance(reply, Status):
        text = "+" + reply.decode("utf-8", "replace")
    elif isinstance(reply, ErrorReply):
        text = "-" + reply.decode("utf-8", "replace")
    elif isinstance(reply, bytes):
        text = repr(reply) if len(reply) <= 60 else f"<{len(reply)} bytes {reply[:40]!r}...>"
    elif isinstance(reply, list):
        text = "[" + ", ".join(describe(item, limit) for item in reply) + "]"
    else:
        text = repr(reply)
    return text if len(text) <= limit else text[:limit] + "..."


class Reader:
    """Replies from one socket, with a deadline per reply; `chunk` and `pause` make it slow."""

    def __init__(self, sock, chunk: int = 65536, pause: float = 0.0) -> None:
        self.sock = sock
        self.chunk = chunk
        self.pause = pause
        self.buffer = bytearray()
        self.offset = 0

    def read(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.offset < len(self.buffer):
                try:
                    value, end = parse_reply(self.buffer, self.offset)
                except Incomplete:
                    pass
                else:
                    self.offset = end
                    if end == len(self.buffer):
                        self.buffer.clear()
                        self.offset = 0
                    elif end > 65536:
                        del self.buffer[:end]
                        self.offset = 0
                    return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReply(f"no reply within {timeout:g} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(self.chunk)
            except socket.timeout:
                raise NoReply(f"no reply within {timeout:g} s") from None
            except OSError as error:
                raise Disconnected(f"recv failed: {error.strerror or error}") from None
            if not data:
                raise Disconnected("closed by the proxy")
            self.buffer += data
            if self.pause:
                gevent.sleep(self.pause)


# ---- what the run saw ---------------------------------------------------------------------------


class Histogram:
    """Latencies in buckets 2 % wide: bounded memory however long the run."""

    STEP = math.log(1.02)

    def __init__(self) -> None:
        self.counts: Dict[int, int] = {}
        self.total = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        bucket = int(math.log(max(seconds, 1e-6) * 1e6) / self.STEP)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1
        self.max = max(self.max, seconds)

    def percentile(self, q: float) -> Optional[float]:
        if not self.total:
            return None
        rank = max(1, math.ceil(q / 100 * self.total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(math.exp((bucket + 1) * self.STEP) / 1e6, self.max)
        return self.max


class KindStats:
    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.requests = 0
        self.errors = 0
        self.disconnects = 0
        self.reconnects = 0
        self.latency = Histogram()
        self.window_max = 0.0
        self.worst_sent_at = 0.0  # when the request with the largest latency was sent
        self.reasons: Dict[str, int] = {}


@dataclass
class GarbageStats:
    connections: int = 0
    messages: int = 0
    bytes_received: int = 0
    closed_by_proxy: int = 0
    resets: int = 0
    connect_failures: int = 0


@dataclass
class Failure:
    wall_time: float
    elapsed: float
    kind: str
    client: str
    what: str
    detail: str
    context: str
    port: int = 0  # the client's own port, as the proxy's log names it


@dataclass
class UpgradeRecord:
    number: int
    started: float
    ended: Optional[float] = None
    returncode: Optional[int] = None
    output: str = ""
    kept: Optional[int] = None
    closed: Optional[int] = None
    blackout_ms: Optional[int] = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.ended is not None and not self.problem


@dataclass
class ResourceSample:
    elapsed: float
    rss_kib: int
    fds: int
    processes: int


@dataclass
class Soak:
    """Everything the clients, the upgrader and the report share."""

    options: argparse.Namespace
    port: int
    redis_port: int
    proxy: Proxy
    redis_pid: int
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False
    interrupted: int = 0
    stats: Dict[str, KindStats] = field(default_factory=dict)
    garbage: GarbageStats = field(default_factory=GarbageStats)
    failures: List[Failure] = field(default_factory=list)
    upgrades: List[UpgradeRecord] = field(default_factory=list)
    resources: List[ResourceSample] = field(default_factory=list)  # while the clients ran
    final_resources: Optional[ResourceSample] = None  # once they had finished
    cpu_at_start: Dict[str, float] = field(default_factory=dict)
    channels: List[bytes] = field(default_factory=list)
    subscribed: List[int] = field(default_factory=list)  # confirmed subscribers per channel
    published: List[int] = field(default_factory=list)  # last sequence number per channel
    publishing_done: bool = False
    feeder: Optional["Feeder"] = None
    #: What went wrong outside any client: the proxy exiting, a client crashing.
    problems: List[str] = field(default_factory=list)
    #: Worth a look, but no failure.
    notes: List[str] = field(default_factory=list)

    def elapsed(self, at: Optional[float] = None) -> float:
        return (time.monotonic() if at is None else at) - self.started

    def record(self, kind: str, latency: float, requests: int = 1) -> None:
        stats = self.stats[kind]
        stats.requests += requests
        if latency > stats.latency.max:
            stats.worst_sent_at = time.monotonic() - latency
        stats.latency.add(latency)
        stats.window_max = max(stats.window_max, latency)

    def upgrade_context(self, at: float) -> str:
        """Where `at` falls among the upgrades: inside one, or how long after the last."""
        for record in reversed(self.upgrades):
            if record.started <= at:
                if record.ended is None or at <= record.ended:
                    return (f"during upgrade {record.number} ({(at - record.started) * 1000:.0f} "
                            f"ms after it started)")
                return f"{(at - record.ended) * 1000:.0f} ms after upgrade {record.number} ended"
        return "before the first upgrade"

    def fail(self, kind: str, client: str, what: str, detail: str,
             at: Optional[float] = None, port: int = 0) -> None:
        stats = self.stats[kind]
        stats.errors += 1
        stats.reasons[what] = stats.reasons.get(what, 0) + 1
        self._keep(kind, client, what, detail, at, port)

    def disconnect(self, kind: str, client: str, reason: str, detail: str, port: int = 0) -> None:
        stats = self.stats[kind]
        stats.disconnects += 1
        what = f"disconnected: {reason}"
        stats.reasons[what] = stats.reasons.get(what, 0) + 1
        self._keep(kind, client, what, detail, None, port)

    def _keep(self, kind: str, client: str, what: str, detail: str, at: Optional[float],
              port: int) -> None:
        if len(self.failures) >= MAX_FAILURE_RECORDS:
            return
        now = time.monotonic()
        at = now if at is None else at
        self.failures.append(Failure(time.time() - (now - at), self.elapsed(at), kind, client,
                                     what, detail, self.upgrade_context(at), port))

    def sleep_until(self, when: float) -> bool:
        """Sleep until `when` unless the run stops first; False if it stops."""
        while not self.stopping:
            remaining = when - time.monotonic()
            if remaining <= 0:
                return True
            gevent.sleep(min(remaining, 0.2))
        return False

    @property
    def timeout(self) -> float:
        return self.options.request_timeout


# ---- well-behaved clients -----------------------------------------------------------------------


class Client:
    """One connection to the proxy, reconnected after a failure; `serve` is its loop."""

    kind = ""
    receive_buffer = 0  # SO_RCVBUF, when set
    read_chunk = 65536
    read_pause = 0.0

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.index = index
        self.random = random.Random(f"{soak.options.seed}:{self.kind}:{index}")
        self.sock: Any = None
        self.reader: Optional[Reader] = None
        self.local_port = 0
        self.doing = ""  # the request whose reply it waits for
        self.sent_at = 0.0
        # Pipeliners and transactions: the value their key must hold (None: not known, as
        # after a failure), compared with Redis at the end.
        self.counter: Optional[int] = None

    @property
    def name(self) -> str:
        return f"{self.kind} {self.index} (127.0.0.1:{self.local_port})"

    def connect(self) -> None:
        sock = green_socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.settimeout(self.soak.timeout)
            sock.connect((HOST, self.soak.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.local_port = sock.getsockname()[1]
        self.reader = Reader(sock, self.read_chunk, self.read_pause)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.soak.timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise NoReply(f"could not send {len(data)} bytes within {self.soak.timeout:g} s") \
                from None
        except OSError as error:
            raise Disconnected(f"send failed: {error.strerror or error}") from None

    def read(self) -> Any:
        assert self.reader is not None
        return self.reader.read(self.soak.timeout)

    def request(self, what: str, data: bytes) -> Any:
        """Send one request, return its reply and count it with its latency."""
        self.doing = what
        self.sent_at = time.monotonic()
        self.send(data)
        reply = self.read()
        self.soak.record(self.kind, time.monotonic() - self.sent_at)
        self.doing = ""
        return reply

    def failed(self, what: str, detail: str, at: Optional[float] = None) -> None:
        self.soak.fail(self.kind, self.name, what, detail, at, self.local_port)

    def check(self, what: str, reply: Any, expected: Any) -> bool:
        if same(reply, expected):
            return True
        self.failed(f"wrong reply to {what}",
                    f"got {describe(reply)}, expected {describe(expected)}", self.sent_at)
        return False

    def read_counter(self, key: bytes) -> int:
        reply = self.request("GET", command(b"GET", key))
        if reply is None:
            return 0
        if isinstance(reply, bytes) and not isinstance(reply, (Status, ErrorReply)) \
                and reply.isdigit():
            return int(reply)
        self.failed("wrong reply to GET of its counter",
                    f"got {describe(reply)}", self.sent_at)
        return 0

    def run(self) -> None:
        resync = False
        while True:
            try:
                self.connect()
            except OSError as error:
                self.soak.fail(self.kind, f"{self.kind} {self.index}", "connect failed",
                               str(error))
            else:
                try:
                    self.serve(resync)
                except Disconnected as error:
                    detail = (f"waiting for the reply to {self.doing} sent "
                              f"{(time.monotonic() - self.sent_at) * 1000:.0f} ms earlier"
                              if self.doing else "between requests")
                    self.soak.disconnect(self.kind, self.name, str(error), detail, self.local_port)
                except NoReply as error:
                    self.failed(f"no reply to {self.doing or 'a read'}",
                                str(error), self.sent_at)
                except BadBytes as error:
                    self.failed("unparseable reply", str(error),
                                self.sent_at)
                except Restart:
                    pass
                else:
                    return
                finally:
                    self.close()
                    self.doing = ""
                self.counter = None  # what the failed request did is not known
            if self.soak.stopping:
                return
            resync = True
            self.soak.stats[self.kind].reconnects += 1
            gevent.sleep(RECONNECT_DELAY)

    def serve(self, resync: bool) -> None:
        raise NotImplementedError


class Pipeliner(Client):
    kind = PIPELINE

    def serve(self, resync: bool) -> None:
        key = b"soak:pipeline:%d" % self.index
        self.counter = self.read_counter(key)
        pace = self.soak.options.pipeline_every
        next_at = time.monotonic() + self.random.random() * pace
        while self.soak.sleep_until(next_at):
            count = self.random.randint(10, 50)
            self.doing = f"a pipeline of {count} INCR"
            self.sent_at = time.monotonic()
            next_at = self.sent_at + pace
            self.send(command(b"INCR", key) * count)
            wrong = False
            for position in range(count):
                reply = self.read()
                if not wrong and not same(reply, self.counter + position + 1):
                    wrong = True
                    self.failed("wrong reply to INCR in a pipeline",
                                f"reply {position + 1} of {count}: got {describe(reply)}, "
                                f"expected {self.counter + position + 1}", self.sent_at)
            self.soak.record(PIPELINE, time.monotonic() - self.sent_at, count)
            self.doing = ""
            self.counter = self.read_counter(key) if wrong else self.counter + count


class PacedClient(Client):
    kind = PACED

    def serve(self, resync: bool) -> None:
        key = b"soak:paced:%d" % self.index
        interval = self.soak.options.interval
        next_at = time.monotonic() + self.random.random() * interval
        sequence = 0
        while self.soak.sleep_until(next_at):
            sequence += 1
            value = b"%d:%d:%d" % (self.index, sequence, self.random.getrandbits(32))
            reply = self.request("SET", command(b"SET", key, value))
            self.check("SET", reply, Status(b"OK"))
            if not self.soak.sleep_until(self.sent_at + interval):
                return
            reply = self.request("GET", command(b"GET", key))
            self.check("GET", reply, value)
            next_at = self.sent_at + interval


class Publisher(Client):
    kind = PUBLISHER

    def serve(self, resync: bool) -> None:
        try:
            self._serve(resync)
        finally:
            if self.soak.stopping:
                self.soak.publishing_done = True

    def _serve(self, resync: bool) -> None:
        soak = self.soak
        if not resync:
            wanted = soak.stats[SUBSCRIBER].clients
            deadline = time.monotonic() + 30
            while sum(soak.subscribed) < wanted and time.monotonic() < deadline:
                if soak.stopping:
                    return
                gevent.sleep(0.05)
            if sum(soak.subscribed) < wanted:
                self.failed("subscribers missing at the start",
                            f"{sum(soak.subscribed)} of {wanted} subscribed after 30 s")
        pace = soak.options.publish_every
        next_at = time.monotonic()
        while soak.sleep_until(next_at):
            next_at += pace
            for number, channel in enumerate(soak.channels):
                sequence = soak.published[number] + 1
                # Counted as published before the reply: it may reach subscribers without one.
                soak.published[number] = sequence
                payload = b"%d:%.6f" % (sequence, time.monotonic())
                reply = self.request("PUBLISH", command(b"PUBLISH", channel, payload))
                expected = soak.subscribed[number]
                if not same(reply, expected):
                    self.failed("PUBLISH reached a wrong number of subscribers",
                                f"{channel.decode()} sequence {sequence}: got {describe(reply)}, "
                                f"expected {expected}", self.sent_at)
            next_at = max(next_at, time.monotonic())


class Subscriber(Client):
    kind = SUBSCRIBER

    def serve(self, resync: bool) -> None:
        soak = self.soak
        number = self.index % len(soak.channels)
        channel = soak.channels[number]
        reply = self.request("SUBSCRIBE", command(b"SUBSCRIBE", channel))
        if not self.check("SUBSCRIBE", reply, [b"subscribe", channel, 1]):
            raise Disconnected("could not subscribe")  # a new connection tries again
        soak.subscribed[number] += 1
        try:
            # After a reconnect the first message sets where it goes on from.
            last: Optional[int] = None if resync else soak.published[number]
            while True:
                self.doing = f"message {last + 1 if last is not None else '?'} on " \
                             f"{channel.decode()}"
                self.sent_at = time.monotonic()
                message = self._next_message(number, last)
                if message is None:
                    return  # the publisher is done and every message came
                now = time.monotonic()
                parsed = self._sequence(message, channel, now)
                if parsed is None:
                    continue
                sequence, latency = parsed
                if last is None or sequence == last + 1:
                    soak.record(SUBSCRIBER, latency)
                else:
                    what = "message missing" if sequence > last + 1 else "message repeated or " \
                                                                          "out of order"
                    self.failed(what,
                                f"{channel.decode()}: got sequence {sequence} after {last}", now)
                last = sequence
        finally:
            soak.subscribed[number] -= 1

    def _next_message(self, number: int, last: Optional[int]) -> Any:
        """The next message, or None once the publisher has stopped and `last` is its last.
        Read in short slices: the publisher may stop while this waits."""
        soak = self.soak
        assert self.reader is not None
        deadline = time.monotonic() + soak.timeout
        while True:
            if soak.stopping and soak.publishing_done and last is not None \
                    and last >= soak.published[number]:
                return None
            try:
                return self.reader.read(min(0.2, max(0.001, deadline - time.monotonic())))
            except NoReply:
                if time.monotonic() >= deadline:
                    raise NoReply(f"no message within {soak.timeout:g} s (the publisher is at "
                                  f"{soak.published[number]})") from None

    def _sequence(self, message: Any, channel: bytes, now: float) -> Optional[Tuple[int, float]]:
        """(sequence number, latency) of a message from the publisher; None for anything else."""
        if isinstance(message, list) and len(message) == 3 and same(message[0], b"message") \
                and same(message[1], channel) and isinstance(message[2], bytes):
            sequence, _, sent = message[2].partition(b":")
            try:
                return int(sequence), now - float(sent)
            except ValueError:
                pass
        self.failed("unexpected message",
                    f"got {describe(message)} on {channel.decode()}", now)
        return None


class Feeder:
    """One connection straight to Redis that pushes what the blocking workers wait for, so its
    pushes never wait for an upgrade."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.lock = gevent.lock.Semaphore()
        self.sock: Any = None
        self.reader: Optional[Reader] = None

    def push(self, worker: str, key: bytes, value: bytes) -> Optional[float]:
        """RPUSH `value`; it must answer :1 (an earlier value left in the list was never taken).
        Returns the time of the push, None if the feeder's connection failed."""
        with self.lock:
            pushed_at = time.monotonic()
            try:
                if self.sock is None:
                    self.sock = green_socket.create_connection((HOST, self.soak.redis_port),
                                                               timeout=self.soak.timeout)
                    self.reader = Reader(self.sock)
                self.sock.sendall(command(b"RPUSH", key, value))
                assert self.reader is not None
                reply = self.reader.read(self.soak.timeout)
            except (OSError, Disconnected, NoReply, BadBytes) as error:
                self.soak.fail(BLOCKING, "the feeder", "the feeder's connection to Redis failed",
                               str(error), pushed_at)
                if self.sock is not None:
                    self.sock.close()
                self.sock = None
                return None
            if not same(reply, 1):
                self.soak.fail(BLOCKING, worker, "RPUSH found values never taken",
                               f"RPUSH {key.decode()} {value.decode()} answered {describe(reply)}, "
                               f"expected 1", pushed_at)
            return pushed_at

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class BlockingWorker(Client):
    kind = BLOCKING

    def __init__(self, soak: Soak, index: int) -> None:
        super().__init__(soak, index)
        self.sequence = 0
        self.outstanding: Optional[bytes] = None  # pushed for it, not received yet

    def serve(self, resync: bool) -> None:
        soak = self.soak
        key = b"soak:blocking:%d" % self.index
        name = b"BRPOP" if self.index % 2 else b"BLPOP"
        if self.outstanding is not None:
            # Pushed while the last connection waited: still in the list, or lost with it.
            reply = self.request("LRANGE", command(b"LRANGE", key, b"0", b"-1"))
            if same(reply, []):
                self.failed("a pushed value was lost with its connection",
                            f"{self.outstanding.decode()} pushed to {key.decode()}")
            elif not same(reply, [self.outstanding]):
                self.failed("unexpected list after a reconnect",
                            f"LRANGE {key.decode()} 0 -1: got {describe(reply)}, expected "
                            f"[{self.outstanding!r}] or []")
            self.request("DEL", command(b"DEL", key))
            self.outstanding = None
        interval = soak.options.interval
        next_at = time.monotonic() + self.random.random() * interval
        while soak.sleep_until(next_at):
            self.doing = name.decode()
            self.sent_at = time.monotonic()
            next_at = self.sent_at + interval
            self.send(command(name, key, b"0"))
            # Long enough for the command to be waiting in Redis when the value comes.
            gevent.sleep(self.random.uniform(0.02, interval / 2))
            self.sequence += 1
            value = b"%d:%d" % (self.index, self.sequence)
            assert soak.feeder is not None
            pushed_at = soak.feeder.push(self.name, key, value)
            if pushed_at is None:
                raise Restart()  # nothing will come for the waiting command
            self.outstanding = value
            self.sent_at = pushed_at
            reply = self.read()
            soak.record(BLOCKING, time.monotonic() - self.sent_at)
            self.doing = ""
            self.outstanding = None
            self.check(name.decode(), reply, [key, value])


class TransactionClient(Client):
    kind = TRANSACTION

    def serve(self, resync: bool) -> None:
        key = b"soak:transaction:%d" % self.index
        self.counter = self.read_counter(key)
        interval = self.soak.options.interval
        next_at = time.monotonic() + self.random.random() * interval
        while self.soak.sleep_until(next_at):
            next_at = time.monotonic() + interval
            ok = self.check("MULTI", self.request("MULTI", command(b"MULTI")), Status(b"OK"))
            if ok:
                ok = self.check("INCR inside MULTI", self.request("INCR", command(b"INCR", key)),
                                Status(b"QUEUED"))
            if ok:
                self.doing = "EXEC (in the pause inside MULTI)"
                gevent.sleep(self.random.uniform(0.05, 0.3))
                ok = self.check("EXEC", self.request("EXEC", command(b"EXEC")),
                                [self.counter + 1])
            if ok:
                self.counter += 1
            else:
                self.request("DISCARD", command(b"DISCARD"))  # any reply will do
                self.counter = self.read_counter(key)


class SlowReader(Client):
    kind = SLOW
    receive_buffer = SLOW_READ_BYTES
    read_chunk = SLOW_READ_BYTES
    read_pause = SLOW_READ_PAUSE

    def serve(self, resync: bool) -> None:
        key = b"soak:slow:%d" % self.index
        gets = self.soak.options.slow_gets
        filler = bytes(self.random.choice(b"abcdefghijklmnopqrstuvwxyz0123456789")
                       for _ in range(SLOW_VALUE_BYTES))
        next_at = time.monotonic() + self.random.random()
        round_number = 0
        while self.soak.sleep_until(next_at):
            round_number += 1
            header = b"%d:%d:" % (self.index, round_number)
            value = header + filler[len(header):]
            self.doing = f"SET and {gets} GETs of {len(value)} bytes"
            self.sent_at = time.monotonic()
            self.send(command(b"SET", key, value) + command(b"GET", key) * gets)
            self.check("SET of the 10 KB value", self.read(), Status(b"OK"))
            wrong = False
            for position in range(gets):
                reply = self.read()
                if not wrong and not same(reply, value):
                    wrong = True
                    self.failed("wrong reply to GET of the 10 KB value",
                                f"reply {position + 1} of {gets}: got {describe(reply)}, "
                                f"expected {describe(value)}", self.sent_at)
            self.soak.record(SLOW, time.monotonic() - self.sent_at, gets + 1)
            self.doing = ""
            next_at = time.monotonic() + 0.2


# ---- garbage ------------------------------------------------------------------------------------


class GarbageClient:
    """Sends mutated RESP on short-lived connections; whatever it gets back is only counted."""

    kind = GARBAGE

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.index = index
        self.name = f"garbage {index}"
        self.random = random.Random(f"{soak.options.seed}:{GARBAGE}:{index}")
        self.key = b"soak:garbage:%d" % index

    def base(self) -> bytes:
        choice = self.random.randrange(9)
        value = bytes(self.random.getrandbits(8) for _ in range(self.random.randrange(1, 64)))
        if choice == 0:
            return command(b"PING")
        if choice == 1:
            return command(b"ECHO", value)
        if choice == 2:
            return command(b"SET", self.key, value)
        if choice == 3:
            return command(b"GET", self.key)
        if choice == 4:
            return command(b"MULTI") + command(b"INCR", self.key) + command(b"EXEC")
        if choice == 5:
            return command(b"SUBSCRIBE", b"soak:garbage:channel")
        if choice == 6:
            return command(b"BLPOP", self.key, b"1")
        if choice == 7:
            return command(b"MONITOR") if self.random.random() < 0.2 else command(b"PING")
        return b"".join(command(b"GET", self.key) for _ in range(self.random.randint(2, 20)))

    def mutate(self, data: bytes) -> bytes:
        rng = self.random
        buffer = bytearray(data)
        choice = rng.randrange(9)
        position = rng.randrange(len(buffer) + 1)
        if choice == 0:  # flip a few bytes
            for _ in range(rng.randint(1, 3)):
                if buffer:
                    buffer[rng.randrange(len(buffer))] = rng.getrandbits(8)
        elif choice == 1:  # insert junk
            buffer[position:position] = bytes(rng.getrandbits(8)
                                              for _ in range(rng.randint(1, 16)))
        elif choice == 2:  # delete a slice
            del buffer[position:position + rng.randint(1, 8)]
        elif choice == 3:  # cut the frame short
            del buffer[position:]
        elif choice == 4:  # a length that lies
            lie = rng.choice([b"-2", b"-1", b"0", b"99999999", b"2147483648", b"9" * 20, b"x",
                              b"", b"1.5", b" 3"])
            match = re.search(rb"[*$](-?\d+)", bytes(buffer[position:]))
            if match:
                start = position + match.start(1)
                buffer[start:position + match.end(1)] = lie
        elif choice == 5:  # line endings broken or doubled
            crlf = [m.start() for m in re.finditer(rb"\r\n", bytes(buffer))]
            if crlf:
                at = rng.choice(crlf)
                buffer[at:at + 2] = rng.choice([b"\n", b"\r", b"\r\r\n", b"\r\n\r\n", b""])
        elif choice == 6:  # pure junk
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))
        elif choice == 7:  # an inline command, overlong or unbalanced
            if rng.random() < 0.3:
                return b"GET " + b"A" * rng.randint(60000, 70000)
            return rng.choice([b'GET "soak:garbage\r\n', b"SET 'x\r\n", b"\r\n\r\n",
                               b"PING PING PING\r\n", b"   \r\n", b"\x00\x00\r\n"])
        else:  # a huge array header in front of a real command
            buffer[0:0] = rng.choice([b"*1048577\r\n", b"*3\r\n", b"*-1\r\n", b"*2\r\n$1\r\n"])
        return bytes(buffer)

    def run(self) -> None:
        soak, stats, rng = self.soak, self.soak.garbage, self.random
        while not soak.stopping:
            sock = green_socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(5)
                try:
                    sock.connect((HOST, soak.port))
                except OSError:
                    stats.connect_failures += 1
                    gevent.sleep(0.5)
                    continue
                stats.connections += 1
                self._talk(sock)
            except OSError:
                stats.resets += 1
            finally:
                sock.close()
            gevent.sleep(rng.uniform(0.05, 0.2))

    def _talk(self, sock) -> None:
        rng, stats = self.random, self.soak.garbage
        for _ in range(rng.randint(1, 4)):
            data = self.base()
            if rng.random() < 0.9:
                data = self.mutate(data)
            cut = rng.randrange(len(data) + 1) if len(data) > 1 and rng.random() < 0.3 else 0
            for piece in ((data[:cut], data[cut:]) if cut else (data,)):
                if piece:
                    sock.sendall(piece)
                    gevent.sleep(0.001)
            stats.messages += 1
        # Mostly brief; sometimes held across an upgrade with a frame half sent.
        hold = rng.uniform(0.05, 0.3) if rng.random() < 0.8 else rng.uniform(0.5, 3.0)
        deadline = time.monotonic() + hold
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return
            if not data:
                stats.closed_by_proxy += 1
                return
            stats.bytes_received += len(data)


# ---- upgrades -----------------------------------------------------------------------------------


class Upgrader:
    """Runs `shotover_gevent upgrade` --upgrade-every seconds after the previous one ended."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.process: Optional[subprocess.Popen] = None

    def run(self) -> None:
        soak = self.soak
        every = soak.options.upgrade_every
        next_at = time.monotonic() + every
        while soak.sleep_until(next_at):
            record = UpgradeRecord(len(soak.upgrades) + 1, time.monotonic())
            soak.upgrades.append(record)
            # A thread of the hub's pool waits for the CLI: the clients keep running meanwhile,
            # and only the standard library's subprocess reaps children.
            record.returncode, record.output = gevent.get_hub().threadpool.apply(self._run_cli)
            record.ended = time.monotonic()
            self._judge(record)
            if not record.ok:
                sys.stdout.write(f"[{soak.elapsed():7.1f} s] upgrade {record.number} FAILED: "
                                 f"{record.problem}\n")
                sys.stdout.flush()
            next_at = record.ended + every

    def _run_cli(self) -> Tuple[int, str]:
        options = self.soak.options
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]]
                                                          if env.get("PYTHONPATH") else []))
        argv = [sys.executable, "-m", "shotover_gevent", "upgrade", "--control-socket",
                self.soak.proxy.control_path, "--timeout", str(options.upgrade_timeout)]
        # Its own session: a Ctrl-C meant for the soak does not cut an upgrade in half.
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.process = process
        try:
            output, _ = process.communicate(timeout=options.upgrade_timeout + 30)
            return process.returncode, output.decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            return -1, output.decode("utf-8", "replace") + "\n(killed: it did not finish)"
        finally:
            self.process = None

    def _judge(self, record: UpgradeRecord) -> None:
        # One line per worker; kept and closed add up, the blackout is the worst worker's.
        matches = list(UPGRADED_LINE.finditer(record.output))
        if matches:
            record.kept = sum(int(m.group(3)) for m in matches)
            record.closed = sum(int(m.group(4)) for m in matches)
            record.blackout_ms = max(int(m.group(6)) for m in matches)
        supervisor = SUPERVISOR_LINE.search(record.output)
        problems = []
        if record.returncode != 0:
            problems.append(f"exit status {record.returncode}")
        if not matches:
            problems.append("no 'upgraded ... closed N' line")
        else:
            if record.closed != 0:
                problems.append(f"closed {record.closed} "
                                f"({'; '.join(m.group(5) for m in matches)})")
            if supervisor is None or int(supervisor.group(1)) != self.soak.proxy.pid:
                problems.append(f"supervisor pid {supervisor and supervisor.group(1)}, "
                                f"expected {self.soak.proxy.pid}")
        if problems:
            last_lines = " | ".join(record.output.strip().splitlines()[-3:])
            record.problem = "; ".join(problems) + f" -- {last_lines}"

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()


# ---- the report ---------------------------------------------------------------------------------


def proxy_resources(soak: Soak) -> ResourceSample:
    """RSS and open fds summed over the proxy and its descendants (the old side during an
    upgrade)."""
    rss = fds = processes = 0
    for pid in process_tree([soak.proxy.pid]):
        try:
            rss += proc_status_kib(pid)
            fds += proc_fd_count(pid)
            processes += 1
        except (OSError, BenchError):
            pass  # gone meanwhile
    return ResourceSample(soak.elapsed(), rss, fds, processes)


def ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def worst(soak: Soak, window: bool) -> Tuple[float, str]:
    best = (0.0, "-")
    for kind in LATENCY_KINDS:
        stats = soak.stats[kind]
        value = stats.window_max if window else stats.latency.max
        if value > best[0]:
            best = (value, kind)
    return best


class Reporter:
    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.last_requests = 0

    def line(self, final: bool = False) -> str:
        """One progress line; `final`: the one after the clients have finished."""
        soak = self.soak
        requests = sum(soak.stats[kind].requests for kind in WELL_BEHAVED)
        errors = sum(soak.stats[kind].errors for kind in WELL_BEHAVED)
        disconnects = sum(soak.stats[kind].disconnects for kind in WELL_BEHAVED)
        window, window_kind = worst(soak, True)
        overall, overall_kind = worst(soak, False)
        for kind in WELL_BEHAVED:
            soak.stats[kind].window_max = 0.0
        done = [u for u in soak.upgrades if u.ended is not None]
        failed = sum(1 for u in done if not u.ok)
        sample = proxy_resources(soak)
        if final:
            soak.final_resources = sample
        else:
            soak.resources.append(sample)
        text = (f"[{soak.elapsed():7.1f} s] requests {requests:,} (+{requests - self.last_requests:,})"
                f"  errors {errors}  disconnects {disconnects}"
                f"  worst {ms(window)} ms {window_kind} (overall {ms(overall)} ms {overall_kind})"
                f"  upgrades {len(done)} (failed {failed})"
                f"  proxy RSS {sample.rss_kib / 1024:.1f} MiB in {sample.processes} process(es),"
                f" fds {sample.fds}" + ("  (clients finished)" if final else ""))
        self.last_requests = requests
        return text

    def run(self) -> None:
        soak = self.soak
        next_at = time.monotonic() + soak.options.report_every
        while soak.sleep_until(next_at):
            print(self.line(), flush=True)
            next_at += soak.options.report_every


def log_lines_around(path: str, start_wall: float, end_wall: float, ports: Sequence[int] = (),
                     limit: int = 60) -> List[str]:
    """The proxy's log lines stamped within [start_wall, end_wall] (lines without a stamp go with
    the line before them). Beyond `limit`, only warnings, errors, upgrade lines and lines naming
    one of `ports` (the failing clients' own)."""
    def stamp(wall: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + \
            f".{int(wall % 1 * 1000):03d}Z"

    low, high = stamp(start_wall), stamp(end_wall)
    selected: List[str] = []
    inside = False
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if LOG_TIMESTAMP.match(line):
                    inside = low <= line[:24] <= high
                if inside:
                    selected.append(line)
    except OSError as error:
        return [f"<log not readable: {error}>"]
    if len(selected) <= limit:
        return selected
    named = re.compile(r":(%s)\b" % "|".join(str(port) for port in ports if port)) \
        if any(ports) else None
    important = [line for line in selected
                 if re.search(r" (WARN|WARNING|ERROR|CRITICAL) |upgrade|Traceback|^\s", line)
                 or (named is not None and named.search(line))]
    note = f"<{len(selected)} lines in this window; {min(len(important), limit)} shown: warnings, " \
           f"errors, upgrade lines, lines naming a failing client's port>"
    return [note] + important[:limit]


def print_failures(soak: Soak) -> None:
    failures = soak.failures
    failed_upgrades = [u for u in soak.upgrades if not u.ok]
    if not failures and not failed_upgrades:
        return
    print()
    print(f"FAILURES ({len(failures)} recorded"
          + (f", first {MAX_FAILURE_RECORDS} kept" if len(failures) >= MAX_FAILURE_RECORDS else "")
          + "):")
    # Incidents: failures within 5 s of the first of their group, printed with the proxy's log.
    incidents: List[List[Failure]] = []
    for failure in sorted(failures, key=lambda f: f.wall_time):
        if incidents and failure.wall_time - incidents[-1][0].wall_time <= 5:
            incidents[-1].append(failure)
        else:
            incidents.append([failure])
    for number, incident in enumerate(incidents):
        print()
        print(f"-- incident {number + 1}: {len(incident)} failure(s) from "
              f"{incident[0].elapsed:.2f} s")
        for failure in incident[:15]:
            print(f"   at {failure.elapsed:8.3f} s ({failure.context}): {failure.kind}, "
                  f"{failure.client}: {failure.what}: {failure.detail}")
        if len(incident) > 15:
            print(f"   ... and {len(incident) - 15} more in this incident")
        if number < 8:
            print(f"   proxy log ({soak.proxy.log_path}) from 3 s before to 1 s after:")
            for line in log_lines_around(soak.proxy.log_path, incident[0].wall_time - 3,
                                         incident[-1].wall_time + 1,
                                         sorted({failure.port for failure in incident})):
                print("     " + line)
    if len(incidents) > 8:
        print(f"(log lines shown for the first 8 of {len(incidents)} incidents)")
    for record in failed_upgrades:
        print()
        print(f"-- upgrade {record.number} at {soak.elapsed(record.started):.2f} s failed: "
              f"{record.problem}")
        for line in record.output.strip().splitlines()[-25:]:
            print("     " + line)


def final_checks(soak: Soak, clients: List[Any]) -> List[str]:
    """Compare what the clients believe with Redis itself, on a connection straight to it."""
    problems = []
    for client in clients:
        if isinstance(client, (Pipeliner, TransactionClient)):
            prefix = b"soak:pipeline:" if isinstance(client, Pipeliner) else b"soak:transaction:"
            key = (prefix + b"%d" % client.index).decode()
            stored = redis_call(soak.redis_port, "GET", key)
            expected = client.counter
            if expected is not None and stored != str(expected):
                problems.append(f"{client.kind} {client.index}: Redis holds {key} = {stored!r}, "
                                f"the client counted {expected}")
        elif isinstance(client, BlockingWorker):
            key = f"soak:blocking:{client.index}"
            left = redis_call(soak.redis_port, "LLEN", key)
            if left != "0":
                problems.append(f"blocking {client.index}: {left} value(s) left in {key}, never "
                                "taken")
    for number, channel in enumerate(soak.channels):
        if soak.subscribed[number]:
            problems.append(f"{soak.subscribed[number]} subscriber(s) of {channel.decode()} still "
                            "counted as subscribed at the end")
    return problems


def cpu_seconds(soak: Soak) -> Dict[str, float]:
    """CPU seconds used so far by the proxy (the supervisor and its workers; their pids keep
    them across upgrades; a bridge's own share is not included), redis-server and this
    process."""
    used: Dict[str, float] = {}
    for name, pid in (("proxy", soak.proxy.pid), ("redis-server", soak.redis_pid)):
        try:
            used[name] = tree_cpu_seconds(pid) if name == "proxy" else sum(proc_cpu_seconds(pid))
        except (OSError, ValueError, IndexError):
            pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    used["soak clients"] = own.ru_utime + own.ru_stime
    return used


def cpu_use(soak: Soak) -> Dict[str, float]:
    now = cpu_seconds(soak)
    seconds = soak.elapsed()
    return {name: 100 * (now[name] - soak.cpu_at_start[name]) / seconds
            for name in now if name in soak.cpu_at_start and seconds > 0}


def print_summary(soak: Soak, clients: List[Any], checks: List[str], minutes: float,
                  load_before: Dict[str, Any]) -> bool:
    print()
    print(f"SUMMARY after {soak.elapsed():.1f} s ({minutes:g} min asked"
          + (", interrupted" if soak.interrupted else "") + ")")
    rows = []
    for kind in WELL_BEHAVED:
        stats = soak.stats[kind]
        if not stats.clients:
            continue
        histogram = stats.latency
        rows.append([kind, stats.clients, f"{stats.requests:,}", stats.errors, stats.disconnects,
                     stats.reconnects, ms(histogram.percentile(50)), ms(histogram.percentile(99)),
                     ms(histogram.percentile(99.9)), ms(histogram.max if histogram.total else None)])
    print(format_table(["kind", "clients", "requests", "errors", "disconnects", "reconnects",
                        "p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows,
                       right=[False] + [True] * 9))
    print("(requests: commands whose replies were checked; a subscriber's are messages received. "
          "latency: a pipeliner's\n per pipeline (to its last reply); a subscriber's from PUBLISH "
          "to the message; a blocking worker's from the\n push to the value; a slow reader's per "
          "pipeline, mostly its own slow reading)")
    print("each kind's largest latency, by when its request was sent:")
    for kind in LATENCY_KINDS:
        stats = soak.stats[kind]
        if stats.latency.total:
            print(f"  {kind} {ms(stats.latency.max)} ms at {soak.elapsed(stats.worst_sent_at):.1f} s, "
                  f"{soak.upgrade_context(stats.worst_sent_at)}")
    for kind in WELL_BEHAVED:
        for what, count in sorted(soak.stats[kind].reasons.items()):
            print(f"  {kind}: {count} x {what}")
    garbage = soak.garbage
    if soak.options.garbage:
        print(f"garbage ({soak.options.garbage} clients, not checked): {garbage.connections:,} "
              f"connections, {garbage.messages:,} messages, {garbage.bytes_received:,} bytes back, "
              f"{garbage.closed_by_proxy:,} closed by the proxy, {garbage.resets:,} reset, "
              f"{garbage.connect_failures} connect failures")
    print()
    done = [u for u in soak.upgrades if u.ended is not None]
    failed = [u for u in done if not u.ok]
    blackouts = sorted(u.blackout_ms for u in done if u.blackout_ms is not None)
    durations = sorted((u.ended - u.started) for u in done if u.ended is not None)
    kept = [u.kept for u in done if u.kept is not None]
    if done:
        print(f"upgrades: {len(done)} done, {len(done) - len(failed)} ok, {len(failed)} failed; "
              f"blackout median {blackouts[len(blackouts) // 2] if blackouts else '-'} ms, max "
              f"{blackouts[-1] if blackouts else '-'} ms; CLI median "
              f"{durations[len(durations) // 2] * 1000:.0f} ms, max {durations[-1] * 1000:.0f} ms; "
              f"connections kept {min(kept) if kept else '-'}..{max(kept) if kept else '-'}")
        for record in failed:
            print(f"  upgrade {record.number} at {soak.elapsed(record.started):.1f} s: "
                  f"{record.problem}")
    else:
        print("upgrades: none done")
    if soak.resources:
        first, last = soak.resources[0], soak.resources[-1]
        top_rss = max(sample.rss_kib for sample in soak.resources)
        top_fds = max(sample.fds for sample in soak.resources)
        print(f"proxy under load: RSS {first.rss_kib / 1024:.1f} MiB at {first.elapsed:.0f} s, "
              f"{last.rss_kib / 1024:.1f} MiB at {last.elapsed:.0f} s (max {top_rss / 1024:.1f}); "
              f"open fds {first.fds} at {first.elapsed:.0f} s, {last.fds} at "
              f"{last.elapsed:.0f} s (max {top_fds})")
    if soak.final_resources is not None:
        print(f"proxy once the clients had finished: RSS "
              f"{soak.final_resources.rss_kib / 1024:.1f} MiB, open fds {soak.final_resources.fds}")
    cpu = cpu_use(soak)
    if cpu:
        print("CPU over the run (share of one core): " + ", ".join(
            f"{name} {percent:.0f}%" for name, percent in cpu.items()))
    print("final checks against Redis: " + ("all consistent" if not checks else
                                            f"{len(checks)} problem(s)"))
    for problem in checks[:30]:
        print("  " + problem)
    print(describe_load(load_before, machine_load()))
    errors = sum(soak.stats[kind].errors for kind in WELL_BEHAVED)
    disconnects = sum(soak.stats[kind].disconnects for kind in WELL_BEHAVED)
    for note in soak.notes:
        print("note: " + note)
    for problem in soak.problems:
        print("PROBLEM: " + problem)
    clean = not errors and not disconnects and not failed and not checks and not soak.problems
    print_failures(soak)
    print()
    print(f"RESULT: {'PASS' if clean else 'FAIL'}: {errors} errors, {disconnects} disconnects "
          f"of well-behaved clients, {len(failed)} failed upgrade(s) of {len(done)}, "
          f"{len(checks)} final-check problem(s)"
          + (f", {len(soak.problems)} other problem(s)" if soak.problems else ""))
    return clean


# ---- the run ------------------------------------------------------------------------------------


def start_clients(soak: Soak) -> List[Any]:
    options = soak.options
    counts = {PIPELINE: options.pipeliners, PACED: options.paced,
              PUBLISHER: 1 if options.subscribers else 0, SUBSCRIBER: options.subscribers,
              BLOCKING: options.blocking, TRANSACTION: options.transactions,
              SLOW: options.slow_readers, GARBAGE: options.garbage}
    soak.stats = {kind: KindStats(counts[kind]) for kind in KINDS}
    soak.channels = [b"soak:channel:%d" % n for n in range(options.channels)]
    soak.subscribed = [0] * options.channels
    soak.published = [0] * options.channels
    soak.publishing_done = not options.subscribers
    soak.feeder = Feeder(soak)
    classes = {PIPELINE: Pipeliner, PACED: PacedClient, PUBLISHER: Publisher,
               SUBSCRIBER: Subscriber, BLOCKING: BlockingWorker, TRANSACTION: TransactionClient,
               SLOW: SlowReader, GARBAGE: GarbageClient}
    return [classes[kind](soak, index) for kind in KINDS for index in range(counts[kind])]


def install_signal_handlers(soak: Soak) -> Dict[int, Any]:
    """Ctrl-C and SIGTERM end the run the normal way (summary included); a second one stops at
    once. A handler may run inside any greenlet: it only sets flags, or has the hub throw
    KeyboardInterrupt into the main greenlet."""
    main_greenlet = getcurrent()

    def handler(signum, frame) -> None:
        if soak.interrupted:
            gevent.get_hub().loop.run_callback(main_greenlet.throw, KeyboardInterrupt())
            return
        soak.interrupted = signum
        soak.stopping = True

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def wind_down(soak: Soak, upgrader_greenlet: gevent.Greenlet, greenlets: List[Tuple[Any, Any]],
              upgrader: Upgrader) -> None:
    """Stop starting anything new, let every client finish what it is in the middle of (bounded),
    then stop whatever is left."""
    soak.stopping = True
    for client, _greenlet in greenlets:
        if isinstance(client, SlowReader) and client.reader is not None:
            client.reader.pause = 0.0  # the rest of its pipeline at full speed
    upgrader_greenlet.join(timeout=soak.options.upgrade_timeout + 40)
    if not upgrader_greenlet.dead:
        upgrader.stop()
        upgrader_greenlet.kill(block=True, timeout=5)
    checked = [(client, greenlet) for client, greenlet in greenlets
               if not isinstance(client, GarbageClient)]
    gevent.joinall([greenlet for _client, greenlet in checked],
                   timeout=soak.options.request_timeout + 5)
    for client, greenlet in checked:
        if not greenlet.dead:
            client.failed("did not finish at the end",
                          f"still {client.doing or 'busy'} {soak.options.request_timeout + 5:g} s "
                          "after the run stopped")
            client.counter = None
    gevent.killall([greenlet for _client, greenlet in greenlets], block=True, timeout=5)
    for client, greenlet in greenlets:
        if isinstance(client, Client):
            client.close()
        if greenlet.exception is not None and not isinstance(greenlet.exception,
                                                             gevent.GreenletExit):
            soak.problems.append(f"{client.name} crashed (a bug of the soak itself): "
                                 f"{greenlet.exception!r}")


def run_soak(stack: Stack, options: argparse.Namespace) -> int:
    load_before = machine_load()
    total = client_total(options)
    redis = stack.start_redis(max_clients=total + 1000, extra_args=[
        argument for name in DANGEROUS_COMMANDS for argument in ("--rename-command", name, "")])
    proxy = stack.start_proxy("passthrough", redis.port, connection_limit=total + 1000,
                              workers=options.workers)
    soak = Soak(options, proxy.port, redis.port, proxy, redis.pid)
    clients = start_clients(soak)
    stack.say(f"{total} client connections: " + ", ".join(
        f"{soak.stats[kind].clients} {kind}" for kind in KINDS if soak.stats[kind].clients)
        + f"; an upgrade {options.upgrade_every:g} s after the previous one; "
          f"{options.minutes:g} min")
    previous_handlers = install_signal_handlers(soak)
    upgrader = Upgrader(soak)
    greenlets: List[Tuple[Any, Any]] = []
    try:
        soak.started = time.monotonic()
        soak.cpu_at_start = cpu_seconds(soak)
        greenlets = [(client, gevent.spawn(client.run)) for client in clients]
        upgrader_greenlet = gevent.spawn(upgrader.run) if options.upgrade_every > 0 \
            else gevent.spawn(lambda: None)
        reporter = Reporter(soak)
        reporter_greenlet = gevent.spawn(reporter.run)
        deadline = soak.started + options.minutes * 60
        while not soak.stopping and time.monotonic() < deadline:
            gevent.sleep(0.2)
            if not proxy.running:
                soak.problems.append(f"the proxy exited with status {proxy.process.returncode} "
                                     f"at {soak.elapsed():.1f} s")
                print(f"[{soak.elapsed():7.1f} s] the proxy exited with status "
                      f"{proxy.process.returncode}", flush=True)
                break
        reason = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(soak.interrupted)
        if reason:
            print(f"[{soak.elapsed():7.1f} s] {reason}: finishing what is in flight "
                  "(again to stop at once)", flush=True)
        wind_down(soak, upgrader_greenlet, greenlets, upgrader)
        reporter_greenlet.kill(block=True, timeout=5)
        settle_proxy(soak)
        print(reporter.line(final=True), flush=True)
        assert soak.feeder is not None
        soak.feeder.close()
        try:
            checks = final_checks(soak, clients)
        except BenchError as error:
            checks = [f"could not check: {error}"]
        clean = print_summary(soak, clients, checks, options.minutes, load_before)
    finally:
        upgrader.stop()
        gevent.killall([greenlet for _client, greenlet in greenlets], block=True, timeout=5)
        for client, _greenlet in greenlets:
            if isinstance(client, Client):
                client.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    if not clean:
        stack.keep = True  # the logs stay for a closer look; their directory is printed
    if soak.interrupted:
        return 128 + soak.interrupted
    return 0 if clean else 1


def settle_proxy(soak: Soak, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy counts no client connection, so that the resources sampled
    next are those of an idle proxy; note it if it never gets there."""
    deadline = time.monotonic() + timeout
    connections = -1
    while soak.proxy.running and time.monotonic() < deadline:
        try:
            connections = soak.proxy.connections()
        except BenchError:
            connections = -1
        if connections == 0:
            return
        gevent.sleep(0.1)
    soak.notes.append(f"the proxy still counted {connections} client connection(s) {timeout:g} s "
                      "after every client had closed its own")


def client_total(options: argparse.Namespace) -> int:
    return (options.pipeliners + options.paced + options.subscribers
            + (1 if options.subscribers else 0) + options.blocking + options.transactions
            + options.slow_readers + options.garbage)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long the clients run (default 10)")
    parser.add_argument("--upgrade-every", type=float, default=5.0, metavar="SECONDS",
                        help="seconds from the end of one upgrade to the start of the next "
                             "(default 5; 0: no upgrades)")
    parser.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between two progress lines (default 10)")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (default 1)")
    parser.add_argument("--pipeliners", type=int, default=20, help="default 20")
    parser.add_argument("--paced", type=int, default=100, help="default 100")
    parser.add_argument("--subscribers", type=int, default=30,
                        help="default 30 (plus one publisher when above 0)")
    parser.add_argument("--channels", type=int, default=5,
                        help="channels the subscribers are spread over (default 5)")
    parser.add_argument("--blocking", type=int, default=20, help="blocking workers (default 20)")
    parser.add_argument("--transactions", type=int, default=15, help="default 15")
    parser.add_argument("--slow-readers", type=int, default=5, help="default 5")
    parser.add_argument("--garbage", type=int, default=10, help="default 10")
    parser.add_argument("--slow-gets", type=int, default=600,
                        help="GETs of the 10 KB value in a slow reader's pipeline (default 600: "
                             "6 MB, more than the kernel's socket buffers hold, so that the "
                             "proxy itself holds replies not yet written when it upgrades)")
    parser.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                        help="a paced client's request, a blocking worker's push and a "
                             "transaction each come once per interval (default 0.5)")
    parser.add_argument("--pipeline-every", type=float, default=0.25, metavar="SECONDS",
                        help="a pipeliner's pipelines start this often (default 0.25)")
    parser.add_argument("--publish-every", type=float, default=0.1, metavar="SECONDS",
                        help="the publisher publishes on every channel this often (default 0.1)")
    parser.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="a reply (or a pushed value, or a message) missing this long is an "
                             "error (default 10)")
    parser.add_argument("--upgrade-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="--timeout given to the upgrade command (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="seeds every client's randomness")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with configs and logs (kept anyway "
                             "when something failed)")
    options = parser.parse_args(argv)
    counts = [options.pipeliners, options.paced, options.subscribers, options.blocking,
              options.transactions, options.slow_readers, options.garbage]
    if any(count < 0 for count in counts) or client_total(options) > 5000:
        parser.error("client counts must be at least 0 and add up to at most 5000")
    if not 0 < options.minutes <= 24 * 60:
        parser.error("--minutes must be above 0 and at most 1440")
    if options.subscribers and options.channels < 1:
        parser.error("--channels must be at least 1")
    if not 0 <= options.upgrade_every <= 3600 or not 0.5 <= options.report_every <= 3600:
        parser.error("--upgrade-every must be 0..3600, --report-every 0.5..3600")
    if min(options.interval, options.pipeline_every, options.publish_every) < 0.001 \
            or max(options.interval, options.pipeline_every, options.publish_every) > 60:
        parser.error("--interval, --pipeline-every and --publish-every must be 0.001..60")
    if not 1 <= options.slow_gets <= 10000:
        parser.error("--slow-gets must be 1..10000")
    if not 0.5 <= options.request_timeout <= 600 or not 1 <= options.upgrade_timeout <= 3600:
        parser.error("--request-timeout must be 0.5..600, --upgrade-timeout 1..3600")
    return options


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_args(argv)
    raise_nofile()
    try:
        with Stack(keep=options.keep_logs) as stack:
            return run_soak(stack, options)
    except BenchError as error:
        sys.stderr.write(f"soak: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: every process this soak started was stopped\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
