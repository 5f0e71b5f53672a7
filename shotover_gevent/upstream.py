"""One connection to a Redis/Valkey server: connect, replay a session, send a batch, read replies.

Knows how many reply frames each request produces (pub/sub, MULTI, CLIENT REPLY) and tells pushes apart.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket as stdlib_socket
import ssl
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional

import gevent
from gevent import get_hub, socket
from gevent.event import Event
from gevent.socket import wait_read

from .handover.checkpoint import REPLY_EFFECTS
from .message import NO_REPLY, REPLICATION_COMMANDS, Message, as_messages, replication_refused
from .netio import (LARGE_OUTPUT, SERVER_RECV_BUFFER, SERVER_RECV_VIEW, close_for_good, let_go,
                    relay)
from .protocol import resp
from .protocol.state import (
    BLOCKING_COMMANDS,
    DECIDED_BY_FIRST_FRAME,
    ENDS_TRANSACTION,
    OFF,
    SKIP,
    STARTS_TRANSACTION,
    SUBSCRIBE_KINDS,
    TRACKED_COMMANDS,
    ConnectionState,
    may_block,
    own_wait,
)
from .session import Session

log = logging.getLogger(__name__)


# Requests that call() may not send as they are (see _call_amended).
_NOT_SENT_AS_IS = REPLICATION_COMMANDS | {"MULTI"}
# Either those or a blocking command: a request that the batch's fast path has to look at twice.
_NOTABLE = _NOT_SENT_AS_IS | BLOCKING_COMMANDS
_HANGUP = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR
#: While replies are owed, how often (at most) the proxy looks whether the client is still
#: there and whether the request timeout has passed.
CLIENT_CHECK_INTERVAL = 1.0
# Sent in place of SYNC/PSYNC: a command with no effect whose reply the server counts, skips
# (CLIENT REPLY OFF/SKIP) or refuses (subscribed RESP2) as it would any other's; the proxy then
# puts the refusal in the place of the reply, if there is one.
_REPLICATION_STANDIN = Message.request([b"PING", b"shotover-g: replication refused"])
# Redis answers CLIENT REPLY inside a transaction with a truncated EXEC reply that no client can
# parse; the proxy refuses it instead of forwarding it.
_CLIENT_REPLY_IN_MULTI = "ERR CLIENT REPLY is not supported inside MULTI by the proxy"


#: Why the replies to a batch were not read further: past the client's output_buffer_limit
#: (its connection is then closed, as Redis closes a client over its own limit).
OVER_OUTPUT_LIMIT = ("output buffer limit: the replies to a batch are over the source's "
                     "output_buffer_limit")


class UpstreamError(Exception):
    """The server could not be reached or the connection broke; the text goes to clients."""


class _Pending:
    """A request whose reply frames are being collected (push mode)."""

    __slots__ = ("request", "count", "frames", "prefix", "apply", "done")

    def __init__(self, request: Message) -> None:
        self.request = request
        self.count = -1  # not known until every earlier reply has been read
        self.frames: List[bytes] = []
        self.prefix = b""  # pushes that came just before the reply
        self.apply = None
        self.done = False


class UpstreamConnection:
    """A connection to one server, used by one client connection at a time.

    The reply count of a request is decided when every earlier reply has been read, from the
    connection's state as the server has it at that point: protocol, CLIENT REPLY mode,
    subscriptions, MULTI, MONITOR. Effects are applied once a request's frames are all read.
    """

    # Slots: see ClientConnection.
    __slots__ = ("address", "session", "on_push", "on_lost", "client_follows", "client_socket",
                 "request_timeout", "tls", "reply_limit", "_reply_budget", "_tick",
                 "_quiet_since", "lost_by_server", "_idle_watcher", "framer", "state", "_plain",
                 "_quiet", "_just_sent", "push_mode", "_reader", "_pending", "_held",
                 "_all_done", "_failure", "closed", "_batch", "_replies", "_current",
                 "_entries", "_unsent", "_answered", "sock", "_adopted_inflight", "_lane",
                 "_lane_raw", "_lane_fresh")

    def __init__(self, address, connect_timeout: float, session: Session,
                 on_push: Callable[[bytes], None], ssl_context=None, server_hostname=None,
                 on_lost: Optional[Callable[["UpstreamConnection"], None]] = None,
                 client_socket=None, adopted=None, request_timeout: Optional[float] = None,
                 client_follows: bool = False, reply_limit: Optional[int] = None) -> None:
        self.address = address
        #: Set when the connection is encrypted (TLS state cannot be handed over).
        self.tls = False
        #: Bytes the replies to one batch may take before the client's connection is closed,
        #: as its output_buffer_limit would close it once they were written (None: no limit);
        #: and what is left of it for the batch being read (None: not reading one).
        self.reply_limit: Optional[int] = reply_limit or None
        self._reply_budget: Optional[int] = None
        self.session = session
        self.on_push = on_push
        # Called (once, after the session is restored) when the server ends the connection or
        # it breaks: whether replies were owed, or nothing was asked of it.
        self.on_lost: Optional[Callable[["UpstreamConnection"], None]] = None
        # The client's connection is closed when the server closes this one (set by a sink
        # that can do so): requests left without a reply then get none, as they would directly.
        self.client_follows = False
        # Watched while a reply is owed: a client that leaves must not stay blocked on the
        # server (it would take the next value pushed and lose it), nor stay counted as open.
        self.client_socket = client_socket
        # Seconds without a byte from the server while a reply is owed before the proxy gives
        # up on the connection (None: never); a blocking command's own timeout comes on top.
        self.request_timeout = request_timeout
        # How often the wait for a reply is looked at (see _Waits; None: never).
        self._tick: Optional[float] = None
        if request_timeout is not None or client_socket is not None:
            self._tick = min(CLIENT_CHECK_INTERVAL, (request_timeout or 2.0) / 2)
        # Since when the server has sent nothing while a reply is owed (None: bytes came since
        # the wait was last looked at).
        self._quiet_since: Optional[float] = None
        # The server closed the connection (or it broke): not the proxy's own decision.
        self.lost_by_server = False
        # Watches the socket while nothing is asked of the server (see _watch_idle).
        self._idle_watcher = None
        self.framer = resp.ReplyFramer()
        # The server's view of this connection: what decides how its replies are counted.
        self.state = ConnectionState()
        self._plain = True  # state.plain, kept at hand for the batch's fast path
        #: Plain, and no frame may come unasked (not state.pushes_expected): the lane's state.
        self._quiet = True
        # A batch was just written and nothing read since (see _read_frame).
        self._just_sent = False
        self.push_mode = False
        self._reader: Optional[gevent.Greenlet] = None
        self._pending: Deque[_Pending] = deque()
        # Pushes read while a batch is in flight: each goes out in front of the next reply, as
        # Redis orders them; the session-changing replies are kept clean of them.
        self._held: List[bytes] = []
        self._all_done = Event()
        self._failure: Optional[str] = None
        self.closed = False
        # The batch being answered, kept on the connection (not in locals) so that an upgrade
        # can hand it over at any moment: the requests, the replies read so far, the reply
        # begun for the next request ([count, effect, frames]), the bytes not yet written.
        self._batch: Optional[List[Message]] = None
        self._replies: Optional[List[Message]] = None
        self._current: Optional[list] = None
        self._entries: Optional[List[_Pending]] = None
        self._unsent: Optional[memoryview] = None
        # The batch answered last: its replies are on their way to the client.
        self._answered: Optional[List[Message]] = None
        #: A batch handed over in flight, until resume() answers it.
        self._adopted_inflight = None
        #: The waiter of the batch served from the event loop, while its replies are read.
        self._lane = None
        #: The batch served by the callbacks is kept as bytes (see lane_call).
        self._lane_raw = False
        #: Nothing of the lane's replies read yet, nor anything buffered (lane_call begins
        #: only when the framer is idle: lane_ready).
        self._lane_fresh = False
        if adopted is not None:
            # Handed over by the previous program image, already in this session's state.
            self.sock = adopted
            self.on_lost, self.client_follows = on_lost, client_follows
            return
        try:
            raw = connect(address, connect_timeout)
        except (OSError, stdlib_socket.timeout) as error:
            raise UpstreamError(f"upstream {_fmt(address)} unavailable: {_reason(error)}") from None
        raw.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            try:
                raw.settimeout(connect_timeout)
                raw = ssl_context.wrap_socket(raw, server_hostname=server_hostname)
                self.tls = True
            except (OSError, stdlib_socket.timeout) as error:
                raw.close()
                raise UpstreamError(f"TLS handshake with {_fmt(address)} failed: {_reason(error)}") \
                    from None
        raw.settimeout(None)
        self.sock = raw
        # A server that closes the connection while the session is restored is a failure to
        # connect, reported as one: the client's requests get errors, its connection stays.
        self._replay_session()
        self.on_lost, self.client_follows = on_lost, client_follows
        self._watch_idle()

    # ---- handover -----------------------------------------------------------------------------

    def export_state(self, batch: Optional[List[Message]] = None):
        """(state, status): what the next program image needs to go on using this connection
        as it is, and where the client's `batch` (the requests its connection is serving, if
        any) stands here. Status: "ok" (no batch), "inflight" (the batch was written, or began
        to be, and the state carries it), "unsent" (nothing of it was written: the client's
        connection keeps it as unread bytes), "busy" (cannot be handed over this moment).
        A state of None: the next image connects afresh."""
        in_flight = batch is not None and self._batch is batch
        if batch is not None and not in_flight and (self._batch is not None
                                                     or self._answered is batch):
            return None, "busy"  # a part of the batch in flight, or replies on their way
        state = self.state
        if state.quitting or (in_flight and (self.closed or self.tls)):
            return None, "busy"  # moments from done: replies being read or settled as errors
        if self.lost_by_server and self.client_follows:
            return None, "busy"  # the client's connection is about to be closed too
        if self.closed or self.tls:
            if self.tls and not self.closed and (state.in_multi or state.monitor
                                                 or state.tracking or self.session.watching):
                return None, "busy"  # a fresh connection could not rebuild that state
            return None, ("ok" if batch is None else "unsent")
        record: Dict = {"resp_version": state.resp_version}
        if state.reply_mode == OFF:
            record["reply_off"] = True
        if state.reply_mode == SKIP:
            record["skip_next"] = True
        if state.subscribed:
            record["subscriptions"] = {kind: sorted(getattr(state, kind))
                                       for kind in _SUBSCRIPTION_SETS if getattr(state, kind)}
        if state.monitor:
            record["monitor"] = True
        if state.tracking:
            record["tracking"] = True
        if state.queued is not None:
            record["multi"] = [request.raw for request in state.queued]
        if self.push_mode:
            record["push"] = True
        buffered = self.framer.unread_bytes()
        if buffered:
            record["buffered"] = buffered
        if self._held:
            record["held"] = list(self._held)
        if not in_flight:
            return record, ("ok" if batch is None else "unsent")
        record["inflight"] = self._export_inflight()
        return record, "inflight"

    def _export_inflight(self) -> dict:
        self._lane_messages()
        requests = self._batch or []
        replies = [reply.raw for reply in self._replies or ()]
        current = None
        if self._entries is not None:  # answered by the reader greenlet
            for entry in self._entries:
                if entry.done:
                    replies.append(entry.prefix + b"".join(entry.frames) if entry.frames else b"")
                    continue
                if entry.count >= 0:
                    current = {"count": entry.count, "effect": _effect_name(entry.apply),
                               "frames": list(entry.frames), "prefix": entry.prefix}
                break
        elif self._current is not None:
            count, apply, frames = self._current
            current = {"count": count, "effect": _effect_name(apply), "frames": list(frames),
                       "prefix": b""}
        inflight = {"requests": [request.raw for request in requests], "replies": replies}
        if current is not None:
            inflight["current"] = current
        if self._unsent is not None and len(self._unsent):
            inflight["unsent"] = bytes(self._unsent)
        return inflight

    @classmethod
    def adopt(cls, sock, address, record, session: Session,
              on_push: Callable[[bytes], None], **options) -> Optional["UpstreamConnection"]:
        """Wrap a connection handed over by the previous image (a checkpoint UpstreamRecord);
        None if the server has closed it meanwhile (the caller then connects afresh)."""
        inflight = record.inflight
        if not record.push and inflight is None and not record.buffered:
            # Nothing is owed on it: anything readable (EOF, an error, bytes nobody asked for)
            # means it is not the connection that was handed over any more. (One with replies
            # or messages to come finds out when it reads.)
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | _HANGUP)
            if poller.poll(0):
                sock.close()
                return None
        upstream = cls(address, 0, session, on_push, adopted=sock, **options)
        state = upstream.state
        state.resp_version = record.resp_version
        state.reply_mode = OFF if record.reply_off else SKIP if record.skip_next else "ON"
        for kind, names in (record.subscriptions or {}).items():
            if kind in _SUBSCRIPTION_SETS:
                setattr(state, kind, set(names))
        state.monitor = record.monitor
        state.tracking = record.tracking
        if record.multi is not None:
            state.queued = [Message(raw) for raw in record.multi]
        if record.buffered:
            upstream.framer.feed(record.buffered)
        upstream._held = list(record.held)
        upstream._state_changed()
        if inflight is not None:
            # The connection's greenlet reads the rest of the batch's replies first
            # (resume()); unasked frames can only come after that.
            upstream._adopted_inflight = inflight
        elif state.pushes_expected:
            upstream._enter_push_mode()
        else:
            upstream._watch_idle()
        return upstream

    @property
    def has_inflight(self) -> bool:
        return self._adopted_inflight is not None

    def resume(self, requests: List[Message]) -> List[Message]:
        """Answer the batch that was in flight when this connection was handed over (its
        `requests`, made from the record's): the replies already read, then the rest as it
        arrives, one reply per request."""
        inflight, self._adopted_inflight = self._adopted_inflight, None
        replies = [Message(raw) if raw else NO_REPLY for raw in inflight.replies]
        current = inflight.current
        if current is not None:
            self._current = [current["count"], _imported_effect(current.get("effect")),
                             list(current.get("frames") or ())]
            prefix = current.get("prefix") or b""
            if prefix:
                self._held.insert(0, prefix)
        watcher = None
        if self.client_socket is not None and _any_may_block(requests[len(replies):]):
            watcher = gevent.spawn(self._watch_client)
        try:
            replies = self._call_direct(requests, replies, inflight.unsent)
        finally:
            if watcher is not None:
                watcher.kill(block=False)
        if self.state.pushes_expected and not self.closed and not self.push_mode:
            self._enter_push_mode()
        return replies

    # ---- session replay -----------------------------------------------------------------------

    def _replay_session(self) -> None:
        commands = self.session.replay_commands()
        if not commands:
            return
        requests = [Message.request(args) for args in commands]
        replies = self._call_direct(requests)
        for request, reply in zip(requests, replies):
            if reply.is_error:
                self.close()
                text = reply.raw[1:].strip().decode("utf-8", "replace")
                raise UpstreamError(f"could not restore the session on a new upstream "
                                    f"connection ({request.command}): {text}")
        if self.state.pushes_expected:
            self._enter_push_mode()

    # ---- reply accounting ---------------------------------------------------------------------

    def _expect(self, request: Message):
        """(frames the server sends for `request`, effect to apply once they are read).

        Called when every earlier reply has been read, so the state is the server's.
        """
        if self._plain and request.command not in TRACKED_COMMANDS:
            return 1, None
        count, effect = self.state.expect(request)
        self._state_changed()
        return count, effect

    def _first_frame(self, current: list, request: Message, frame: bytes) -> None:
        """A reply whose length its first frame decides (EXEC, (un)subscribe): [count, effect,
        frames] updated once that frame is read."""
        current[0], current[1] = self.state.first_frame(current[1], request, frame, current[0])
        self._state_changed()

    def _apply(self, effect: str, request: Message, frames: List[bytes]) -> None:
        self.state.apply(effect, request, frames)
        self._state_changed()

    def _state_changed(self) -> None:
        state = self.state
        self._plain = plain = state.plain
        self._quiet = plain and not state.pushes_expected

    def _is_push(self, frame: bytes) -> bool:
        return self.state.is_push(frame)

    # ---- I/O ----------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
            if sent < len(data):
                # The rest waits for room; what is left is kept where a handover sees it.
                view = self._unsent = memoryview(data)[sent:]
                while view:
                    view = self._unsent = view[self.sock.send(view):]
                    self._quiet_since = None  # the server is reading: not silent
        except OSError as error:
            if self.closed:  # given up on meanwhile (request timeout, client gone)
                raise UpstreamError(self.failure) from None
            if error.errno in (errno.EPIPE, errno.ECONNRESET):
                # The server has closed the connection: the replies it sent before it did are
                # still to be read, then the end of the connection.
                log.debug("upstream %s: write failed: %s", _fmt(self.address), _reason(error))
                return
            self._broken(f"upstream {_fmt(self.address)} write failed: {_reason(error)}",
                         by_server=self._ended_by_server(error))
            raise UpstreamError(self._failure) from None
        finally:
            self._unsent = None

    def _read_frame(self) -> bytes:
        framer = self.framer
        while True:
            try:
                frame = framer.next_frame()
            except resp.ProtocolError as error:
                self._broken(f"upstream {_fmt(self.address)} sent invalid RESP: {error}")
                raise UpstreamError(self._failure) from None
            if frame is not None:
                return frame
            self._receive()

    def _take_replies(self, total: int, replies: List[Message]) -> None:
        """Read frames into `replies` until it holds `total`, many per call: for requests that
        are each answered by one frame, on a connection where no push can come between."""
        framer = self.framer
        while len(replies) < total:  # a handed-over batch may have every reply read already
            try:
                frames = framer.take(total - len(replies))
            except resp.ProtocolError as error:
                self._broken(f"upstream {_fmt(self.address)} sent invalid RESP: {error}")
                raise UpstreamError(self._failure) from None
            if frames:
                replies += map(Message, frames)
                if len(replies) >= total:
                    return
            self._receive()

    def _receive(self) -> None:
        """Read what the server sent into the framer (waiting for it)."""
        framer = self.framer
        try:
            if self._just_sent:
                # The first read after a batch was written: the replies are not there yet
                # (a recv would only return EAGAIN), so wait for them first. Not over TLS,
                # where decrypted bytes may wait inside the TLS object.
                self._just_sent = False
                if not self.tls and not self.closed:
                    sock = self.sock
                    sock._wait(sock._read_event)
            received = self.sock.recv_into(SERVER_RECV_BUFFER)
        except OSError as error:
            self._broken(f"upstream {_fmt(self.address)} read failed: {_reason(error)}",
                         by_server=self._ended_by_server(error))
            raise UpstreamError(self._failure) from None
        if not received:
            self._broken(f"upstream {_fmt(self.address)} closed the connection",
                         by_server=self._ended_by_server(None))
            raise UpstreamError(self._failure)
        self._quiet_since = None
        framer.feed(SERVER_RECV_VIEW[:received])  # copied out before anything else can run
        budget = self._reply_budget
        if budget is not None:
            budget = self._reply_budget = budget - received
            if budget < 0:
                # Read on, the proxy would hold the whole batch's replies (a pipeline of large
                # values: gigabytes) only to close the client over its limit once they are.
                self._broken(OVER_OUTPUT_LIMIT, by_server=True)
                raise UpstreamError(self._failure)

    def _read_reply_frame(self) -> bytes:
        """The next frame that answers a request; pushes on the way are held."""
        frame = self._read_frame()
        while self._is_push(frame):
            self._held.append(frame)
            frame = self._read_frame()
        return frame

    def _take_trailing_pushes(self) -> None:
        """Hold the RESP3 pushes read with a batch's last reply (an invalidation another
        connection redirects here, sent right after it): they follow that reply now. Left in
        the framer, no read would bring them out until the client's next request."""
        framer = self.framer
        if self.state.resp_version == 2 or not framer.pending():
            return
        while framer.next_type() == b">":
            frame = framer.next_frame()
            if frame is None:
                return  # the rest of it is still to come: the idle watch reads it
            self._held.append(frame)

    def _take_held(self, request: Message) -> bytes:
        if not self._held or request.command in TRACKED_COMMANDS:
            return b""
        held = b"".join(self._held)
        self._held.clear()
        return held

    def _release_held(self) -> None:
        """Deliver held pushes that no later reply can carry (they follow every reply)."""
        while self._held:
            held, self._held = self._held, []
            # In one piece: the client's connection owns it from here (an upgrade finds it
            # there, not in a list this loop is half-way through).
            self.on_push(b"".join(held))

    def _broken(self, reason: str, expected: bool = False, by_server: bool = False) -> None:
        """Close the connection for `reason`, the first time only. `by_server`: the server
        closed it or it broke (what the client would have seen directly), as opposed to the
        proxy giving up on it (request timeout, invalid RESP) or the client leaving
        (`expected`)."""
        first = self._failure is None and not self.closed
        if first:
            self._failure = reason
            quitting = self.state.quitting
            self.lost_by_server = by_server and not quitting
            # After QUIT the server closing the connection is the expected outcome; a server
            # closing a connection (CLIENT KILL, its idle timeout) is routine.
            if quitting or expected:
                log.debug("%s", reason)
            elif self.lost_by_server:
                log.info("%s", reason)
            else:
                log.warning("%s", reason)
        self._close()
        on_lost = self.on_lost
        if first and on_lost is not None and not (expected or self.state.quitting) and \
                (self.lost_by_server or self.push_mode):
            on_lost(self)

    def _ended_by_server(self, error: Optional[OSError]) -> bool:
        """Whether a failed read or write (`error`; None: the end of the connection) means the
        server ended the connection, as a client talking to it would have seen. A TLS session
        that failed (an alert), or that ended before the server ever answered (TLS 1.3
        servers refuse a missing client certificate that way), is the proxy's own setup
        failing instead: the client gets an error naming it."""
        if isinstance(error, ssl.SSLError) and not isinstance(
                error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return False
        return not (self.tls and self._answered is None and not self._replies)

    @property
    def failure(self) -> str:
        """Why the connection was closed (for the logs and the client's errors)."""
        return self._failure or "upstream connection closed"

    def _check_wait(self, now: float) -> None:
        """Looked at every tick while a reply is owed (by _Waits, not by the greenlet that
        waits): give up on the connection when the client has left or the server has been
        silent for longer than the request timeout. The waiting greenlet then finds the
        connection closed and answers with this failure."""
        if self.closed or self._awaited() is None:
            return
        if self._client_left():
            self._broken(f"client left while waiting for upstream {_fmt(self.address)}",
                         expected=True)
            return
        if self._quiet_since is None:
            self._quiet_since = now
            return
        limit = self._wait_limit()
        if limit is not None and now - self._quiet_since >= limit:
            self._broken(f"upstream {_fmt(self.address)} did not answer within "
                         f"{round(limit * 1000)} ms")

    def _awaited(self) -> Optional[Message]:
        """The request whose reply the server owes next (None: nothing is owed)."""
        if self.push_mode:
            pending = self._pending
            return pending[0].request if pending else None
        batch, replies = self._batch, self._replies
        if batch is None or replies is None or len(replies) >= len(batch):
            return None
        request = batch[len(replies)]
        # A batch the event loop's callbacks serve stays as framed (converted, its replies
        # could no longer be relayed): only the request owed is looked at.
        return Message(*request) if type(request) is tuple else request

    def _wait_limit(self) -> Optional[float]:
        """How long the server may stay silent on the request it owes a reply to: the request
        timeout, plus a blocking command's own timeout (None: as long as it likes)."""
        timeout = self.request_timeout
        request = self._awaited()
        if timeout is None or request is None:
            return None
        own = own_wait(request.command, request.args)
        return None if own is None else timeout + own

    def _client_left(self) -> bool:
        sock = self.client_socket
        if sock is None:
            return False
        try:
            fd = sock.fileno()
        except (OSError, ValueError):
            return True
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, _HANGUP)
        try:
            return bool(poller.poll(0))
        except OSError:
            return False

    # The server closing a connection nothing is asked of (CLIENT KILL, its `timeout`, a
    # restart) is noticed at once, so that the client's connection closes at that moment too, as
    # it would have directly (redis-py, for one, then reconnects before its next command).

    def _watch_idle(self) -> None:
        if self.on_lost is None or not self.client_follows or self.closed or self.push_mode \
                or self.state.pushes_expected:
            return
        watcher = self._idle_watcher
        if watcher is None:
            watcher = self._idle_watcher = get_hub().loop.io(self.sock.fileno(), 1)
        if not watcher.active:
            watcher.start(_REPLIES_READY, self)

    def _unwatch_idle(self, for_good: bool = False) -> None:
        watcher = self._idle_watcher
        if watcher is not None:
            if watcher.active:
                watcher.stop()
            if for_good:  # before the socket is closed: its number may be reused at once
                watcher.close()
                self._idle_watcher = None

    def _idle_readable(self) -> None:
        # Run by the event loop itself: nothing here may wait.
        self._unwatch_idle()
        if self._batch is None and not self.closed:
            gevent.spawn(self._check_idle)

    def _check_idle(self) -> None:
        if self.closed or self._batch is not None or self.push_mode:
            return  # a batch began meanwhile: it finds out for itself
        poller = select.poll()
        poller.register(self.sock.fileno(), _HANGUP)
        if poller.poll(0):
            self._broken(f"upstream {_fmt(self.address)} closed the connection",
                         by_server=True)
        elif self.state.resp_version != 2 and not self.tls and self._pushes_while_idle():
            return
        else:
            # Redis sends nothing unasked on such a connection (over TLS it may be a record
            # that ends the session); the next batch reads it, and finds out.
            (log.debug if self.tls else log.warning)(
                "upstream %s sent bytes while nothing was asked of it", _fmt(self.address))

    def _pushes_while_idle(self) -> bool:
        """RESP3 pushes that came while nothing is owed (invalidations another connection
        redirects here with CLIENT TRACKING ... REDIRECT) go to the client at once, as they
        would directly. False when something else came: it is kept for the next batch, and
        reported."""
        try:
            received = self.sock._sock.recv_into(SERVER_RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            received = -1
        except OSError as error:
            self._broken(f"upstream {_fmt(self.address)} read failed: {_reason(error)}",
                         by_server=True)
            return True
        if not received:
            self._broken(f"upstream {_fmt(self.address)} closed the connection", by_server=True)
            return True
        frames = []
        if received > 0:
            self.framer.feed(SERVER_RECV_VIEW[:received])
            # Every complete frame first, without a switch: a batch that begins meanwhile
            # reads only what comes after them.
            frame = self.framer.next_frame()
            while frame is not None:
                frames.append(frame)
                frame = self.framer.next_frame()
        pushes = []
        for index, frame in enumerate(frames):
            if not (frame[:1] == b">" and self._is_push(frame)):
                self._held.extend(frames[index:])  # written before the next reply
                break
            pushes.append(frame)
        if self._batch is None:
            self._watch_idle()
        if pushes:
            self.on_push(b"".join(pushes))
        return len(pushes) == len(frames)

    def abandon(self) -> None:
        """Let go of a connection another process now owns: stop using it without a word to
        the server (no shutdown; the fd is closed, the connection lives on elsewhere)."""
        self.on_lost = None
        self._close(release=let_go)

    def close(self) -> None:
        """Close for good (the client left or was handed over): no loss is reported."""
        self.on_lost = None
        self._close()

    def _close(self, release=close_for_good) -> None:
        if self.closed:
            return
        self.closed = True
        self._unwatch_idle(for_good=True)
        lane, self._lane = self._lane, None
        if lane is not None:
            # A batch served from the event loop (request timeout, the client left): its
            # client's greenlet finds the connection closed and answers with the failure.
            get_hub().loop.run_callback(lane.trouble)
        reader = self._reader
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)
        release(self.sock)

    # ---- batches from the event loop (connection.py, _Lane) ------------------------------------

    def lane_ready(self) -> bool:
        """Whether a batch of plain requests can be served from the event loop: a plain
        connection where every request gets one frame and nothing else is expected (in RESP3
        a push may still come, an invalidation another client redirects here: see
        _lane_frames)."""
        return (self._quiet and not self.closed and not self.tls and not self.push_mode
                and self._batch is None and self._adopted_inflight is None and not self._held
                and not self.framer.pending())

    def lane_call(self, requests: list, payload: bytes, waiter) -> None:
        """Write a batch of plain requests (lane_ready) without waiting: `waiter.switch(replies)`
        is called from the event loop once every reply is read; `waiter.trouble()` when the
        rest is for the client's greenlet (resume_lane): a write that did not go at once, a
        read that failed or ended, the connection given up (request timeout).
        `requests`: as framed, (bytes, name) pairs; they and the replies stay bytes (no
        Message objects) unless something else needs them (_lane_messages)."""
        watcher = self._idle_watcher
        if watcher is None:
            watcher = self._idle_watcher = get_hub().loop.io(self.sock.fileno(), 1)
        if not watcher.active:
            watcher.start(_REPLIES_READY, self)
        if self._tick is not None:
            self._quiet_since = None
            _WAITS.add(self)
        self._batch = requests
        self._replies = []
        self._lane_raw = True
        self._lane_fresh = True
        self._reply_budget = self.reply_limit if self.client_follows else None
        self._lane = waiter
        try:
            sent = self.sock._sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = -1
        if sent != len(payload):
            self._lane_unsent(payload, sent)

    def _lane_unsent(self, payload: bytes, sent: int) -> None:
        """lane_call's write took `sent` bytes of `payload` (-1: it failed): the client's
        greenlet writes the rest, or meets the error writing it all again."""
        waiter, self._lane = self._lane, None
        if sent >= 0:
            self._unsent = memoryview(payload)[sent:]
        else:
            self._unsent = memoryview(payload)
        get_hub().loop.run_callback(waiter.trouble)

    def _readable(self) -> None:
        """The server's socket is readable: the replies of the batch lane_call sent, or bytes
        while nothing is asked (the event loop's callback: nothing here may wait)."""
        lane = self._lane
        if lane is None:
            self._idle_readable()
            return
        total = len(self._batch)
        budget = self._reply_budget
        # The replies of a RESP2 batch that come whole in one read go on to the client as they
        # were read, with no copy and no call of the lane's switch, when it can take them now.
        to = lane.relay_fd() if self._lane_fresh and self._lane_raw and \
            self.state.resp_version == 2 else -1
        data = relay(self._idle_watcher.fd, to, total, self.framer.max_bulk_len,
                     LARGE_OUTPUT if budget is None or budget > LARGE_OUTPUT else budget)
        if data is None:
            return
        if type(data) is not bytes:  # relayed: how many bytes (and what was not written)
            self._quiet_since = None
            self._lane_done()
            lane.relayed(data)
            return
        self._lane_read(lane, data, total, budget)

    def _lane_read(self, lane, data: bytes, total: int, budget: Optional[int]) -> None:
        """The rest of _readable, once bytes are read that were not relayed (the C part of
        the lane calls it too)."""
        self._lane_fresh = False
        received = len(data)
        if not received:  # the greenlet reads the end (or the error) again, and settles it
            self._lane = None
            lane.trouble()
            return
        self._quiet_since = None
        if budget is not None:
            budget = self._reply_budget = budget - received
            if budget < 0:
                self.framer.feed(data)
                self._lane = None
                self._broken(OVER_OUTPUT_LIMIT, by_server=True)
                lane.trouble()
                return
        replies = self._replies
        resp3 = self.state.resp_version != 2
        while True:
            try:
                if data is not None:
                    frames = self.framer.take_fed(data, total - len(replies))
                    data = None
                else:
                    frames = self.framer.take(total - len(replies))
            except resp.ProtocolError:
                self._lane = None  # the greenlet frames it again and gives it up
                lane.trouble()
                return
            if not frames:
                break
            if resp3:
                frames = self._lane_frames(frames)
            if self._lane_raw:
                replies += frames
            else:
                replies += map(Message, frames)
            if len(replies) >= total or not resp3:
                break
        if len(replies) < total:
            return
        if resp3:
            self._take_trailing_pushes()
        if not self._lane_raw:
            replies = [reply.raw for reply in replies]
        self._lane_done()
        lane.switch(replies)

    def _lane_done(self) -> None:
        """Every reply of the batch lane_call sent is read: the connection is free again."""
        if self._held:
            self._release_held()  # pushes after the last reply: they follow it
        self._lane_raw = False
        self._answered = self._batch
        self._lane = None
        self._batch = self._replies = None
        self._reply_budget = None
        if self._tick is not None:
            _WAITS.owing.discard(self)

    def _lane_messages(self) -> None:
        """The batch the callbacks serve, as Message objects from now on, converted in place:
        for the greenlet that takes it over, and the handover."""
        if self._lane_raw:
            self._lane_raw = False
            as_messages(self._batch)
            as_messages(self._replies)

    def _lane_frames(self, frames: List[bytes]) -> List[bytes]:
        """RESP3 frames read for a batch served by callbacks, as replies: a push among them
        answers no request and is written just before the next reply (as _collect does)."""
        replies = []
        held = self._held
        for frame in frames:
            if frame[:1] == b">" and self._is_push(frame):
                held.append(frame)
            elif held:
                replies.append(b"".join(held) + frame)
                held.clear()
            else:
                replies.append(frame)
        return replies

    def resume_lane(self) -> List[Message]:
        """The replies of the batch lane_call began, read (and written) from where it stands,
        in the calling greenlet."""
        self._lane_messages()
        requests, replies = self._batch, self._replies
        unsent, self._unsent = self._unsent, None
        return self._call_direct(requests, replies if replies is not None else [],
                                 bytes(unsent) if unsent is not None else None)

    # ---- batches ------------------------------------------------------------------------------

    def call(self, requests: List[Message]) -> List[Message]:
        """Send a batch in one write and return one reply per request; never raises for
        upstream trouble: requests without a reply get an -ERR naming the failure."""
        if self.closed:
            return [Message.error(f"ERR {self.failure}")] * len(requests)
        if self.state.queued is None:
            # One pass decides both whether the batch goes as it is and whether it may block.
            blocking = False
            for request in requests:
                command = request.command
                if command in _NOTABLE:
                    if command in _NOT_SENT_AS_IS:
                        break
                    if not blocking and self.client_socket is not None:
                        blocking = may_block(command, request.args)
            else:
                return self._call(requests, blocking)
        return self._call_amended(requests)

    def _call_amended(self, requests: List[Message]) -> List[Message]:
        """Call with the requests the proxy does not send as they are: CLIENT REPLY inside
        MULTI is answered by the proxy; SYNC/PSYNC (outside MULTI, where the server refuses
        them itself) are sent as a stand-in whose reply, if any, becomes the refusal."""
        refused: Dict[int, Message] = {}
        standins = set()
        in_multi = self.state.queued is not None
        for index, request in enumerate(requests):
            command = request.command
            if command in STARTS_TRANSACTION:
                in_multi = True
            elif command in ENDS_TRANSACTION:
                in_multi = False
            elif in_multi and command == "CLIENT" and request.subcommand() == "REPLY":
                refused[index] = Message.error(_CLIENT_REPLY_IN_MULTI)
            elif in_multi and command == "REPLCONF":
                # Queued by Redis, it would leave a hole in the EXEC reply.
                refused[index] = replication_refused(command)
            elif not in_multi and command in REPLICATION_COMMANDS:
                standins.add(index)
        if not refused and not standins:
            return self._call(requests)
        sent = [_REPLICATION_STANDIN if i in standins else request
                for i, request in enumerate(requests) if i not in refused]
        answers = iter(self._call(sent) if sent else ())
        replies = []
        for index, request in enumerate(requests):
            if index in refused:
                replies.append(refused[index])
                continue
            reply = next(answers)
            if index in standins and reply.raw and not reply.is_error:
                reply = replication_refused(request.command)
            replies.append(reply)
        return replies

    def _call(self, requests: List[Message], blocking: Optional[bool] = None) -> List[Message]:
        """`blocking`: whether a request of the batch may block (None: not looked at yet)."""
        if blocking is None:
            blocking = self.client_socket is not None and _any_may_block(requests)
        if not blocking:
            return self._call_unwatched(requests)
        watcher = gevent.spawn(self._watch_client)
        try:
            return self._call_unwatched(requests)
        finally:
            watcher.kill(block=False)

    def _call_unwatched(self, requests: List[Message]) -> List[Message]:
        if self.push_mode:
            return self._call_via_reader(requests)
        replies = self._call_direct(requests)
        if self.state.pushes_expected and not self.closed:
            # From now on frames may arrive while the client sends nothing.
            self._enter_push_mode()
        return replies

    def _watch_client(self) -> None:
        """Close this connection if the client leaves while its batch waits for replies."""
        fd = self.client_socket.fileno()
        try:
            wait_read(fd)
            # Readable: closed, or more bytes (pipelined requests, TLS records) that are not
            # ours to read. The peer's FIN shows as POLLRDHUP whatever is still unread.
            poller = select.poll()
            poller.register(fd, _HANGUP)
            while not poller.poll(0):
                gevent.sleep(0.5)
        except (OSError, ValueError):
            pass
        self._broken(f"client left while a command on upstream {_fmt(self.address)} "
                     "was blocked", expected=True)

    def _call_direct(self, requests: List[Message], replies: Optional[List[Message]] = None,
                     payload: Optional[bytes] = None) -> List[Message]:
        """Write `requests` and read their replies in this greenlet. Resuming a handed-over
        batch: `replies` holds those already read and `payload` what is left to write."""
        if replies is None:
            replies = []
            payload = requests[0].raw if len(requests) == 1 else b"".join([r.raw for r in requests])
        watcher = self._idle_watcher
        if watcher is not None and watcher.active:
            watcher.stop()
        if self._tick is not None:
            self._quiet_since = None
            _WAITS.add(self)
        self._batch = requests
        self._replies = replies
        self._reply_budget = self.reply_limit if self.client_follows else None
        try:
            if payload:
                self._send(payload)
                self._just_sent = True
            self._collect(requests, replies)
        except UpstreamError as error:
            if self.state.quitting:
                # After QUIT the server answers nothing more, and neither does the proxy.
                reply = NO_REPLY
            elif self.lost_by_server and self.client_follows:
                # As directly: what the server sent (part of a reply included), then nothing.
                reply = NO_REPLY
                current = self._current
                if current is not None and current[2]:
                    replies.append(Message(b"".join(current[2])))
            else:
                reply = Message.error(f"ERR {error}")
            replies.extend([reply] * (len(requests) - len(replies)))
        finally:
            self._batch = self._replies = self._current = None
            self._reply_budget = None
            self._answered = requests
            if self._tick is not None:
                _WAITS.discard(self)
        self._take_trailing_pushes()
        if self._held:
            self._release_held()
        watcher = self._idle_watcher
        if watcher is not None and not self.closed and not watcher.active and \
                self.on_lost is not None and self.client_follows and not self.push_mode and \
                not self.state.pushes_expected:
            watcher.start(_REPLIES_READY, self)  # the idle watch again (see _watch_idle)
        else:
            self._watch_idle()
        return replies

    def _collect(self, requests: List[Message], replies: List[Message]) -> None:
        """Read the replies of requests[len(replies):] into `replies`."""
        state = self.state
        if self._quiet and self._current is None and state.resp_version == 2:
            # Every request outside TRACKED_COMMANDS is answered by one frame, and a RESP2
            # connection without subscriptions, MONITOR or tracking gets no other frame.
            for index in range(len(replies), len(requests)):
                if requests[index].command in TRACKED_COMMANDS:
                    break
            else:
                self._take_replies(len(requests), replies)
                return
        for index in range(len(replies), len(requests)):
            request = requests[index]
            current = self._current
            if current is None:
                if self._plain and request.command not in TRACKED_COMMANDS:
                    count, apply = 1, None  # what _expect() says first, without the call
                else:
                    count, apply = self._expect(request)
                if count == 1 and apply is None:
                    frame = self._read_reply_frame()
                    if self._held:
                        frame = self._take_held(request) + frame
                    replies.append(Message(frame))
                    continue
                current = self._current = [count, apply, []]
            frames = current[2]
            while len(frames) < current[0]:
                frames.append(self._read_reply_frame())
                if len(frames) == 1 and current[1] in DECIDED_BY_FIRST_FRAME:
                    self._first_frame(current, request, frames[0])
            self._current = None
            effect = current[1]
            if effect is not None:
                self._apply(effect, request, frames)
            if frames and self._held:
                frames.insert(0, self._take_held(request))
            replies.append(Message(b"".join(frames)) if frames else NO_REPLY)

    # ---- push mode: a reader greenlet owns the socket's read side -------------------------------

    def _enter_push_mode(self) -> None:
        self._unwatch_idle()
        self.push_mode = True
        self._reader = gevent.spawn(self._read_loop)

    def _call_via_reader(self, requests: List[Message]) -> List[Message]:
        entries = [_Pending(request) for request in requests]
        if self._tick is not None:
            self._quiet_since = None
            _WAITS.add(self)
        self._batch = requests
        self._replies = []
        self._entries = entries
        self._pending.extend(entries)
        self._all_done.clear()
        self._advance()
        try:
            self._send(b"".join(r.raw for r in requests))
        except UpstreamError:
            pass
        try:
            if self._pending and not self.closed:
                self._all_done.wait()
        finally:
            self._batch = self._replies = self._entries = None
            self._answered = requests
            if self._tick is not None:
                _WAITS.discard(self)
        replies = []
        lost = self.lost_by_server and self.client_follows
        for entry in entries:
            if not entry.done and self.state.quitting:
                replies.append(NO_REPLY)
            elif not entry.done and lost:
                replies.append(Message(entry.prefix + b"".join(entry.frames)) if entry.frames
                               else NO_REPLY)
            elif not entry.done:
                replies.append(Message.error(f"ERR {self.failure}"))
            elif entry.frames:
                replies.append(Message(entry.prefix + b"".join(entry.frames)))
            else:
                replies.append(NO_REPLY)
        self._pending.clear()
        return replies

    def _advance(self) -> Optional[_Pending]:
        """The request the next reply frame belongs to (None: none is waiting); requests that
        get no reply at all are completed on the way."""
        pending = self._pending
        while pending:
            entry = pending[0]
            if entry.count < 0:
                entry.count, entry.apply = self._expect(entry.request)
            if entry.count > len(entry.frames):
                return entry
            self._finish(entry)
        self._release_held()
        self._all_done.set()
        return None

    def _finish(self, entry: _Pending) -> None:
        self._pending.popleft()
        if entry.apply is not None:
            self._apply(entry.apply, entry.request, entry.frames)
        entry.done = True

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self._read_frame()
                if self._is_push(frame):
                    if self._pending:
                        self._held.append(frame)
                    else:
                        self.on_push(frame)
                    continue
                entry = self._advance()
                if entry is None:
                    # A reply nobody waits for means the accounting is off: say so loudly.
                    log.error("upstream %s sent an unexpected reply %r", _fmt(self.address),
                              frame[:80])
                    continue
                if not entry.frames and self._held:
                    entry.prefix = self._take_held(entry.request)
                entry.frames.append(frame)
                if len(entry.frames) == 1 and entry.apply in DECIDED_BY_FIRST_FRAME:
                    current = [entry.count, entry.apply]
                    self._first_frame(current, entry.request, frame)
                    entry.count, entry.apply = current
                if len(entry.frames) >= entry.count:
                    self._finish(entry)
                    self._advance()
        except UpstreamError:
            pass  # _broken() has told whom it concerns
        except gevent.GreenletExit:
            pass
        finally:
            self._pending.clear()
            self._all_done.set()
            self._release_held()


