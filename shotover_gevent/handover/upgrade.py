"""The old image's side of `shotover-g upgrade`, one function per step, in order:
preflight -> fork the bridge -> exec in place; then, in the bridge, once the new image is ready:
quiesce -> checkpoint (see bridge.py). A failure before the fork changes nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket as stdlib_socket
import stat
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import gevent

from .. import __version__, observability
from ..connection import PAUSE_PROGRESS
from . import checkpoint as checkpoint_format

log = logging.getLogger(__name__)

#: Signals held back across the exec window; the new image unblocks them once it can act on them.
CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP}
PREFLIGHT_TIMEOUT = 60.0
#: Environment variable naming the program to exec back if the new image cannot restore.
PREVIOUS_ENV = "SHOTOVER_G_PREVIOUS"
#: When the old image called execv (ns since the epoch), for the new image's timing report.
EXEC_TIME_ENV = "SHOTOVER_G_EXEC_NS"
#: Why a roll-back image runs, for its report.
ROLLBACK_REASON_ENV = "SHOTOVER_G_ROLLBACK_REASON"
#: Set when the new version never ran (its exec failed): the report says "aborted".
ABORTED_ENV = "SHOTOVER_G_ABORTED"
#: The value of --restore when the checkpoint comes over the bridge socket (a sealed memfd).
FROM_BRIDGE = "bridge"


class UpgradeAborted(Exception):
    """The upgrade stopped before exec; the text says why. Service goes on as before."""


@dataclass
class UpgradeRequest:
    python: Optional[str] = None
    drain_timeout: float = 10.0
    keep_checkpoint: Optional[str] = None
    restore_timeout: float = 30.0
    #: How long the previous version keeps serving TLS clients after the switch.
    tls_drain_timeout: float = 3600.0

    @classmethod
    def from_json(cls, data: Dict) -> "UpgradeRequest":
        return cls(python=data.get("python") or None,
                   drain_timeout=float(data.get("drain_timeout", 10.0)),
                   keep_checkpoint=data.get("keep_checkpoint") or None,
                   restore_timeout=float(data.get("restore_timeout", 30.0)),
                   tls_drain_timeout=float(data.get("tls_drain_timeout", 3600.0)))


class Reporter:
    """Sends each stage to the waiting CLI (if any) and to the log."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self.started = time.monotonic()

    def stage(self, stage: str, detail: str, **extra) -> None:
        elapsed_ms = round((time.monotonic() - self.started) * 1000, 1)
        log.info("upgrade: %s: %s", stage, detail)
        if self.channel is not None:
            self.channel.send({"event": "stage", "stage": stage, "detail": detail,
                               "elapsed_ms": elapsed_ms, **extra})

    def result(self, ok: bool, summary: str, **extra) -> None:
        (log.info if ok else log.error)("upgrade %s: %s", "done" if ok else "failed", summary)
        if self.channel is not None:
            self.channel.send({"event": "result", "ok": ok, "summary": summary, **extra})
            self.channel.close()


def start_upgrade(proxy, request: UpgradeRequest, channel) -> bool:
    """Start an upgrade in its own greenlet; False (and an error event) if one is running."""
    if proxy.upgrade_in_progress:
        if channel is not None:
            channel.send({"event": "error", "error": "an upgrade is already in progress"})
        else:
            log.warning("upgrade requested while one is in progress: ignored")
        return False
    proxy.upgrade_in_progress = True
    gevent.spawn(run_upgrade, proxy, request, channel)
    return True


def program_argv(proxy, python: str) -> List[str]:
    """How to start this proxy with `python`: the same files, sockets and options."""
    return [python, "-m", "shotover_gevent", "start",
            "-c", os.path.abspath(proxy.config.path), "-t", os.path.abspath(proxy.topology.path),
            "--control-socket", proxy.control_path, "--log-format", proxy.log_format]


def run_upgrade(proxy, request: UpgradeRequest, channel) -> None:
    report = Reporter(channel)
    python = request.python or sys.executable
    try:
        answer = preflight(proxy, python, report)
        check_executable(python)
        bridge = fork_and_exec(proxy, python, request, report, answer)
    except UpgradeAborted as error:
        proxy.upgrade_in_progress = False
        report.result(False, f"upgrade aborted, {__version__} still serving: {error}",
                      reason=str(error))
        return
    except Exception as error:  # a bug must not stop the proxy
        log.exception("upgrade failed unexpectedly")
        proxy.upgrade_in_progress = False
        report.result(False, f"upgrade aborted by an internal error, {__version__} still "
                             f"serving: {error}", reason=str(error))
        return
    # Only the bridge process gets here: it serves until the new image takes over.
    bridge.run()


# ---- step 1: preflight ------------------------------------------------------------------------

