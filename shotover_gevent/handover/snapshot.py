"""The bridge's part of an upgrade, once the new image is ready: settle the few connections that
cannot be described this very moment, take a snapshot of every connection without yielding,
and build the checkpoint the new image restores from."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .. import __version__, lifecycle, observability
from ..connection import PAUSE_PROGRESS
from . import checkpoint as checkpoint_format


class UpgradeAborted(Exception):
    """The upgrade stopped before exec; the text says why. Service goes on as before."""


# ---- step 2: settle (in the bridge, once the new image is ready) ------------------------------

def settle(proxy, deadline: float) -> List:
    """Stop accepting, then wait (at most until `deadline`) for the few connections that
    cannot be handed over this very moment: most can, whatever they are doing (requests in
    flight, a blocking command, a transaction, MONITOR...). Those that cannot are asked to
    stop at their next request boundary; the others are served meanwhile. Returns those still
    busy."""
    for source in proxy.sources.values():
        source.stop_accepting()
    busy = [c for c in proxy.all_connections() if c.handover_status() == "busy"]
    for connection in busy:
        connection.request_pause()
    while busy and time.monotonic() < deadline:
        PAUSE_PROGRESS.clear()
        PAUSE_PROGRESS.wait(min(deadline - time.monotonic(), SETTLE_POLL))
        busy = [c for c in busy if c.handover_status() == "busy"]
    return busy


#: How often settle() looks again at a busy connection that has not stopped yet.
SETTLE_POLL = 0.005


def resume(proxy, connections: List) -> None:
    """Undo settle(): every paused connection carries on; accepting restarts."""
    for connection in connections:
        connection.resume()
    for source in proxy.sources.values():
        source.start_accepting()


# ---- step 3: snapshot and checkpoint ----------------------------------------------------------

@dataclass
class Snapshot:
    """Every connection as it stands at one moment (taken without yielding to any other
    greenlet: nothing can move between the first connection described and the last)."""

    #: (connection, fields of its checkpoint record) for each connection handed over.
    described: List
    #: Connections that cannot be handed over this moment, with why.
    busy: List
    #: TLS connections (their encryption state cannot leave this process).
    tls: List


def take_snapshot(proxy) -> Snapshot:
    described, busy, tls = [], [], []
    for connection in proxy.all_connections():
        fields, status = connection.export()
        if status == "busy":
            busy.append(connection)
        elif status == "tls":
            tls.append(connection)
        elif fields is not None:
            described.append((connection, fields))
    return Snapshot(described, busy, tls)


def busy_reason(connection) -> str:
    return connection.session.handover_blocker() or "busy (command in flight)"


def count(closed: Dict[str, int], reason: str) -> None:
    closed[reason] = closed.get(reason, 0) + 1


def build_checkpoint(proxy, snapshot: Snapshot, closed: Dict[str, int], settle_ms: float,
                     quiesce_started_ns: int, request, answer: Dict,
                     translate: Callable[[List[int]], Dict[int, int]],
                     channel_fd: Optional[int] = None):
    """The checkpoint of a snapshot, as a Checkpoint and its encoded bytes.

    `translate` maps the fds of the connections (and of their upstream connections) to the
    numbers the next image knows them by (the same number for a socket it inherited; a socket
    opened since, it is sent). A client whose fd is missing from the answer is closed; an
    upstream connection whose fd is missing stays behind (the next image connects afresh),
    unless requests are in flight on it: then its client is closed too."""
    listeners = [checkpoint_format.ListenerRecord(s.listener.fileno(), name, s.address)
                 for name, s in proxy.sources.items()]
    wanted = [c.sock.fileno() for c, _fields in snapshot.described]
    wanted += [f["upstream"].fd for _c, f in snapshot.described if f["upstream"] is not None]
    numbers = translate(wanted)
    records = []
    for connection, fields in snapshot.described:
        fd = connection.sock.fileno()
        upstream = fields["upstream"]
        if upstream is not None:
            if upstream.fd in numbers:
                upstream.fd = numbers[upstream.fd]
            elif upstream.inflight is None:
                upstream = None
            else:
                fd = -1  # its requests' replies could not be read: close it
        if fd not in numbers:
            reason = "socket not transferable to the next image"
            count(closed, reason)
            connection.close(f"upgrade: {reason}", now=True)
            continue
        records.append(checkpoint_format.ConnectionRecord(
            numbers[fd], connection.source.name, connection.peer, fields["unread"],
            fields["session"], upstream, fields["output"], fields["deferred"]))
    lame_ducks = []
    duck_numbers = translate([duck["fd"] for duck in proxy.lame_ducks.values()])
    for duck in proxy.lame_ducks.values():
        if duck["fd"] in duck_numbers:
            lame_ducks.append(dict(duck, fd=duck_numbers[duck["fd"]]))
    control = {"fd": proxy.control_server.listener.fileno(), "path": proxy.control_path}
    if channel_fd is not None:
        control["channel_fd"] = channel_fd
    if proxy.observability_server is not None:
        control["metrics_fd"] = proxy.observability_server.server.socket.fileno()
    config_data, topology_data = answer.get("config_data"), answer.get("topology_data")
    cp = checkpoint_format.Checkpoint(
        written_by=__version__, created_ns=time.time_ns(), pid=os.getpid(),
        generation=proxy.generation,
        argv=lifecycle.program_argv(sys.executable, proxy.config.path, proxy.topology.path,
                                    proxy.control_path, proxy.log_format),
        python=sys.executable, config_sha256=configuration_digest(config_data, topology_data),
        listeners=listeners, connections=records, control=control,
        drain={"ms": int(settle_ms), "closed": sum(closed.values()), "closed_reasons": closed},
        rollback=False, guardian={"bridge_pid": os.getpid()},
        restore={"quiesce_started_ns": quiesce_started_ns,
                 "keep_checkpoint": request.keep_checkpoint,
                 "started_wall": proxy.started_wall,
                 # What the new version validated in its preflight: it runs on exactly that.
                 "config_data": config_data,
                 "topology_data": topology_data,
                 # What this version runs on, should it have to take over again.
                 "previous_config_data": proxy.config.raw,
                 "previous_topology_data": proxy.topology.raw,
                 # TLS clients this old side keeps serving after the switch, and how long.
                 "tls_kept": len(snapshot.tls),
                 "tls_drain_timeout": request.tls_drain_timeout,
                 # Earlier versions still serving TLS clients: the next image watches them.
                 "lame_ducks": lame_ducks,
                 # Counters the next image goes on from.
                 "upgrade_closed_totals": observability.upgrade_closed_totals(),
                 "counters": observability.export_counters(),
                 # The client sockets carry SO_TIMESTAMPNS already (arrival order).
                 "arrivals_stamped": True})
    try:
        data = checkpoint_format.encode(cp, validate=False)
    except checkpoint_format.CheckpointError as error:
        raise UpgradeAborted(f"checkpoint: {error}") from None
    return cp, data


def configuration_digest(config_data, topology_data) -> str:
    """Names the configuration a checkpoint was written for (what the new version validated),
    from data in memory: nothing is read from disk inside the pause."""
    import hashlib

    text = json.dumps([config_data, topology_data], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe(cp) -> str:
    """One line on what a checkpoint hands over, for the upgrade's report."""
    records = cp.connections
    upstreams = sum(1 for r in records if r.upstream is not None)
    inflight = sum(1 for r in records if r.upstream is not None and r.upstream.inflight)
    unread = sum(len(r.unread) for r in records)
    output = sum(len(r.output) + len(r.deferred) for r in records)
    states = []
    for key, label in (("in_multi", "in a transaction"), ("watching", "watching keys"),
                       ("monitor", "monitoring"), ("tracking", "tracking keys")):
        n = sum(1 for r in records if r.session.get(key))
        if n:
            states.append(f"{n} {label}")
    subscribed = sum(1 for r in records if r.session.get("subscriptions"))
    if subscribed:
        states.append(f"{subscribed} subscribed")
    text = (f"{len(cp.listeners)} listeners, {len(records)} connections with {upstreams} "
            f"upstream connections ({inflight} with requests in flight), {unread} unread bytes, "
            f"{output} bytes owed to clients")
    if states:
        text += "; " + ", ".join(states)
    return text
