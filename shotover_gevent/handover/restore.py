"""The new image's side of an upgrade: tell the bridge it is ready, verify the checkpoint the
bridge writes, keep only the fds it names, adopt listeners and connections onto fresh chains,
release the bridge, then report. Anything unusable rolls back."""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket as stdlib_socket
import time
from typing import Dict, Optional, Set

import gevent
from gevent import socket

from .. import __version__, lifecycle, observability
from ..config import ConfigError, load, load_data
from . import checkpoint as checkpoint_format
from .bridge import LineChannel
from ..lifecycle import (ABORTED_ENV, EXEC_TIME_ENV, FROM_BRIDGE, PREVIOUS_ENV,
                         ROLLBACK_REASON_ENV)
from .snapshot import describe
from .upgrade import CONTROL_SIGNALS, reap_later

log = logging.getLogger(__name__)


#: The bridge sends its first line as soon as it runs: silence this long means it is stopped.
BRIDGE_FIRST_LINE_SECONDS = 30.0
#: How long the bridge may take to hand over when it does not say (an older version).
DEFAULT_BRIDGE_WAIT_SECONDS = 3600.0


class RestoreOptions:
    """What the exec'ing image told this one on its command line."""

    def __init__(self, config_path: str, topology_path: str, control_path: str, log_format: str,
                 restore_path: str, bridge_fd: Optional[int] = None,
                 bridge_pid: Optional[int] = None, rollback: bool = False) -> None:
        self.config_path = config_path
        self.topology_path = topology_path
        self.control_path = control_path
        self.log_format = log_format
        self.restore_path = restore_path
        self.bridge_fd = bridge_fd
        self.bridge_pid = bridge_pid
        self.rollback = rollback
        #: The sealed memfd holding the checkpoint, once the bridge has sent it.
        self.checkpoint_fd: Optional[int] = None
        #: How long the bridge may take to answer "ready" (it says so with its first line).
        self.bridge_wait = DEFAULT_BRIDGE_WAIT_SECONDS
        # Reads and writes on the bridge socket; the fd itself stays as it is (inheritable:
        # a roll-back exec hands it on).
        self.bridge: Optional[LineChannel] = None
        if bridge_fd is not None:
            self.bridge = LineChannel(stdlib_socket.socket(stdlib_socket.AF_UNIX,
                                                           stdlib_socket.SOCK_STREAM,
                                                           fileno=bridge_fd))


class RestoreFailed(Exception):
    pass


class BridgeDeclined(RestoreFailed):
    """The bridge could not hand over and serves on: this image leaves quietly."""


class BridgeLost(RestoreFailed):
    """The bridge process ended without handing anything over: no checkpoint will come."""


def tell_bridge(options: RestoreOptions, message: str) -> None:
    if options.bridge is not None:
        options.bridge.send(message)


def _close_bridge(options: RestoreOptions) -> None:
    if options.bridge is not None:
        options.bridge.close()
        options.bridge = None


def _await_checkpoint(options: RestoreOptions) -> None:
    """Ask the bridge to pause every client and write the checkpoint; return once it is on disk."""
    bridge = options.bridge
    if bridge is None:
        return  # started by hand on an existing file
    bridge.send("ready")
    # The bridge settles (at most the drain timeout), then sends: a bridge that says nothing
    # for longer than it gave itself is stopped or hung, and this image gives up.
    wait = options.bridge_wait
    answer = bridge.read_line(time.monotonic() + wait)
    while answer.startswith("fds "):
        # Connections the bridge accepted while this image started: their sockets come now.
        taken = bridge.take_fds(int(answer.split()[1]))
        bridge.send("fds " + " ".join(str(fd) for fd in taken))
        answer = bridge.read_line(time.monotonic() + wait)
    if answer == "timeout":
        raise RestoreFailed(f"the previous version's bridge process did not hand over within "
                            f"{wait:g} s")
    if answer == "written":
        # The checkpoint itself: a sealed memory file, the one socket-less fd of the message.
        taken = bridge.take_fds(len(bridge.fds))
        if taken:
            options.checkpoint_fd = taken[-1]
            for fd in taken[:-1]:
                os.close(fd)
        return
    if answer.startswith("failed"):
        # The bridge serves on, as the previous version: this image has nothing to do.
        raise BridgeDeclined("the previous version could not hand over: "
                             + answer[len("failed"):].strip())
    raise BridgeLost("the previous version's bridge process ended before handing over")


