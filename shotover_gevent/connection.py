"""One client connection: its greenlet reads requests, runs them through its chain, writes replies.

It can stop at a request boundary, report what a successor needs, and carry on if asked.
"""

from __future__ import annotations

import enum
import logging
import os
import socket as stdlib_socket
from time import perf_counter
from typing import TYPE_CHECKING, List, Optional

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from .chain import Chain, ConnectionContext
from .message import Message, as_messages
from .netio import LARGE_OUTPUT, Readable, arrival_order, close_for_good, let_go, recv_stamped
from .protocol import resp
from .protocol.state import TRACKED_COMMANDS
from .session import Session
from .upstream import OVER_OUTPUT_LIMIT

if TYPE_CHECKING:  # pragma: no cover
    from .source import Source

log = logging.getLogger(__name__)

# A greenlet per client connection: gevent's record of who spawned each one (a weak reference,
# a dict and a capture of the spawning stack, per greenlet) is read by nothing here.
gevent.config.track_greenlet_tree = False

RECV_SIZE = 64 * 1024
#: Like Redis's client-query-buffer-limit: a client may not make the proxy buffer more than
#: this much of one unfinished request.
MAX_BUFFERED_BYTES = 1024 * 1024 * 1024

#: Requests sent upstream as one batch at most: what a batch's replies can hold in memory is
#: this many replies (a client that pipelines thousands of GETs of large values and reads
#: nothing holds one batch's replies, not all of them).
MAX_BATCH = 128
#: Reads that fill the whole receive buffer in a row before a connection lets others run.
BUSY_READS_BEFORE_YIELD = 4
YIELD_SECONDS = 0.0001


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


# The states as module globals for the per-request checks: a member looked up on its Enum class
# goes through EnumType's attribute hook (about 60 ns a time in Python 3.11, 170 ns for a test
# against two of them), a global is a dict lookup.
SERVING, PAUSING, PAUSED = State.SERVING, State.PAUSING, State.PAUSED
HANDED_OVER, CLOSED = State.HANDED_OVER, State.CLOSED
#: The connection is no longer this process's to serve.
_GONE = (HANDED_OVER, CLOSED)


