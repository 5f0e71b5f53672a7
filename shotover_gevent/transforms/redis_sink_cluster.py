"""RedisSinkCluster (alias ValkeySinkCluster): a whole Redis Cluster behind the proxy, hidden as
one server (default) or, with `direct_destination`, handled like `redis-cli -c` would."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Dict, List, Optional, Tuple

import gevent
from gevent import get_hub

from .. import observability
from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..cluster import routing
from ..cluster.node import (
    Address,
    AuthError,
    Credentials,
    NodeConnection,
    NodeError,
    NodePool,
    client_ssl_context,
)
from ..cluster.slotmap import SlotMap, parse_redirect
from ..cluster.slots import RETRIED, key_slot, merge_replies, request_key_slots, route_batch
from ..cluster.topology import ClusterState, ClusterUnavailable
from ..config import Problems, parse_address, take_mapping
from ..message import (REPLICATION_COMMANDS, Message, NameTable, command_name, one_name,
                       replication_refused)
from ..protocol import resp
from ..protocol.state import auth_credentials, hello_options, valid_client_name
from ..shared_upstream import LARGE_MESSAGE, SharedConnection, SharedConnections
from ..upstream import UpstreamError
from ..tls import TlsConnectorConfig, parse_tls_connector
from . import TransformType, register

log = logging.getLogger(__name__)

#: How long requests are retried while a node is unreachable or the cluster is reconfiguring.
RETRY_WINDOW = 5.0
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 0.5
#: MOVED/ASK redirections followed for one request before its last error is returned.
MAX_REDIRECTS = 8
#: A MOVED reply triggers a full slot map refresh at most this often (seconds).
MOVED_REFRESH_INTERVAL = 1.0

_ASKING = resp.encode_command([b"ASKING"])
_OK = b"+OK\r\n"
_NULLS = (b"$-1\r\n", b"_\r\n", b"*-1\r\n")
#: Replies that send a request again (redirections, a cluster not ready).
_RETRIED = RETRIED


@dataclass
class RedisSinkClusterConfig:
    first_contact_points: List[Address]
    connect_timeout_ms: int = 3000
    direct_destination: Optional[Address] = None
    connection_count: int = 1
    tls: Optional[TlsConnectorConfig] = None


def parse(settings: Any, where: str, problems: Problems) -> Optional[RedisSinkClusterConfig]:
    values = take_mapping(settings, where, problems, required={"first_contact_points": list},
                          optional={"connect_timeout_ms": (int, 3000),
                                    "direct_destination": (str, None),
                                    "direct_connection": (str, None),
                                    "connection_count": (int, 1), "tls": (dict, None)})
    if values is None:
        return None
    points = []
    if not values["first_contact_points"]:
        problems.add(f"{where}.first_contact_points", "needs at least one \"host:port\"")
    for index, text in enumerate(values["first_contact_points"]):
        address = parse_address(text, f"{where}.first_contact_points[{index}]", problems)
        if address is not None:
            points.append(address)
    if values["connect_timeout_ms"] <= 0:
        problems.add(f"{where}.connect_timeout_ms", "must be a positive number of milliseconds")
    if values["connection_count"] < 1:
        problems.add(f"{where}.connection_count", "must be at least 1")
    direct = None
    if values["direct_destination"] is not None and values["direct_connection"] is not None:
        problems.add(f"{where}.direct_connection", "give direct_destination or its older "
                                                   "spelling direct_connection, not both")
    direct_text = values["direct_destination"] or values["direct_connection"]
    if direct_text is not None:
        key = "direct_destination" if values["direct_destination"] else "direct_connection"
        direct = parse_address(direct_text, f"{where}.{key}", problems)
    tls = None
    if values["tls"] is not None:
        tls = parse_tls_connector(values["tls"], f"{where}.tls", problems)
    return RedisSinkClusterConfig(points, values["connect_timeout_ms"], direct,
                                  values["connection_count"], tls)


class RedisSinkClusterBuilder(TransformBuilder):
    terminating = True

    def __init__(self, config: RedisSinkClusterConfig, name: str, chain_name: str) -> None:
        self.config = config
        self.name = name
        ssl_context = client_ssl_context(config.tls) if config.tls else None
        self.pool = NodePool(config.connect_timeout_ms / 1000.0, config.connection_count,
                             ssl_context)
        contacts = list(config.first_contact_points)
        if config.direct_destination is not None and config.direct_destination not in contacts:
            contacts.insert(0, config.direct_destination)
        self.state = ClusterState(self.pool, contacts)
        self.failed_requests = observability.failed_requests(chain_name, "RedisSinkCluster")
        #: Per node and protocol, the pipelined connections (connection_count of them) that
        #: carry the batches of clients with no credentials, many batches in flight at once
        #: (None with TLS: those go through the pool).
        self.links: Optional[Dict[Tuple[Address, int], SharedConnections]] = \
            None if config.tls else {}
        self._next_link = 0
        #: Per node and protocol, the batches queued from the event loop's callbacks during
        #: this turn of the loop, on one pipelined connection (see turn_link).
        self.turn: Dict[Tuple[Address, int], _NodeTurn] = {}

    def build(self, context: ConnectionContext) -> Transform:
        return RedisSinkCluster(self, context)

    def assign_link(self) -> int:
        """Which of each node's pipelined connections a new client uses."""
        index = self._next_link
        self._next_link = (index + 1) % self.config.connection_count
        return index

    def link(self, address: Address, protocol: int) -> SharedConnections:
        links = self.links
        nodes = links.get((address, protocol))
        if nodes is None:
            greeting = b"" if protocol == 2 else \
                resp.encode_command([b"HELLO", str(protocol).encode()])
            nodes = links[(address, protocol)] = SharedConnections(
                address, self.config.connect_timeout_ms / 1000.0, None,
                self.config.connection_count, "cluster node", greeting)
        return nodes

    def turn_link(self, address: Optional[Address], protocol: int,
                  index: int) -> Optional[_NodeTurn]:
        """Where a batch queued from the event loop's callbacks for `address` goes: this turn
        of the loop's batches for that node (_NodeTurn), on the pipelined connection they went
        on, else on the client's own (`index`); None when it is not open (or no node serves
        the slot). The batches of one turn go out in one write per node whatever client they
        are from: spread over each client's own connection, they would cost one write, one
        read and one wake-up of the node per connection; and they take their replies as one
        batch of the connection. A client has one batch in flight at a time, so its requests
        stay in order whichever connection carries each batch."""
        key = (address, protocol)
        turn = self.turn
        node_turn = turn.get(key)
        if node_turn is not None and node_turn.open():
            return node_turn
        connection = None if node_turn is None else node_turn.connection
        if connection is None or connection.closed:
            nodes = self.links.get(key)
            if nodes is None:
                return None
            connection = nodes.ready(index)
            if connection is None:
                return None
        if not turn:
            get_hub().loop.run_callback(turn.clear)  # once the turn's writes are queued
        node_turn = turn[key] = _NodeTurn(connection)
        return node_turn

    def close(self) -> None:
        self.turn.clear()
        self.pool.close()
        if self.links:
            for nodes in self.links.values():
                nodes.close()
            self.links.clear()