def preflight(proxy, python: str, report: Reporter) -> Dict:
    """Run the new program's `check` in a subprocess: it must import, accept the config and
    read our checkpoint format. Nothing is touched yet."""
    from gevent import subprocess

    report.stage("preflight", f"checking the new version with {python}")
    command = [python, "-m", "shotover_gevent", "check", "-c", os.path.abspath(proxy.config.path),
               "-t", os.path.abspath(proxy.topology.path),
               "--checkpoint-format", str(checkpoint_format.FORMAT), "--json"]
    try:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL)
    except OSError as error:
        raise UpgradeAborted(f"preflight: cannot run {python}: {error.strerror or error}") from None
    try:
        out, err = child.communicate(timeout=PREFLIGHT_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise UpgradeAborted(f"preflight: {python} did not answer within {PREFLIGHT_TIMEOUT:g} s") \
            from None
    answer = None
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            try:
                answer = json.loads(line)
            except ValueError:
                pass
    if child.returncode != 0 or answer is None or not answer.get("ok"):
        reason = ""
        if answer and answer.get("problems"):
            reason = "; ".join(answer["problems"])
        if not reason:
            tail = (err or out).decode("utf-8", "replace").strip().splitlines()[-3:]
            reason = " | ".join(tail) or f"exit status {child.returncode}"
        raise UpgradeAborted(f"preflight failed: {reason}")
    version = answer.get("version", "?")
    report.stage("preflight", f"new version {version} imports, validates the config and reads "
                              f"checkpoint format {checkpoint_format.FORMAT}", new_version=version)
    return answer


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
                     quiesce_started_ns: int, request: UpgradeRequest, answer: Dict,
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
        generation=proxy.generation, argv=program_argv(proxy, sys.executable),
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


# ---- step 3: fork the bridge and exec --------------------------------------------------------

def check_executable(python: str) -> None:
    """Abort while nothing is touched if `python` can no longer be executed (the preflight ran
    it moments ago, but an install may have moved it since)."""
    path = python if os.sep in python else _which(python)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        try:
            os.stat(path or python)
            why = "not an executable file"
        except OSError as error:
            why = error.strerror or str(error)
        raise UpgradeAborted(f"exec {python} failed: {why}")


def _which(name: str) -> Optional[str]:
    import shutil

    return shutil.which(name)


def mark_sockets_inheritable() -> Dict[int, int]:
    """Let every socket reach the next image (PEP 446 made them close-on-exec); return each
    fd's inode so that the bridge can later tell a socket the next image holds from a new one
    that happens to reuse its number."""
    inodes: Dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            info = os.fstat(fd)
            if stat.S_ISSOCK(info.st_mode):
                os.set_inheritable(fd, True)
                inodes[fd] = info.st_ino
        except OSError:
            pass  # the listing's own fd, closed by now
    return inodes


def fork_and_exec(proxy, python: str, request: UpgradeRequest, report: Reporter,
                  answer: Dict):
    """Fork the bridge, then exec the new version in this process (same PID).

    Returns (in the child only) the Bridge that serves every client until the new image is
    ready to take them; the parent never returns: it becomes the new version, or, should the
    exec fail, this version again."""
    from gevent.os import fork_gevent

    from .bridge import Bridge

    inodes = mark_sockets_inheritable()
    parent_end, child_end = stdlib_socket.socketpair(stdlib_socket.AF_UNIX,
                                                     stdlib_socket.SOCK_STREAM)
    parent_pid = os.getpid()
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        child_pid = fork_gevent()
    except OSError as error:
        parent_end.close()
        child_end.close()
        raise UpgradeAborted(f"cannot fork the bridge process: {error.strerror or error}") \
            from None
    if child_pid == 0:
        parent_end.close()
        return Bridge(proxy, request, report, answer, python, child_end, inodes, parent_pid)
    # The parent: from here on nothing may yield to the hub (the bridge owns every client now)
    # and nothing may read or write a client socket.
    child_end.close()
    bridge_fd = parent_end.detach()
    os.set_inheritable(bridge_fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    restore_args = ["--restore", FROM_BRIDGE, "--bridge-fd", str(bridge_fd),
                    "--bridge-pid", str(child_pid)]
    # How to start this version again: for the new image's roll-back, or right below.
    own_start = fast_start_argv(sys.executable, {"sys_path": sys.path,
                                                 "package_root": _package_root()})
    os.environ[PREVIOUS_ENV] = json.dumps({"python": sys.executable,
                                           "argv": program_argv(proxy, sys.executable),
                                           "boot": own_start, "version": __version__})
    os.environ[EXEC_TIME_ENV] = str(time.time_ns())
    try:
        os.execv(python, fast_start_argv(python, answer) + program_argv(proxy, python)[3:] +
                 restore_args)
    except OSError as error:
        reason = f"exec {python} failed: {error.strerror or error}"
    # The new version could not be started: start this one again, in place, on the same
    # bridge (it hands the clients back exactly as it would have handed them over).
    os.environ[ROLLBACK_REASON_ENV] = reason
    os.environ[ABORTED_ENV] = "1"
    try:
        os.execv(sys.executable, own_start + program_argv(proxy, sys.executable)[3:] +
                 restore_args + ["--rollback"])
    except OSError:
        pass
    # Nothing can be exec'ed: the bridge keeps serving on its own.
    try:
        os.write(bridge_fd, b"takeover " + reason.encode("utf-8", "replace") + b"\n")
    finally:
        os._exit(1)


def _package_root() -> str:
    import shotover_gevent

    return os.path.dirname(os.path.dirname(os.path.abspath(shotover_gevent.__file__)))


def fast_start_argv(python: str, answer: Dict) -> List[str]:
    """The start of the new image's command line.

    With the search path its preflight reported, the new interpreter skips site-packages
    processing (-S): that start-up time would otherwise be client-visible blackout.
    """
    sys_path = answer.get("sys_path")
    root = answer.get("package_root")
    if not isinstance(sys_path, list) or not isinstance(root, str) or \
            not all(isinstance(p, str) for p in sys_path):
        return [python, "-m", "shotover_gevent"]
    paths = [root] + [p for p in sys_path[1:] if p != root]
    boot = (f"import sys; sys.path[:] = {paths!r}; "
            "from shotover_gevent.__main__ import _run; _run()")
    return [python, "-S", "-c", boot]


def reap_later(pid: int, patience: Optional[float] = 10.0) -> None:
    """Collect a child's exit status without blocking the hub (for `patience` seconds at
    most; None: as long as it takes)."""

    def reap() -> None:
        rounds = 10 ** 9 if patience is None else int(patience / 0.05)
        for _ in range(rounds):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            gevent.sleep(0.05)

    gevent.spawn(reap)
