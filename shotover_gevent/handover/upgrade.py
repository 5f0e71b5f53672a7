"""The old image's side of `shotover-g upgrade`, one function per step, in order:
preflight -> quiesce -> checkpoint -> guardian -> exec. Any failure before exec resumes service."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import gevent

from .. import __version__
from ..connection import PAUSE_PROGRESS, State
from . import checkpoint as checkpoint_format

log = logging.getLogger(__name__)

#: Signals held back across the exec window; the new image unblocks them once it can act on them.
CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP}
PREFLIGHT_TIMEOUT = 60.0
#: Environment variable naming the program to exec back if the new image cannot restore.
PREVIOUS_ENV = "SHOTOVER_G_PREVIOUS"
#: When the old image called execv (ns since the epoch), for the new image's timing report.
EXEC_TIME_ENV = "SHOTOVER_G_EXEC_NS"


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
    paused: List = []
    try:
        answer = preflight(proxy, python, report)
        # No collection pause inside the blackout (turned back on if the upgrade aborts).
        gc.disable()
        quiesce_started_ns = time.time_ns()
        paused, closed = quiesce(proxy, request.drain_timeout, report)
        path, data, cp = write_checkpoint(proxy, paused, closed, quiesce_started_ns,
                                          request, report, answer)
        exec_new_image(proxy, python, path, data, cp, request, report, answer)
    except UpgradeAborted as error:
        gc.enable()
        resume(proxy, paused)
        proxy.upgrade_in_progress = False
        report.result(False, f"upgrade aborted, {__version__} still serving: {error}",
                      reason=str(error))
    except Exception as error:  # a bug must not leave clients paused
        log.exception("upgrade failed unexpectedly")
        gc.enable()
        resume(proxy, paused)
        proxy.upgrade_in_progress = False
        report.result(False, f"upgrade aborted by an internal error, {__version__} still "
                             f"serving: {error}", reason=str(error))


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
    for source in proxy.sources.values():
        source.stop_accepting()
    connections = proxy.all_connections()
    for connection in connections:
        connection.request_pause()
    deadline = time.monotonic() + drain_timeout
    started = time.monotonic()
    waiting = connections
    while True:
        # Rescan only the connections not yet stopped; each stop wakes this loop at once.
        waiting = [c for c in waiting if c.state not in (State.PAUSED, State.CLOSED)]
        remaining = deadline - time.monotonic()
        if not waiting or remaining <= 0:
            break
        PAUSE_PROGRESS.clear()
        PAUSE_PROGRESS.wait(min(remaining, 0.05))
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
    paused = [c for c in connections if c.state is State.PAUSED]
    for connection in paused:
        connection.freeze()
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
                     report: Reporter, answer: Dict):
    listeners = [checkpoint_format.ListenerRecord(s.listener.fileno(), name, s.address)
                 for name, s in proxy.sources.items()]
    records = [checkpoint_format.ConnectionRecord(c.sock.fileno(), c.source.name, c.peer,
                                                  c.unread_bytes(), c.session.to_dict(),
                                                  c.export_upstream())
               for c in paused]
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
        rollback=False, guardian=None,
        restore={"quiesce_started_ns": quiesce_started_ns,
                 "keep_checkpoint": request.keep_checkpoint,
                 "started_wall": proxy.started_wall,
                 # What the new version validated in its preflight: it runs on exactly that.
                 "config_data": answer.get("config_data"),
                 "topology_data": answer.get("topology_data"),
                 # What this version runs on, should it have to take over again.
                 "previous_config_data": proxy.config.raw,
                 "previous_topology_data": proxy.topology.raw})
    path = checkpoint_format.new_path()
    try:
        data = checkpoint_format.encode(cp, validate=False)
        checkpoint_format.write(path, data)
    except checkpoint_format.CheckpointError as error:
        raise UpgradeAborted(f"checkpoint: {error}") from None
    unread = sum(len(r.unread) for r in records)
    upstreams = sum(1 for r in records if r.upstream is not None)
    report.stage("checkpoint", f"wrote {path} ({len(data)} bytes: {len(listeners)} listeners, "
                               f"{len(records)} connections with {upstreams} idle upstream "
                               f"connections, {unread} unread bytes)", path=path)
    return path, data, cp


# ---- step 4 + 5: guardian and exec ------------------------------------------------------------

def exec_new_image(proxy, python: str, path: str, data: bytes, cp, request: UpgradeRequest,
                   report: Reporter, answer: Dict) -> None:
    """Replace this program with `python`'s shotover_gevent. Returns only by raising."""
    # An in-memory copy of the checkpoint travels with the fds, for the roll-back image in case
    # the file is damaged or removed.
    memfd = os.memfd_create("shotover-g-checkpoint", 0)
    os.write(memfd, data)
    os.lseek(memfd, 0, os.SEEK_SET)
    fds = set(cp.fds())
    for key in ("channel_fd", "metrics_fd"):
        if key in cp.control:
            fds.add(cp.control[key])
    fds.add(memfd)
    guardian_pipe_read, guardian_pipe_write = os.pipe()
    guardian_pid = None
    blocked = False
    try:
        # PEP 446 made every other fd close-on-exec: marking exactly these inheritable decides
        # what the guardian and the new image get.
        for fd in fds | {guardian_pipe_read}:
            os.set_inheritable(fd, True)
        guardian_pid = spawn_guardian(proxy, path, memfd, guardian_pipe_read,
                                      request.restore_timeout)
        os.close(guardian_pipe_read)
        guardian_pipe_read = None
        os.set_inheritable(guardian_pipe_write, True)
        argv = fast_start_argv(python, answer) + program_argv(proxy, python)[3:] + [
            "--restore", path, "--checkpoint-fd", str(memfd),
            "--guardian-fd", str(guardian_pipe_write), "--guardian-pid", str(guardian_pid)]
        os.environ[PREVIOUS_ENV] = json.dumps({"python": sys.executable,
                                               "argv": program_argv(proxy, sys.executable),
                                               "version": __version__})
        report.stage("exec", f"exec {python} (new version {answer.get('version')}) in place, "
                             f"pid {os.getpid()}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        blocked = True
        os.environ[EXEC_TIME_ENV] = str(time.time_ns())
        os.execv(python, argv)
    except OSError as error:
        reason = f"exec {python} failed: {error.strerror or error}"
    except UpgradeAborted as error:
        reason = str(error)
    finally:
        # Only reached when exec did not happen.
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    os.environ.pop(PREVIOUS_ENV, None)
    os.environ.pop(EXEC_TIME_ENV, None)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    if guardian_pipe_read is not None:
        os.close(guardian_pipe_read)
    try:
        os.write(guardian_pipe_write, b"abort\n")
    except OSError:
        pass
    os.close(guardian_pipe_write)
    os.close(memfd)
    if guardian_pid is not None:
        reap_later(guardian_pid)
    try:
        os.unlink(path)
    except OSError:
        pass
    raise UpgradeAborted(reason)


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


def spawn_guardian(proxy, path: str, memfd: int, pipe_read: int, timeout: float) -> int:
    """A small process holding copies of every handed-over fd (those marked inheritable); if
    the new image dies before it has adopted them, the guardian execs this version back onto
    the same checkpoint. posix_spawn, not gevent's Popen: nothing here may yield to the hub
    once connections are paused, or a waiting connection could read bytes after the
    checkpoint recorded what it had."""
    command = [sys.executable, "-m", "shotover_gevent.handover.guardian",
               "--pipe-fd", str(pipe_read), "--pid", str(os.getpid()),
               "--timeout", str(timeout), "--", *program_argv(proxy, sys.executable),
               "--restore", path, "--checkpoint-fd", str(memfd), "--rollback"]
    try:
        return os.posix_spawn(sys.executable, command, dict(os.environ))
    except OSError as error:
        raise UpgradeAborted(f"cannot start the guardian: {error.strerror or error}") from None


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