class _Part:
    """One command sent to one node on behalf of (part of) a client request."""

    __slots__ = ("raw", "slot", "target", "ask", "frame", "failure", "last_error", "redirects",
                 "retry_safe", "dedicated", "sent_to")

    def __init__(self, raw: bytes, slot: Optional[int] = None, target: Optional[Address] = None,
                 retry_safe: bool = False, dedicated: bool = False) -> None:
        self.raw = raw
        self.slot = slot
        self.target = target
        self.ask: Optional[Address] = None
        self.frame: Optional[bytes] = None
        self.failure: Optional[Tuple[str, bool]] = None
        self.last_error: Optional[bytes] = None
        self.redirects = 0
        self.retry_safe = retry_safe
        self.dedicated = dedicated
        self.sent_to: Optional[Address] = None


class _Job:
    """One client request: its parts and how their replies make its reply."""

    __slots__ = ("index", "command", "combine", "parts", "positions", "reply")

    def __init__(self, index: int, command: str, combine: str = "") -> None:
        self.index = index
        self.command = command
        self.combine = combine
        self.parts: List[_Part] = []
        self.positions: List[List[int]] = []
        self.reply: Optional[bytes] = None


class RedisSinkCluster(Transform):
    """Routing is described in cluster/routing.py. Upstream connections are owned by the builder
    and shared by every client connection of the source. Clients with no credentials (plain TCP)
    send over `connection_count` pipelined connections per node and protocol (RESP2, or RESP3 after
    HELLO 3): the batches of many clients are in flight on one at once, in the order they were
    queued, each taking as many replies as it has requests (shared_upstream.py); a batch holding a
    request over LARGE_MESSAGE goes through the pool instead, like everyone else's: per node and
    credential set at most `connection_count` connections, each lent to one batch at a time. A
    batch is cut per node; each node's share goes out in one write, all nodes at once (one greenlet
    per node), and the replies are put back in request order. From its second batch on, a client
    whose batches hold only single-key commands (GET, SET, INCR, HSET, ...) is served from the
    event loop's callbacks (submit): the batch is cut per node in one C call (route_batch),
    each node's share is added to this turn of the loop's batches for that node, which go on
    one pipelined connection as one batch of it (turn_link, _NodeTurn), and the replies are
    put together in one C call (merge_replies) once every node answered, without a greenlet
    switch; a redirection, a node not
    ready or a failed connection hands the batch to the client's greenlet, which goes on exactly as
    below. MOVED updates the shared slot map and sends the request again; ASK sends ASKING plus the
    request to the named node once. When a node cannot be reached (a failover), the slot map is
    fetched again and the request retried with backoff for up to RETRY_WINDOW seconds. A request
    that was written to a node that then failed before replying is retried only when it changes no
    data; otherwise the client gets an error saying it may or may not have run. Blocking commands
    (BLPOP, ...) run on a connection of the client's own, opened on first use and closed with the
    client connection, so they never hold a shared one. AUTH (and HELLO ... AUTH) is checked
    against a node; from then on the client's requests use connections authenticated with those
    credentials (pooled per credential set). A failed AUTH leaves the previous credentials in
    force. A client that switched to RESP3 (HELLO 3) is served by connections that did the same
    (the pool is keyed by protocol too)."""

    def __init__(self, builder: RedisSinkClusterBuilder, context: ConnectionContext) -> None:
        self.builder = builder
        self.pool = builder.pool
        self.state = builder.state
        self.direct = builder.config.direct_destination
        self.handling = self.direct is not None
        session = context.session
        # After an upgrade the session carries the client's credentials and name.
        self.credentials: Credentials = None
        if session.auth_password is not None:
            self.credentials = (session.auth_username, session.auth_password)
        self.client_name: Optional[bytes] = session.client_name
        self.protocol = session.resp_version
        self._dedicated: Dict[Address, NodeConnection] = {}
        self._failed = 0
        #: Which of each node's pipelined connections this client uses (None: no TLS-less ones).
        self._link: Optional[int] = None if builder.links is None else builder.assign_link()
        #: The batch submitted from the event loop's callbacks whose replies are owed: a
        #: _Submitted, or for a batch sent to one node (framed, slot map version, node).
        self._submitted: Any = None
        #: Who waits for the replies of that batch (the client connection's lane).
        self._lane = None

    # ---- the batch ----------------------------------------------------------------------------

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        replies: List[Optional[bytes]] = [None] * len(requests)
        phase: List[_Job] = []
        self._failed = 0
        for index, request in enumerate(requests):
            if request.command in REPLICATION_COMMANDS:
                replies[index] = replication_refused(request.command).raw
                continue
            args = request.args
            where = routing.route(args, self.handling)
            kind = where.kind
            if kind == routing.LOCAL:
                replies[index] = self._local(request.command, args)
            elif kind == routing.REFUSED:
                replies[index] = resp.error_reply(
                    f"ERR RedisSinkCluster does not support {request.command or 'this command'}"
                    f" ({where.reason})")
            elif kind == routing.AUTH:
                self._run(phase, replies)
                phase = []
                replies[index] = self._auth_command(args)
            elif kind == routing.HELLO:
                self._run(phase, replies)
                phase = []
                replies[index] = self._hello(index, args)
            elif kind == routing.BLOCKING:
                if len({key_slot(key) for key in where.keys}) > 1:
                    replies[index] = resp.error_reply(
                        f"ERR RedisSinkCluster cannot run {request.command} on keys of different "
                        f"slots: it would wait on one node only (give the keys a common hash tag)")
                    continue
                # Alone, after everything before it, on the client's own connection.
                self._run(phase, replies)
                phase = []
                self._run([self._plan(index, request, where)], replies)
            else:
                phase.append(self._plan(index, request, where))
        self._run(phase, replies)
        if self._failed:
            self.builder.failed_requests(self._failed)
        if None in replies:
            lost = Message.error("ERR RedisSinkCluster lost this request's reply")
            return [Message(reply) if reply is not None else lost for reply in replies]
        return list(map(Message, replies))

    def _plan(self, index: int, request: Message, where: routing.Route) -> _Job:
        command = request.command
        job = _Job(index, command, where.combine)
        retry_safe = command in routing.READ_ONLY
        kind = where.kind
        if kind in (routing.KEYED, routing.BLOCKING):
            slot = where.slot if where.slot is not None else key_slot(where.keys[0])
            job.parts.append(_Part(request.raw, slot, retry_safe=retry_safe,
                                   dedicated=kind == routing.BLOCKING))
        elif kind == routing.SPLIT:
            self._plan_split(job, request, where, retry_safe)
        elif kind == routing.FANOUT:
            try:
                current = self.state.get(self.credentials)
            except ClusterUnavailable as error:
                job.reply = error.reply
                self._failed += 1
                return job
            for master in current.masters:
                job.parts.append(_Part(request.raw, current.first_slots[master],
                                       retry_safe=True))
        else:  # any node: the direct destination in handling mode
            job.parts.append(_Part(request.raw, target=self.direct, retry_safe=retry_safe))
        return job

    def _plan_split(self, job: _Job, request: Message, where: routing.Route,
                    retry_safe: bool) -> None:
        args = request.args
        by_slot: Dict[int, List[int]] = {}
        for position, key in enumerate(where.keys):
            by_slot.setdefault(key_slot(key), []).append(position)
        if len(by_slot) == 1:
            slot = next(iter(by_slot))
            job.combine = ""
            job.parts.append(_Part(request.raw, slot, retry_safe=retry_safe))
            return
        name = args[0]
        for slot, positions in by_slot.items():
            if where.step == 2:  # MSET key value pairs
                sub = [name]
                for position in positions:
                    sub.extend(args[1 + 2 * position : 3 + 2 * position])
            else:
                sub = [name] + [where.keys[position] for position in positions]
            job.parts.append(_Part(resp.encode_command(sub), slot, retry_safe=retry_safe))
            job.positions.append(positions)

    def _run(self, jobs: List[_Job], replies: List[Optional[bytes]]) -> None:
        if not jobs:
            return
        parts = [part for job in jobs for part in job.parts]
        if parts:
            self._execute(parts)
        for job in jobs:
            if job.reply is None:
                job.reply = self._combine(job)
            replies[job.index] = job.reply

    # ---- sending, redirections and retries ----------------------------------------------------

    def _execute(self, parts: List[_Part], sent_version: Optional[int] = None) -> None:
        """Send the parts and follow redirections and retries until each has its reply.
        `sent_version`: the parts were sent already (from the event loop's callbacks, when the
        slot map had that version) and hold what came back; they are judged first."""
        pending = parts
        deadline: Optional[float] = None
        backoff = BACKOFF_FIRST
        while pending:
            unroutable = set()
            if sent_version is not None:
                version, sent_version = sent_version, None
            else:
                try:
                    current = self.state.get(self.credentials)
                except ClusterUnavailable as error:
                    for part in pending:
                        part.frame = error.reply
                    self._failed += len(pending)
                    return
                version = self.state.version
                groups: Dict[Tuple[Address, bool], List[_Part]] = {}
                for part in pending:
                    address = self._address_for(part, current)
                    if address is None:
                        unroutable.add(id(part))
                        part.last_error = resp.error_reply(
                            f"CLUSTERDOWN RedisSinkCluster knows no node serving slot "
                            f"{part.slot}")
                    else:
                        groups.setdefault((address, part.dedicated), []).append(part)
                self._send_all(groups)
            retry: List[_Part] = []
            wait = refresh = bool(unroutable)
            moved = False
            overtaken = _overtaken(pending)
            for part in pending:
                if id(part) in unroutable:
                    retry.append(part)
                    continue
                part.ask = None
                failure, part.failure = part.failure, None
                if failure is not None:
                    text, sent = failure
                    if sent and not part.retry_safe:
                        part.frame = resp.error_reply(
                            f"ERR RedisSinkCluster: {text}; the command may or may not have run")
                        self._failed += 1
                        continue
                    if sent and id(part) in overtaken:
                        part.frame = resp.error_reply(
                            f"ERR RedisSinkCluster: {text}; not sent again: a write after it "
                            f"in the pipeline may have run")
                        self._failed += 1
                        continue
                    part.last_error = resp.error_reply(f"ERR RedisSinkCluster: {text}")
                    retry.append(part)
                    wait = refresh = True
                    continue
                frame = part.frame
                if frame[:1] != b"-":
                    continue
                if frame.startswith((b"-MOVED ", b"-ASK ")):
                    redirect = parse_redirect(frame, part.sent_to)
                    if redirect is not None and part.redirects < MAX_REDIRECTS:
                        part.redirects += 1
                        part.last_error, part.frame = frame, None
                        kind, slot, address = redirect
                        log.debug("%s redirection of slot %d to %s:%d", kind, slot, *address)
                        if kind == "MOVED":
                            self.state.apply_moved(slot, address)
                            moved = True
                        else:
                            part.ask = address
                        retry.append(part)
                elif frame.startswith((b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING")):
                    part.last_error, part.frame = frame, None
                    retry.append(part)
                    wait = True
                    refresh = refresh or frame.startswith(b"-CLUSTERDOWN")
            if not retry:
                return
            now = time.monotonic()
            if deadline is None:
                deadline = now + RETRY_WINDOW
            if now >= deadline:
                for part in retry:
                    part.frame = part.last_error
                    if not part.last_error.startswith((b"-MOVED", b"-ASK", b"-TRYAGAIN",
                                                       b"-CLUSTERDOWN", b"-LOADING")):
                        self._failed += 1
                return
            if refresh:
                self.state.refresh(self.credentials, version)
            elif moved:
                self.state.refresh(self.credentials, version, MOVED_REFRESH_INTERVAL)
            if wait:
                gevent.sleep(min(backoff, max(0.0, deadline - now)))
                backoff = min(backoff * 2, BACKOFF_MAX)
            pending = retry

    def _address_for(self, part: _Part, current: SlotMap) -> Optional[Address]:
        if part.ask is not None:
            return part.ask
        if part.slot is not None:
            return current.owners[part.slot]
        if part.target is not None:
            return part.target
        return current.any_master()

    def _send_all(self, groups: Dict[Tuple[Address, bool], List[_Part]]) -> None:
        items = list(groups.items())
        if len(items) == 1:
            (address, dedicated), parts = items[0]
            self._send_group(address, dedicated, parts)
            return
        others = [gevent.spawn(self._send_group, address, dedicated, parts)
                  for (address, dedicated), parts in items[1:]]
        (address, dedicated), parts = items[0]
        self._send_group(address, dedicated, parts)
        gevent.joinall(others)

    def _send_group(self, address: Address, dedicated: bool, parts: List[_Part]) -> None:
        raws: List[bytes] = []
        for part in parts:
            if part.ask is not None:
                raws.append(_ASKING)
            raws.append(part.raw)
            part.sent_to = address
            part.frame = None
        if not dedicated and self._link is not None and self.credentials is None and \
                max(map(len, raws)) <= LARGE_MESSAGE:
            self._send_pipelined(address, raws, parts)
            return
        try:
            connection = (self._dedicated_connection(address) if dedicated
                          else self.pool.acquire(address, self.credentials, self.protocol))
        except AuthError as error:
            for part in parts:
                part.frame = resp.error_reply(str(error))
            return
        except NodeError as error:
            for part in parts:
                part.failure = (str(error), False)
            return
        frames: List[bytes] = []
        failure: Optional[Tuple[str, bool]] = None
        try:
            frames = connection.call(raws)
        except NodeError as error:
            frames = error.replies
            failure = (str(error), error.sent)
        except Exception as error:  # a bug must not leave the client without replies
            log.exception("sending to cluster node %s failed", address)
            connection.close()
            failure = (f"internal error: {error}", True)
        finally:
            if not dedicated:
                self.pool.release(connection)
            elif connection.closed:
                self._dedicated.pop(address, None)
        _take_frames(parts, frames, failure)

    def _send_pipelined(self, address: Address, raws: List[bytes], parts: List[_Part]) -> None:
        """Send parts on the client's pipelined connection to `address` and wait for their
        replies (the connection is opened if need be)."""
        try:
            connection = self.builder.link(address, self.protocol).get(self._link)
        except UpstreamError as error:
            for part in parts:
                part.failure = (str(error), False)
            return
        frames, failure = connection.call(raws[0] if len(raws) == 1 else b"".join(raws),
                                          len(raws))
        # A failed shared connection cannot tell what the node did with what was written.
        _take_frames(parts, frames, None if failure is None else (failure, True))

    # ---- served from the event loop's callbacks -----------------------------------------------

    def lane_ready(self) -> bool:
        return self._link is not None and self.credentials is None and \
            self.state.map is not None

    def submit(self, framed: List[tuple], waiter):
        """Queue a batch of single-key commands on the pipelined connections of the nodes that
        own their keys, without waiting, if every one of them is open (see
        RedisSinkSingle.submit for the protocol). Returns the batch as the client's connection
        records it, or None: the batch goes through transform(). A batch for one node (every
        batch without pipelining) is answered through switch() with no object of its own."""
        current = self.state.map
        if current is None or self.credentials is not None:
            return None
        if len(framed) > 2:
            # A pipeline of one command, the usual kind, is judged with one lookup.
            name = one_name(framed)
            if (name is None or not _LANE.passes.get(name)) and not _LANE.all_pass(framed):
                return None
        elif not _LANE.all_pass(framed):
            return None
        table, nodes = current.routing()
        route = route_batch(framed, table, LARGE_MESSAGE)
        if route is None:
            return None
        if type(route) is not int:
            return self._submit_spread(framed, waiter, nodes, route)
        address = nodes[route]
        payload = framed[0][0] if len(framed) == 1 else b"".join(map(itemgetter(0), framed))
        builder = self.builder
        node_turn = builder.turn.get((address, self.protocol))
        if node_turn is None or not node_turn.add(payload, len(framed), self, -1):
            node_turn = builder.turn_link(address, self.protocol, self._link)
            if node_turn is None or not node_turn.add(payload, len(framed), self, -1):
                return None
        self._lane = waiter
        self._submitted = (framed, self.state.version, address)
        return framed

    def switch(self, result: tuple) -> None:
        """What the one node of a batch from the callbacks answered (from the event loop):
        the replies in one piece for the client's connection, unless one of them sends its
        request again (a redirection, a node not ready) or the node failed: the client's
        greenlet then finishes the batch (resume_submitted)."""
        frames, failure = result
        if failure is None:
            payload = frames[0] if len(frames) == 1 else b"".join(frames)
            if not _retried(payload, frames):
                self._lane.switch(payload)
                return
        framed, version, address = self._submitted
        submitted = self._submitted = _Submitted(self._lane, framed, version, [address],
                                                 bytes(len(framed)))
        submitted.results[0] = frames
        submitted.failures = [failure]
        submitted.left = 0
        self._lane.trouble()

    def _submit_spread(self, framed: List[tuple], waiter, nodes: List[Address],
                       route: tuple):
        """submit() for a batch whose keys are on several nodes (`route`, as route_batch cut
        it): each node's share queued on its connection, the replies put back in request
        order once every node answered."""
        groups, payloads, order = route
        builder = self.builder
        node_turns = []
        addresses = []
        for node in groups:
            address = nodes[node]
            node_turn = builder.turn_link(address, self.protocol, self._link)
            if node_turn is None:
                return None
            node_turns.append(node_turn)
            addresses.append(address)
        submitted = self._submitted = _Submitted(waiter, framed, self.state.version, addresses,
                                                 order)
        for index, node_turn in enumerate(node_turns):
            node_turn.add(payloads[index], order.count(index), submitted, index)
        return framed

    def lane_payload(self, count: int, result) -> bytes:
        return result  # the replies in one piece (_Submitted)

    def resume_submitted(self, requests: List[Message]) -> List[Message]:
        """The replies of a batch submitted from the callbacks whose replies need more than
        putting together (a redirection, a node not ready, a failed connection): judged and
        retried as if transform() had sent it."""
        submitted, self._submitted = self._submitted, None
        self._failed = 0
        parts = submitted.parts()
        self._execute(parts, submitted.version)
        if self._failed:
            self.builder.failed_requests(self._failed)
        return [Message(part.frame) for part in parts]

    def _dedicated_connection(self, address: Address) -> NodeConnection:
        connection = self._dedicated.get(address)
        if connection is not None and (connection.credentials != self.credentials
                                       or connection.protocol != self.protocol
                                       or not connection.alive()):
            connection.close()
            connection = None
        if connection is None:
            connection = self.pool.connect(address, self.credentials, self.protocol)
            self._dedicated[address] = connection
        return connection

    # ---- putting replies together -------------------------------------------------------------

    def _combine(self, job: _Job) -> bytes:
        frames = [part.frame for part in job.parts]
        if not job.combine:
            return frames[0]
        for frame in frames:
            if frame[:1] == b"-":
                return frame
        if job.combine == "sum":
            total = 0
            for frame in frames:
                if frame[:1] != b":":
                    return _unexpected(job.command, frame)
                total += int(frame[1:].strip())
            return b":%d\r\n" % total
        if job.combine == "all_ok":
            for frame in frames:
                if frame != _OK:
                    return frame
            return _OK
        if job.combine == "same":
            if all(frame == frames[0] for frame in frames):
                return frames[0]
            return resp.error_reply(f"ERR RedisSinkCluster: the masters replied differently to "
                                    f"{job.command}")
        if job.combine == "join":
            count = 0
            bodies = []
            for frame in frames:
                if frame[:1] != b"*":
                    return _unexpected(job.command, frame)
                end = frame.index(b"\r\n")
                items = int(frame[1:end])
                if items > 0:
                    count += items
                    bodies.append(frame[end + 2 :])
            return b"*%d\r\n" % count + b"".join(bodies)
        if job.combine == "mget":
            total = sum(len(positions) for positions in job.positions)
            values: List[Optional[bytes]] = [None] * total
            for positions, frame in zip(job.positions, frames):
                parsed = resp.parse_frame(frame)
                if not isinstance(parsed, list) or len(parsed) != len(positions):
                    return _unexpected(job.command, frame)
                for position, value in zip(positions, parsed):
                    values[position] = value
            null = self._null()
            return b"*%d\r\n" % total + b"".join(null if v is None else resp.bulk_reply(v)
                                                 for v in values)
        if job.combine == "all_true":
            merged: Optional[List[int]] = None
            for frame in frames:
                parsed = resp.parse_frame(frame)
                if not isinstance(parsed, list):
                    return _unexpected(job.command, frame)
                merged = parsed if merged is None else [min(a, b) for a, b in zip(merged, parsed)]
            return resp.encode_value(merged or [])
        if job.combine == "first_value":
            for frame in frames:
                if frame not in _NULLS:
                    return frame
            return self._null()
        return frames[0]

    def _null(self) -> bytes:
        return b"_\r\n" if self.protocol == 3 else b"$-1\r\n"

    # ---- answered here ------------------------------------------------------------------------

    def _local(self, command: str, args: List[bytes]) -> bytes:
        count = len(args)
        if command == "PING":
            if count == 1:
                return b"+PONG\r\n"
            if count == 2:
                return resp.bulk_reply(args[1])
        elif command == "ECHO":
            if count == 2:
                return resp.bulk_reply(args[1])
        elif command == "SELECT":
            if count == 2:
                return _OK
        elif command in ("QUIT", "READONLY", "READWRITE"):
            return _OK
        elif command == "CLIENT":
            sub = args[1].upper() if count > 1 else b""
            if sub == b"SETNAME" and count == 3:
                name = args[2]
                if not valid_client_name(name):
                    return resp.error_reply("ERR Client names cannot contain spaces, newlines "
                                            "or special characters.")
                self.client_name = name or None
                return _OK
            if sub == b"GETNAME" and count == 2:
                return self._null() if self.client_name is None else \
                    resp.bulk_reply(self.client_name)
            if sub == b"SETINFO" and count == 4:
                return _OK
            return resp.error_reply(f"ERR wrong number of arguments for 'client|"
                                    f"{sub.decode('latin-1').lower()}' command")
        return resp.error_reply(f"ERR wrong number of arguments for '{command.lower()}' command")

    def _auth_command(self, args: List[bytes]) -> bytes:
        credentials = auth_credentials(args)
        if credentials is None:
            return resp.error_reply("ERR wrong number of arguments for 'auth' command")
        return self._authenticate(credentials)

    def _authenticate(self, credentials: Credentials) -> bytes:
        """Check credentials on a node; on success the client's requests use them from now on."""
        candidates: List[Address] = []
        if self.direct is not None:
            candidates.append(self.direct)
        for address in self.state.candidates():
            if address not in candidates:
                candidates.append(address)
        problem = "no contact points"
        for address in candidates:
            try:
                connection = self.pool.acquire(address, credentials)
            except AuthError as error:
                return resp.error_reply(str(error))
            except NodeError as error:
                problem = str(error)
                continue
            self.pool.release(connection)
            self.credentials = credentials
            return _OK
        self._failed += 1
        return resp.error_reply(f"ERR RedisSinkCluster could not check the credentials on any "
                                f"node: {problem}")

    def _hello(self, index: int, args: List[bytes]) -> bytes:
        options = hello_options(args)
        if options.problem is not None:
            return options.problem
        version = self.protocol if options.version is None else options.version
        credentials, name = options.credentials, options.name
        if credentials is not None:
            outcome = self._authenticate(credentials)
            if outcome != _OK:
                return outcome
        # A node answers (in the new protocol) over a connection speaking that protocol.
        previous, self.protocol = self.protocol, version
        job = _Job(index, "HELLO")
        job.parts.append(_Part(resp.encode_command([b"HELLO", str(version).encode()]),
                               target=self.direct, retry_safe=True))
        holder: List[Optional[bytes]] = [None] * (index + 1)
        self._run([job], holder)
        reply = holder[index]
        if reply[:1] == b"-":
            self.protocol = previous
        elif name is not None:
            self.client_name = name or None
        return reply

    def close(self) -> None:
        for connection in self._dedicated.values():
            connection.close()
        self._dedicated.clear()


def _overtaken(parts: List[_Part]) -> set:
    """The reads (ids of retry-safe parts) that a node connection failed under after they were
    written, followed on that connection by a write that may have run: sent again, a read would
    see what the client pipelined after it (GET, SET: the GET would return the SET's value)."""
    overtaken = set()
    written_after = set()  # the nodes where such a write came later in the client's order
    for part in reversed(parts):
        failure = part.failure
        if failure is None or not failure[1]:
            continue
        if not part.retry_safe:
            written_after.add(part.sent_to)
        elif part.sent_to in written_after:
            overtaken.add(id(part))
    return overtaken


def _take_frames(parts: List[_Part], frames: List[bytes],
                 failure: Optional[Tuple[str, bool]]) -> None:
    """Give each part its reply from the frames a node sent for them in order (an ASKING
    before a part has its own); the parts past the last frame get `failure`."""
    position = 0
    for part in parts:
        if part.ask is not None:
            position += 1  # ASKING's own +OK
        if position < len(frames):
            part.frame = frames[position]
        else:
            part.failure = failure or ("the node sent too few replies", True)
        position += 1


class _Submitted:
    """A batch queued from the event loop's callbacks on the nodes' pipelined connections: what
    each node answered, put back in request order once every node has."""

    __slots__ = ("waiter", "framed", "version", "addresses", "order", "results", "failures",
                 "left")

    def __init__(self, waiter, framed: List[tuple], version: int, addresses: List[Address],
                 order: bytes) -> None:
        """`addresses`: the nodes the batch was cut for (its groups); `order`: for each
        request, the index of its group (see route_batch)."""
        self.waiter = waiter
        self.framed = framed
        #: The slot map's version when the batch was routed.
        self.version = version
        self.addresses = addresses
        self.order = order
        #: Per group, the frames its node sent, once it answered; and why the rest of them
        #: never will come (None: they all came), once one did not answer them all.
        self.results: List[Optional[List[bytes]]] = [None] * len(addresses)
        self.failures: Optional[List[Optional[str]]] = None
        self.left = len(addresses)

    def answer(self) -> None:
        """Every node answered (from the event loop): the replies in request order to the
        client's connection, or the batch to the client's greenlet when one of them sends its
        request again or a node failed (as RedisSinkCluster.switch does for one node)."""
        payload = None if self.failures is not None else merge_replies(self.order, self.results)
        if payload is None:
            self.waiter.trouble()
            return
        self.waiter.switch(payload)

    def parts(self) -> List[_Part]:
        """The requests as parts sent, with what came back for them (see _execute)."""
        framed = self.framed
        count = len(framed)
        raws: List[bytes] = []
        commands: List[Optional[str]] = []
        for request in framed:  # as framed, or made a Message by the connection
            if type(request) is tuple:
                raws.append(request[0])
                commands.append(command_name(request[1]))
            else:
                raws.append(request.raw)
                commands.append(request.command)
        slots = request_key_slots([(raw, None) for raw in raws])
        shares: List[List[_Part]] = [[] for _ in self.addresses]
        parts: List[Optional[_Part]] = [None] * count
        for position, group in enumerate(self.order):
            part = _Part(raws[position], slots[position],
                         retry_safe=commands[position] in routing.READ_ONLY)
            part.sent_to = self.addresses[group]
            parts[position] = part
            shares[group].append(part)
        failures = self.failures or [None] * len(shares)
        for share, frames, failure in zip(shares, self.results, failures):
            if frames is None:
                frames, failure = [], "no reply came"
            _take_frames(share, frames, None if failure is None else (failure, True))
        return parts


def _retried(payload: bytes, frames: List[bytes]) -> bool:
    """Whether one of the frames (`payload`: all of them, in one) is a reply that sends its
    request again (a redirection, a node not ready). An error frame begins the payload or
    follows a CRLF: only then are the frames looked at one by one."""
    if len(frames) == 1:  # the payload is the frame: no need to look inside it
        return payload[:1] == b"-" and payload.startswith(_RETRIED)
    if payload[:1] != b"-" and b"\r\n-" not in payload:
        return False
    for frame in frames:
        if frame[:1] == b"-" and frame.startswith(_RETRIED):
            return True
    return False


class _NodeTurn:
    """The batches queued from the event loop's callbacks on one node's pipelined connection
    during one turn of the loop: one batch of the connection, whose replies are shared out in
    the order they were added. Each is the share of one node of a _Submitted batch, or a
    client's batch for that node alone (answered through RedisSinkCluster.switch)."""

    __slots__ = ("connection", "members")

    def __init__(self, connection: SharedConnection) -> None:
        self.connection = connection
        #: Per batch added: who takes its replies, its group (-1: the batch's only node, the
        #: sink takes them with switch), how many. (No reference to the connection's record
        #: of the batch, whose waiter this is: the two would make a cycle.)
        self.members: List[Any] = []

    def open(self) -> bool:
        """Whether more may be added: the connection is open and nothing was queued on it
        since (the replies of what is added come right after the ones before)."""
        if not self.members:
            return not self.connection.closed
        return self.connection.owes_last(self)

    def add(self, payload: bytes, count: int, target, group: int) -> bool:
        """Queue a batch's requests for this node (`payload`, `count` of them), whose replies
        `target` takes (see members), if more may be added (see open). False: nothing was."""
        if self.members:
            if not self.connection.extend(self, payload, count):
                return False
        elif self.connection.closed:
            return False
        else:
            self.connection.submit(payload, count, None, self)
        self.members += (target, group, count)
        return True

    def switch(self, result: tuple) -> None:
        """The replies (from the event loop), shared out; each batch is answered once all of
        its nodes have. A batch whose replies did not all come gets the failure, the ones
        before it what came."""
        frames, failure = result
        members = self.members
        if len(members) == 3 and members[1] < 0:
            members[0].switch(result)  # one batch, for this node alone
            return
        start = 0
        for index in range(0, len(members), 3):
            target, group, count = members[index], members[index + 1], members[index + 2]
            end = start + count
            mine = frames[start:end] if start or end < len(frames) else frames
            start = end
            lost = None if failure is None or len(mine) == count else failure
            if group < 0:
                target.switch((mine, lost))
                continue
            target.results[group] = mine
            if lost is not None:
                if target.failures is None:
                    target.failures = [None] * len(target.results)
                target.failures[group] = lost
            target.left -= 1
            if not target.left:
                target.answer()


#: Single-key commands (the key is argument 1) routed to the owner of their key, whatever
#: their other arguments: the ones served from the callbacks.
_LANE_COMMANDS = frozenset(
    command for command in routing.FIRST_KEY
    if command not in REPLICATION_COMMANDS and
    routing.route([command.encode(), b"k", b"v", b"w"]).kind == routing.KEYED and
    routing.route([command.encode(), b"k"]).kind == routing.KEYED)
_LANE = NameTable(_LANE_COMMANDS.__contains__)


def _unexpected(command: str, frame: bytes) -> bytes:
    return resp.error_reply(f"ERR RedisSinkCluster: unexpected reply to {command} from a node: "
                            f"{frame[:60]!r}")


KIND = register(TransformType(("RedisSinkCluster", "ValkeySinkCluster"), True, parse,
                              RedisSinkClusterBuilder))
