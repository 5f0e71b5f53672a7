"""The running proxy: its sources, endpoints and signals, from cold start or from a checkpoint,
to a graceful stop. The upgrade itself lives in handover/."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional

import gevent
from gevent.event import Event

from . import __version__, lifecycle, observability
from .config import Config, Topology
from .connection import PAUSE_PROGRESS, ClientConnection, State
from .source import Source

log = logging.getLogger(__name__)

#: How often a worker checks that its supervisor is still there.
ORPHAN_CHECK_SECONDS = 1.0
#: How long a graceful stop waits for batches in flight before closing anyway.
STOP_DRAIN_SECONDS = 10.0


class Proxy:
    def __init__(self, config: Config, topology: Topology, control_path: str,
                 log_format: str = "human") -> None:
        self.config = config
        self.topology = topology
        self.control_path = lifecycle.control_address(control_path)
        self.log_format = log_format
        self.generation = 0
        self.started_wall = time.time()
        self.sources: Dict[str, Source] = {}
        self.observability_server = None
        self.control_server = None
        self.stopped = Event()
        self.upgrade_in_progress = False
        self.last_upgrade: Optional[dict] = None
        #: In the bridge process of an upgrade: the PID being upgraded (the service's PID).
        self.bridge_for: Optional[int] = None
        #: In a bridge that serves on only for its TLS clients after the new image took over.
        self.lame_duck = False
        #: Previous versions still serving TLS clients: pid -> what they last reported.
        self.lame_ducks: Dict[int, dict] = {}
        #: Set when this process is one of a supervisor's workers.
        self.worker = lifecycle.worker_identity()
        self._orphan_watch: Optional[gevent.Greenlet] = None

    @property
    def metrics_address(self):
        """Where this process serves /metrics itself, or None: a worker never does (its
        supervisor serves one page for every worker)."""
        return None if self.worker is not None else self.config.observability_interface

    # ---- start --------------------------------------------------------------------------------

    def start_fresh(self) -> None:
        from .handover.control import ControlServer

        from gevent import socket

        inherited = self.worker.listeners if self.worker is not None else {}
        for source_config in self.topology.sources:
            source = Source(source_config)
            fd = inherited.get(source.name)
            if fd is not None:
                source.listener = socket.socket(fileno=fd)  # the supervisor's group
            else:
                source.bind(reuse_port=self.worker is not None)
            self.sources[source.name] = source
        if self.metrics_address is not None:
            self.observability_server = observability.start_observability_server(
                self.metrics_address, token=self.config.observability_token)
        self.control_server = ControlServer(self, self.control_path)
        self.control_server.bind()
        self.go_live()

    def go_live(self) -> None:
        """Accept clients and serve control requests; log the line operators wait for."""
        for source in self.sources.values():
            source.start_accepting()
        self.control_server.start()
        observability.set_generation(self.generation)
        self.install_signal_handlers()
        addresses = ", ".join(f"{s.name}={s.address}" for s in self.sources.values())
        extra = ""
        if self.observability_server is not None:
            extra = f"; metrics on {self.observability_server.metrics_location}"
        if self.worker is not None:
            log.info("%s: shotover-g %s (pid %d, generation %d) serving %s", self.worker.label,
                     __version__, os.getpid(), self.generation, addresses)
            return
        log.info("shotover-g %s (pid %d, generation %d) accepting connections on %s%s",
                 __version__, os.getpid(), self.generation, addresses, extra)
        lifecycle.notify_service_manager()

    def install_signal_handlers(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        if self.worker is None:
            gevent.signal_handler(signal.SIGUSR2, self._upgrade_from_signal)
            return
        # A worker upgrades when its supervisor asks (a signal to the whole process group
        # must not start one upgrade per worker).
        gevent.signal_handler(signal.SIGUSR2, lambda: log.info(
            "SIGUSR2 ignored by a worker: send it to the supervisor (pid %d)",
            self.worker.supervisor_pid))
        if self._orphan_watch is None:
            self._orphan_watch = gevent.spawn(self._watch_supervisor)

    def _watch_supervisor(self) -> None:
        """A worker whose supervisor is gone (killed) keeps serving the clients it has, but
        stops accepting and gives up its control address: a restarted service must find the
        address and the port free, not a worker nobody supervises. It exits when its last
        client leaves."""
        missed = 0
        while not self.stopped.is_set():
            gevent.sleep(ORPHAN_CHECK_SECONDS)
            if self.bridge_for is not None or self.lame_duck or \
                    os.getppid() == self.worker.supervisor_pid:
                # (A bridge's parent is the worker it bridges for; one that serves on is
                # re-parented to the supervisor once that worker's process has ended.)
                missed = 0
                continue
            missed += 1
            if missed < 2:
                continue
            log.error("%s: the supervisor (pid %d) is gone: no longer accepting; serving the "
                      "%d connections there are until they leave", self.worker.label,
                      self.worker.supervisor_pid, len(self.all_connections()))
            for source in self.sources.values():
                source.close_listener()
            if self.control_server is not None:
                self.control_server.close(unlink=False)
            while self.all_connections() and not self.stopped.is_set():
                gevent.sleep(ORPHAN_CHECK_SECONDS)
            self.request_stop("the last client of a worker without a supervisor left")
            return

    def _upgrade_from_signal(self) -> None:
        log.info("SIGUSR2 received: upgrading in place")
        self.start_upgrade({}, None)

    # ---- the upgrade's state: written here only, read by status() -------------------------------

    def begin_upgrade(self) -> bool:
        """Mark an upgrade as running; False when one is already."""
        if self.upgrade_in_progress:
            return False
        self.upgrade_in_progress = True
        return True

    def upgrade_aborted(self) -> None:
        """The upgrade stopped before the exec: nothing changed."""
        self.upgrade_in_progress = False

    def serve_as_bridge(self, upgraded_pid: int) -> None:
        """This process is now the bridge of `upgraded_pid`, which execs the new version."""
        self.bridge_for = upgraded_pid

    def serve_as_lame_duck(self) -> None:
        """The new version took over; this process keeps only its TLS clients."""
        self.lame_duck = True

    def bridge_took_over(self, result: dict) -> None:
        """The new version will not serve: this bridge does, as the service."""
        self.bridge_for = None
        self.upgrade_in_progress = False
        self.last_upgrade = result

    def upgrade_finished(self, result: dict) -> None:
        """The outcome, as the image that serves afterwards reports it."""
        self.last_upgrade = result

    def track_lame_duck(self, pid: int, info: Optional[dict]) -> None:
        """A previous version serving TLS clients (None: it is gone)."""
        if info is None:
            self.lame_ducks.pop(pid, None)
        else:
            self.lame_ducks[pid] = info

    # ---- what the control socket asks ----------------------------------------------------------

    def start_upgrade(self, options: dict, channel) -> bool:
        """Start an upgrade in place (options checked by the control socket); False when one
        is running already."""
        from .handover.upgrade import UpgradeRequest, start_upgrade

        options = {k: v for k, v in options.items() if k != "parallel"}
        return start_upgrade(self, UpgradeRequest.from_json(options), channel)

    def render_metrics(self) -> bytes:
        return observability.render_metrics()

    def apply_filter(self, text: str) -> None:
        observability.set_log_filter(text)
        log.info("log filter set to %r", text.strip())

    # ---- status -------------------------------------------------------------------------------

    def all_connections(self) -> List[ClientConnection]:
        return [c for source in self.sources.values() for c in source.connections]

    def status(self) -> dict:
        return {
            "version": __version__,
            # During an upgrade the bridge answers: the service's PID is still the one upgraded.
            "pid": self.bridge_for or os.getpid(),
            "generation": self.generation,
            "uptime_seconds": round(time.time() - self.started_wall, 3),
            "python": sys.executable,
            "sources": {
                name: {"address": source.address, "connections": len(source.connections)}
                for name, source in self.sources.items()
            },
            "upgrade_in_progress": self.upgrade_in_progress,
            "lame_ducks": sorted(self.lame_ducks.values(), key=lambda d: d["pid"]),
            **({"bridge_pid": os.getpid()} if self.bridge_for else {}),
            **({"worker": self.worker.as_dict()} if self.worker is not None else {}),
            "last_upgrade": self.last_upgrade,
        }

    # ---- stop ---------------------------------------------------------------------------------

    def request_stop(self, why: str = "stop requested") -> None:
        if self.stopped.is_set() or getattr(self, "_stopping", False):
            return
        if self.lame_duck:
            log.info("%s: closing the TLS connections this previous version still serves", why)
            self.stopped.set()
            return
        if self.bridge_for is not None:
            # A signal for the whole service group: the process being upgraded acts on it once
            # it serves; the bridge hands over (or serves on) as planned.
            log.info("%s: left to pid %d, which is being upgraded", why, self.bridge_for)
            return
        self._stopping = True
        log.info("%s: stopping (no new connections, finishing batches in flight)", why)
        gevent.spawn(self._stop)

    def pause_connections(self, timeout: float,
                          settled: Callable[[ClientConnection], object] = lambda c: False
                          ) -> List[ClientConnection]:
        """Stop accepting and ask every connection to stop at its next request boundary; wait
        until each has stopped or is `settled` (not worth waiting for), at most `timeout`
        seconds. Returns the connections there were."""
        for source in self.sources.values():
            source.stop_accepting()
        connections = self.all_connections()
        for connection in connections:
            connection.request_pause()
        deadline = time.monotonic() + timeout
        waiting = connections
        while True:
            # Rescan only the connections not yet stopped; each stop wakes this loop at once.
            waiting = [c for c in waiting
                       if c.state not in (State.PAUSED, State.CLOSED) and not settled(c)]
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                return connections
            PAUSE_PROGRESS.clear()
            PAUSE_PROGRESS.wait(min(remaining, 0.05))

    def _stop(self) -> None:
        for pid in list(self.lame_ducks):
            try:
                os.kill(pid, signal.SIGTERM)  # previous versions still serving TLS clients
            except OSError:
                pass
        # Batches in flight finish; a transaction or a blocking command is not waited for.
        connections = self.pause_connections(STOP_DRAIN_SECONDS,
                                             lambda c: c.session.handover_blocker())
        for connection in connections:
            connection.close("proxy stopping")
        for source in self.sources.values():
            source.close_listener()
            source.close_builders()
        if self.control_server is not None:
            self.control_server.close(unlink=True)
        if self.observability_server is not None:
            self.observability_server.stop()
        log.info("stopped")
        self.stopped.set()

    def serve_forever(self) -> None:
        settle_garbage_collection()
        self.stopped.wait()


#: Allocations (net of deallocations) between two young-generation collections. Serving a
#: request frees what it allocates by reference counting; the default (700) mostly collects
#: nothing, as often as every few dozen requests.
GC_YOUNG_THRESHOLD = 20_000


#: Blocks of this size and more come from the system each time and go back to it when freed
#: (glibc's M_MMAP_THRESHOLD, set once so that it stays put).
LARGE_BLOCK = 128 * 1024
_M_MMAP_THRESHOLD = -3


def settle_garbage_collection() -> None:
    """Once the proxy serves: what it has built so far lives as long as the process, so it is
    frozen (later collections skip it), and young collections come less often. Large blocks
    go back to the system when freed: glibc otherwise raises its threshold for that after the
    first large block is freed, and serves later ones from a heap it cannot give back while
    a small block stays at its top, so the replies of a burst of clients owed megabytes
    (clients that reset, slow readers) stayed in the worker's RSS for good."""
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    _return_large_blocks()


def _return_large_blocks() -> None:
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its own policy stands
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK)
