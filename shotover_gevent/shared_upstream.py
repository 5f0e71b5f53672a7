"""Upstream connections shared by many clients (RedisSinkSingle's `shared_connections`).

A client whose session is the default one (database 0, RESP2, no credentials, no name, replies
on, no transaction, no subscription) and whose batch holds only commands that neither change
nor depend on the connection can have its requests carried on a connection that other such
clients use too. Every batch queued during one turn of the event loop goes out in one write,
and the server's replies come back in one read: one upstream `send`/`recv` (and one wake-up of
the server) for many clients instead of one each.

Replies come in the order the requests were written, so each client takes as many frames as it
sent requests, in the order the batches were queued. That is all the accounting a shared
connection needs: on a connection in the default state every request outside TRACKED_COMMANDS
is answered by exactly one frame and changes nothing (protocol/state.py).

Reading and writing run in the event loop's own callbacks (no greenlet of their own): a read
splits the replies and switches to each waiting client's greenlet in turn, which writes its
replies and reads its next requests before the next client's turn.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
import sys
from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

from gevent import get_hub, getcurrent
from gevent.hub import Waiter
from gevent.lock import Semaphore

from .message import REPLICATION_COMMANDS
from .netio import SERVER_RECV_BUFFER, SERVER_RECV_VIEW, close_for_good
from .protocol import resp
from .protocol.state import BLOCKING_COMMANDS, TRACKED_COMMANDS
from .upstream import OVER_OUTPUT_LIMIT, UpstreamError, _fmt, _reason, connect

log = logging.getLogger(__name__)

#: Commands a shared connection never carries: those that change the connection or are
#: counted otherwise (TRACKED_COMMANDS, CLIENT included), those that may block it for every
#: client on it, the replication protocol's (refused, see message.py), and ASKING (it applies
#: to the connection's next command). A client that sends one gets a connection of its own
#: from then on.
UNSHAREABLE = TRACKED_COMMANDS | BLOCKING_COMMANDS | REPLICATION_COMMANDS | {"ASKING"}

#: A client that sends a request, or gets a reply frame, larger than this gets a connection of
#: its own from then on: large values would hold up the other clients' replies behind them,
#: and one request over a limit of the server's (proto-max-bulk-len, 1 MiB at the least) would
#: make it close the connection under every client on it.
LARGE_MESSAGE = 64 * 1024

#: take() everything there is.
_EVERY_FRAME = sys.maxsize

_READ = 1
_WRITE = 2


class _Waiting:
    """A batch whose replies are owed: who waits for them (None: nobody any more, its frames
    are dropped as they come), how many are still to come or kept, those kept so far, and how
    many bytes they may take (None: no limit)."""

    __slots__ = ("waiter", "count", "frames", "budget")

    def __init__(self, waiter, count: int, budget: Optional[int]) -> None:
        self.waiter = waiter
        self.count = count
        self.frames: List[bytes] = []
        self.budget = budget


class SharedConnection:
    """One connection to the server carrying the batches of many clients, in order."""

    def __init__(self, address, connect_timeout: float, request_timeout: Optional[float],
                 label: str = "upstream", greeting: bytes = b"") -> None:
        self.address = address
        #: How errors name the server ("upstream", "cluster node").
        self.label = label
        self.request_timeout = request_timeout
        self.closed = False
        self.failure = ""
        try:
            sock = connect(address, connect_timeout)
        except (OSError, stdlib_socket.timeout) as error:
            raise UpstreamError(f"{label} {_fmt(address)} unavailable: {_reason(error)}") \
                from None
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.sock = sock
        self._raw = sock._sock  # the plain, non-blocking socket under gevent's wrapper
        self._hub = hub = get_hub()
        self._loop = loop = hub.loop
        self._framer = resp.ReplyFramer()
        self._waiting: Deque[_Waiting] = deque()
        #: Batches queued in this turn of the loop, written together by _flush.
        self._out: List[bytes] = []
        self._flush_scheduled = False
        #: What a write left unsent (the rest goes when the socket has room).
        self._unsent: Optional[memoryview] = None
        #: When the server last sent something, or the first batch of a wait was queued.
        self._progress = loop.now()
        fd = sock.fileno()
        # Always read: a server that closes an idle shared connection is noticed at once.
        self._reader = loop.io(fd, _READ)
        self._reader.start(self._readable)
        self._writer = loop.io(fd, _WRITE)
        self._timer = None
        if greeting:
            # Sent before anything else, its one reply dropped (HELLO 3, say).
            self.submit(greeting, 1, None, None)
        if request_timeout:
            interval = min(1.0, request_timeout / 2)
            self._timer = loop.timer(interval, interval)
            self._timer.ref = False
            self._timer.start(self._check_timeout)

    # ---- the clients' side ------------------------------------------------------------------

    def call(self, payload: bytes, count: int, budget: Optional[int] = None
             ) -> Tuple[List[bytes], Optional[str]]:
        """Queue a batch of `count` requests (their bytes, `payload`) and wait for its replies:
        (frames, None), or (the frames that came, why the rest never will). `budget`: the
        bytes the replies may take; past it the caller gets what came within it and
        OVER_OUTPUT_LIMIT, and the rest of its replies are read and dropped."""
        if self.closed:
            return [], self.failure
        entry = self.submit(payload, count, budget, Waiter(self._hub))
        try:
            return entry.waiter.get()
        except BaseException:
            # The client's greenlet was killed (it left, the proxy stops): its replies are
            # read and dropped when they come, so the next batch's stay in step.
            entry.waiter = None
            entry.count -= len(entry.frames)
            entry.frames = []
            raise

    def submit(self, payload: bytes, count: int, budget: Optional[int], waiter) -> _Waiting:
        """Queue a batch (see call) without waiting: `waiter.switch((frames, failure))` is
        called from the event loop once its replies are read, or the connection is given up.
        The connection must be open."""
        waiting = self._waiting
        if not waiting:
            self._progress = self._loop.now()
        entry = _Waiting(waiter, count, budget)
        waiting.append(entry)
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.run_callback(self._flush)
        return entry

    def owes_last(self, waiter) -> bool:
        """Whether the batch queued last on this open connection, still owed replies, is the
        one `waiter` waits for: extend() may add to it."""
        waiting = self._waiting
        return not self.closed and bool(waiting) and waiting[-1].waiter is waiter

    def extend(self, waiter, payload: bytes, count: int) -> bool:
        """Add `count` requests (their bytes, `payload`) to the batch queued last if owes_last()
        holds for `waiter`: its waiter takes their replies too, with the rest of its own.
        False: nothing was added."""
        if not self.owes_last(waiter):
            return False
        self._waiting[-1].count += count
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.run_callback(self._flush)
        return True

    # ---- the event loop's side --------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if self.closed or not out or self._unsent is not None:
            return  # a write under way takes what was queued when it is done
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._write(data)

    def _write(self, data) -> None:
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._fail(f"{self.label} {_fmt(self.address)} write failed: {_reason(error)}")
            return
        if sent < len(data):
            self._unsent = memoryview(data)[sent:]
            if not self._writer.active:
                self._writer.start(self._writable)
        elif self._unsent is not None:
            self._unsent = None
            self._writer.stop()

    def _writable(self) -> None:
        unsent = self._unsent
        if unsent is None or self.closed:
            self._writer.stop()
            return
        out = self._out
        if out:
            data = b"".join([bytes(unsent)] + out)
            out.clear()
        else:
            data = unsent
        self._unsent = None
        self._write(data)
        if self._unsent is None:
            self._writer.stop()

    def _readable(self) -> None:
        try:
            received = self._raw.recv_into(SERVER_RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fail(f"{self.label} {_fmt(self.address)} read failed: {_reason(error)}")
            return
        if not received:
            self._fail(f"{self.label} {_fmt(self.address)} closed the connection")
            return
        self._progress = self._loop.now()
        framer = self._framer
        waiting = self._waiting
        # (waiter, frames, failure) of the batches this read settles, answered after it.
        settled: List[tuple] = []
        try:
            # Every whole frame that came, in one step (more than the batches waiting are owed
            # is invalid, as below).
            frames = framer.take_fed(SERVER_RECV_VIEW[:received], _EVERY_FRAME)
            first = 0
            available = len(frames)
            while waiting:
                entry = waiting[0]
                count = entry.count
                if not entry.frames and entry.waiter is not None and first + count <= available:
                    # The usual case: every reply of the batch came in this read, within its
                    # budget (the same outcome as below, in fewer steps).
                    taken = frames[first:first + count]
                    budget = entry.budget
                    if budget is None or sum(map(len, taken)) <= budget:
                        first += count
                        waiting.popleft()
                        settled.append((entry.waiter, taken, None))
                        continue
                missing = count - len(entry.frames)
                if missing:
                    taken = frames[first:first + missing]
                    first += len(taken)
                    if entry.waiter is None:
                        entry.count -= len(taken)  # nobody waits for them: dropped
                    else:
                        entry.frames += taken
                        if entry.budget is not None and taken:
                            entry.budget -= sum(map(len, taken))
                    if entry.waiter is not None and entry.budget is not None and (
                            entry.budget < 0 or (len(entry.frames) < entry.count
                                                 and framer.pending() > entry.budget)):
                        # Past the client's output limit: it gets what came, the rest is
                        # dropped as it comes rather than held.
                        settled.append((entry.waiter, entry.frames, OVER_OUTPUT_LIMIT))
                        entry.waiter = None
                        entry.count -= len(entry.frames)
                        entry.frames = []
                    if len(entry.frames) < entry.count:
                        break
                waiting.popleft()
                if entry.waiter is not None:
                    settled.append((entry.waiter, entry.frames, None))
            if not waiting and (first < len(frames) or framer.pending()):
                raise resp.ProtocolError("a frame that answers no request")
            if framer.pending():
                framer.next_frame()  # what stopped the framing: a frame on its way, or invalid
        except resp.ProtocolError as error:
            self._fail(f"{self.label} {_fmt(self.address)} sent invalid RESP: {error}", settled)
            return
        for waiter, frames, failure in settled:
            waiter.switch((frames, failure))

    def _check_timeout(self) -> None:
        if self._waiting and not self.closed and \
                self._loop.now() - self._progress > self.request_timeout:
            # After the proxy itself stalled, this timer may run before the read of what the
            # server sent meanwhile: read first.
            self._readable()
        if self._waiting and not self.closed and \
                self._loop.now() - self._progress > self.request_timeout:
            self._fail(f"{self.label} {_fmt(self.address)} did not answer within "
                       f"{self.request_timeout * 1000:.0f} ms (request_timeout_ms)")

    def _fail(self, reason: str, settled: Sequence[tuple] = ()) -> None:
        """Give the connection up: every batch still owed replies gets `reason` (and the
        frames that came for it); the `settled` ones (see _readable) get theirs first."""
        if self.closed:
            return
        self.closed = True
        self.failure = reason
        log.warning("shared connection to %s: %s", _fmt(self.address), reason)
        self._stop()
        owed = [(entry.waiter, entry.frames, reason) for entry in self._waiting
                if entry.waiter is not None]
        self._waiting.clear()
        self._out.clear()
        self._unsent = None
        for waiter, frames, failure in list(settled) + owed:
            waiter.switch((frames, failure))

    def _stop(self) -> None:
        self._reader.stop()
        self._writer.stop()
        if self._timer is not None:
            self._timer.stop()
        close_for_good(self.sock)

    def close(self) -> None:
        """Close for good (the proxy stops). Batches still owed replies are answered with an
        error from the event loop."""
        if self.closed:
            return
        if self._waiting and getcurrent() is not self._hub:
            self._loop.run_callback(self._fail, "the proxy closed the shared connection")
            return
        self._fail("the proxy closed the shared connection")


class SharedConnections:
    """A sink's shared connections in this process: clients are spread over them in turn, and
    each is opened when first needed and again after it was lost."""

    def __init__(self, address, connect_timeout: float, request_timeout: Optional[float],
                 count: int, label: str = "upstream", greeting: bytes = b"") -> None:
        self.address = address
        self.label = label
        self.greeting = greeting
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._slots: List[Optional[SharedConnection]] = [None] * count
        self._opening = [Semaphore() for _ in range(count)]
        #: Per slot, the last failed attempt to open it: (when it ended, its error).
        self._failed: List[Optional[Tuple[float, UpstreamError]]] = [None] * count
        self._next = 0

    def assign(self) -> int:
        """The slot of a new client."""
        index = self._next
        self._next = (index + 1) % len(self._slots)
        return index

    def ready(self, index: int) -> Optional[SharedConnection]:
        """The slot's connection if it is open (None: it would have to be opened first)."""
        connection = self._slots[index]
        return connection if connection is not None and not connection.closed else None

    def get(self, index: int) -> SharedConnection:
        """The slot's connection, opened if need be (UpstreamError if it cannot be)."""
        connection = self._slots[index]
        if connection is not None and not connection.closed:
            return connection
        asked = get_hub().loop.now()
        with self._opening[index]:
            connection = self._slots[index]
            if connection is None or connection.closed:
                failed = self._failed[index]
                if failed is not None and failed[0] >= asked:
                    # An attempt made while this one waited has just failed: every client
                    # that waited for it gets its answer, rather than one attempt each in
                    # turn (the thousandth client would wait a thousand connect timeouts).
                    raise failed[1]
                try:
                    connection = SharedConnection(self.address, self.connect_timeout,
                                                  self.request_timeout, self.label,
                                                  self.greeting)
                except UpstreamError as error:
                    log.warning("shared connection %d to %s could not be opened: %s",
                                index + 1, _fmt(self.address), error)
                    self._failed[index] = (get_hub().loop.now(), error)
                    raise
                self._slots[index] = connection
        return connection

    def close(self) -> None:
        for index, connection in enumerate(self._slots):
            if connection is not None:
                connection.close()
            self._slots[index] = None
