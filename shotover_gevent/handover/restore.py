"""The new image's side of an upgrade: verify the checkpoint, keep only the fds it names, adopt
listeners and connections onto fresh chains, then report. Anything unusable rolls back."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket as stdlib_socket
import time
from dataclasses import dataclass
from typing import Dict, Optional, Set

import gevent
from gevent import socket

from .. import __version__, observability
from ..config import ConfigError, load, load_data
from ..session import Session
from . import checkpoint as checkpoint_format
from .upgrade import CONTROL_SIGNALS, EXEC_TIME_ENV, PREVIOUS_ENV, reap_later

log = logging.getLogger(__name__)


@dataclass
class RestoreOptions:
    config_path: str
    topology_path: str
    control_path: str
    log_format: str
    restore_path: str
    checkpoint_fd: Optional[int] = None
    guardian_fd: Optional[int] = None
    guardian_pid: Optional[int] = None
    rollback: bool = False


class RestoreFailed(Exception):
    pass


def _read_checkpoint(options: RestoreOptions):
    """In a roll-back, our own in-memory copy comes first: the file may be what went wrong."""
    sources = []
    if options.rollback and options.checkpoint_fd is not None:
        sources.append("memory")
    sources.append("file")
    errors = []
    for where in sources:
        try:
            if where == "memory":
                size = os.fstat(options.checkpoint_fd).st_size
                return checkpoint_format.decode(os.pread(options.checkpoint_fd, size, 0))
            return checkpoint_format.read(options.restore_path)
        except (checkpoint_format.CheckpointError, OSError) as error:
            errors.append(f"{where}: {error}")
    raise RestoreFailed("cannot use the checkpoint: " + "; ".join(errors))


def roll_back(options: RestoreOptions, reason: str) -> None:
    """Exec the previous program onto the same checkpoint (once). Does not return."""
    previous = json.loads(os.environ.get(PREVIOUS_ENV, "null") or "null")
    if options.rollback or not previous:
        raise RestoreFailed(f"{reason}; no roll-back left to try")
    log.error("restore failed (%s): rolling back to %s", reason, previous.get("version"))
    for handler in logging.getLogger().handlers:
        handler.flush()
    argv = list(previous["argv"]) + ["--restore", options.restore_path, "--rollback"]
    if options.checkpoint_fd is not None:
        argv += ["--checkpoint-fd", str(options.checkpoint_fd)]
    if options.guardian_fd is not None:
        argv += ["--guardian-fd", str(options.guardian_fd),
                 "--guardian-pid", str(options.guardian_pid)]
    os.environ["SHOTOVER_G_ROLLBACK_REASON"] = f"new version {__version__}: {reason}"
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


def restore(options: RestoreOptions):
    """Return a live Proxy serving every adopted connection (or exec a roll-back)."""
    from ..app import Proxy
    from ..handover.control import ControlChannel, ControlServer
    from ..source import Source

    started_ns = time.time_ns()
    try:
        cp = _read_checkpoint(options)
    except RestoreFailed as error:
        roll_back(options, str(error))
        raise
    hints = cp.restore or {}
    prefix = "previous_" if options.rollback else ""
    try:
        if hints.get(prefix + "config_data") is not None and \
                hints.get(prefix + "topology_data") is not None:
            # A roll-back runs on the configuration it ran with before; an upgrade on what its
            # preflight validated moments ago (no YAML parsing inside the blackout).
            config, topology = load_data(hints[prefix + "config_data"],
                                         hints[prefix + "topology_data"],
                                         options.config_path, options.topology_path)
        else:
            config, topology = load(options.config_path, options.topology_path)
    except ConfigError as error:
        roll_back(options, "configuration invalid: " + "; ".join(error.problems))
        raise
    observability.set_log_filter(config.main_log_level)

    control = cp.control or {}
    keep = set(cp.fds())
    for key in ("channel_fd", "metrics_fd"):
        if control.get(key) is not None:
            keep.add(control[key])
    for fd in (options.checkpoint_fd, options.guardian_fd):
        if fd is not None:
            keep.add(fd)
    leaked = _close_unnamed_fds(keep)

    proxy = Proxy(config, topology, options.control_path, options.log_format)
    proxy.generation = cp.generation if options.rollback else cp.generation + 1
    proxy.started_wall = hints.get("started_wall", proxy.started_wall)

    # Listeners: keep a source's socket when the source still listens on that address.
    by_name = {record.source: record for record in cp.listeners}
    for source_config in topology.sources:
        record = by_name.pop(source_config.name, None)
        listener = None
        if record is not None:
            listener = socket.socket(fileno=record.fd)
            if not same_address(listener.getsockname(), source_config.listen_addr):
                # The topology moved this source: the old address stops listening first, so
                # that the new one can be bound even when it overlaps (0.0.0.0 vs 127.0.0.1).
                listener.close()
                listener = None
        source = Source(source_config, listener)
        if listener is None:
            source.bind()
        proxy.sources[source.name] = source
    for record in by_name.values():  # sources the new topology dropped
        os.close(record.fd)

    closed: Dict[str, int] = dict(cp.drain.get("closed_reasons") or {})
    adopted = []
    for record in cp.connections:
        source = proxy.sources.get(record.source)
        if source is None:
            os.close(record.fd)
            if record.upstream is not None:
                os.close(record.upstream["fd"])
            closed["source removed"] = closed.get("source removed", 0) + 1
            continue
        # Family, type and protocol given: otherwise the socket module asks the kernel for all
        # three, three system calls per connection inside the pause.
        family = stdlib_socket.AF_INET6 if record.peer.startswith("[") else stdlib_socket.AF_INET
        client = socket.socket(family, stdlib_socket.SOCK_STREAM, stdlib_socket.IPPROTO_TCP,
                               fileno=record.fd)
        try:
            client.getpeername()
        except OSError:
            client.close()
            if record.upstream is not None:
                os.close(record.upstream["fd"])
            closed["client left during upgrade"] = closed.get("client left during upgrade", 0) + 1
            continue
        adopted.append((source, client, record))

    if control.get("fd") is not None:
        proxy.control_server = ControlServer(proxy, options.control_path,
                                             socket.socket(fileno=control["fd"]))
    else:
        proxy.control_server = ControlServer(proxy, options.control_path)
        proxy.control_server.bind()
    metrics_listener = None
    if control.get("metrics_fd") is not None:
        metrics_listener = socket.socket(fileno=control["metrics_fd"])
        if config.observability_interface is None or \
                not same_address(metrics_listener.getsockname(), config.observability_interface):
            metrics_listener.close()
            metrics_listener = None

    # Every fd is ours now: release the guardian before any byte is read from a client, so that
    # a roll-back can never replay requests this image has already served.
    if options.guardian_fd is not None:
        try:
            os.write(options.guardian_fd, b"adopted\n")
        except OSError:
            pass
        os.close(options.guardian_fd)
        if options.guardian_pid:
            reap_later(options.guardian_pid)

    for source, client, record in adopted:
        source.adopt(client, record.peer, Session.from_dict(record.session), record.unread,
                     record.upstream)
    proxy.go_live()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    quiesce_ns = hints.get("quiesce_started_ns") or cp.created_ns
    blackout_ms = (time.time_ns() - quiesce_ns) / 1e6
    live_ns = time.time_ns()
    gevent.spawn_later(2.0, _collect_garbage_again)
    # Clients are served again; what only scrapes need loads now, off the hub's thread.
    if config.observability_interface is not None:
        # A second later: loading it competes for the interpreter with the catch-up of every
        # request that queued during the pause. The kernel queues scrapes meanwhile.
        gevent.spawn_later(1.0, _start_observability_later, proxy,
                           config.observability_interface, metrics_listener)

    keep_path = hints.get("keep_checkpoint")
    keep_problem = _dispose_checkpoint(options.restore_path, keep_path)
    if options.checkpoint_fd is not None:
        os.close(options.checkpoint_fd)

    reason = os.environ.pop("SHOTOVER_G_ROLLBACK_REASON", None)
    os.environ.pop(PREVIOUS_ENV, None)
    closed_total = sum(closed.values())
    closed_text = ", ".join(f"{n} {why}" for why, n in closed.items()) or "none closed"
    exec_ns = int(os.environ.pop(EXEC_TIME_ENV, "0") or 0)
    timings = {
        "drain_and_checkpoint_ms": round((cp.created_ns - quiesce_ns) / 1e6, 1),
        "exec_to_restore_ms": round((started_ns - exec_ns) / 1e6, 1) if exec_ns else None,
        "restore_ms": round((live_ns - started_ns) / 1e6, 1),
    }
    restore_ms = timings["restore_ms"]
    result = {
        "event": "result", "ok": not options.rollback,
        "old_version": cp.written_by, "new_version": __version__, "pid": os.getpid(),
        "generation": proxy.generation, "kept": len(adopted), "closed": closed_total,
        "closed_reasons": closed, "blackout_ms": round(blackout_ms, 1),
        "restore_ms": restore_ms, "timings": timings, "leaked_fds_closed": leaked,
    }
    if options.rollback:
        result["reason"] = reason or "roll-back"
        result["summary"] = (f"rolled back: {reason or 'the new version could not restore'}; "
                             f"{__version__} serving {len(adopted)} kept connections "
                             f"({closed_text}), blackout {blackout_ms:.0f} ms")
    else:
        result["summary"] = (f"upgraded {cp.written_by} -> {__version__}: kept {len(adopted)} "
                             f"connections, closed {closed_total} ({closed_text}), blackout "
                             f"{blackout_ms:.0f} ms, pid {os.getpid()}, generation "
                             f"{proxy.generation} (drain+checkpoint "
                             f"{timings['drain_and_checkpoint_ms']} ms, exec+imports "
                             f"{timings['exec_to_restore_ms']} ms, adoption "
                             f"{timings['restore_ms']} ms)")
    if keep_problem:
        result["summary"] += f"; {keep_problem}"
        result["checkpoint_problem"] = keep_problem
    proxy.last_upgrade = result
    if result["ok"]:
        observability.record_upgrade(blackout_ms / 1000, upgrades_so_far=proxy.generation)
    (log.info if result["ok"] else log.error)("%s", result["summary"])
    if control.get("channel_fd") is not None:
        channel = ControlChannel(socket.socket(fileno=control["channel_fd"]))
        channel.send(result)
        channel.close()
    return proxy


def _collect_garbage_again() -> None:
    # What survived the restore lives as long as the process: frozen, later collections
    # skip it.
    gc.freeze()
    gc.enable()


def _start_observability_later(proxy, address, listener) -> None:
    def warm_imports() -> None:
        import gevent.pywsgi  # noqa: F401
        import prometheus_client  # noqa: F401

    try:
        gevent.get_hub().threadpool.apply(warm_imports)
    except Exception:
        log.exception("loading the metrics endpoint failed")
    proxy.observability_server = observability.start_observability_server(address,
                                                                           listener=listener)


def same_address(bound, wanted) -> bool:
    """Whether a bound socket address is the configured "host:port" (port 0: any port)."""
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


def _dispose_checkpoint(path: str, keep_path: Optional[str]) -> Optional[str]:
    """Delete the checkpoint, or move it to `keep_path`; return a problem worth reporting."""
    problem = None
    if keep_path:
        try:
            os.replace(path, keep_path)
            return None
        except OSError:
            # Another file system, most likely: copy it, still private, then delete the original.
            try:
                descriptor = os.open(keep_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(path, "rb") as source, os.fdopen(descriptor, "wb") as target:
                    target.write(source.read())
            except OSError as error:
                problem = f"checkpoint not kept at {keep_path}: {error.strerror or error}"
                log.warning("%s", problem)
    try:
        os.unlink(path)
    except OSError as error:
        log.warning("could not remove checkpoint %s: %s", path, error)
    return problem
