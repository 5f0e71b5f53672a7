"""Connections to cluster nodes and the pool that shares them between client connections:
at most `connection_count` per node and credential set, each used by one batch at a time."""

from __future__ import annotations

import logging
import select
import socket as stdlib_socket
import ssl
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from gevent import socket
from gevent.lock import BoundedSemaphore

from ..netio import SERVER_RECV_BUFFER, SERVER_RECV_VIEW, send_all
from ..protocol import resp
from ..protocol.state import Credentials

log = logging.getLogger(__name__)

Address = Tuple[str, int]
#: Credentials: (username or None, password), or None for connections that never sent AUTH.



def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NodeError(Exception):
    """A node could not be reached, or its connection broke.

    `sent` tells whether the requests may have reached the node; `replies` are the frames
    read before the failure (one per request, in order)."""

    def __init__(self, text: str, sent: bool = False, replies: Optional[List[bytes]] = None):
        super().__init__(text)
        self.sent = sent
        self.replies = replies or []


class AuthError(Exception):
    """The node refused the credentials; the text is the node's error line (without '-')."""


def client_ssl_context(tls) -> ssl.SSLContext:
    """A cooperative (gevent) client context from shotover-style TLS settings."""
    from gevent import ssl as gevent_ssl  # only where TLS is configured: it is slow to import

    context = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = bool(tls.verify_hostname)
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.certificate_authority_path:
        context.load_verify_locations(tls.certificate_authority_path)
    else:
        context.load_default_certs()
    if tls.certificate_path:
        context.load_cert_chain(tls.certificate_path, tls.private_key_path)
    return context


def _reason(error: BaseException) -> str:
    if isinstance(error, stdlib_socket.timeout):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


class NodeConnection:
    """One connection to one node; `call` sends requests in one write and reads their replies."""

    __slots__ = ("address", "credentials", "protocol", "sock", "framer", "closed", "pool_key")

    def __init__(self, address: Address, connect_timeout: float, credentials: Credentials = None,
                 ssl_context: Optional[ssl.SSLContext] = None, protocol: int = 2) -> None:
        self.address = address
        self.credentials = credentials
        self.protocol = protocol
        self.framer = resp.ReplyFramer()
        self.closed = False
        self.pool_key = None
        where = format_address(address)
        try:
            raw = socket.create_connection(address, timeout=connect_timeout)
        except (OSError, stdlib_socket.timeout) as error:
            raise NodeError(f"cluster node {where} unavailable: {_reason(error)}") from None
        raw.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            try:
                raw = ssl_context.wrap_socket(raw, server_hostname=address[0])
            except (OSError, stdlib_socket.timeout) as error:
                raw.close()
                raise NodeError(f"TLS handshake with cluster node {where} failed: "
                                f"{_reason(error)}") from None
        self.sock = raw
        if credentials is not None:
            username, password = credentials
            args = [b"AUTH", password] if username is None else [b"AUTH", username, password]
            # Still under the connect timeout: a node that accepts but never answers fails here.
            reply = self.call([resp.encode_command(args)])[0]
            if reply[:1] == b"-":
                self.close()
                raise AuthError(reply[1:].strip().decode("utf-8", "replace"))
        if protocol != 2:
            reply = self.call([resp.encode_command([b"HELLO", str(protocol).encode()])])[0]
            if reply[:1] == b"-":
                self.close()
                raise NodeError(f"cluster node {where} refused RESP{protocol}: "
                                f"{reply[1:].strip().decode('utf-8', 'replace')}")
        raw.settimeout(None)

    def alive(self) -> bool:
        """False when the node closed the connection (or sent something nobody asked for)
        while it sat idle in the pool."""
        if self.closed:
            return False
        try:
            readable, _, _ = select.select([self.sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def call(self, raws: List[bytes]) -> List[bytes]:
        """Send requests (raw RESP) and return one reply frame per request."""
        where = format_address(self.address)
        if self.closed:
            raise NodeError(f"connection to cluster node {where} is closed")
        try:
            send_all(self.sock, raws[0] if len(raws) == 1 else b"".join(raws))
        except (OSError, stdlib_socket.timeout) as error:
            self.close()
            raise NodeError(f"write to cluster node {where} failed: {_reason(error)}") from None
        except BaseException:
            self.close()
            raise
        replies: List[bytes] = []
        framer = self.framer
        try:
            while len(replies) < len(raws):
                frame = framer.next_frame()
                if frame is not None:
                    if frame[:1] != b">":  # RESP3 pushes answer no request: none is asked for
                        replies.append(frame)
                    continue
                received = self.sock.recv_into(SERVER_RECV_BUFFER)
                if not received:
                    raise NodeError(f"cluster node {where} closed the connection", True, replies)
                framer.feed(SERVER_RECV_VIEW[:received])  # copied before any other greenlet runs
        except NodeError:
            self.close()
            raise
        except resp.ProtocolError as error:
            self.close()
            raise NodeError(f"cluster node {where} sent invalid RESP: {error}", True,
                            replies) from None
        except (OSError, stdlib_socket.timeout) as error:
            self.close()
            raise NodeError(f"read from cluster node {where} failed: {_reason(error)}", True,
                            replies) from None
        except BaseException:
            # Interrupted (the client's greenlet was killed): replies may still be on their way,
            # so this connection can never be lent out again.
            self.close()
            raise
        return replies

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class _Entry:
    __slots__ = ("semaphore", "idle", "open")

    def __init__(self, size: int) -> None:
        self.semaphore = BoundedSemaphore(size)
        self.idle: Deque[NodeConnection] = deque()
        self.open = 0


class NodePool:
    """Connections per (node, credentials), made lazily, shared by every client connection of a
    source. A connection is lent to one batch at a time (acquire, then release)."""

    def __init__(self, connect_timeout: float, connection_count: int = 1,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.connect_timeout = connect_timeout
        self.connection_count = connection_count
        self.ssl_context = ssl_context
        self._entries: Dict[tuple, _Entry] = {}
        self.closed = False

    def connect(self, address: Address, credentials: Credentials = None,
                protocol: int = 2) -> NodeConnection:
        """A connection outside the pool (the caller closes it)."""
        return NodeConnection(address, self.connect_timeout, credentials, self.ssl_context,
                              protocol)

    def acquire(self, address: Address, credentials: Credentials = None,
                protocol: int = 2) -> NodeConnection:
        """A connection to `address` authenticated with `credentials` and speaking RESP
        `protocol`; it must be given back with `release`."""
        if self.closed:
            raise NodeError("the cluster sink is shutting down")
        key = (address, credentials, protocol)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries.setdefault(key, _Entry(self.connection_count))
        entry.semaphore.acquire()
        try:
            while entry.idle:
                connection = entry.idle.pop()
                if connection.alive():
                    return connection
                connection.close()
                entry.open -= 1
            connection = self.connect(address, credentials, protocol)
        except BaseException:
            entry.semaphore.release()
            raise
        connection.pool_key = key
        entry.open += 1
        return connection

    def release(self, connection: NodeConnection) -> None:
        entry = self._entries.get(connection.pool_key)
        if entry is None:
            connection.close()
            return
        if connection.closed or self.closed:
            connection.close()
            entry.open -= 1
        else:
            entry.idle.append(connection)
        entry.semaphore.release()

    def open_connections(self) -> int:
        return sum(entry.open for entry in self._entries.values())

    def close(self) -> None:
        self.closed = True
        for entry in self._entries.values():
            while entry.idle:
                entry.idle.pop().close()
                entry.open -= 1