class ClientConnection:
    # Slots: every request reads and writes a dozen of these, and with hundreds of
    # connections the attributes held in the object itself, rather than in a dict's values
    # beside it, keep more of them in the CPU's caches (at 500 clients, 10 % less CPU per
    # request with the upstream connection's slots too).
    __slots__ = ("sock", "source", "peer", "session", "framer", "state", "close_reason", "_idle",
                 "_in_batch", "_deferred_pushes", "_write_lock", "_resume", "greenlet", "_chain",
                 "_upstream_record", "_batch", "_outbox", "_unsent", "_output_first",
                 "_deferred_first", "_busy_reads", "_hang_up", "_readable", "_write_failed")

    def __init__(self, sock, source: "Source", peer: str, session: Optional[Session] = None,
                 unread: bytes = b"", upstream=None, output: bytes = b"",
                 deferred: bytes = b"") -> None:
        self.sock = sock
        self.source = source
        self.peer = peer
        self.session = session or Session()
        self.framer = resp.RequestFramer()
        if unread:
            self.framer.feed(unread)
        self.state = SERVING
        self.close_reason: Optional[str] = None
        self._idle = False
        self._in_batch = False
        self._deferred_pushes: List[bytes] = []
        self._write_lock = Semaphore()
        # Made only when the connection pauses: most connections never do.
        self._resume: Optional[Event] = None
        self.greenlet: Optional[gevent.Greenlet] = None
        # Built on the first request: an idle connection costs no transforms (and adopting
        # thousands of connections in an upgrade stays quick).
        self._chain: Optional[Chain] = None
        # An upstream connection handed down by the previous image (a checkpoint
        # UpstreamRecord), adopted with the chain.
        self._upstream_record = upstream
        #: The requests being served (from framing until their replies are handed to _write).
        self._batch: Optional[List[Message]] = None
        #: Payloads waiting for the write side (another greenlet is writing).
        self._outbox: Optional[List[bytes]] = None
        #: What is left to write of the payload being written.
        self._unsent: Optional[bytes] = None
        #: Handed down by the previous image: bytes owed to the client before anything else,
        #: and messages that follow the replies of the batch that was in flight.
        self._output_first: bytes = output or b""
        self._deferred_first: bytes = deferred or b""
        #: Consecutive reads served without waiting: bounded, then the hub gets a turn.
        self._busy_reads = 0
        #: Why the server ended this client's upstream connection: this one ends after the
        #: replies of the batch under way are written (see hang_up).
        self._hang_up: Optional[str] = None
        #: The plain client socket's read watcher (netio.Readable), once the greenlet runs.
        self._readable: Optional[Readable] = None
        #: Why a write to the client failed (it is gone): the requests it sent before are still
        #: served, as Redis serves what it has read, and what they are owed goes nowhere; then
        #: the connection ends (see _serve_buffered).
        self._write_failed: Optional[OSError] = None

    # ---- serving ------------------------------------------------------------------------------

    def start(self) -> gevent.Greenlet:
        self.greenlet = gevent.spawn(self.run)
        return self.greenlet

    def run(self) -> None:
        readable = None
        try:
            if self._output_first:
                self._write(b"")  # what the previous image owed the client goes out first
            record = self._upstream_record
            if record is not None and record.inflight is not None:
                if self._deferred_first:  # they follow the replies of that batch
                    self._deferred_pushes.insert(0, self._deferred_first)
                    self._deferred_first = b""
                if not self._finish_handed_over_batch(record.inflight):
                    return
            elif record is not None and record.push:
                self.chain  # noqa: B018 (adopted now: messages may be waiting on it)
            if self._deferred_first:
                payload, self._deferred_first = self._deferred_first, b""
                self._write(payload)
            if self.session.subscribed:
                self.chain.prepare()
            if self.framer.pending():
                if not self._serve_buffered():
                    return
            sock = self.sock
            # Plain sockets are read in arrival order across connections, which also gives
            # the others a turn when this client keeps its socket full (see netio); TLS ones
            # through their wrapper.
            order = arrival_order(gevent.get_hub()) if self.source.tls_context is None else None
            readable = self._readable = Readable(sock) if order is not None else None
            wait_first = False
            while True:
                if self.state is PAUSING and self.session.drain_blocker() is None:
                    if not self._park():
                        return
                if readable is not None and self._lane_usable():
                    if not self._after_lane(self._serve_on_lane(readable, order)):
                        return
                    wait_first = False
                    continue
                self._idle = True
                try:
                    if order is not None:
                        data, arrived, waited, wait_first = order.recv(sock, RECV_SIZE,
                                                                      wait_first, readable)
                    else:
                        data = sock.recv(RECV_SIZE)
                finally:
                    self._idle = False
                if not data:
                    self.close_reason = self.close_reason or "client closed"
                    return
                self.framer.feed(data)
                if order is not None:
                    order.my_turn(arrived, waited)
                    if self.state is HANDED_OVER:
                        return
                elif len(data) == RECV_SIZE:
                    # A TLS client keeping its socket full: after a few such reads in a row,
                    # every other connection gets a turn (gevent's recv() only yields when
                    # there is nothing to read). A timer, not sleep(0), which would only run
                    # pending callbacks without polling the others' sockets.
                    self._busy_reads += 1
                    if self._busy_reads >= BUSY_READS_BEFORE_YIELD:
                        self._busy_reads = 0
                        gevent.sleep(YIELD_SECONDS)
                elif self._busy_reads:
                    self._busy_reads = 0
                if self.state is PAUSED:
                    # Paused while it waited in recv(): what arrived stays unread (a successor
                    # gets it from the checkpoint) until the pause ends.
                    if not self._park():
                        return
                if readable is not None and self._chain is None and \
                        self._lane_usable(opening=True):
                    # The connection's first requests: on the lane from the start.
                    if not self._after_lane(self._serve_on_lane(readable, order, first=True)):
                        return
                    wait_first = False
                    continue
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
            if readable is not None:
                readable.stop()
            if self.state is not HANDED_OVER:
                self._close()
            # The chain's transforms and the socket's watcher refer back to this connection:
            # let go of them, so that all of it is freed as soon as the last reference goes,
            # not left to the cycle collector (a dozen objects per connection, collected tens
            # of microseconds later).
            self._chain = None
            self._readable = None

    def _finish_handed_over_batch(self, inflight) -> bool:
        """Answer the batch the previous image had sent upstream when it handed this
        connection over: its replies arrive on the inherited upstream connection."""
        requests = [Message(raw) for raw in inflight.requests]
        replies = self._run_batch(requests, self.chain.resume_inflight)
        if replies is None:
            # The new topology no longer sends this client to that server: the replies cannot
            # be read. Each request still gets one.
            log.warning("connection from %s: %d requests in flight were sent to a server the "
                        "new topology no longer uses", self.peer, len(requests))
            replies = [Message.error("ERR the proxy was reconfigured while this command was in "
                                     "flight; its outcome is unknown")] * len(requests)
        return self._answer(requests, replies)

    def _run_batch(self, requests: List[Message], run) -> Optional[List[Message]]:
        """`run(requests)` through the chain, the batch recorded where an upgrade finds it and
        pushes meanwhile held back until its replies are written."""
        self._batch = requests
        self._in_batch = True
        try:
            return run(requests)
        finally:
            self._in_batch = False

    def _serve_buffered(self, first=None) -> bool:
        """Serve every complete request buffered, MAX_BATCH at a time (a deep pipeline of large
        replies is held a batch at a time, not all at once); `first`: what the lane framed
        already, (requests, error). False when the connection must end."""
        while True:
            if self.state is HANDED_OVER:
                return False  # another process serves this client now
            if first is not None:
                (framed, error), first = first, None
            else:
                framed, error = self.framer.pop_requests(MAX_BATCH)
            if framed:
                requests = [Message(raw, name) for raw, name in framed]
                if not self._answer(requests, self._run_batch(requests, self.chain.process)):
                    return False
            if error is not None or len(framed) < MAX_BATCH:
                break
        if self._write_failed is not None:
            failure = self._write_failed
            self.close_reason = f"client socket error: {failure.strerror or failure}"
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

    def _answer(self, requests: List[Message], replies: List[Message]) -> bool:
        """Note what the batch changed, then write its replies. False: the client quit."""
        session = self.session
        quit_requested = False
        plain = session.plain
        for request, reply in zip(requests, replies):
            name = request.command
            if not plain or name in TRACKED_COMMANDS:
                session.observe(request, reply)
                plain = session.plain
                if name == "QUIT":
                    quit_requested = True
        if len(replies) == 1:
            payload = replies[0].raw
        else:
            payload = b"".join([reply.raw for reply in replies])
        if len(payload) > LARGE_OUTPUT and self._over_output_limit(len(payload)):
            return False
        # From here the replies are output: an upgrade hands them over as bytes to write.
        self._write(payload, batch_done=True)
        if self._hang_up is not None:
            self.close_reason = self._hang_up
            return False
        if quit_requested:
            self.close_reason = "client sent QUIT"
            return False
        return True

    # ---- the lane -----------------------------------------------------------------------------

    def _lane_usable(self, opening: bool = False) -> bool:
        """Whether the lane can serve this connection from here (see _Lane). `opening`: with
        the requests buffered, the first of the connection (the chain is built for them)."""
        if self.state is not SERVING:
            return False
        chain = self._chain
        if chain is None:
            if not opening:
                return False
            chain = self.chain
        sink = chain.sink_after_screens
        return (sink is not None and (opening or sink.lane_ready()) and self.session.plain
                and self._hang_up is None and not self.source.config.timeout
                and (opening or not self.framer.pending()) and not self._outbox
                and self._unsent is None and not self._deferred_pushes
                and not self._output_first)

    def _serve_on_lane(self, readable: Readable, order, first: bool = False) -> tuple:
        """Let the lane serve until it hands the connection back: why it did. `first`: it
        begins with the requests buffered, the connection's first (see _Lane.opening)."""
        lane = _Lane(self, readable, order)
        readable.attach(lane.on_readable)
        try:
            if first:
                lane.busy = lane.opening = True
                lane.serve()
                lane.opening = False
                if lane.stopped:
                    return lane.why
            else:
                self._idle = True
            return gevent.get_hub().switch()
        finally:
            lane.stopped = True
            readable.detach()
            # The callbacks hold the lane: no cycle left. A sink may still answer a batch
            # (switch): the lane, stopped, has nothing to do with it.
            lane.on_readable = lane.resume = None
            lane.switch = _answer_after_stop
            self._idle = False

    def _after_lane(self, why: tuple) -> bool:
        """Take over from the lane where it stopped (see _Lane.give_back). False: the
        connection ends."""
        kind = why[0] if isinstance(why, tuple) else "check"
        if kind == "eof":
            self.close_reason = self.close_reason or "client closed"
            return False
        if kind == "error":
            raise why[1]
        if kind == "end":
            return False
        if kind == "crash":
            self.close_reason = "internal error"
            return False
        if kind == "run":
            requests, started, entered = why[1:]
            chain = self.chain
            replies = self._run_batch(
                requests, lambda batch: chain.run_rest(batch, started, entered))
            if not self._answer(requests, replies):
                return False
            return self._serve_buffered()
        if kind == "framed":
            return self._serve_buffered(why[1])
        if kind == "resume":
            started, entered = why[1:]
            chain = self.chain
            requests = as_messages(self._batch)  # the callbacks may have kept it as framed
            replies = self._run_batch(
                requests, lambda batch: chain.finish_submitted(batch, started, entered))
            if not self._answer(requests, replies):
                return False
            return self._serve_buffered()
        if kind == "flush":
            self._write(b"", batch_done=True)
            if self._hang_up is not None:
                self.close_reason = self._hang_up
                return False
            return self._serve_buffered()
        # "check": the state changed (a pause, an upgrade)
        if self.state is PAUSED and not self._park():
            return False
        return self._serve_buffered()

    @property
    def chain(self) -> Chain:
        chain = self._chain
        if chain is None:
            source = self.source
            context = ConnectionContext(source.name, source.chain_name, self.peer, self.session,
                                        self.push, self.hang_up)
            chain = self._chain = Chain(source.chain_name, source.builders, context,
                                        source.chain_shared)
            record, self._upstream_record = self._upstream_record, None
            if record is not None and not chain.adopt_upstream(record):
                _close_fd(record.fd)  # the new topology sends this client elsewhere
        return chain

    def _write(self, payload: bytes, batch_done: bool = False) -> None:
        """Write `payload` (after whatever is queued), then the pushes a batch deferred.

        Everything owed to the client is always somewhere an upgrade can see it: queued in
        the outbox, or the unsent part of the write under way."""
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = []
        if self._output_first:
            outbox.append(self._output_first)
            self._output_first = b""
        if payload:
            outbox.append(payload)
        if batch_done:
            self._batch = None
            if self._deferred_pushes:
                outbox.extend(self._deferred_pushes)
                self._deferred_pushes = []
        if not outbox:
            return
        with self._write_lock:
            sock = self.sock
            while outbox:
                if self._write_failed is not None:
                    outbox.clear()  # the client is gone: what it is owed goes nowhere
                    break
                data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                outbox.clear()
                self._unsent = data
                aside = None
                try:
                    if self._readable is not None:  # a plain socket: try without waiting
                        try:
                            sent = sock._sock.send(data)
                        except BlockingIOError:
                            sent = 0
                    else:
                        sent = sock.send(data)
                    if sent < len(data):
                        view = self._unsent = memoryview(data)[sent:]
                        aside = _ReadAside.start(self)
                        while view:
                            view = self._unsent = view[sock.send(view):]
                except stdlib_socket.timeout:
                    raise
                except OSError as error:
                    self._write_failed = _without_traceback(error)
                finally:
                    self._unsent = None
                    if aside is not None:
                        aside.stop()

    def hang_up(self, reason: str) -> None:
        """The server ended this client's upstream connection: end this one too, as the
        client would have seen directly; at once when it waits for requests, else once the
        replies that did arrive are written (_answer)."""
        self._hang_up = reason
        if self._idle or self.state is PAUSED:
            self.close(reason)

    def _over_output_limit(self, adding: int) -> bool:
        """Whether what this client is owed, with `adding` more bytes, passes the source's
        output_buffer_limit; if so the connection is closed (logged and counted), as Redis
        closes a client over its client-output-buffer-limit."""
        limit = self.source.config.output_buffer_limit
        if not limit:
            return False
        owed = adding + (len(self._unsent) if self._unsent is not None else 0)
        if self._outbox:
            owed += sum(len(part) for part in self._outbox)
        if owed <= limit:
            return False
        if self._hang_up == OVER_OUTPUT_LIMIT:
            # The sink stopped taking this batch's replies at the limit and said so already.
            self.close_reason = "output buffer limit"
            return True
        log.warning("closing connection from %s: %d bytes owed to it, over the source's "
                    "output_buffer_limit of %d (it does not read its replies)", self.peer,
                    owed, limit)
        self.close_reason = "output buffer limit"
        return True

    def push(self, frame: bytes) -> None:
        """Deliver a frame that answers no request (pub/sub message, RESP3 push).

        During a batch it waits until that batch's replies are written, so a client never sees a
        message before the confirmation of the subscription it belongs to.
        """
        if self.state in _GONE:
            return
        if self._write_lock.locked() and self._over_output_limit(len(frame)):
            self.close(self.close_reason or "output buffer limit")
            return
        if self._in_batch:
            self._deferred_pushes.append(frame)
            return
        try:
            self._write(frame)
        except OSError:
            pass  # the connection's own greenlet notices and closes

    # ---- handover -----------------------------------------------------------------------------

    def handover_status(self) -> str:
        """Whether this connection can be handed over this very moment: "ok", "tls" (never:
        its encryption state lives in this process), "closed", or "busy" (a batch is at a
        point the next image could not take over; it will not be for long)."""
        if self.state is CLOSED:
            return "closed"
        if self.source.tls_context is not None:  # every client of a TLS source is encrypted
            return "tls"
        if self._chain is None:
            return "ok"
        return self._chain.export_upstream(self._batch)[1]

    def export(self):
        """(record fields, status) for the next image, taken at this moment without waiting
        for anything: what the client sent and no request was made of yet, what it is owed
        (output), its session, and its upstream connection as it stands, with the batch in
        flight on it if there is one. Status as handover_status(); no record unless "ok"."""
        status = self.handover_status()
        if status in ("tls", "closed", "busy"):
            return None, status
        batch = self._batch
        upstream = None
        if self._chain is None:
            upstream = self._upstream_record  # handed down to us and not used yet: pass it on
            status = "inflight" if upstream is not None and upstream.inflight is not None \
                else "ok"
        else:
            upstream, status = self._chain.export_upstream(batch)
            if status == "busy":
                return None, status
        unread = self.framer.unread_bytes()
        if status == "unsent":
            # Nothing of the batch reached the server: the next image serves it afresh. (The
            # callbacks keep a batch as framed, even one whose connection failed to open and
            # whose errors are still to be written.)
            unread = b"".join([request.raw for request in as_messages(batch)]) + unread
        output = self._output_first
        if self._unsent is not None:
            output += bytes(self._unsent)
        if self._outbox:
            output += b"".join(self._outbox)
        deferred = self._deferred_first + b"".join(self._deferred_pushes)
        if status != "inflight" and deferred:
            output, deferred = output + deferred, b""
        return {"unread": unread, "session": self.session.to_dict(), "upstream": upstream,
                "output": output, "deferred": deferred}, status

    def request_pause(self) -> None:
        """Ask the connection to stop at its next request boundary (then it is PAUSED).

        A connection waiting in recv() with every reply written is at a boundary already: it
        becomes PAUSED at once and is left waiting (waking a thousand greenlets would cost
        tens of milliseconds of blackout). If bytes arrive before the handover, run() keeps
        them unread. A busy one goes on serving and stops at the first boundary.
        """
        if self.state is not SERVING:
            return
        if self._idle and self.session.drain_blocker() is None:
            self.state = PAUSED
        else:
            self.state = PAUSING

    def _park(self) -> bool:
        """Stay paused until resumed (True) or handed over (False)."""
        self.state = PAUSED
        PAUSE_PROGRESS.set()
        self._resume = Event()
        self._resume.wait()
        self._resume = None
        return self.state not in _GONE

    def resume(self) -> None:
        """Carry on serving after an aborted upgrade: nothing was lost, nothing is replayed."""
        if self.state in (PAUSING, PAUSED):
            self.state = SERVING
            self._wake()

    def _wake(self) -> None:
        if self._resume is not None:
            self._resume.set()

    def abandon(self) -> None:
        """Let go of a connection the next image has adopted: this process stops serving it
        without touching the sockets (no shutdown, no close_notify, nothing written)."""
        if self.state is CLOSED:
            return
        self.state = HANDED_OVER
        greenlet = self.greenlet
        if greenlet is not None and not greenlet.dead and greenlet is not gevent.getcurrent():
            # Killed at the next turn of the loop; should anything wake it first (its turn in
            # arrival order, a reply), it finds itself handed over and serves nothing.
            greenlet.kill(block=False)
        if self._chain is not None:
            self._chain.abandon()
        if self._upstream_record is not None:
            _close_fd(self._upstream_record.fd)
            self._upstream_record = None
        let_go(self.sock)
        self.source.forget(self)

    def close(self, reason: str, now: bool = False) -> None:
        """Close from outside (drain deadline, shutdown). `now`: the socket is closed before
        this returns (an upgrade's old side runs no greenlet after it has handed over)."""
        self.close_reason = reason
        greenlet = self.greenlet
        if self.state is PAUSED or now:
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
        if self.state is HANDED_OVER or self.state is CLOSED:
            return
        self.state = CLOSED
        if self._chain is not None:
            self._chain.close()
        if self._upstream_record is not None:
            _close_fd(self._upstream_record.fd)
            self._upstream_record = None
        PAUSE_PROGRESS.set()
        sslobj = getattr(self.sock, "_sslobj", None)
        if sslobj is not None:
            # TLS clients get close_notify, as Redis sends it; their answer is not awaited.
            try:
                sslobj.shutdown()
            except (OSError, ValueError):
                pass
        close_for_good(self.sock)
        self.source.connection_closed(self)



