"""Socket helpers shared by the client side and the server side of the proxy."""

import errno
import itertools
import os
import socket as stdlib_socket
import struct
from time import time_ns
from typing import Optional

from gevent import Timeout, getcurrent, socket
from greenlet import greenlet as greenlet_type


def send_all(sock, payload: bytes) -> None:
    """Write everything; one send() in the common case. (gevent's sendall() asks the kernel for
    the socket's buffer size on every call: a system call per write that this skips.)"""
    sent = sock.send(payload)
    if sent < len(payload):
        sock.sendall(memoryview(payload)[sent:])


def let_go(sock) -> None:
    """Close a gevent socket whose connection another process now owns (an upgrade's old side
    after the new image adopted it): nothing said to the peer, and no greenlet of this process
    is woken by it again - its watchers stop now (gevent itself would close the fd only at the
    next turn of the loop, when a waiting greenlet could still read bytes that are not ours)."""
    for name in ("_read_event", "_write_event"):
        watcher = getattr(sock, name, None)
        if watcher is not None:
            watcher.stop()
    try:
        sock.close()
    except OSError:
        pass


def close_for_good(sock) -> None:
    """Close a connection so that its peer sees it end now, even while another process still
    holds a copy of the socket (during an upgrade the next image inherits every socket until it
    has adopted what it needs): a blocked command on the server must not outlive its client."""
    try:
        sock.shutdown(stdlib_socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more
    try:
        sock.close()
    except OSError:
        pass


# ---- reading in arrival order -------------------------------------------------------------------
#
# The event loop does not run the connections that became readable in the order their bytes
# arrived: libev runs the watchers of one turn newest first, its lazy epoll bookkeeping does not
# keep the kernel's order either, and a connection that finds bytes at once (its greenlet was
# running) would read them before an older arrival still waiting for the next poll. Two
# clients sending together would then be served second-sender first: the second RPUSH landing
# first, the second BLPOP served first. So a client connection reads with the kernel's arrival
# timestamp (SO_TIMESTAMPNS) and goes on at once only when nothing older can be waiting: no
# other watcher pending in this turn, nobody waiting for its turn, and (when it did not have to
# wait) bytes that arrived before the last poll. Otherwise it waits for its turn: after the
# turn's watchers have run (a check watcher of the lowest priority), the waiting connections go
# on oldest bytes first. The bytes are in the connection's framer meanwhile (an upgrade's
# snapshot sees them).

_TIMESTAMP_SPACE = stdlib_socket.CMSG_SPACE(16)
_SCM_TIMESTAMPNS = getattr(stdlib_socket, "SCM_TIMESTAMPNS", 35)
_SO_TIMESTAMPNS = getattr(stdlib_socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


def stamp_arrivals(sock) -> None:
    """Have the kernel stamp what arrives on `sock` with its arrival time."""
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        pass


class ArrivalOrder:
    """The turn-taking of the client connections of one event loop (see above)."""

    def __init__(self, hub) -> None:
        self.hub = hub
        self.loop = hub.loop
        # (arrival ns, sequence, greenlet, the loop iteration from which it may go on)
        self.waiting: list = []
        #: The latest loop iteration from which an entry of `waiting` may go on.
        self.latest = 0
        self._sequence = itertools.count()
        self._turn = self.loop.check()
        self._turn.priority = self.loop.MINPRI
        self._turn.ref = False
        self._turn.start(self._take_turns)
        # Keeps the loop from blocking in its poll while someone waits for the next turn.
        self._spin = self.loop.idle()
        self._spin.ref = False

    def recv(self, sock, size: int, wait_first: bool = False, readable=None):
        """(bytes, their arrival time in ns or 0, whether it had to wait for them, whether the
        next call should wait first) from a plain (non-TLS) gevent socket; then call
        my_turn() before acting on them. `readable`: the socket's Readable, if it has one
        (else gevent's own wait).

        `wait_first`: wait until the socket is readable before reading (what the last call
        advised): a client that sends its next request only once it has the last reply is not
        asked for bytes that cannot be there yet (a system call and an exception per
        request). The advice follows the client: wait first again when the bytes came after
        the wait began, read at once next time when they were there already."""
        raw = sock._sock
        wait = readable.wait if readable is not None else _gevent_wait(sock)
        if wait_first:
            began = time_ns()
            wait()
            data, stamp = _read_after_wait(raw, size, wait)
            return data, stamp, True, stamp > began
        try:
            data, stamp = recv_stamped(raw.fileno(), size)
            waited = False
        except BlockingIOError:
            wait()
            data, stamp = _read_after_wait(raw, size, wait)
            waited = True
        return data, stamp, waited, waited

    def my_turn(self, stamp: int, waited: bool) -> None:
        """Wait, if an older arrival may not have been served yet."""
        loop = self.loop
        if not self.waiting and not loop.pendingcnt and (
                waited or stamp <= int(loop.now() * 1e9)):
            return
        # Woken by this turn's poll: after this turn's watchers; found at once: after the
        # next poll, which reports what arrived meanwhile.
        self.queue(stamp, getcurrent(), loop.iteration if waited else loop.iteration + 1)
        if not waited and not self._spin.active:
            self._spin.start(_nothing)
        self.hub.switch()

    def queue(self, stamp: int, resume, start: Optional[int] = None) -> None:
        """Wait for the turn of bytes that arrived at `stamp`: `resume` (a greenlet, switched
        to, or a callable, called) goes on from loop iteration `start` (default: this one,
        for bytes read in an event loop callback woken by this turn's poll) once every older
        arrival has gone. For a callback, only when others wait or the loop has callbacks
        pending (`waiting` or `loop.pendingcnt`); else the bytes may be acted on at once."""
        if start is None:
            start = self.loop.iteration
        self.waiting.append((stamp, next(self._sequence), resume, start))
        if start > self.latest:
            self.latest = start

    def _take_turns(self) -> None:
        waiting = self.waiting
        if not waiting:
            return
        iteration = self.loop.iteration
        if self.latest <= iteration:  # every one's turn may come now (the usual case)
            due = waiting
            self.waiting = []
        else:
            due = [entry for entry in waiting if entry[3] <= iteration]
            if not due:
                return
            self.waiting = [entry for entry in waiting if entry[3] > iteration]
        if not self.waiting and self._spin.active:
            self._spin.stop()
        due.sort()
        for _stamp, _sequence, waiter, _start in due:
            if not isinstance(waiter, greenlet_type):
                waiter()  # a callback's turn (queue)
            elif not waiter.dead:
                waiter.switch()


def _nothing() -> None:
    pass


def recv_stamped_py(fd: int, size: int):
    """(bytes, arrival time in ns or 0) from a plain non-blocking socket's descriptor
    (BlockingIOError when there is nothing to read): `recv_stamped`, in C when the extension
    is built (one call, no buffer of `size` bytes allocated per read)."""
    if fd < 0:  # a closed socket's fileno()
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    sock = stdlib_socket.socket(fileno=fd)
    try:
        data, ancillary, _flags, _address = sock.recvmsg(size, _TIMESTAMP_SPACE)
    finally:
        sock.detach()
    return data, _arrival(ancillary)


def relay_py(src: int, _dst: int, _count: int, _max_bulk: int, _most: int):
    """`relay` without the C extension: one read from the descriptor `src`, never sent on
    (None: nothing to read; b"": the end of the stream, or a failed read)."""
    try:
        return os.read(src, SERVER_RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


try:
    from .protocol._scan import recv_stamped, relay
except ImportError:  # the C extension is not built
    recv_stamped = recv_stamped_py
    relay = relay_py


def _gevent_wait(sock):
    return lambda: sock._wait(sock._read_event)


def _read_after_wait(raw, size: int, wait):
    """(data, arrival) of a read after a wait; should the socket have nothing after all
    (another reader, a spurious wake-up), wait again."""
    while True:
        try:
            return recv_stamped(raw.fileno(), size)
        except BlockingIOError:
            wait()


class Readable:
    """Waits for a plain client socket to be readable, with the socket's read watcher left
    started from one wait to the next.

    gevent starts the watcher for each wait and stops it after; libev applies a stop lazily,
    and the start that follows costs an epoll_ctl() system call: one per request of a client
    that waits for each reply. Left started, the watcher costs nothing while the client waits
    for its reply. Should it fire while nobody waits (bytes arrived while the connection
    serves a batch), it stops, so that the loop does not spin on them, and the next wait
    starts it again. Only this connection's greenlet waits here, never on the socket itself
    while the watcher is ours. While a lane serves the connection (attach), the watcher calls
    it directly."""

    __slots__ = ("sock", "greenlet", "lane")

    def __init__(self, sock) -> None:
        self.sock = sock
        self.greenlet = None
        #: Called when the socket is readable and no greenlet waits (None: nothing, the
        #: watcher stops).
        self.lane = None

    def wait(self) -> None:
        """Until the socket is readable, or its timeout (socket.timeout) passes."""
        sock = self.sock
        watcher = sock._read_event
        if not watcher.active:
            watcher.start(self._fired)
        self.greenlet = getcurrent()
        timeout = sock.timeout
        try:
            if timeout is None:
                sock.hub.switch()
            else:
                with Timeout(timeout, stdlib_socket.timeout("timed out")):
                    sock.hub.switch()
        finally:
            self.greenlet = None

    def _fired(self) -> None:
        greenlet = self.greenlet
        if greenlet is None:
            if self.lane is not None:
                self.lane()
            else:
                self.sock._read_event.stop()
            return
        self.greenlet = None
        greenlet.switch()

    def attach(self, lane) -> None:
        """From now on the watcher calls `lane()` directly (no greenlet waits here meanwhile),
        until detach()."""
        self.lane = lane
        watcher = self.sock._read_event
        if watcher.active:
            watcher.callback = lane
        else:
            watcher.start(lane)

    def detach(self) -> None:
        """The watcher wakes the greenlet that waits again (see attach)."""
        if self.lane is None:
            return
        self.lane = None
        watcher = self.sock._read_event
        if watcher is not None and watcher.active:
            watcher.callback = self._fired

    def watch(self) -> None:
        """Start the watcher (for the lane) if it is not."""
        watcher = self.sock._read_event
        if not watcher.active:
            watcher.start(self.lane if self.lane is not None else self._fired)

    def pause(self) -> None:
        """Stop the watcher for now (bytes the lane is not ready for)."""
        self.sock._read_event.stop()

    def throw(self, *args) -> None:
        """gevent closing the socket cancels a wait on its watcher through this."""
        greenlet = self.greenlet
        if greenlet is not None:
            self.greenlet = None
            greenlet.throw(*args)

    def stop(self) -> None:
        """Stop the watcher if it is still this one's (before the socket changes hands)."""
        watcher = self.sock._read_event
        if watcher is None:
            return
        callback = watcher.callback
        if getattr(callback, "__self__", None) is self or (
                self.lane is not None and callback == self.lane):
            watcher.stop()


def _arrival(ancillary) -> int:
    for level, kind, payload in ancillary:
        if level == stdlib_socket.SOL_SOCKET and kind == _SCM_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
            return seconds * 1_000_000_000 + nanoseconds
    return 0


#: Replies this large are checked against the source's output_buffer_limit before they are
#: queued or relayed (smaller ones cannot pass it on their own).
LARGE_OUTPUT = 64 * 1024
#: Where every read from a server lands before it is copied into its connection's framer,
#: which happens before anything else runs (a recv() would allocate this many bytes per read,
#: and since the first read after a batch waits for its replies, glibc would map and unmap
#: that memory every time).
SERVER_RECV_SIZE = 256 * 1024
SERVER_RECV_BUFFER = bytearray(SERVER_RECV_SIZE)
SERVER_RECV_VIEW = memoryview(SERVER_RECV_BUFFER)


_ORDERS: dict = {}


def arrival_order(hub) -> ArrivalOrder:
    """The ArrivalOrder of `hub`'s loop (one per process: after a fork, the child's own)."""
    order = _ORDERS.get(id(hub))
    if order is None or order.hub is not hub:
        order = _ORDERS[id(hub)] = ArrivalOrder(hub)
    return order


def listening_socket(host: str, port: int, reuse_port: bool = False):
    """A TCP socket, not yet bound, with the options every listener of the proxy has."""
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    listener = socket.socket(family, stdlib_socket.SOCK_STREAM)
    listener.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    if reuse_port:
        listener.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
    return listener


#: Connections the kernel queues for a listener until it accepts them.
LISTEN_BACKLOG = 4096


def bind_listener(name: str, host: str, port: int, reuse_port: bool = False,
                  listen: bool = True):
    """A listening socket of source `name` on (host, port) (`listen=False`: only bound, a
    probe of the address); an OSError naming the source and the address when it cannot be
    had."""
    listener = listening_socket(host, port, reuse_port)
    try:
        listener.bind((host, port))
        if listen:
            listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        from .config import format_address

        raise OSError(error.errno, f"source {name}: cannot listen on "
                                   f"{format_address((host, port))}: {error.strerror}") from None
    return listener