class _Waits:
    """The upstream connections that owe a reply, looked at by one greenlet every tick (the
    smallest tick among them), rather than a timer per wait: a batch only joins and leaves a
    set, which costs nothing next to a timer armed and disarmed around every read."""

    def __init__(self) -> None:
        self.owing: set = set()
        self.greenlet: Optional[gevent.Greenlet] = None

    def add(self, upstream: "UpstreamConnection") -> None:
        self.owing.add(upstream)
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def discard(self, upstream: "UpstreamConnection") -> None:
        self.owing.discard(upstream)

    def _run(self) -> None:
        try:
            while self.owing:
                gevent.sleep(min(upstream._tick for upstream in self.owing))
                now = time.monotonic()
                for upstream in list(self.owing):
                    try:
                        upstream._check_wait(now)
                    except Exception:
                        log.exception("checking the wait on upstream %s failed",
                                      _fmt(upstream.address))
        finally:
            self.greenlet = None


_WAITS = _Waits()

#: Set to run every step of the lane in Python even where the C part is built (a diagnostic:
#: both must behave the same; see connection._set_up_lane_in_c).
LANE_IN_PYTHON_ENV = "SHOTOVER_G_LANE_IN_PYTHON"
#: The callback of a server connection's watcher, given the connection: _readable, its usual
#: case in C where the extension is built.
_REPLIES_READY = UpstreamConnection._readable
if not os.environ.get(LANE_IN_PYTHON_ENV):
    try:
        from .protocol._scan import lane_replies as _REPLIES_READY  # noqa: F811
    except ImportError:
        pass


