"""A Redis source: a listening socket, its accept loop, connection limits, and its connections.

Listeners are kept open across an upgrade; while accepting is paused the kernel queues clients.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from typing import Dict, Optional, Set

import gevent
from gevent import socket
from gevent.event import Event

from . import observability
from .chain import ChainShared
from .config import SourceConfig, format_address
from .connection import ClientConnection
from .netio import bind_listener, stamp_arrivals
from .session import Session
from .transforms import build_builders

log = logging.getLogger(__name__)



class _Interrupt(Exception):
    """Thrown into an accept loop parked in accept() so that it notices it should stop."""


def describe_peer(address) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return format_address((address[0], address[1]))
    return str(address)


class Source:
    def __init__(self, config: SourceConfig, listener: Optional[socket.socket] = None) -> None:
        self.config = config
        self.name = config.name
        self.chain_name = config.name
        self.builders = build_builders(config.chain, self.chain_name)
        self.chain_shared = ChainShared(self.chain_name, self.builders)
        self.listener = listener
        self.connections: Set[ClientConnection] = set()
        self.closed_reasons: Dict[str, int] = {}
        self._capacity = Event()  # set while below connection_limit
        self._capacity.set()
        self._accepting = Event()
        self._in_accept = False
        self._accept_greenlet: Optional[gevent.Greenlet] = None
        self._available = observability.available_connections(self.name)
        self._available.set(config.connection_limit)
        self._open = observability.connections_open(self.name)
        #: Set by an upgrade when the previous version stamped arrivals on its sockets already.
        self.adopted_stamped = False
        self.tls_context = None
        if config.tls is not None:
            from .tls import server_context
            self.tls_context = server_context(config.tls)

    # ---- listening ----------------------------------------------------------------------------

    def bind(self, reuse_port: bool = False) -> None:
        """Listen on the source's address; with `reuse_port`, as one socket of a SO_REUSEPORT
        group (a worker's own socket, beside its siblings')."""
        host, port = self.config.listen_addr
        self.listener = bind_listener(self.name, host, port, reuse_port)

    @property
    def address(self) -> str:
        return format_address(self.listener.getsockname()[:2])

    def start_accepting(self) -> None:
        self._accepting.set()
        if self._accept_greenlet is None or self._accept_greenlet.dead:
            self._accept_greenlet = gevent.spawn(self._accept_loop)

    def stop_accepting(self) -> None:
        """New clients wait in the kernel's backlog until accepting starts again."""
        self._accepting.clear()
        if self._in_accept and self._accept_greenlet is not None:
            gevent.get_hub().loop.run_callback(self._interrupt_accept)

    def _interrupt_accept(self) -> None:
        greenlet = self._accept_greenlet
        if self._in_accept and greenlet is not None and not greenlet.dead:
            greenlet.throw(_Interrupt())

    def _accept_loop(self) -> None:
        hard = self.config.hard_connection_limit
        while True:
            self._accepting.wait()
            if not hard:
                # Soft limit: stop accepting while full; the kernel backlog holds the rest.
                self._capacity.wait()
                if not self._accepting.is_set():
                    continue
            self._in_accept = True
            try:
                client, address = self.listener.accept()
            except _Interrupt:
                continue
            except OSError as error:
                if self.listener.fileno() < 0:
                    return
                log.warning("source %s: accept failed: %s", self.name, error)
                gevent.sleep(0.05)
                continue
            finally:
                self._in_accept = False
            if hard and len(self.connections) >= self.config.connection_limit:
                log.warning("source %s: connection limit %d reached, refusing %s", self.name,
                            self.config.connection_limit, describe_peer(address))
                client.close()
                continue
            self._open_connection(client, describe_peer(address))

    def _open_connection(self, client, peer: str, session: Optional[Session] = None,
                         unread: bytes = b"", upstream=None, adopted: bool = False,
                         output: bytes = b"", deferred: bytes = b"") -> ClientConnection:
        if not adopted:  # an adopted socket keeps the options it was given when accepted
            client.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        if self.tls_context is None and not (adopted and self.adopted_stamped):
            stamp_arrivals(client)
        if self.config.timeout:
            client.settimeout(self.config.timeout)
        if self.tls_context is not None:
            from gevent.ssl import SSLContext  # noqa: F401  (gevent's wrapper cooperates)
            client = self.tls_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        connection = ClientConnection(client, self, peer, session, unread, upstream, output,
                                      deferred)
        self.connections.add(connection)
        self._count_changed()
        connection.start()
        return connection

    def adopt(self, client, record) -> ClientConnection:
        """Take over a connection handed down by the previous image (a checkpoint
        ConnectionRecord; even beyond the limit), with its upstream connection when one came
        along."""
        return self._open_connection(client, record.peer, Session.from_dict(record.session),
                                     record.unread, record.upstream, adopted=True,
                                     output=record.output, deferred=record.deferred)

    def connection_closed(self, connection: ClientConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self._count_changed()
            reason = connection.close_reason or "closed"
            log.debug("connection from %s closed: %s", connection.peer, reason)
            observability.connection_closed(self.name, reason)

    def forget(self, connection: ClientConnection) -> None:
        """Drop a connection that was handed over, without closing it."""
        if connection in self.connections:
            self.connections.discard(connection)
            self._count_changed()

    def _count_changed(self) -> None:
        count = len(self.connections)
        limit = self.config.connection_limit
        if count < limit:
            self._capacity.set()
        else:
            self._capacity.clear()
        self._available.set(max(0, limit - count))
        self._open.set(count)

    def close_listener(self) -> None:
        self.stop_accepting()
        if self._accept_greenlet is not None:
            self._accept_greenlet.kill(block=False)
        if self.listener is not None:
            self.listener.close()

    def close_builders(self) -> None:
        for builder in self.builders:
            try:
                builder.close()
            except Exception:
                log.exception("closing %s failed", builder.name)
