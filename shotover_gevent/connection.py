"""One client connection: its greenlet reads requests, runs them through its chain, writes replies.

It can stop at a request boundary, report what a successor needs, and carry on if asked.
"""

from __future__ import annotations

import enum
import logging
import os
import socket as stdlib_socket
from typing import TYPE_CHECKING, List, Optional

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from .chain import Chain, ConnectionContext
from .message import Message
from .netio import send_all
from .protocol import resp
from .session import TRACKED_COMMANDS, Session

if TYPE_CHECKING:  # pragma: no cover
    from .source import Source

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
#: Like Redis's client-query-buffer-limit: a client may not make the proxy buffer more than
#: this much of one unfinished request.
MAX_BUFFERED_BYTES = 1024 * 1024 * 1024


_SESSION_COMMANDS = TRACKED_COMMANDS | {"QUIT"}


#: Set whenever a connection stops at a request boundary or closes: what a drain waits on.
PAUSE_PROGRESS = Event()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class State(enum.Enum):
    SERVING = "serving"
    PAUSING = "pausing"        # asked to stop at the next request boundary
    PAUSED = "paused"          # stopped: every reply written, nothing more read
    HANDED_OVER = "handed-over"  # its socket belongs to the next program image now
    CLOSED = "closed"


class ClientConnection:
    #: While frozen for a handover: the pushes (pub/sub messages) that arrived meanwhile, which
    #: the next image delivers first, or this one once unfrozen.
    _frozen: Optional[List[bytes]] = None
    #: Handed down by the previous image: pushes it had read but not yet written to the client.
    _deliver_first: Optional[bytes] = None

    def __init__(self, sock, source: "Source", peer: str, session: Optional[Session] = None,
                 unread: bytes = b"", upstream: Optional[dict] = None) -> None:
        self.sock = sock
        self.source = source
        self.peer = peer
        self.session = session or Session()
        self.framer = resp.RequestFramer()
        if unread:
            self.framer.feed(unread)
        self.state = State.SERVING
        self.close_reason: Optional[str] = None
        self._idle = False
        self._in_batch = False
        self._deferred_pushes: List[bytes] = []
        self._write_lock = Semaphore()
        # Made only when the connection pauses: most connections never do, and an idle
        # connection's footprint is what 10,000 of them cost.
        self._resume: Optional[Event] = None
        self.greenlet: Optional[gevent.Greenlet] = None
        # Built on the first request: an idle connection costs no transforms (and adopting
        # thousands of connections in an upgrade stays quick).
        self._chain: Optional[Chain] = None
        # An upstream connection handed down by the previous image, adopted with the chain.
        self._upstream_record = upstream
        if upstream is not None and upstream.get("deliver"):
            self._deliver_first = upstream.pop("deliver")

    # ---- serving ------------------------------------------------------------------------------

    def start(self) -> gevent.Greenlet:
        self.greenlet = gevent.spawn(self.run)
        return self.greenlet

    def run(self) -> None:
        try:
            if self._deliver_first is not None:
                # Before the adopted subscriber connection's reader can push anything newer.
                payload, self._deliver_first = self._deliver_first, None
                self._write(payload)
            if self.session.subscribed:
                self.chain.prepare()
            if self.framer.pending():
                if not self._serve_buffered():
                    return
            sock = self.sock
            while True:
                if self.state is State.PAUSING and self.session.drain_blocker() is None:
                    if not self._park():
                        return
                self._idle = True
                try:
                    data = sock.recv(RECV_SIZE)
                finally:
                    self._idle = False
                if not data:
                    self.close_reason = self.close_reason or "client closed"
                    return
                self.framer.feed(data)
                if self.state is State.PAUSED:
                    # Paused while it waited in recv(): what arrived stays unread (a successor
                    # gets it from the checkpoint) until the pause ends.
                    if not self._park():
                        return
                if not self._serve_buffered():
                    return
        except stdlib_socket.timeout:
            self.close_reason = "idle timeout"
        except OSError as error:
            self.close_reason = f"client socket error: {error.strerror or error}"
        except gevent.GreenletExit:
            self.close_reason = self.close_reason or "stopped"
        except Exception:
            log.exception("connection from %s failed", self.peer)
            self.close_reason = "internal error"
        finally:
            if self.state is not State.HANDED_OVER:
                self._close()

    def _serve_buffered(self) -> bool:
        """Serve every complete request buffered. False when the connection must end."""
        framed, error = self.framer.pop_requests()
        if framed:
            requests = [Message(raw, name) for raw, name in framed]
            self._in_batch = True
            try:
                replies = self.chain.process(requests)
            finally:
                self._in_batch = False
            session = self.session
            quit_requested = False
            for request, reply in zip(requests, replies):
                name = request.command
                if name in _SESSION_COMMANDS:
                    session.observe(request, reply)
                    if name == "QUIT":
                        quit_requested = True
            if len(replies) == 1:
                payload = replies[0].raw
            else:
                payload = b"".join([reply.raw for reply in replies])
            self._write(payload)
            if quit_requested:
                self.close_reason = "client sent QUIT"
                return False
        if error is not None:
            self._write(resp.error_reply(f"ERR Protocol error: {error}"))
            log.info("closing connection from %s: protocol error: %s", self.peer, error)
            self.close_reason = "protocol error"
            return False
        if self.framer.pending() > MAX_BUFFERED_BYTES:
            self._write(resp.error_reply("ERR Protocol error: request larger than the proxy's "
                                         "query buffer limit"))
            self.close_reason = "query buffer limit"
            return False
        return True

    @property
    def chain(self) -> Chain:
        chain = self._chain
        if chain is None:
            source = self.source
            context = ConnectionContext(source.name, source.chain_name, self.peer, self.session,
                                        self.push)
            chain = self._chain = Chain(source.chain_name, source.builders, context)
            record, self._upstream_record = self._upstream_record, None
            if record is not None and not chain.adopt_upstream(record):
                _close_fd(record["fd"])  # the new topology sends this client elsewhere
        return chain

    def export_upstream(self) -> Optional[dict]:
        """This client's idle upstream connection, for the next image (None: it reconnects),
        with the pushes read from it that the client has not been sent yet."""
        if self._chain is None:
            record = self._upstream_record  # handed down to us and not used yet: pass it on
        else:
            record = self._chain.export_upstream()
        undelivered = (self._deliver_first or b"") + b"".join(self._frozen or ())
        if record is not None and undelivered:
            record = dict(record, deliver=undelivered)
        return record

    def _write(self, payload: bytes) -> None:
        with self._write_lock:
            if payload:
                send_all(self.sock, payload)
            if self._deferred_pushes:
                pushes, self._deferred_pushes = self._deferred_pushes, []
                send_all(self.sock, b"".join(pushes))

    def push(self, frame: bytes) -> None:
        """Deliver a frame that answers no request (pub/sub message, RESP3 push).

        During a batch it waits until that batch's replies are written, so a client never sees a
        message before the confirmation of the subscription it belongs to.
        """
        if self.state in (State.HANDED_OVER, State.CLOSED):
            return
        if self._frozen is not None:
            self._frozen.append(frame)
            return
        if self._in_batch:
            self._deferred_pushes.append(frame)
            return
        try:
            self._write(frame)
        except OSError:
            pass  # the connection's own greenlet notices and closes

    # ---- handover -----------------------------------------------------------------------------

    def request_pause(self) -> None:
        """Ask the connection to stop at its next request boundary (then it is PAUSED).

        A connection waiting in recv() with every reply written is at a boundary already: it
        becomes PAUSED at once and is left waiting (waking a thousand greenlets would cost
        tens of milliseconds of blackout). If bytes arrive before the handover, run() keeps
        them unread. A busy one, or one that cannot be handed over yet (MULTI, TLS...), goes on
        serving and stops at the first boundary where it can.
        """
        if self.state is not State.SERVING:
            return
        if self._idle and self.session.drain_blocker() is None:
            self.state = State.PAUSED
        else:
            self.state = State.PAUSING

    def _park(self) -> bool:
        """Stay paused until resumed (True) or handed over (False)."""
        self.state = State.PAUSED
        PAUSE_PROGRESS.set()
        self._resume = Event()
        self._resume.wait()
        self._resume = None
        return self.state not in (State.HANDED_OVER, State.CLOSED)

    @property
    def paused(self) -> bool:
        return self.state is State.PAUSED

    def handover_blocker(self) -> Optional[str]:
        """Why this connection cannot be handed over now (None: it can)."""
        if self.state is State.CLOSED:
            return "closed"
        if self.source.tls_context is not None:  # every client of a TLS source is encrypted
            return "tls"
        return self.session.handover_blocker()

    def unread_bytes(self) -> bytes:
        return self.framer.unread_bytes()

    def resume(self) -> None:
        """Carry on serving after an aborted upgrade: nothing was lost, nothing is replayed."""
        if self.state in (State.PAUSING, State.PAUSED):
            self.state = State.SERVING
            self._wake()

    def _wake(self) -> None:
        if self._resume is not None:
            self._resume.set()

    def freeze(self, timeout: Optional[float] = None) -> bool:
        """Hold the write side so that no push can be half-written when the image is replaced;
        pushes arriving from now on are kept for whoever serves the client next. False: a
        write in progress did not finish within `timeout` seconds."""
        acquired = (self._write_lock.acquire(blocking=False) if timeout == 0
                    else self._write_lock.acquire(timeout=timeout))
        if not acquired:
            return False
        self._frozen = []
        return True

    def unfreeze(self) -> None:
        if self._frozen is None:
            return  # not frozen: the write side is not ours to release
        pushes, self._frozen = self._frozen, None
        self._write_lock.release()
        if pushes:
            try:
                self._write(b"".join(pushes))
            except OSError:
                pass  # the connection's own greenlet notices and closes

    def mark_handed_over(self) -> None:
        """The socket now belongs to the next image: stop without closing it."""
        self.state = State.HANDED_OVER
        self._wake()
        if self._chain is not None:
            self._chain.close()

    def close(self, reason: str) -> None:
        """Close from outside (drain deadline, shutdown)."""
        self.close_reason = reason
        greenlet = self.greenlet
        if self.state is State.PAUSED:
            # Close now, before the program image can be replaced; a parked greenlet then
            # wakes up to CLOSED and ends, one still waiting in recv() is killed below.
            self._close()
            if self._resume is not None:
                self._wake()
                return
        if greenlet is not None and not greenlet.dead and greenlet is not gevent.getcurrent():
            greenlet.kill(block=False)
        else:
            self._close()

    def _close(self) -> None:
        # Once only: a paused connection closed from outside is closed again by its own
        # greenlet on the way out.
        if self.state is State.HANDED_OVER or self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if self._chain is not None:
            self._chain.close()
        if self._upstream_record is not None:
            _close_fd(self._upstream_record["fd"])
            self._upstream_record = None
        PAUSE_PROGRESS.set()
        sslobj = getattr(self.sock, "_sslobj", None)
        if sslobj is not None:
            # TLS clients get close_notify, as Redis sends it; their answer is not awaited.
            try:
                sslobj.shutdown()
            except (OSError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.source.connection_closed(self)

