"""RedisSinkSingle (alias ValkeySinkSingle): each client connection gets its own upstream
connection to one server, opened on the first batch. When the server ends that connection, the
client's ends too; when the proxy gives up on it (request timeout), the next batch reopens it.

With `shared_connections: N`, clients in the default session send their plain commands over N
connections they share instead (see shared_upstream.py); a client gets its own connection from
its first command that changes or depends on the connection on."""

from __future__ import annotations

import itertools
from bisect import bisect_left
import logging
import socket as stdlib_socket
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Dict, List, Optional

import gevent
from gevent import socket
from gevent.event import Event
from gevent.lock import Semaphore

from .. import observability
from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Address, Problems, format_address, parse_address, take_mapping
from ..message import NO_REPLY, Message, NameTable
from ..protocol.resp import error_reply
from ..shared_upstream import LARGE_MESSAGE, UNSHAREABLE, SharedConnections
from ..tls import TlsConnectorConfig, parse_tls_connector
from ..upstream import OVER_OUTPUT_LIMIT, UpstreamConnection, UpstreamError
from . import TransformType, register

log = logging.getLogger(__name__)


#: How long the server may send nothing while it owes a reply (a blocking command's own
#: timeout comes on top). Long enough for slow legitimate commands (a big KEYS, FLUSHALL or
#: SAVE, a CLIENT PAUSE during a failover), short enough that a hung server does not hold
#: clients for good.
DEFAULT_REQUEST_TIMEOUT_MS = 30000
MAX_SHARED_CONNECTIONS = 64


class _OpeningOrder:
    """Batches that open an upstream connection are written in the order they began to open
    it, which is the order their requests arrived in (each took its turn in arrival order,
    netio.ArrivalOrder, before it began), whatever order the server accepts the connections
    in: one made sooner waits for those begun before it to be written (or to fail). The line
    moves as long as one of them ends every OPENING_STALL seconds (a thousand clients
    connecting at once keep their order), and a batch waits OPENING_WAIT seconds at most: a
    connection that hangs holds up no other for long."""

    def __init__(self) -> None:
        self._tickets = itertools.count()
        #: The openings under way: who waits for each to end (None: nobody).
        self._open: Dict[int, Optional[Event]] = {}
        #: Their tickets, in the order they began (ascending: found by bisection).
        self._begun: List[int] = []
        #: When one last ended.
        self._moved = 0.0

    def begin(self) -> int:
        ticket = next(self._tickets)
        self._open[ticket] = None
        self._begun.append(ticket)
        return ticket

    def wait_turn(self, ticket: int) -> None:
        """Wait until every opening begun before `ticket` has ended: for the latest of them,
        which itself waited for those before it (each waits for one, so that a thousand
        clients connecting at once wake a thousand times, not a million)."""
        deadline = None
        begun = self._begun
        while True:
            place = bisect_left(begun, ticket)
            if not place:
                return
            earlier = begun[place - 1]
            done = self._open[earlier]
            if done is None:
                done = self._open[earlier] = Event()
            now = time.monotonic()
            if deadline is None:
                deadline = now + OPENING_WAIT
            if now >= deadline:
                return
            if not done.wait(min(OPENING_STALL, deadline - now)) and \
                    time.monotonic() - self._moved >= OPENING_STALL:
                return  # the line has not moved for that long: something hangs before it

    def end(self, ticket: int) -> None:
        self._moved = time.monotonic()
        if ticket not in self._open:
            return
        done = self._open.pop(ticket)
        begun = self._begun
        del begun[bisect_left(begun, ticket)]
        if done is not None:
            done.set()


#: How long the openings before a batch may go without one of them ending, and how long the
#: batch waits for them at most in all.
OPENING_STALL = 0.05
OPENING_WAIT = 1.0
#: One line per server: the order that matters is the one in which the server gets the
#: requests, and a server that hangs must not hold the new clients of another.
_OPENINGS: Dict[Address, _OpeningOrder] = {}


def opening_order(address) -> _OpeningOrder:
    """The line of openings of connections to `address`."""
    order = _OPENINGS.get(address)
    if order is None:
        order = _OPENINGS[address] = _OpeningOrder()
    return order