def _without_traceback(error: OSError) -> OSError:
    """A write's error, kept to say why the client is gone, without the frames it was raised
    through: they hold the connection and the replies being written, and the connection would
    hold them, a cycle only the garbage collector frees (megabytes per client that resets
    while owed large replies)."""
    error.__traceback__ = None
    error.__context__ = None
    return error


class _ReadAside:
    """Reads a client's requests while a write of its replies waits for room in its socket.

    A client may send a whole pipeline before it reads any reply (redis-py's pipelines do):
    Redis reads on and keeps the replies, while a proxy that stopped reading until its write
    went through would wait for the client, and the client for it, for ever. What is read
    here is only buffered (up to the source's output_buffer_limit, else the query buffer
    limit) and served once the write is done, a batch at a time as ever. Plain sockets and the
    connection's own greenlet only (another greenlet writing, a push say, leaves the socket's
    reads to the connection's greenlet)."""

    __slots__ = ("connection", "readable", "fd", "limit")

    @classmethod
    def start(cls, connection: ClientConnection) -> Optional["_ReadAside"]:
        readable = connection._readable
        if readable is None or readable.greenlet is not None or readable.lane is not None or \
                connection.state is not SERVING or \
                gevent.getcurrent() is not connection.greenlet:
            return None
        aside = cls()
        aside.connection = connection
        aside.readable = readable
        aside.fd = connection.sock.fileno()
        aside.limit = connection.source.config.output_buffer_limit or MAX_BUFFERED_BYTES
        readable.attach(aside.fired)
        return aside

    def fired(self) -> None:
        connection = self.connection
        framer = connection.framer
        if connection.state is not SERVING or framer.pending() >= self.limit:
            self.readable.pause()  # read again once the write is done
            return
        try:
            data, _stamp = recv_stamped(self.fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the end, or an error: the greenlet reads it again once it reads
            self.readable.pause()
            return
        framer.feed(data)

    def throw(self, *args) -> None:
        """gevent closing the socket cancels waits through the callback's owner: nothing
        waits on this one."""

    def stop(self) -> None:
        self.readable.detach()


class _Lane:
    """Serves a connection's plain batches from the event loop's callbacks while its greenlet
    waits: the read, the screens, the batch handed to the sink (its shared connection), and
    the replies written, with no greenlet switch and no system call beyond the read and the
    write. Anything else (a request the sink does not take this way, a protocol error, a
    reply that does not fit the socket, a pause, the client gone) hands the connection back to
    its greenlet, which goes on from there as if it had done all of it itself."""

    __slots__ = ("connection", "fd", "readable", "watcher", "order", "busy", "stopped", "batch",
                 "opening", "why", "chain", "sink", "screens", "sink_index", "record",
                 "on_readable", "resume", "switch")

    def __init__(self, connection: ClientConnection, readable: Readable, order) -> None:
        self.connection = connection
        #: Read only while the connection is SERVING: closing or handing it over changes the
        #: state before the descriptor goes.
        self.fd = connection.sock.fileno()
        self.readable = readable
        self.watcher = connection.sock._read_event
        self.order = order
        # The connection's chain, which stays the same while the connection lives, and its
        # sink, held here: with hundreds of connections, each object a request reaches costs
        # memory reads the CPU's caches no longer hold.
        chain = self.chain = connection._chain
        self.screens = chain.screens
        self.sink_index = len(chain.transforms) - 1
        self.sink = chain.transforms[-1]
        # What every connection of the chain shares records the batches: the connection's
        # own chain is not reached at all for a batch that no screen looks at.
        self.record = chain.shared.record
        #: Bytes read and not answered yet: the next are read once they are.
        self.busy = False
        self.stopped = False
        #: The batch whose replies are owed: (its size, when it entered the chain, how many
        #: screens passed it on).
        self.batch: Optional[tuple] = None
        #: serve() runs in the connection's greenlet, for its first requests: the sink may
        #: open its upstream connection (Transform.submit_first), and give_back() keeps why
        #: in `why` for _serve_on_lane.
        self.opening = False
        self.why: Optional[tuple] = None
        #: The watcher's callback (readable_now), the turn's (serve) and the sink's answer
        #: (switch_in_python): their usual case in C where the extension is built (see
        #: _scan.c), the same methods otherwise.
        self.on_readable, self.resume, self.switch = _lane_callbacks(self)

    def give_back(self, why: tuple) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.readable.detach()
        if self.opening:
            self.why = why
            return
        greenlet = self.connection.greenlet
        if greenlet is not None and not greenlet.dead:
            greenlet.switch(why)

    def throw(self, *args) -> None:
        """gevent closing the socket cancels a wait on its watcher through the callback's
        owner: the lane's while it is attached (see Readable.attach)."""
        self.readable.throw(*args)

    def readable_now(self) -> None:
        """The client's socket is readable."""
        connection = self.connection
        if self.busy or connection.state is not SERVING:
            self.readable.pause()  # read once this batch is answered, or by the greenlet
            if not self.busy:
                self.give_back(("check",))
            return
        try:
            data, stamp = recv_stamped(self.fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            self.give_back(("error", error))
            return
        if not data:
            self.give_back(("eof",))
            return
        connection.framer.feed(data)
        connection._idle = False
        self.busy = True
        order = self.order
        if order.waiting or order.loop.pendingcnt:
            # Others may have sent before this client: the arrival time settles it.
            order.queue(stamp, self.resume)
            return
        self.serve()

    def serve(self) -> None:
        """Frame what the client sent and hand it to the sink (its turn has come)."""
        connection = self.connection
        if self.stopped or connection.state in _GONE:
            return
        try:
            framed, error = connection.framer.pop_requests(MAX_BATCH)
            if error is not None:
                self.give_back(("framed", (framed, error)))
                return
            if not framed:  # the rest of a request is still to come
                if connection.framer.pending() > MAX_BUFFERED_BYTES:
                    self.give_back(("framed", (framed, error)))
                    return
                self._written(rest_to_come=True)
                return
            started = perf_counter()
            # No Message objects unless the greenlet has to take over: the screens see the
            # command names only.
            entered = self.chain.screen_framed(framed, started) if self.screens else 0
        except Exception:
            log.exception("connection from %s failed", connection.peer)
            self.give_back(("crash",))
            return
        self.submit(framed, started, entered)

    def submit(self, framed: list, started: float, entered: int) -> None:
        """Hand a framed batch that `entered` screens passed on to the sink, or give it back to
        the greenlet when the sink does not take it this way (the rest of serve; the lane's
        C part calls it for what it does not do itself)."""
        connection = self.connection
        try:
            if entered == self.sink_index:
                self.batch = (len(framed), started, entered)
                if self.opening:
                    # The sink may wait while it connects: the batch is where an upgrade
                    # finds it meanwhile, as requests none of which reached the server.
                    connection._batch = [Message(raw, name) for raw, name in framed]
                    connection._in_batch = True
                    batch = self.sink.submit_first(framed, self)
                    if connection.state in _GONE:
                        return  # handed over while it waited: the next image serves it
                    if batch is None:
                        connection._batch = None
                        connection._in_batch = False
                else:
                    batch = self.sink.submit(framed, self)
                if batch is not None:
                    # Where an upgrade finds it (the sink's own record of it says more).
                    connection._batch = batch
                    connection._in_batch = True
                    return
                self.batch = None
            requests = [Message(raw, name) for raw, name in framed]
            self.give_back(("run", requests, started, entered))
        except Exception:
            log.exception("connection from %s failed", connection.peer)
            self.give_back(("crash",))

    def crashed(self, error: BaseException) -> None:
        """What the C part of the lane met that it cannot go on from (see serve's except)."""
        log.error("connection from %s failed", self.connection.peer, exc_info=error)
        self.give_back(("crash",))

    def switch_in_python(self, result) -> None:
        """The sink's answer to the batch submitted (called from the event loop). Reached as
        `switch`: this method, or its usual case in C (lane_switch) which calls it, or
        deliver() or written() at the point where it stops."""
        batch, self.batch = self.batch, None
        connection = self.connection
        if self.stopped or batch is None or \
                connection.state in _GONE:
            return
        count, started, entered = batch
        try:
            payload = self.sink.lane_payload(count, result)
            self.record(started, entered, False)
            connection._in_batch = False
        except Exception:
            log.exception("connection from %s failed", connection.peer)
            self.give_back(("crash",))
            return
        self.deliver(payload)

    def deliver(self, payload: bytes) -> None:
        """Write the replies of the batch answered (the rest of switch)."""
        connection = self.connection
        try:
            if len(payload) > LARGE_OUTPUT and connection._over_output_limit(len(payload)):
                self.give_back(("end",))
                return
            if connection._deferred_pushes or connection._outbox:
                outbox = connection._outbox = connection._outbox or []
                outbox.append(payload)
                self.give_back(("flush",))
                return
            connection._batch = None
            try:
                sent = connection.sock._sock.send(payload)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self._unwritten(None, error)
                return
            if sent < len(payload):
                self._unwritten(payload[sent:], None)
                return
            self._written()
        except Exception:
            log.exception("connection from %s failed", connection.peer)
            self.give_back(("crash",))

    def send_failed(self, payload: bytes, sent: int, error_number: int) -> None:
        """The write of deliver in C took `sent` bytes, or failed (`error_number`)."""
        if error_number:
            self._unwritten(None, OSError(error_number, os.strerror(error_number)))
        else:
            self._unwritten(payload[sent:], None)

    def relay_fd(self) -> int:
        """The client's descriptor, when the replies of the batch submitted may be written to it
        as they are read (what switch would do with them), else -1: the server's connection
        then calls relayed() instead of switch()."""
        connection = self.connection
        if self.stopped or self.batch is None or connection._deferred_pushes or \
                connection._outbox or connection.state in _GONE:
            return -1
        return self.fd

    def relayed(self, outcome) -> None:
        """The replies of the batch submitted were written to the client as they were read
        (relay_fd): `outcome`, how many bytes, or (how many, the bytes the socket did not take,
        the errno of a failed write or 0)."""
        batch, self.batch = self.batch, None
        connection = self.connection
        _count, started, entered = batch
        try:
            self.record(started, entered, False)
            connection._in_batch = False
            connection._batch = None
            if type(outcome) is tuple:
                _read, rest, failure = outcome
                self._unwritten(rest, OSError(failure, os.strerror(failure)) if failure else None)
                return
            self._written()
        except Exception:
            log.exception("connection from %s failed", connection.peer)
            self.give_back(("crash",))

    def _unwritten(self, rest: Optional[bytes], failure: Optional[OSError]) -> None:
        """The socket did not take all of the batch's replies: the greenlet writes `rest` once
        it can; or the write failed (`failure`) and the greenlet serves the requests the client
        sent before it went."""
        if failure is not None:
            # The client is gone: its greenlet serves what it sent before (see _write_failed).
            self.connection._write_failed = _without_traceback(failure)
            self.give_back(("flush",))
            return
        self.connection._outbox = [rest]
        self.give_back(("flush",))

    def _written(self, rest_to_come: bool = False) -> None:
        """The replies of the batch are written: serve what came meanwhile, or wait for the
        next request (`rest_to_come`: for the rest of the one begun)."""
        connection = self.connection
        if not rest_to_come:
            if connection._hang_up is not None:
                self.give_back(("flush",))
                return
            if connection.framer.pending():
                self.serve()
                return
        self.busy = False
        connection._idle = True
        if connection.state is not SERVING:
            self.give_back(("check",))
            return
        if not self.watcher.active:
            self.readable.watch()

    def trouble(self) -> None:
        """The sink gives the batch submitted to the client's greenlet to finish."""
        batch, self.batch = self.batch, None
        if self.stopped or batch is None or \
                self.connection.state in _GONE:
            return
        _count, started, entered = batch
        self.give_back(("resume", started, entered))


# ---- the lane's usual case in C ------------------------------------------------------------------

_lane_bind = None


def _lane_callbacks(lane: _Lane) -> tuple:
    """(on_readable, resume, switch) for a new lane (see _Lane.__init__)."""
    global _lane_bind
    if _lane_bind is None:
        _lane_bind = _set_up_lane_in_c() or _lane_in_python
    return _lane_bind(lane)


def _answer_after_stop(result) -> None:
    """A stopped lane's switch (see _Lane.switch_in_python: a stopped lane ignores it)."""


def _lane_in_python(lane: _Lane) -> tuple:
    return lane.readable_now, lane.serve, lane.switch_in_python


def _set_up_lane_in_c():
    """Tell the C part the classes and values it works with; its lane_bind, or None (not
    built, or not wanted: upstream.py decided, for both sides, when it chose the server
    connections' callback)."""
    from . import upstream
    if upstream._REPLIES_READY is upstream.UpstreamConnection._readable:
        return None
    from .protocol import _scan
    from .chain import FOLD_AT, ChainShared
    from .message import NameTable
    from .observability import BatchSeries, CounterCell
    from .protocol.resp import (_CANONICAL_WINDOW, MAX_REQUEST_MULTIBULK_LEN, ReplyFramer,
                                RequestFramer, _Buffer)
    from .protocol.state import ConnectionState
    from .shared_upstream import LARGE_MESSAGE
    from .transforms import redis_sink_cluster, redis_sink_single
    _scan.lane_setup(
        UpstreamConnection=upstream.UpstreamConnection, _Lane=_Lane,
        ClientConnection=ClientConnection, RequestFramer=RequestFramer, ReplyFramer=ReplyFramer,
        _Buffer=_Buffer, ConnectionState=ConnectionState, ChainShared=ChainShared,
        BatchSeries=BatchSeries, RedisSinkSingle=redis_sink_single.RedisSinkSingle,
        NameTable=NameTable, Chain=Chain, CounterCell=CounterCell,
        RedisSinkCluster=redis_sink_cluster.RedisSinkCluster, LARGE_OUTPUT=LARGE_OUTPUT,
        LARGE_MESSAGE=LARGE_MESSAGE,
        FOLD_AT=FOLD_AT, MAX_BATCH=MAX_BATCH, CANONICAL_WINDOW=_CANONICAL_WINDOW,
        RECV_SIZE=RECV_SIZE, MAX_MULTIBULK=MAX_REQUEST_MULTIBULK_LEN, SERVING=SERVING,
        HANDED_OVER=HANDED_OVER, CLOSED=CLOSED, WAITS=upstream._WAITS,
        SHAREABLE=redis_sink_single._SHAREABLE)
    return _scan.lane_bind

