"""One connection to a Redis/Valkey server: connect, replay a session, send a batch, read replies.

Knows how many reply frames each request produces (pub/sub, CLIENT REPLY) and tells pushes apart.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from collections import deque
from typing import Callable, Deque, List, Optional

import gevent
from gevent import socket
from gevent.event import Event

from .message import NO_REPLY, Message
from .protocol import resp
from .session import SUBSCRIBE_KINDS, Session

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024

_SUBSCRIBE_FRAME_KINDS = frozenset(k.lower().encode() for k in SUBSCRIBE_KINDS)
# RESP2 pub/sub deliveries start with one of these exact prefixes.
_RESP2_DELIVERY_PREFIXES = (b"*3\r\n$7\r\nmessage\r\n", b"*4\r\n$8\r\npmessage\r\n",
                            b"*3\r\n$8\r\nsmessage\r\n")
# Commands that make the server send frames nobody asked for.
PUSH_COMMANDS = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"})


class UpstreamError(Exception):
    """The server could not be reached or the connection broke; the text goes to clients."""


class UpstreamConnection:
    """A connection to one server, used by one client connection at a time."""

    def __init__(self, address, connect_timeout: float, session: Session,
                 on_push: Callable[[bytes], None], ssl_context=None, server_hostname=None) -> None:
        self.address = address
        self.session = session
        self.on_push = on_push
        self.framer = resp.ReplyFramer()
        self.reply_mode = b"ON"
        self.skip_next = False
        self.monitor = False
        # Subscriptions as the server will see them once every request sent so far has run.
        self.predicted = {"channels": set(), "patterns": set(), "shard_channels": set()}
        self.push_mode = False
        self._reader: Optional[gevent.Greenlet] = None
        self._waiting: Deque[list] = deque()
        self._all_done = Event()
        self._failure: Optional[str] = None
        self.closed = False
        try:
            raw = socket.create_connection(address, timeout=connect_timeout)
        except (OSError, stdlib_socket.timeout) as error:
            raise UpstreamError(f"upstream {_fmt(address)} unavailable: {_reason(error)}") from None
        raw.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            try:
                raw.settimeout(connect_timeout)
                raw = ssl_context.wrap_socket(raw, server_hostname=server_hostname)
            except (OSError, stdlib_socket.timeout) as error:
                raw.close()
                raise UpstreamError(f"TLS handshake with {_fmt(address)} failed: {_reason(error)}") \
                    from None
        raw.settimeout(None)
        self.sock = raw
        self._replay_session()

    # ---- session replay -----------------------------------------------------------------------

    def _replay_session(self) -> None:
        commands = self.session.replay_commands()
        if not commands:
            return
        requests = [Message.request(args) for args in commands]
        counts = [self._frames_for(request) for request in requests]
        self._send(b"".join(r.raw for r in requests))
        for request, count in zip(requests, counts):
            frames = [self._read_frame() for _ in range(count)]
            for frame in frames:
                if frame[:1] in (b"-", b"!"):
                    self.close()
                    text = frame[1:].strip().decode("utf-8", "replace")
                    raise UpstreamError(f"could not restore the session on a new upstream "
                                        f"connection ({request.command}): {text}")
        if any(r.command in PUSH_COMMANDS for r in requests):
            self._enter_push_mode()

    # ---- reply accounting ---------------------------------------------------------------------

    def _frames_for(self, request: Message) -> int:
        """How many frames the server will send in reply to `request` (0 for none)."""
        command = request.command
        if self.reply_mode == b"OFF" or self.skip_next:
            self.skip_next = False
            if command == "CLIENT" and request.subcommand() == "REPLY":
                return self._client_reply(request)
            return 0
        if command == "CLIENT" and request.subcommand() == "REPLY":
            return self._client_reply(request)
        kind = SUBSCRIBE_KINDS.get(command)
        if kind is None:
            if command == "RESET":
                for members in self.predicted.values():
                    members.clear()
                self.reply_mode = b"ON"
            return 1
        members = self.predicted[kind]
        targets = request.args[1:]
        if command.startswith(("SUB", "PSUB", "SSUB")):
            members.update(targets)
            return max(1, len(targets))
        if targets:
            members.difference_update(targets)
            return len(targets)
        count = len(members)
        members.clear()
        return max(1, count)

    def _client_reply(self, request: Message) -> int:
        mode = request.args[2].upper() if len(request.args) > 2 else b""
        if mode == b"ON":
            self.reply_mode = b"ON"
            return 1
        if mode == b"OFF":
            self.reply_mode = b"OFF"
            return 0
        if mode == b"SKIP":
            self.skip_next = True
            return 0
        return 1 if self.reply_mode == b"ON" else 0

    def _is_push(self, frame: bytes) -> bool:
        first = frame[:1]
        if first == b">":
            value = resp.parse_frame(frame)
            kind = value[0] if isinstance(value, list) and value else b""
            return not (isinstance(kind, bytes) and kind.lower() in _SUBSCRIBE_FRAME_KINDS)
        if self.monitor:
            return True
        if first == b"*" and self.push_mode:
            return frame.startswith(_RESP2_DELIVERY_PREFIXES)
        return False

    # ---- I/O ----------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as error:
            self._broken(f"upstream {_fmt(self.address)} write failed: {_reason(error)}")
            raise UpstreamError(self._failure) from None

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
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError as error:
                self._broken(f"upstream {_fmt(self.address)} read failed: {_reason(error)}")
                raise UpstreamError(self._failure) from None
            if not data:
                self._broken(f"upstream {_fmt(self.address)} closed the connection")
                raise UpstreamError(self._failure)
            framer.feed(data)

    def _broken(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
            log.warning("%s", reason)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        reader = self._reader
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- batches ------------------------------------------------------------------------------

    def call(self, requests: List[Message]) -> List[Message]:
        """Send a batch in one write and return one reply per request; never raises for
        upstream trouble: requests without a reply get an -ERR naming the failure."""
        if self.closed:
            return [Message.error(f"ERR {self._failure or 'upstream connection closed'}")] * len(requests)
        counts = [self._frames_for(r) for r in requests]
        enters_push = any(r.command in PUSH_COMMANDS for r in requests)
        if enters_push and not self.push_mode:
            if self._waiting:
                return self._fail_all(requests)
            self._enter_push_mode()
        if self.push_mode:
            return self._call_via_reader(requests, counts)
        payload = requests[0].raw if len(requests) == 1 else b"".join([r.raw for r in requests])
        replies: List[Message] = []
        try:
            self._send(payload)
            for request, count in zip(requests, counts):
                if count == 1:
                    frame = self._read_frame()
                    while frame[:1] == b">" and self._is_push(frame):
                        self.on_push(frame)
                        frame = self._read_frame()
                    replies.append(Message(frame))
                elif count == 0:
                    replies.append(NO_REPLY)
                else:
                    frames = []
                    while len(frames) < count:
                        frame = self._read_frame()
                        if self._is_push(frame):
                            self.on_push(frame)
                        else:
                            frames.append(frame)
                    replies.append(Message(b"".join(frames)))
        except UpstreamError as error:
            text = f"ERR {error}"
            replies.extend([Message.error(text)] * (len(requests) - len(replies)))
        return replies

    def _fail_all(self, requests: List[Message]) -> List[Message]:
        return [Message.error("ERR proxy cannot enter pub/sub mode with replies pending")] * len(requests)

    # ---- push mode: a reader greenlet owns the socket's read side -------------------------------

    def _enter_push_mode(self) -> None:
        self.push_mode = True
        self._reader = gevent.spawn(self._read_loop)

    def _call_via_reader(self, requests: List[Message], counts: List[int]) -> List[Message]:
        slots = [[count, [], r.command == "MONITOR"] for count, r in zip(counts, requests)]
        for slot in slots:
            if slot[0]:
                self._waiting.append(slot)
        self._all_done.clear()
        try:
            self._send(b"".join(r.raw for r in requests))
        except UpstreamError:
            pass
        if self._waiting and not self.closed:
            self._all_done.wait()
        replies = []
        for slot in slots:
            count, frames = slot[0], slot[1]
            if len(frames) < count:
                replies.append(Message.error(f"ERR {self._failure or 'upstream connection closed'}"))
            elif count == 0:
                replies.append(NO_REPLY)
            else:
                replies.append(Message(b"".join(frames)))
        self._waiting.clear()
        return replies

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self._read_frame()
                if self._is_push(frame):
                    self.on_push(frame)
                    continue
                if not self._waiting:
                    # A reply nobody waits for means the accounting is off: say so loudly.
                    log.error("upstream %s sent an unexpected reply %r", _fmt(self.address),
                              frame[:80])
                    continue
                slot = self._waiting[0]
                slot[1].append(frame)
                if len(slot[1]) >= slot[0]:
                    if slot[2] and not frame[:1] == b"-":
                        # From MONITOR's +OK on, everything the server sends is a push.
                        self.monitor = True
                    self._waiting.popleft()
                    if not self._waiting:
                        self._all_done.set()
        except UpstreamError:
            pass
        except gevent.GreenletExit:
            pass
        finally:
            self._waiting.clear()
            self._all_done.set()


def _fmt(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(error: BaseException) -> str:
    if isinstance(error, stdlib_socket.timeout):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