@dataclass
class RedisSinkSingleConfig:
    remote_address: Address
    connect_timeout_ms: int = 3000
    tls: Optional[TlsConnectorConfig] = None
    #: 0: no request timeout.
    request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS
    #: Connections per proxy process shared by the clients in the default session (0: none,
    #: every client has its own).
    shared_connections: int = 0


def parse(settings: Any, where: str, problems: Problems) -> Optional[RedisSinkSingleConfig]:
    values = take_mapping(settings, where, problems, required={"remote_address": str},
                          optional={"connect_timeout_ms": (int, 3000), "tls": (dict, None),
                                    "request_timeout_ms": (int, DEFAULT_REQUEST_TIMEOUT_MS),
                                    "shared_connections": (int, 0)})
    if values is None:
        return None
    address = parse_address(values["remote_address"], f"{where}.remote_address", problems)
    if values["connect_timeout_ms"] <= 0:
        problems.add(f"{where}.connect_timeout_ms", "must be a positive number of milliseconds")
    if values["request_timeout_ms"] < 0:
        problems.add(f"{where}.request_timeout_ms",
                     "must be a number of milliseconds, or 0 for no request timeout")
    shared = values["shared_connections"]
    if not 0 <= shared <= MAX_SHARED_CONNECTIONS:
        problems.add(f"{where}.shared_connections",
                     f"must be a number of connections from 0 (none) to {MAX_SHARED_CONNECTIONS}")
    elif shared and values["tls"] is not None:
        problems.add(f"{where}.shared_connections",
                     "cannot be used with tls: shared connections are plain TCP only")
    tls = None
    if values["tls"] is not None:
        tls = parse_tls_connector(values["tls"], f"{where}.tls", problems)
    if address is None:
        return None
    return RedisSinkSingleConfig(address, values["connect_timeout_ms"], tls,
                                 values["request_timeout_ms"], shared)


class RedisSinkSingleBuilder(TransformBuilder):
    terminating = True

    def __init__(self, config: RedisSinkSingleConfig, name: str, chain_name: str) -> None:
        self.config = config
        self.name = name
        self.ssl_context = config.tls.client_context() if config.tls else None
        #: How an upgrade's checkpoint names this sink's server.
        self.address_text = format_address(config.remote_address)
        self.request_timeout = (config.request_timeout_ms / 1000.0
                                if config.request_timeout_ms else None)
        self.openings = opening_order(config.remote_address)
        self.failed_requests = observability.failed_requests(chain_name, "RedisSinkSingle")
        self.shared: Optional[SharedConnections] = None
        if config.shared_connections:
            self.shared = SharedConnections(config.remote_address,
                                            config.connect_timeout_ms / 1000.0,
                                            self.request_timeout, config.shared_connections)

    def build(self, context: ConnectionContext) -> Transform:
        return RedisSinkSingle(self, context)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


