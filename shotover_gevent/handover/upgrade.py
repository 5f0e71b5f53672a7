"""The old image's side of `shotover-g upgrade`, one function per step, in order:
preflight -> fork the bridge -> exec in place; then, in the bridge, once the new image is ready:
settle -> snapshot -> checkpoint (see bridge.py and snapshot.py). A failure before the fork
changes nothing."""

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
from typing import Dict, List, Optional

import gevent

from .. import __version__, lifecycle
from ..lifecycle import (ABORTED_ENV, EXEC_TIME_ENV, FROM_BRIDGE, PREVIOUS_ENV,  # noqa: F401
                         ROLLBACK_REASON_ENV)
from . import checkpoint as checkpoint_format
from .control import Reporter
from .snapshot import UpgradeAborted

log = logging.getLogger(__name__)

#: Signals held back across the exec window; the new image unblocks them once it can act on them.
CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP}
PREFLIGHT_TIMEOUT = lifecycle.PREFLIGHT_TIMEOUT
@dataclass
class UpgradeRequest:
    python: Optional[str] = None
    drain_timeout: float = 10.0
    keep_checkpoint: Optional[str] = None
    restore_timeout: float = 30.0
    #: How long the previous version keeps serving TLS clients after the switch.
    tls_drain_timeout: float = 3600.0
    #: The answer of a preflight already run by the supervisor for this very upgrade.
    preflight: Optional[Dict] = None

    @classmethod
    def from_json(cls, data: Dict) -> "UpgradeRequest":
        return cls(python=data.get("python") or None,
                   drain_timeout=float(data.get("drain_timeout", 10.0)),
                   keep_checkpoint=data.get("keep_checkpoint") or None,
                   restore_timeout=float(data.get("restore_timeout", 30.0)),
                   tls_drain_timeout=float(data.get("tls_drain_timeout", 3600.0)),
                   preflight=data.get("preflight") or None)


def start_upgrade(proxy, request: UpgradeRequest, channel) -> bool:
    """Start an upgrade in its own greenlet; False (and an error event) if one is running."""
    if not proxy.begin_upgrade():
        if channel is not None:
            channel.send({"event": "error", "error": "an upgrade is already in progress"})
        else:
            log.warning("upgrade requested while one is in progress: ignored")
        return False
    gevent.spawn(run_upgrade, proxy, request, channel)
    return True


def program_argv(proxy, python: str) -> List[str]:
    """How to start this proxy with `python`: the same files, sockets and options."""
    return lifecycle.program_argv(python, proxy.config.path, proxy.topology.path,
                                  proxy.control_path, proxy.log_format)


def run_upgrade(proxy, request: UpgradeRequest, channel) -> None:
    report = Reporter(channel)
    python = request.python or sys.executable
    try:
        if request.preflight is not None:
            answer = request.preflight
            report.stage("preflight", f"new version {answer.get('version', '?')} checked by "
                                      "the supervisor", new_version=answer.get("version"))
        else:
            answer = preflight(proxy, python, report)
        check_executable(python)
        bridge = fork_and_exec(proxy, python, request, report, answer)
    except UpgradeAborted as error:
        proxy.upgrade_aborted()
        report.result(False, f"upgrade aborted, {__version__} still serving: {error}",
                      reason=str(error))
        return
    except Exception as error:  # a bug must not stop the proxy
        log.exception("upgrade failed unexpectedly")
        proxy.upgrade_aborted()
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
    command = lifecycle.preflight_argv(python, proxy.config.path, proxy.topology.path,
                                       checkpoint_format.FORMAT)
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
    try:
        answer = lifecycle.preflight_answer(child.returncode, out, err)
    except lifecycle.PreflightFailed as error:
        raise UpgradeAborted(str(error)) from None
    version = answer.get("version", "?")
    report.stage("preflight", f"new version {version} imports, validates the config and reads "
                              f"checkpoint format {checkpoint_format.FORMAT}", new_version=version)
    return answer


# ---- step 2: fork the bridge and exec --------------------------------------------------------

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
    restore_args = lifecycle.restore_args(bridge_fd, child_pid)
    # How to start this version again: for the new image's roll-back, or right below.
    own_start = lifecycle.fast_start_argv(sys.executable, {"sys_path": sys.path,
                                                 "package_root": lifecycle.package_root()})
    os.environ[PREVIOUS_ENV] = json.dumps({"python": sys.executable,
                                           "argv": program_argv(proxy, sys.executable),
                                           "boot": own_start, "version": __version__})
    os.environ[EXEC_TIME_ENV] = str(time.time_ns())
    try:
        os.execv(python, lifecycle.fast_start_argv(python, answer) + program_argv(proxy, python)[3:] +
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