_SUBSCRIPTION_SETS = tuple(dict.fromkeys(SUBSCRIBE_KINDS.values()))


def _effect_name(effect: Optional[str]) -> Optional[str]:
    """How a checkpoint names the effect an in-flight reply still has to apply: the effects
    that decide how later replies are counted; the others are the session's to apply."""
    if effect is None:
        return None
    name = "_" + effect
    return name if name in REPLY_EFFECTS else None


def _imported_effect(name: Optional[str]) -> Optional[str]:
    if not name:
        return None
    effect = name.lstrip("_")
    return "hello" if effect == "hello_queued" else effect


def _any_may_block(requests: List[Message]) -> bool:
    for request in requests:
        if request.command in BLOCKING_COMMANDS and may_block(request.command, request.args):
            return True
    return False


def connect(address, timeout: float):
    """A connected TCP socket. A numeric address is connected directly: the general path asks
    the resolver first, which gevent runs in a thread pool (slow when a thousand clients
    reconnect at once)."""
    host, port = address[0], address[1]
    try:
        family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
        stdlib_socket.inet_pton(family, host)
    except OSError:
        return socket.create_connection(address, timeout=timeout)
    sock = socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        error = sock._sock.connect_ex((host, port))
        if error in _CONNECT_UNDER_WAY:
            try:
                # Over loopback the handshake is done within connect() itself: no wait (a
                # timer, a watcher, a turn of the loop, two more system calls) then.
                sock._sock.getpeername()
            except OSError:
                sock.connect((host, port))  # waits for the handshake: its error, or timed out
        elif error and error != errno.EISCONN:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


_CONNECT_UNDER_WAY = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


def _fmt(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(error: BaseException) -> str:
    if isinstance(error, stdlib_socket.timeout):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