#: Between attempts to subscribe again on a new connection after the server went away.
RESUBSCRIBE_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class RedisSinkSingle(Transform):
    __slots__ = ("builder", "context", "upstream", "_connecting", "_resubscriber", "_closed",
                 "_shared_slot", "_shared_busy", "_output_limit")
    inflight_handover = True

    def __init__(self, builder: RedisSinkSingleBuilder, context: ConnectionContext) -> None:
        self.builder = builder
        self.context = context
        self.upstream: Optional[UpstreamConnection] = None
        self._connecting = Semaphore()
        self._resubscriber: Optional[gevent.Greenlet] = None
        self._closed = False
        #: The shared connection this client's plain batches go over (None: its own
        #: connection; for good once it has sent a command a shared connection cannot carry).
        self._shared_slot: Optional[int] = None
        #: A batch of this client is on a shared connection, its replies owed.
        self._shared_busy = False
        self._output_limit = _output_limit(context)
        if builder.shared is not None and context.session.is_default:
            self._shared_slot = builder.shared.assign()

    def _connect(self) -> UpstreamConnection:
        """The current upstream connection, opened (and the session replayed) if need be."""
        with self._connecting:
            upstream = self.upstream
            if upstream is not None and not upstream.closed:
                return upstream
            config = self.builder.config
            self.upstream = UpstreamConnection(
                config.remote_address, config.connect_timeout_ms / 1000.0,
                self.context.session, self.context.push, self.builder.ssl_context,
                config.tls.server_hostname(config.remote_address) if config.tls else None,
                **self._upstream_options())
            return self.upstream

    def _connect_in_line(self) -> UpstreamConnection:
        """_connect() for a batch that opens the connection, in the line of openings to its
        server: once the openings begun before it have written their batches (or failed). The
        caller writes its batch before it next waits: those behind it go on once this greenlet
        has."""
        openings = self.builder.openings
        ticket = openings.begin()
        try:
            upstream = self._connect()
            openings.wait_turn(ticket)
            return upstream
        finally:
            openings.end(ticket)

    def _upstream_options(self) -> dict:
        return {"on_lost": self._upstream_lost, "client_socket": _client_socket(self.context),
                "request_timeout": self.builder.request_timeout,
                "client_follows": self.context.hang_up is not None,
                "reply_limit": self._output_limit}

    def export_upstream(self, batch: Optional[List[Message]] = None):
        if self._shared_busy:
            # Its replies come on a connection that stays with this process: the client stops
            # once they are written (they are owed by a server that does not block on them).
            return None, "busy"
        upstream = self.upstream
        if upstream is None:
            # Not connected yet, or connecting for this very batch: nothing of it was sent.
            return None, ("ok" if batch is None else "unsent")
        state, status = upstream.export_state(batch)
        if state is None:
            return None, status
        from ..handover.checkpoint import InflightRecord, UpstreamRecord

        inflight = state.pop("inflight", None)
        return UpstreamRecord(fd=upstream.sock.fileno(), sink="RedisSinkSingle",
                              address=self.builder.address_text,
                              inflight=None if inflight is None else InflightRecord(**inflight),
                              **state), status

    def adopt_upstream(self, record) -> bool:
        config = self.builder.config
        if record.sink != "RedisSinkSingle" or config.tls is not None or \
                record.address != self.builder.address_text:
            return False
        self._shared_slot = None
        self.upstream = UpstreamConnection.adopt(
            _socket_from_fd(record.fd, config.remote_address),
            config.remote_address, record, self.context.session, self.context.push,
            **self._upstream_options())
        return True  # even when it turned out dead: the fd is dealt with

    def resume_inflight(self, requests: List[Message]) -> Optional[List[Message]]:
        upstream = self.upstream
        if upstream is None or not upstream.has_inflight:
            return None
        replies = upstream.resume(requests)
        if upstream.closed:
            self.builder.failed_requests(sum(1 for r in replies if r.is_error))
        return replies

    def prepare(self) -> None:
        if self.context.session.subscribed:
            try:
                self._connect()
            except UpstreamError as error:
                log.warning("could not resubscribe %s after the upgrade: %s", self.context.peer,
                            error)
                self._upstream_lost(None)

    def _upstream_lost(self, upstream: Optional[UpstreamConnection]) -> None:
        if self._closed:
            return
        hang_up = self.context.hang_up
        if upstream is not None and upstream.lost_by_server and hang_up is not None:
            # The server ended the connection (CLIENT KILL, its timeout, a restart), or the
            # proxy stopped reading it past the client's output limit: the client's ends too,
            # as it would directly, once the replies that came are written.
            if upstream.failure == OVER_OUTPUT_LIMIT:
                self._hang_up_over_limit()
            else:
                hang_up(upstream.failure)
            return
        # The proxy's own doing (a subscriber whose upstream connection could not come along
        # in an upgrade, a request timeout): a subscriber may send nothing for hours, so rather
        # than wait for its next request, subscribe again on a new connection at once.
        if self.context.session.subscribed and (
                self._resubscriber is None or self._resubscriber.dead):
            self._resubscriber = gevent.spawn(self._resubscribe)

    def _hang_up_over_limit(self) -> None:
        log.warning("closing connection from %s: %s of %s bytes (it does not read its replies)",
                    self.context.peer, OVER_OUTPUT_LIMIT, self._output_limit)
        self.context.hang_up(OVER_OUTPUT_LIMIT)

    def _resubscribe(self) -> None:
        attempt = 0
        while not self._closed and self.context.session.subscribed:
            gevent.sleep(RESUBSCRIBE_DELAYS[min(attempt, len(RESUBSCRIBE_DELAYS) - 1)])
            attempt += 1
            if self._closed:
                return
            try:
                self._connect()
                log.info("subscribed %s again on a new upstream connection", self.context.peer)
                return
            except UpstreamError as error:
                log.debug("resubscribing %s: %s", self.context.peer, error)

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        slot = self._shared_slot
        if slot is not None:
            for request in requests:
                if request.command in UNSHAREABLE or len(request.raw) > LARGE_MESSAGE:
                    self._shared_slot = None  # its own connection from now on
                    break
            else:
                return self._call_shared(slot, requests)
        upstream = self.upstream
        if upstream is None or upstream.closed:
            if upstream is not None and upstream.lost_by_server and \
                    self.context.hang_up is not None:
                # The client's connection is being closed after the server's: nothing more
                # is sent for it (directly, these requests would have met a closed socket).
                self.context.hang_up(upstream.failure)
                return [NO_REPLY] * len(requests)
            try:
                upstream = self._connect_in_line()
            except UpstreamError as error:
                self.builder.failed_requests(len(requests))
                return [Message.error(f"ERR {error}")] * len(requests)
        replies = upstream.call(requests)
        if upstream.closed:
            self.builder.failed_requests(sum(1 for r in replies if r.is_error))
        return replies

    def lane_ready(self) -> bool:
        if self._shared_slot is not None:
            return True
        upstream = self.upstream
        return upstream is not None and upstream.lane_ready()

    def submit(self, framed: List[tuple], waiter):
        """Send a batch without waiting, if it can go that way: on the client's shared
        connection (open), or on its own connection in the plain state (lane_ready), and if
        every command is one that neither changes nor depends on the connection nor blocks.
        `framed`: the requests as (bytes, name or None) pairs, as the request framer gives
        them. Returns what the client's connection records as its batch in flight (None: the
        batch must go through transform()). What came back reaches `waiter.switch(result)`
        from the event loop, for `lane_payload`; on its own connection, `waiter.trouble()` may
        come instead, and the client's greenlet then gets the replies from resume_submitted."""
        if not _SHAREABLE.all_pass(framed):
            return None
        slot = self._shared_slot
        if slot is None:
            upstream = self.upstream
            if upstream is None or not upstream.lane_ready():
                return None
            upstream.lane_call(framed, framed[0][0] if len(framed) == 1 else
                               b"".join(map(itemgetter(0), framed)), waiter)
            return framed
        shared = self.builder.shared.ready(slot)
        if shared is None:
            return None
        for raw, _name in framed:
            if len(raw) > LARGE_MESSAGE:
                return None
        payload = framed[0][0] if len(framed) == 1 else b"".join(map(itemgetter(0), framed))
        self._shared_busy = True
        shared.submit(payload, len(framed), self._output_limit, waiter)
        return framed

    def submit_first(self, framed: List[tuple], waiter):
        """submit() that first opens the client's own connection (see Transform.submit_first),
        as transform() opens it. A failure to connect answers every request of the batch with
        the error, as transform() would (through waiter.switch)."""
        if self._shared_slot is None and self.upstream is None and not self._closed and \
                self.builder.ssl_context is None and _SHAREABLE.all_pass(framed):
            try:
                self._connect_in_line()
            except UpstreamError as error:
                self.builder.failed_requests(len(framed))
                gevent.get_hub().loop.run_callback(
                    waiter.switch, [error_reply(f"ERR {error}")] * len(framed))
                return framed
        return self.submit(framed, waiter)

    def lane_payload(self, count: int, result) -> bytes:
        """What a submitted batch of `count` requests answers the client, from what came back
        (see submit)."""
        if type(result) is tuple:  # from the shared connection: (frames, failure)
            frames, failure = result
            if failure is None and len(frames) == 1 and len(frames[0]) <= LARGE_MESSAGE:
                self._shared_busy = False  # shared_payload's commonest case
                return frames[0]
            return self.shared_payload(count, frames, failure)
        return result[0] if len(result) == 1 else b"".join(result)  # its own: the frames

    def resume_submitted(self, requests: List[Message]) -> List[Message]:
        """The replies of a batch submitted on the client's own connection, read from where
        its callbacks stopped (waiter.trouble)."""
        upstream = self.upstream
        replies = upstream.resume_lane()
        if upstream.closed:
            self.builder.failed_requests(sum(1 for r in replies if r.is_error))
        return replies

    def shared_payload(self, count: int, frames: List[bytes], failure: Optional[str]) -> bytes:
        """What a batch of `count` requests sent on the shared connection answers the client,
        from what came back."""
        if failure is None:
            self._shared_busy = False
            payload = frames[0] if len(frames) == 1 else b"".join(frames)
            if len(payload) > LARGE_MESSAGE and max(map(len, frames)) > LARGE_MESSAGE:
                self._shared_slot = None  # large values: its own connection from now on
            return payload
        return b"".join([reply.raw for reply in self.shared_replies(count, frames, failure)])

    def _call_shared(self, slot: int, requests: List[Message]) -> List[Message]:
        try:
            shared = self.builder.shared.get(slot)
        except UpstreamError as error:
            self.builder.failed_requests(len(requests))
            return [Message.error(f"ERR {error}")] * len(requests)
        payload = requests[0].raw if len(requests) == 1 else b"".join([r.raw for r in requests])
        self._shared_busy = True
        try:
            frames, failure = shared.call(payload, len(requests), self._output_limit)
        finally:
            self._shared_busy = False
        return self.shared_replies(len(requests), frames, failure)

    def shared_replies(self, count: int, frames: List[bytes],
                       failure: Optional[str]) -> List[Message]:
        """The replies to a batch of `count` requests sent on a shared connection, from what
        came back."""
        self._shared_busy = False
        replies = [Message(frame) for frame in frames]
        if frames and max(map(len, frames)) > LARGE_MESSAGE:
            self._shared_slot = None  # large values: its own connection from now on
        if failure is OVER_OUTPUT_LIMIT and self.context.hang_up is not None:
            # As Redis closes a client over its output buffer limit: what came within the
            # limit, then the end of the connection.
            self._hang_up_over_limit()
            return replies + [NO_REPLY] * (count - len(replies))
        if failure is not None:
            missing = count - len(replies)
            self.builder.failed_requests(missing)
            replies.extend([Message.error(f"ERR {failure}")] * missing)
        return replies

    def abandon(self) -> None:
        self.close(abandon=True)

    def close(self, abandon: bool = False) -> None:
        """Stop for good; `abandon`: the upstream connection is another process's now, let go
        of it without a word to the server."""
        self._closed = True
        resubscriber = self._resubscriber
        if resubscriber is not None and resubscriber is not gevent.getcurrent():
            resubscriber.kill(block=False)
        upstream, self.upstream = self.upstream, None
        if upstream is not None and abandon:
            upstream.abandon()
        elif upstream is not None:
            upstream.close()