def _configuration_from_bridge(options: RestoreOptions):
    """The bridge's first line: the configuration data to run on, as (config, topology)."""
    if options.bridge is None:
        return None
    line = options.bridge.read_line(time.monotonic() + BRIDGE_FIRST_LINE_SECONDS)
    if line == "timeout":
        raise RestoreFailed(f"the previous version's bridge process sent nothing within "
                            f"{BRIDGE_FIRST_LINE_SECONDS:g} s")
    if not line.startswith("config "):
        raise BridgeLost("the previous version's bridge process ended before handing over")
    import json

    try:
        data = json.loads(line[len("config "):])
        wait = data.get("wait_seconds")
        if isinstance(wait, (int, float)) and wait > 0:
            options.bridge_wait = float(wait)
        return data["config"], data["topology"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _read_checkpoint(options: RestoreOptions):
    try:
        if options.restore_path != FROM_BRIDGE:  # started by hand on a file
            return checkpoint_format.read(options.restore_path)
        if options.checkpoint_fd is None:
            raise checkpoint_format.CheckpointError("the bridge sent no checkpoint")
        return checkpoint_format.read_fd(options.checkpoint_fd)
    except (checkpoint_format.CheckpointError, OSError) as error:
        raise RestoreFailed(f"cannot use the checkpoint: {error}") from None


def roll_back(options: RestoreOptions, reason: str) -> None:
    """Exec the previous program onto the same bridge (once): the bridge resumes serving and
    pauses again when that program is ready. Raises RestoreFailed when no roll-back is left."""
    import json

    previous = json.loads(os.environ.get(PREVIOUS_ENV, "null") or "null")
    if options.rollback or not previous:
        raise RestoreFailed(f"{reason}; no roll-back left to try")
    log.error("restore failed (%s): rolling back to %s", reason, previous.get("version"))
    for handler in logging.getLogger().handlers:
        handler.flush()
    argv = lifecycle.previous_program(previous, list(previous["argv"])[3:] +
                                      ["--restore", FROM_BRIDGE, "--rollback"])
    if options.bridge_fd is not None:
        argv += ["--bridge-fd", str(options.bridge_fd), "--bridge-pid", str(options.bridge_pid)]
    os.environ[ROLLBACK_REASON_ENV] = f"new version {__version__}: {reason}"
    if options.checkpoint_fd is not None:
        os.close(options.checkpoint_fd)  # the bridge sends a fresh one to the next program
        options.checkpoint_fd = None
    tell_bridge(options, "retry")
    os.execv(previous["python"], argv)


def _close_unnamed_fds(keep: Set[int]) -> int:
    """Close every inherited fd the checkpoint does not name (nothing else may leak across)."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                os.close(fd)
                closed += 1
        except OSError:
            pass
    return closed


def _prepare(options: RestoreOptions, config_data, topology_data):
    """A proxy with its sources (not yet listening), on the configuration data given (what the
    preflight validated; for a roll-back, what the previous version ran on), else on the
    files. An invalid configuration rolls back."""
    from ..app import Proxy
    from ..source import Source

    try:
        if config_data is not None and topology_data is not None:
            config, topology = load_data(config_data, topology_data, options.config_path,
                                         options.topology_path)
        else:
            config, topology = load(options.config_path, options.topology_path)
    except ConfigError as error:
        roll_back(options, "configuration invalid: " + "; ".join(error.problems))
        raise
    proxy = Proxy(config, topology, options.control_path, options.log_format)
    for source_config in topology.sources:
        proxy.sources[source_config.name] = Source(source_config)
    return proxy


def restore(options: RestoreOptions):
    """Return a live Proxy serving every adopted connection (or exec a roll-back)."""
    from ..handover.control import ControlServer

    # Everything that does not need the checkpoint happens before asking for it, while the
    # bridge still serves every client: configuration, sources, their transforms' code.
    proxy = None
    sent = _configuration_from_bridge(options)
    if sent is not None:
        proxy = _prepare(options, *sent)
    ready_ns = time.time_ns()
    _await_checkpoint(options)
    written_ns = time.time_ns()
    try:
        cp = _read_checkpoint(options)
    except RestoreFailed as error:
        roll_back(options, str(error))
        raise
    hints = cp.restore or {}
    if proxy is None:
        prefix = "previous_" if options.rollback else ""
        proxy = _prepare(options, hints.get(prefix + "config_data"),
                         hints.get(prefix + "topology_data"))
    config = proxy.config
    observability.set_log_filter(config.main_log_level)

    control = cp.control or {}
    keep = set(cp.fds())
    keep.update(duck["fd"] for duck in hints.get("lame_ducks") or ())
    for key in ("channel_fd", "metrics_fd"):
        if control.get(key) is not None:
            keep.add(control[key])
    if options.bridge_fd is not None:
        keep.add(options.bridge_fd)
    if options.checkpoint_fd is not None:
        keep.add(options.checkpoint_fd)

    proxy.generation = cp.generation if options.rollback else cp.generation + 1
    proxy.started_wall = hints.get("started_wall", proxy.started_wall)
    # Counters go on from the previous image's before this image answers any scrape.
    observability.import_counters(hints.get("counters") or [])

    # Listeners: keep a source's socket when the source still listens on that address.
    by_name = {record.source: record for record in cp.listeners}
    for source in proxy.sources.values():
        source.adopted_stamped = bool(hints.get("arrivals_stamped"))
        record = by_name.pop(source.name, None)
        if record is not None:
            listener = socket.socket(fileno=record.fd)
            if same_address(listener.getsockname(), source.config.listen_addr):
                source.listener = listener
            else:
                # The topology moved this source: the old address stops listening first, so
                # that the new one can be bound even when it overlaps (0.0.0.0 vs 127.0.0.1).
                listener.close()
        if source.listener is None:
            source.bind(reuse_port=proxy.worker is not None)
    for record in by_name.values():  # sources the new topology dropped
        os.close(record.fd)

    closed: Dict[str, int] = dict(cp.drain.get("closed_reasons") or {})
    records = []
    for record in cp.connections:
        if record.source in proxy.sources:
            records.append(record)
            continue
        os.close(record.fd)
        if record.upstream is not None:
            os.close(record.upstream.fd)
        closed["source removed"] = closed.get("source removed", 0) + 1

    if control.get("fd") is not None:
        proxy.control_server = ControlServer(proxy, options.control_path,
                                             socket.socket(fileno=control["fd"]))
    else:
        proxy.control_server = ControlServer(proxy, options.control_path)
        proxy.control_server.bind()
    metrics_listener = None
    if control.get("metrics_fd") is not None:
        metrics_listener = socket.socket(fileno=control["metrics_fd"])
        if proxy.metrics_address is None or \
                not same_address(metrics_listener.getsockname(), proxy.metrics_address):
            metrics_listener.close()
            metrics_listener = None

    # Every fd is ours now: release the bridge before any byte is read from a client, so that
    # it can never serve a request this image serves too.
    if options.bridge_fd is not None:
        tell_bridge(options, "adopted")
        if hints.get("tls_kept") and options.bridge_pid and not options.rollback:
            # The old side goes on serving its TLS clients: it reports on this socket until
            # it exits.
            watch_lame_duck(proxy, options.bridge, {
                "pid": options.bridge_pid, "fd": options.bridge_fd, "version": cp.written_by,
                "tls_connections": hints["tls_kept"],
                "until": time.time() + float(hints.get("tls_drain_timeout") or 0)})
            options.bridge = None
        else:
            _close_bridge(options)
            if options.bridge_pid:
                reap_later(options.bridge_pid)
    for duck in hints.get("lame_ducks") or ():
        # Previous versions still serving TLS clients, watched by the image before this one.
        watch_lame_duck(proxy, LineChannel(stdlib_socket.socket(
            stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM, fileno=duck["fd"])), dict(duck))

    # Inside the pause, only the connections whose requests queued meanwhile are taken over
    # (one poll() finds them); the idle majority follows once these are served again.
    poller = select.poll()
    for record in records:
        poller.register(record.fd, select.POLLIN)
    readable = {fd for fd, _event in poller.poll(0)}
    def waiting(record) -> bool:
        return bool(record.unread or record.output or record.fd in readable or (
            record.upstream is not None and record.upstream.inflight is not None))

    urgent = [r for r in records if waiting(r)]
    later = [r for r in records if not waiting(r)]
    adopted = _adopt(proxy, urgent, closed)
    proxy.go_live()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    quiesce_ns = hints.get("quiesce_started_ns") or cp.created_ns
    blackout_ms = (time.time_ns() - quiesce_ns) / 1e6
    live_ns = time.time_ns()
    gevent.spawn(_finish, proxy, options, cp, closed, adopted, later, keep, blackout_ms,
                 (ready_ns, written_ns, live_ns), metrics_listener)
    return proxy


def watch_lame_duck(proxy, channel: LineChannel, info: dict) -> None:
    """Show a previous version that still serves TLS clients in `status` (it reports on
    `channel`), until it exits; then collect its exit status."""
    pid = info["pid"]
    proxy.track_lame_duck(pid, info)

    def watch() -> None:
        try:
            while True:
                line = channel.read_line(time.monotonic() + 86400 * 365, cooperative=True)
                if line.startswith("lameduck "):
                    parts = line.split()
                    if len(parts) >= 4:
                        info["tls_connections"] = int(parts[2])
                        info["until"] = float(parts[3])
                elif line in ("", "timeout"):
                    return
        except (OSError, ValueError):
            return
        finally:
            proxy.track_lame_duck(pid, None)
            channel.close()
            reap_later(pid, patience=None)

    gevent.spawn(watch)


#: Connections adopted per turn after the pause; between two turns, the served ones run.
ADOPT_BATCH = 100


def _adopt(proxy, records, closed: Dict[str, int]) -> int:
    """Start serving each recorded connection; return how many were still there."""
    count = 0
    for record in records:
        source = proxy.sources[record.source]
        # Family, type and protocol given: otherwise the socket module asks the kernel for all
        # three, three system calls per connection.
        family = stdlib_socket.AF_INET6 if record.peer.startswith("[") else stdlib_socket.AF_INET
        client = socket.socket(family, stdlib_socket.SOCK_STREAM, stdlib_socket.IPPROTO_TCP,
                               fileno=record.fd)
        try:
            client.getpeername()
        except OSError:
            client.close()
            if record.upstream is not None:
                os.close(record.upstream.fd)
            closed["client left during upgrade"] = closed.get("client left during upgrade", 0) + 1
            continue
        source.adopt(client, record)
        count += 1
    return count


def _finish(proxy, options: RestoreOptions, cp, closed: Dict[str, int], adopted: int, later,
            keep: Set[int], blackout_ms: float, moments, metrics_listener) -> None:
    """After the pause: the idle connections, then the inherited fds nobody named, then the
    report. Whatever fails on the way, every connection is adopted and the CLI gets an
    answer."""
    from ..handover.control import ControlChannel

    control = cp.control or {}
    channel = None
    if control.get("channel_fd") is not None:
        channel = ControlChannel(socket.socket(fileno=control["channel_fd"]))
    problems = []
    for start in range(0, len(later), ADOPT_BATCH):
        gevent.sleep(0)
        try:
            adopted += _adopt(proxy, later[start:start + ADOPT_BATCH], closed)
        except Exception:
            log.exception("adopting connections after the upgrade failed; going on one by one")
            problems.append("some connections could not be adopted (see the log)")
            for record in later[start:start + ADOPT_BATCH]:
                try:
                    adopted += _adopt(proxy, [record], closed)
                except Exception:
                    _forget_record(record, closed)
    result = None
    try:
        leaked = _close_unnamed_fds(keep)
        result = _report(proxy, options, cp, closed, adopted, blackout_ms, moments, leaked,
                         metrics_listener, channel)
    except Exception as error:
        log.exception("finishing the upgrade failed")
        problems.append(f"internal error while finishing the upgrade: {error}")
    if result is None:
        result = {"event": "result", "ok": not options.rollback, "new_version": __version__,
                  "pid": os.getpid(), "generation": proxy.generation, "kept": adopted,
                  "summary": f"{__version__} serving {adopted} kept connections, pid "
                             f"{os.getpid()}; " + "; ".join(problems)}
        proxy.upgrade_finished(result)
    elif problems:
        result["summary"] += "; " + "; ".join(problems)
    if channel is not None:
        channel.send(result)
        channel.close()


def _forget_record(record, closed: Dict[str, int]) -> None:
    for fd in (record.fd, record.upstream.fd if record.upstream is not None else None):
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    closed["internal error"] = closed.get("internal error", 0) + 1


def _report(proxy, options: RestoreOptions, cp, closed: Dict[str, int], adopted: int,
            blackout_ms: float, moments, leaked: int, metrics_listener, channel) -> dict:
    ready_ns, written_ns, live_ns = moments
    hints = cp.restore or {}
    quiesce_ns = hints.get("quiesce_started_ns") or cp.created_ns
    gevent.spawn_later(2.0, _collect_garbage_again)
    # Clients are served again; what only scrapes need loads now, off the hub's thread.
    if proxy.metrics_address is not None:
        # A second later: loading it competes for the interpreter with the catch-up of every
        # request that queued during the pause. The kernel queues scrapes meanwhile.
        gevent.spawn_later(1.0, _start_observability_later, proxy, proxy.metrics_address,
                           metrics_listener)

    keep_problem = _dispose_checkpoint(options, hints.get("keep_checkpoint"))

    # The stages the old side could not report (it runs nothing once it has taken the
    # snapshot), for the waiting CLI.
    drain = cp.drain or {}
    drained = drain.get("closed_reasons") or {}
    drained_text = lifecycle.reasons_text(drained)
    stages = [("drain", f"{len(cp.connections)} connections taken over as they were, after "
                        f"{drain.get('ms', 0)} ms for those that could not be at once; "
                        f"closed: {drained_text}"),
              ("checkpoint", f"{describe(cp)}, in a sealed memory file")]
    for stage, detail in stages:
        log.info("upgrade: %s: %s", stage, detail)
        if channel is not None:
            channel.send({"event": "stage", "stage": stage, "detail": detail})

    reason = os.environ.pop(ROLLBACK_REASON_ENV, None)
    aborted = os.environ.pop(ABORTED_ENV, None) is not None
    os.environ.pop(PREVIOUS_ENV, None)
    closed_total = sum(closed.values())
    closed_text = lifecycle.reasons_text(closed, "none closed")
    exec_ns = int(os.environ.pop(EXEC_TIME_ENV, "0") or 0)
    timings = {
        # While the bridge served every client: start, imports, configuration.
        "exec_to_ready_ms": round((ready_ns - exec_ns) / 1e6, 1) if exec_ns else None,
        # The pause: the bridge takes the snapshot and writes; this image reads and adopts.
        "drain_and_checkpoint_ms": round((cp.created_ns - quiesce_ns) / 1e6, 1),
        "handover_ms": round((written_ns - cp.created_ns) / 1e6, 1),
        "restore_ms": round((live_ns - written_ns) / 1e6, 1),
        "settle_ms": drain.get("ms", 0),
    }
    restore_ms = timings["restore_ms"]
    result = {
        "event": "result", "ok": not options.rollback,
        "old_version": cp.written_by, "new_version": __version__, "pid": os.getpid(),
        "generation": proxy.generation, "kept": adopted, "closed": closed_total,
        "closed_reasons": closed, "blackout_ms": round(blackout_ms, 1),
        "restore_ms": restore_ms, "timings": timings, "leaked_fds_closed": leaked,
    }
    if options.rollback and aborted:
        result["reason"] = reason or "aborted"
        result["summary"] = (f"upgrade aborted, {__version__} still serving {adopted} kept "
                             f"connections ({closed_text}): {reason}; blackout "
                             f"{blackout_ms:.0f} ms")
    elif options.rollback:
        result["reason"] = reason or "roll-back"
        result["summary"] = (f"rolled back: {reason or 'the new version could not restore'}; "
                             f"{__version__} serving {adopted} kept connections "
                             f"({closed_text}), blackout {blackout_ms:.0f} ms")
    else:
        result["summary"] = (f"upgraded {cp.written_by} -> {__version__}: kept {adopted} "
                             f"connections, closed {closed_total} ({closed_text}), blackout "
                             f"{blackout_ms:.0f} ms, pid {os.getpid()}, generation "
                             f"{proxy.generation} (start and imports "
                             f"{timings['exec_to_ready_ms']} ms while the old version served; "
                             f"paused: snapshot+checkpoint {timings['drain_and_checkpoint_ms']} "
                             f"ms, adoption {timings['restore_ms']} ms)")
    if keep_problem:
        result["summary"] += f"; {keep_problem}"
        result["checkpoint_problem"] = keep_problem
    proxy.upgrade_finished(result)
    if result["ok"]:
        observability.record_upgrade(blackout_ms / 1000, upgrades_so_far=proxy.generation)
    for why, n in (hints.get("upgrade_closed_totals") or {}).items():
        if isinstance(n, (int, float)):
            observability.record_upgrade_closed(str(why), n)
    for why, n in closed.items():
        observability.record_upgrade_closed(why, n)
    (log.info if result["ok"] else log.error)("%s", result["summary"])
    return result


def restore_or_fall_back(options: RestoreOptions):
    """restore(), or what is left to do when it cannot: if the bridge is gone with every
    client's state, start afresh on the configured addresses; otherwise leave the serving to
    the bridge (it serves on when told, or when this process is gone)."""
    try:
        return restore(options)
    except BridgeLost as error:
        log.critical("restore from %s impossible: %s; starting afresh", options.restore_path,
                     error)
        return _start_afresh(options)
    except BridgeDeclined as error:
        log.error("%s; the previous version serves on", error)
        raise SystemExit(1) from None
    except RestoreFailed as error:
        log.critical("cannot restore from %s: %s", options.restore_path, error)
        tell_bridge(options, f"takeover {error}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        raise SystemExit(1) from None


def _start_afresh(options: RestoreOptions):
    from ..app import Proxy

    keep = {options.bridge_fd} if options.bridge_fd is not None else set()
    identity = lifecycle.worker_identity()
    if identity is not None:
        keep.update(identity.listeners.values())  # a worker's sockets of the supervisor's groups
    _close_unnamed_fds(keep)
    _close_bridge(options)
    try:
        config, topology = load(options.config_path, options.topology_path)
    except ConfigError as error:
        for problem in error.problems:
            log.critical("%s", problem)
        raise SystemExit(1) from None
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    gc.enable()
    proxy = Proxy(config, topology, options.control_path, options.log_format)
    proxy.start_fresh()
    return proxy


def _collect_garbage_again() -> None:
    # What survived the restore lives as long as the process: frozen, later collections
    # skip it.
    from ..app import settle_garbage_collection

    settle_garbage_collection()
    gc.enable()


def _start_observability_later(proxy, address, listener) -> None:
    def warm_imports() -> None:
        import gevent.pywsgi  # noqa: F401
        import prometheus_client  # noqa: F401

    try:
        gevent.get_hub().threadpool.apply(warm_imports)
    except Exception:
        log.exception("loading the metrics endpoint failed")
    proxy.observability_server = observability.start_observability_server(
        address, listener=listener, token=proxy.config.observability_token)


def same_address(bound, wanted) -> bool:
    """Whether a bound socket address is the configured "host:port" (port 0: any port), or
    the configured Unix socket path."""
    if isinstance(bound, str) or isinstance(wanted, str):
        return bound == wanted
    host, port = bound[0], bound[1]
    wanted_host, wanted_port = wanted[0], wanted[1]
    if wanted_port != 0 and port != wanted_port:
        return False
    if host == wanted_host:
        return True
    try:
        infos = stdlib_socket.getaddrinfo(wanted_host, None, type=stdlib_socket.SOCK_STREAM,
                                          flags=stdlib_socket.AI_NUMERICHOST)
    except OSError:
        try:
            infos = stdlib_socket.getaddrinfo(wanted_host, None, type=stdlib_socket.SOCK_STREAM)
        except OSError:
            return False
    return any(info[4][0] == host for info in infos)


def _dispose_checkpoint(options: RestoreOptions, keep_path: Optional[str]) -> Optional[str]:
    """Release the checkpoint's memory file, keeping a copy at `keep_path` when asked (a new
    file, 0600, never an existing file or a symbolic link); return a problem worth reporting."""
    fd, options.checkpoint_fd = options.checkpoint_fd, None
    problem = None
    if keep_path and fd is not None:
        try:
            checkpoint_format.copy_to_file(fd, keep_path)
        except checkpoint_format.CheckpointError as error:
            problem = f"checkpoint not kept at {keep_path}: {error}"
            log.warning("%s", problem)
    if fd is not None:
        os.close(fd)
    return problem
