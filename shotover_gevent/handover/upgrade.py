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

from .. import __version__
from ..connection import State
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


class UpgradeAborted(Exception):
    """The upgrade stopped before exec; the text says why. Service goes on as before."""


@dataclass
class UpgradeRequest:
    python: Optional[str] = None
    drain_timeout: float = 10.0
    keep_checkpoint: Optional[str] = None
    restore_timeout: float = 30.0

    @classmethod
    def from_json(cls, data: Dict) -> "UpgradeRequest":
        return cls(python=data.get("python") or None,
                   drain_timeout=float(data.get("drain_timeout", 10.0)),
                   keep_checkpoint=data.get("keep_checkpoint") or None,
                   restore_timeout=float(data.get("restore_timeout", 30.0)))


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


# ---- step 2: quiesce --------------------------------------------------------------------------

def quiesce(proxy, drain_timeout: float, report: Reporter):
    """Stop accepting, stop every connection at a request boundary; close what cannot stop."""
    started = time.monotonic()
    deadline = started + drain_timeout
    connections = proxy.pause_connections(drain_timeout)
    closed: Dict[str, int] = {}
    for connection in connections:
        if connection.state is State.PAUSED:
            blocker = connection.handover_blocker()
            if blocker is None:
                continue
        elif connection.state is State.CLOSED:
            continue
        else:
            blocker = connection.session.handover_blocker() or "busy (command in flight)"
        closed[blocker] = closed.get(blocker, 0) + 1
        connection.close(f"upgrade: cannot hand over ({blocker})")
    paused, writing = [], []
    for connection in connections:
        if connection.state is State.PAUSED:
            (paused if connection.freeze(0) else writing).append(connection)
    # A write still in progress (a pub/sub message to a client that reads slowly, or not at
    # all) holds the write side: it gets what is left of the deadline, a second at least.
    for connection in writing:
        if connection.state is not State.PAUSED:
            continue  # the client left meanwhile
        if connection.freeze(max(deadline - time.monotonic(), 1.0)):
            paused.append(connection)
            continue
        blocker = "still writing to a client that does not read"
        closed[blocker] = closed.get(blocker, 0) + 1
        connection.close(f"upgrade: cannot hand over ({blocker})")
    drain_ms = (time.monotonic() - started) * 1000
    closed_text = ", ".join(f"{n} {why}" for why, n in closed.items()) or "none"
    report.stage("drain", f"{len(paused)} connections paused at a request boundary in "
                          f"{drain_ms:.1f} ms; closed: {closed_text}",
                 paused=len(paused), closed=closed, drain_ms=round(drain_ms, 1))
    return paused, closed


def resume(proxy, paused: List) -> None:
    """Undo quiesce: every paused connection carries on; accepting restarts."""
    for connection in paused:
        connection.unfreeze()
    for connection in proxy.all_connections():
        connection.resume()
    for source in proxy.sources.values():
        source.start_accepting()


# ---- step 3: checkpoint -----------------------------------------------------------------------

def write_checkpoint(proxy, paused, closed, quiesce_started_ns: int, request: UpgradeRequest,
                     report: Reporter, answer: Dict, path: str, main_pid: int,
                     translate: Callable[[List[int]], Dict[int, int]]):
    """Describe every paused connection for the next image and write the file.

    `translate` maps the fds of the paused connections (and of their upstream connections) to
    the numbers the next image knows them by (the same number for a socket it inherited; a
    socket opened since, it is sent); an fd missing from the answer is not handed over: such a
    client is closed, such an upstream connection stays behind (the next image connects
    afresh)."""
    listeners = [checkpoint_format.ListenerRecord(s.listener.fileno(), name, s.address)
                 for name, s in proxy.sources.items()]
    described = [(c, c.sock.fileno(), c.export_upstream()) for c in paused]
    wanted = [fd for _c, fd, _upstream in described]
    wanted += [upstream["fd"] for _c, _fd, upstream in described if upstream is not None]
    numbers = translate(wanted)
    records = []
    for c, fd, upstream in described:
        if fd not in numbers:
            reason = "socket not transferable to the next image"
            closed[reason] = closed.get(reason, 0) + 1
            c.close(f"upgrade: {reason}")
            continue
        if upstream is not None:
            upstream = dict(upstream, fd=numbers[upstream["fd"]]) if upstream["fd"] in numbers \
                else None
        records.append(checkpoint_format.ConnectionRecord(numbers[fd], c.source.name, c.peer,
                                                          c.unread_bytes(), c.session.to_dict(),
                                                          upstream))
    control = {"fd": proxy.control_server.listener.fileno(), "path": proxy.control_path}
    channel = getattr(report, "channel", None)
    if channel is not None:
        control["channel_fd"] = channel.sock.fileno()
    if proxy.observability_server is not None:
        control["metrics_fd"] = proxy.observability_server.server.socket.fileno()
    cp = checkpoint_format.Checkpoint(
        written_by=__version__, created_ns=time.time_ns(), pid=os.getpid(),
        generation=proxy.generation, argv=program_argv(proxy, sys.executable),
        python=sys.executable, config_sha256=proxy.config_digest(), listeners=listeners,
        connections=records, control=control,
        drain={"ms": int((time.time_ns() - quiesce_started_ns) / 1e6),
               "closed": sum(closed.values()), "closed_reasons": closed},
        rollback=False, guardian={"bridge_pid": os.getpid()},
        restore={"quiesce_started_ns": quiesce_started_ns,
                 "keep_checkpoint": request.keep_checkpoint,
                 "started_wall": proxy.started_wall,
                 # What the new version validated in its preflight: it runs on exactly that.
                 "config_data": answer.get("config_data"),
                 "topology_data": answer.get("topology_data"),
                 # What this version runs on, should it have to take over again.
                 "previous_config_data": proxy.config.raw,
                 "previous_topology_data": proxy.topology.raw})
    try:
        data = checkpoint_format.encode(cp, validate=False)
        try:
            os.unlink(path)  # an earlier attempt's, which a failed image left behind
        except OSError:
            pass
        checkpoint_format.write(path, data)
    except checkpoint_format.CheckpointError as error:
        raise UpgradeAborted(f"checkpoint: {error}") from None
    unread = sum(len(r.unread) for r in records)
    upstreams = sum(1 for r in records if r.upstream is not None)
    report.stage("checkpoint", f"wrote {path} ({len(data)} bytes: {len(listeners)} listeners, "
                               f"{len(records)} connections with {upstreams} upstream "
                               f"connections, {unread} unread bytes)", path=path)
    return cp


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

    path = checkpoint_format.new_path()
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
        return Bridge(proxy, request, report, answer, python, path, child_end, inodes,
                      parent_pid)
    # The parent: from here on nothing may yield to the hub (the bridge owns every client now)
    # and nothing may read or write a client socket.
    child_end.close()
    bridge_fd = parent_end.detach()
    os.set_inheritable(bridge_fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    restore_args = ["--restore", path, "--bridge-fd", str(bridge_fd),
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


def reap_later(pid: int) -> None:
    """Collect a child's exit status without blocking the hub (bounded: 10 s)."""

    def reap() -> None:
        for _ in range(200):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            gevent.sleep(0.05)

    gevent.spawn(reap)