#: The commands that may go on a shared connection, or be served from the callbacks.
_SHAREABLE = NameTable(lambda command: command not in UNSHAREABLE)


def _socket_from_fd(fd: int, address):
    """A socket object for an inherited upstream fd; for a numeric address without asking the
    kernel what the socket is (three system calls per connection inside an upgrade's pause)."""
    host = address[0]
    for family in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6):
        try:
            stdlib_socket.inet_pton(family, host)
        except OSError:
            continue
        return socket.socket(family, stdlib_socket.SOCK_STREAM, stdlib_socket.IPPROTO_TCP,
                             fileno=fd)
    return socket.socket(fileno=fd)


def _output_limit(context: ConnectionContext) -> Optional[int]:
    """The client connection's output_buffer_limit in bytes (None: none, or not known)."""
    connection = getattr(context.push, "__self__", None)
    limit = getattr(getattr(getattr(connection, "source", None), "config", None),
                    "output_buffer_limit", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _client_socket(context: ConnectionContext):
    """The client connection's socket, watched while its requests wait for replies (None: not
    available, nothing is watched)."""
    sock = getattr(context, "client_socket", None)
    if sock is None:
        # The connection's push callback is bound to the connection that owns the socket.
        sock = getattr(getattr(context.push, "__self__", None), "sock", None)
    return sock


KIND = register(TransformType(("RedisSinkSingle", "ValkeySinkSingle"), True, parse,
                              RedisSinkSingleBuilder))
