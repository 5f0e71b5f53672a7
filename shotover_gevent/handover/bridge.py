"""The bridge: a child the old image forks just before it execs the new version in place.

The bridge is the old version, still serving every client, while the new image starts and
imports (the slowest part of an upgrade, and no longer a pause for anyone). When the new image
says "ready", the bridge pauses every connection at a request boundary, writes the checkpoint,
says "written", and waits - without letting any connection read another byte - for "adopted",
then exits. If the new image exits, hangs or gives up first, the bridge simply goes on serving:
nothing was handed over, nothing is lost.

Messages on the bridge socket, one per line. New image -> bridge: "ready" (send me the
checkpoint), "fds <n> <n>..." (the numbers the sockets just sent have here), "adopted" (every
fd is mine: leave), "retry" (I cannot use it; the program I exec next will say "ready" again),
"takeover <reason>" (nobody will restore: serve on).
Bridge -> new image: "config <json>" (the configuration to prepare), "fds <count>" with that
many sockets attached (SCM_RIGHTS: connections accepted while the new image started, which it
did not inherit), "written" (the checkpoint is on disk), "failed <reason>".
"""

from __future__ import annotations

import array
import gc
import logging
import os
import select
import signal
import socket as stdlib_socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

import gevent
from gevent import socket

from .. import __version__
from ..connection import PAUSE_PROGRESS, State
from . import checkpoint as checkpoint_format
from .snapshot import (UpgradeAborted, build_checkpoint, busy_reason, count, resume, settle,
                      take_snapshot)

#: Sockets per SCM_RIGHTS message (the kernel takes at most 253).
MAX_FDS_PER_MESSAGE = 253
FDS_PER_MESSAGE = 250

log = logging.getLogger(__name__)

EXITED = "the new version exited before adopting the connections"


class LineChannel:
    """One end of the bridge socket (a plain, blocking Unix socket): lines of text, and the
    sockets that come with them (SCM_RIGHTS)."""

    def __init__(self, sock: stdlib_socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._buffer = bytearray()
        #: Sockets received and not yet claimed, in the order they came.
        self.fds: List[int] = []

    def send(self, message: str, fds: Sequence[int] = ()) -> None:
        """One line; an error (the other end is gone) is left for read_line() to find."""
        ancillary = [(stdlib_socket.SOL_SOCKET, stdlib_socket.SCM_RIGHTS,
                      array.array("i", fds).tobytes())] if fds else []
        try:
            self.sock.sendmsg([message.encode("utf-8", "replace") + b"\n"], ancillary)
        except OSError:
            pass

    def read_line(self, deadline: Optional[float] = None, cooperative: bool = False) -> str:
        """The next line: "" at EOF, "timeout" once `deadline` (time.monotonic()) has passed
        with nothing to read (what has arrived is read even past it). Cooperative: other
        greenlets run meanwhile; otherwise the whole process waits."""
        while b"\n" not in self._buffer:
            if deadline is not None and not self._readable(deadline, cooperative):
                if time.monotonic() >= deadline:
                    return "timeout"
                continue
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(
                    65536, stdlib_socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4))
            except InterruptedError:
                continue
            except OSError:
                return ""
            for level, kind, payload in ancillary:
                if level == stdlib_socket.SOL_SOCKET and kind == stdlib_socket.SCM_RIGHTS:
                    numbers = array.array("i")
                    numbers.frombytes(payload[:len(payload) - len(payload) % numbers.itemsize])
                    self.fds.extend(numbers)
            if not data:
                return ""
            self._buffer.extend(data)
        end = self._buffer.index(b"\n")
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        return line.decode("utf-8", "replace").strip()

    def _readable(self, deadline: float, cooperative: bool) -> bool:
        remaining = max(deadline - time.monotonic(), 0.0)
        if cooperative and remaining > 0:
            try:
                socket.wait_read(self.fd, timeout=remaining)
                return True
            except (socket.timeout, gevent.Timeout):
                return False
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(remaining * 1000))

    def take_fds(self, count: int) -> List[int]:
        taken, self.fds = self.fds[:count], self.fds[count:]
        return taken

    def close(self) -> None:
        self.sock.close()


class Bridge:
    def __init__(self, proxy, request, report, answer: Dict, python: str,
                 channel_socket, inherited: Dict[int, int], parent_pid: int) -> None:
        self.proxy = proxy
        self.request = request
        self.report = report
        self.answer = answer
        self.python = python
        self.channel = LineChannel(channel_socket)
        self.inherited = inherited
        self.parent_pid = parent_pid
        self._written = False
        self._tls: List = []

    # ---- the bridge's life --------------------------------------------------------------------

    def run(self) -> None:
        proxy = self.proxy
        proxy.serve_as_bridge(self.parent_pid)
        # New clients are accepted and served here too; their sockets are sent to the new image
        # with the checkpoint.
        self.report.stage("exec", f"exec {self.python} (new version "
                                  f"{self.answer.get('version')}) in place, pid "
                                  f"{self.parent_pid}; pid {os.getpid()} serves every client "
                                  "until it is ready")
        try:
            reason = self._serve_until_handed_over()
        except Exception:
            log.exception("upgrade bridge failed")
            if self._written:
                # The new image may be serving already: two processes must never read the
                # same clients. It holds every fd; leave it to it.
                self._leave()
            reason = "the old version's bridge process failed (see its log)"
            self.channel.send(f"failed {reason}")
            resume(self.proxy, self.proxy.all_connections())
        self._take_over(reason)

    def _serve_until_handed_over(self) -> str:
        timeout = self.request.restore_timeout
        deadline = time.monotonic() + timeout
        # What the new version's preflight validated: it prepares everything on it before it
        # asks for the checkpoint.
        self._send_configuration(self.answer.get("config_data"), self.answer.get("topology_data"))
        reason: Optional[str] = None
        while reason is None:
            message = self.channel.read_line(deadline, cooperative=True)
            if message == "ready":
                outcome = self._hand_over()
                if outcome == "retry":
                    self._retry()
                    deadline = time.monotonic() + timeout
                    continue
                reason = outcome
            elif message.startswith("takeover"):
                reason = message[len("takeover"):].strip() or EXITED
            elif message == "retry":
                self._retry()
                deadline = time.monotonic() + timeout
            elif message == "":
                reason = EXITED
            elif message == "timeout":
                reason = f"the new version did not adopt the connections within {timeout:g} s"
            else:
                log.warning("bridge: unexpected message %r ignored", message)
        return reason

    def _hand_over(self) -> str:
        """Settle, snapshot, checkpoint, and wait for the new image's verdict: "retry", or why
        the bridge must serve on. Leaves the process when the new image has adopted
        everything."""
        proxy = self.proxy
        log.info("upgrade: the new image is ready: taking over every connection")
        # No collection pause inside the blackout (back on if this version serves on).
        gc.disable()
        started = time.monotonic()
        deadline = started + self.request.drain_timeout
        closed: Dict[str, int] = {}
        while True:
            # Clients are served while the few connections that cannot be handed over this
            # moment get to a point where they can.
            settle(proxy, deadline)
            # The pause: from here until the new image serves, no greenlet runs in this
            # process (nothing may move between the snapshot and the new image's adoption).
            quiesce_started_ns = time.time_ns()
            snapshot = take_snapshot(proxy)
            if not snapshot.busy or time.monotonic() >= deadline:
                break
        settle_ms = (time.monotonic() - started) * 1000
        for connection in snapshot.busy:
            reason = busy_reason(connection)
            count(closed, reason)
            connection.close(f"upgrade: cannot hand over ({reason})", now=True)
        # TLS connections stay here: their encryption state cannot leave this process. Once
        # the new image has adopted the rest, this process serves them as a lame duck.
        self._tls = list(snapshot.tls)
        # From here the new image gets the whole timeout, however long the settling took.
        deadline = time.monotonic() + self.request.restore_timeout
        channel = getattr(self.report, "channel", None)
        try:
            _cp, data = build_checkpoint(
                proxy, snapshot, closed, settle_ms, quiesce_started_ns, self.request,
                self.answer, lambda fds: self._translate(fds, deadline),
                channel.sock.fileno() if channel is not None else None)
            memfd = checkpoint_format.to_memfd(data)
        except (UpgradeAborted, checkpoint_format.CheckpointError) as error:
            self.channel.send(f"failed {error}")
            resume(proxy, proxy.all_connections())
            gc.enable()
            return str(error)
        # From "written" until the verdict, this process must not run a single greenlet: a
        # connection waiting in recv() would take bytes the new image is about to read.
        self.channel.send("written", [memfd])
        os.close(memfd)
        self._written = True
        verdict = self.channel.read_line(deadline)
        if verdict == "timeout":
            verdict = self._settle_timeout()
        if verdict == "adopted":
            if any(c.state is not State.CLOSED for c in self._tls):
                self._serve_as_lame_duck()
            self._leave()
        if verdict != "retry":
            self._end_new_image()
        resume(proxy, proxy.all_connections())
        self._written = False
        gc.enable()
        if verdict == "retry":
            return "retry"
        if verdict.startswith("takeover"):
            return verdict[len("takeover"):].strip() or EXITED
        if verdict == "timeout":
            return (f"the new version did not adopt the connections within "
                    f"{self.request.restore_timeout:g} s")
        return EXITED

    def _settle_timeout(self) -> str:
        """The new image has not said "adopted" in time. It says so before it reads a single
        client byte, so: stop it, then look once more. If the word came meanwhile, it serves
        already and keeps serving (it is let go on); otherwise it has read nothing and is
        ended, and this process serves on."""
        try:
            os.kill(self.parent_pid, signal.SIGSTOP)
        except OSError:
            return self.channel.read_line(time.monotonic()) or EXITED
        verdict = self.channel.read_line(time.monotonic())
        if verdict == "adopted":
            try:
                os.kill(self.parent_pid, signal.SIGCONT)
            except OSError:
                pass
            return verdict
        return "timeout"

    def _serve_as_lame_duck(self) -> None:
        """The new image serves every other connection and every new client; this process
        goes on serving its TLS clients until each leaves or --tls-drain-timeout passes, then
        exits. It lets go of everything else without touching it: those sockets are the new
        image's now."""
        proxy = self.proxy
        tls = set(self._tls)
        for connection in proxy.all_connections():
            if connection not in tls:
                connection.abandon()
        for source in proxy.sources.values():
            source.close_listener()
        if proxy.control_server is not None:
            proxy.control_server.close(unlink=False)
        if proxy.observability_server is not None:
            try:
                proxy.observability_server.server.close()
            except Exception:  # noqa: BLE001 - nothing of it is ours any more
                pass
            proxy.observability_server = None
        channel = getattr(self.report, "channel", None)
        if channel is not None:
            try:
                channel.sock.close()
            except OSError:
                pass
        proxy.serve_as_lame_duck()
        gc.enable()
        until = time.time() + self.request.tls_drain_timeout
        log.info("upgrade: the new version serves; this process (pid %d) serves %d TLS "
                 "connections until they leave, at most %.0f s", os.getpid(), len(tls),
                 self.request.tls_drain_timeout)
        deadline = time.monotonic() + self.request.tls_drain_timeout
        last = None
        while time.monotonic() < deadline and not proxy.stopped.is_set():
            serving = sum(1 for c in tls if c.state is not State.CLOSED)
            if serving != last:
                # The new image shows this in its status; a new image of a later upgrade
                # inherits the channel and goes on listening.
                self.channel.send(f"lameduck {os.getpid()} {serving} {until:.0f} {__version__}")
                last = serving
            if not serving:
                break
            PAUSE_PROGRESS.clear()
            PAUSE_PROGRESS.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        for connection in tls:
            if connection.state is not State.CLOSED:
                connection.close("the previous version's TLS drain time is over", now=True)
        log.info("upgrade: the previous version's last TLS clients are gone; pid %d exits",
                 os.getpid())

    def _send_configuration(self, config_data, topology_data) -> None:
        import json

        # How long the new image may wait for the checkpoint after it says "ready": the
        # settling, then the time it is given to take over.
        wait = self.request.drain_timeout + self.request.restore_timeout
        self.channel.send("config " + json.dumps({"config": config_data, "topology": topology_data,
                                                  "wait_seconds": wait}))

    def _retry(self) -> None:
        """The new version gave up; the previous one (this version) is started in its place
        and runs on the configuration this process runs on."""
        self._send_configuration(self.proxy.config.raw, self.proxy.topology.raw)

    def _leave(self) -> None:
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:
                pass
        # No cleanup of any kind: every socket is the new image's now.
        os._exit(0)

    def _end_new_image(self) -> None:
        """Whatever became of the new image, it must never serve beside this process."""
        if _alive(self.parent_pid):
            try:
                os.kill(self.parent_pid, signal.SIGKILL)
            except OSError:
                pass

    def _take_over(self, reason: str) -> None:
        """The new version will not serve: this (old) version does, from this process."""
        proxy = self.proxy
        self._end_new_image()
        self.channel.close()
        kept = len(proxy.all_connections())
        summary = (f"rolled back: {reason}; {__version__} serving {kept} kept connections from "
                   f"pid {os.getpid()} (pid {self.parent_pid} is gone)")
        proxy.bridge_took_over({"event": "result", "ok": False, "reason": reason,
                                "summary": summary, "pid": os.getpid(), "kept": kept})
        gc.enable()
        for source in proxy.sources.values():
            source.start_accepting()
        from ..lifecycle import notify_service_manager

        notify_service_manager()
        self.report.result(False, summary, reason=reason, pid=os.getpid(), kept=kept)

    # ---- the socket -----------------------------------------------------------------------------

    def _translate(self, fds, deadline: float) -> Dict[int, int]:
        """fd here -> fd in the new image: the same number for a socket it inherited (same
        inode as at the exec), a new one for a socket sent to it now."""
        numbers: Dict[int, int] = {}
        to_send = []
        for fd in fds:
            try:
                inode = os.fstat(fd).st_ino
            except OSError:
                continue
            if self.inherited.get(fd) == inode:
                numbers[fd] = fd
            else:
                to_send.append(fd)
        for start in range(0, len(to_send), FDS_PER_MESSAGE):
            batch = to_send[start:start + FDS_PER_MESSAGE]
            self.channel.send(f"fds {len(batch)}", batch)
            answer = self.channel.read_line(deadline).split()
            if answer[:1] != ["fds"] or len(answer) != len(batch) + 1:
                raise UpgradeAborted("the new image did not take the sockets sent to it")
            numbers.update(zip(batch, (int(n) for n in answer[1:])))
        return numbers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive, but only its parent could tell; /proc can.
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields: Tuple[bytes, ...] = tuple(stat_file.read().rsplit(b")", 1)[1].split())
        return fields[0] != b"Z"
    except (OSError, IndexError):
        return False
