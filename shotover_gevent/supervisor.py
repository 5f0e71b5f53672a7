"""The supervisor: the process the user starts, whose PID is the service's for its whole life.

It binds every listener (one SO_REUSEPORT group per source, one socket per worker, never closed
while the service runs: closing one would reset the connections queued on it), owns the control
socket and the metrics endpoint, starts the workers, restarts a worker that dies, and drives
upgrades: one preflight, then each worker upgraded the way a single proxy upgrades (bridge,
checkpoint, exec in place), then itself, by exec in place. It never serves a request and never
imports transform code: the configuration is validated by a `check` child process.

It is a child subreaper: a worker's bridge that serves on after a failed upgrade, or a lame duck
serving TLS clients, is re-parented here when its worker is gone, and is adopted or collected.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import signal
import socket as stdlib_socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
from gevent import socket
from gevent.event import AsyncResult, Event

from . import __version__, lifecycle
from .handover.control import (ControlChannel, ControlError, ControlServer, Reporter,
                               peer_credentials, request)

log = logging.getLogger("shotover_gevent.supervisor")

PR_SET_CHILD_SUBREAPER = 36
#: How long a fresh worker may take to answer its first status request.
WORKER_START_SECONDS = 30.0
#: A worker that dies sooner than this after its start is restarted after a growing delay.
QUICK_DEATH_SECONDS = 10.0
MAX_RESTART_DELAY = 30.0
#: How long the supervisor waits for its workers to stop before it kills them.
STOP_SECONDS = 30.0
#: How long a worker may take to answer a status or metrics request.
WORKER_ANSWER_SECONDS = 2.0
#: How long the supervisor's exec waits for the control and metrics requests being answered.
EXEC_QUIESCE_SECONDS = 2.0
#: Signals held back while the supervisor execs its next image.
HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP}


# ---- children ---------------------------------------------------------------------------------

class Children:
    """Collects the exit status of every child (workers, preflight checks, and processes
    re-parented here), and hands it to whoever waits for that pid."""

    def __init__(self, on_unclaimed: Callable[[int, int], None]) -> None:
        self.waiting: Dict[int, AsyncResult] = {}
        self.on_unclaimed = on_unclaimed
        self._wake = Event()
        self._greenlet = gevent.spawn(self._loop)

    def watch(self, pid: int) -> AsyncResult:
        result = self.waiting.get(pid)
        if result is None:
            result = self.waiting[pid] = AsyncResult()
        return result

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(status)
                waiter = self.waiting.pop(pid, None)
                if waiter is not None:
                    waiter.set(code)
                else:
                    try:
                        self.on_unclaimed(pid, code)
                    except Exception:  # noqa: BLE001 - the reaper must go on
                        log.exception("handling the exit of pid %d failed", pid)
            self._wake.clear()
            self._wake.wait(0.1)


def spawn(argv: List[str], env: Dict[str, str], keep_fds=(), stdout: Optional[int] = None) -> int:
    """Start a program; only `keep_fds` (and the standard streams) are inherited."""
    for fd in keep_fds:
        os.set_inheritable(fd, True)
    actions = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in keep_fds]
    if stdout is not None:
        actions += [(os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stdout, 2)]
    try:
        # The child starts with no signal blocked (the supervisor blocks some across its own
        # exec, and a mask is inherited).
        return os.posix_spawn(argv[0] if os.sep in argv[0] else _which(argv[0]), argv, env,
                              file_actions=actions, setsigmask=())
    finally:
        for fd in keep_fds:
            os.set_inheritable(fd, False)


def _inheritable_fds() -> List[int]:
    """Inheritable fds above the standard streams (what this process was started with and
    did not claim)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    found.append(fd)
            except OSError:
                pass
    return found


def _which(name: str) -> str:
    import shutil

    return shutil.which(name) or name


def run_child(children: Children, argv: List[str], timeout: float) -> Tuple[int, bytes]:
    """Run a program to its end; its exit code and what it wrote (stdout and stderr)."""
    read_end, write_end = os.pipe()
    try:
        pid = spawn(argv, dict(os.environ), stdout=write_end)
    finally:
        os.close(write_end)
    done = children.watch(pid)
    output = bytearray()
    deadline = time.monotonic() + timeout
    os.set_blocking(read_end, False)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                done.wait(10)
                raise TimeoutError
            try:
                socket.wait_read(read_end, timeout=remaining)
            except socket.timeout:
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            output += chunk
    finally:
        os.close(read_end)
    return done.get(timeout=max(1.0, deadline - time.monotonic())), bytes(output)


# ---- workers ----------------------------------------------------------------------------------

@dataclass
class WorkerSlot:
    index: int
    #: source name -> this worker's socket of the source's group
    listeners: Dict[str, int]
    control: str
    python: str
    pid: int = 0
    started: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    #: "starting", "serving", "restarting" or "stopped"
    state: str = "starting"
    last_status: Dict[str, Any] = field(default_factory=dict)
    #: pids whose exit this slot waits for
    watched: set = field(default_factory=set)


def ask(address: str, message: Dict[str, Any], timeout: float = 5.0,
        on_event: Callable[[Dict[str, Any]], None] = lambda e: None) -> Dict[str, Any]:
    """One control request to a worker (of this user only), from the supervisor's hub."""
    return request(address, message, on_event, timeout, socket_module=socket,
                   own_user_only=True)


# ---- metrics of all workers ------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
#: Gauges that describe one process, not a sum: the supervisor shows the smallest or largest.
_GAUGE_MIN = {"shotover_g_generation"}
_GAUGE_MAX = {"shotover_g_upgrade_blackout_seconds"}


class MetricsAggregate:
    """One Prometheus page for every worker: counters and histograms summed, and never going
    back when a worker restarts (what a worker had counted before it died is kept)."""

    def __init__(self) -> None:
        self.last: Dict[int, Dict[Tuple[str, Tuple], float]] = {}
        self.offset: Dict[Tuple[str, Tuple], float] = {}
        #: family -> its type, as the workers last said
        self.kinds: Dict[str, str] = {}
        #: worker -> the lineage of processes its last page came from (when it started afresh;
        #: an upgrade or a bridge serving on continues a lineage and its counters)
        self.lineages: Dict[int, Any] = {}

    def merge(self, pages: Dict[int, Optional[str]],
              lineages: Optional[Dict[int, Any]] = None) -> Tuple[List[str], Dict]:
        lineages = lineages or {}
        headers: Dict[str, List[str]] = {}
        kinds: Dict[str, str] = {}
        order: List[str] = []
        current: Dict[int, Dict[Tuple[str, Tuple], float]] = {}
        for index, text in pages.items():
            if text is None:
                continue
            values = current[index] = {}
            for line in text.splitlines():
                if line.startswith("#"):
                    parts = line.split(None, 3)
                    if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                        name = parts[2]
                        if name not in headers:
                            headers[name] = []
                            order.append(name)
                        if parts[1] == "TYPE" and len(parts) == 4:
                            kinds[name] = parts[3].strip()
                        if line not in headers[name]:
                            headers[name].append(line)
                    continue
                match = _SAMPLE.match(line)
                if not match:
                    continue
                try:
                    value = float(match.group(3))
                except ValueError:
                    continue
                labels = tuple(sorted(_LABEL.findall(match.group(2) or "")))
                values[(match.group(1), labels)] = value
        self.kinds.update(kinds)
        kinds = self.kinds
        for family in kinds:
            if family not in headers:
                headers[family] = [f"# TYPE {family} {kinds[family]}"]
                order.append(family)
        merged: Dict[Tuple[str, Tuple], float] = {}
        for index in set(self.last) | set(current):
            now = current.get(index)
            before = self.last.get(index, {})
            if now is not None and index in self.lineages and \
                    lineages.get(index) != self.lineages[index]:
                # A new process started afresh in this worker's place: everything the previous
                # one had counted stays counted, every series of it alike.
                for key, value in before.items():
                    if kinds.get(_family_of(key[0], kinds)) in ("counter", "histogram"):
                        self.offset[key] = self.offset.get(key, 0.0) + value
                before = {}
            if now is None:
                now = before  # a worker that did not answer keeps what it showed last
            else:
                self.lineages[index] = lineages.get(index)
            for key, value in now.items():
                family = _family_of(key[0], kinds)
                kind = kinds.get(family, "untyped")
                if kind in ("counter", "histogram"):
                    merged[key] = merged.get(key, 0.0) + value
                elif family in _GAUGE_MIN:
                    merged[key] = min(merged.get(key, value), value)
                elif family in _GAUGE_MAX:
                    merged[key] = max(merged.get(key, value), value)
                else:
                    merged[key] = merged.get(key, 0.0) + value
            self.last[index] = now
        for key, offset in self.offset.items():
            merged[key] = merged.get(key, 0.0) + offset
        return order, {"headers": headers, "kinds": kinds, "values": merged}

    def render(self, pages: Dict[int, Optional[str]], extra: List[str],
               lineages: Optional[Dict[int, Any]] = None) -> bytes:
        from prometheus_client.utils import floatToGoString

        order, merged = self.merge(pages, lineages)
        values = merged["values"]
        by_family: Dict[str, List[Tuple[str, Tuple]]] = {}
        for key in values:
            by_family.setdefault(_family_of(key[0], merged["kinds"]), []).append(key)
        out: List[str] = []
        for family in order:
            out.extend(merged["headers"][family])
            for name, labels in sorted(by_family.get(family, ()), key=_sample_order):
                shown = ",".join(f'{k}="{v}"' for k, v in labels)
                out.append(f"{name}{{{shown}}} {floatToGoString(values[(name, labels)])}"
                           if shown else f"{name} {floatToGoString(values[(name, labels)])}")
        out.extend(extra)
        return ("\n".join(out) + "\n").encode()


def _family_of(sample: str, kinds: Dict[str, str]) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and kinds.get(sample[:-len(suffix)]) == "histogram":
            return sample[:-len(suffix)]
    return sample


def _sample_order(key):
    name, labels = key
    rest = tuple((k, v) for k, v in labels if k != "le")
    le = next((v for k, v in labels if k == "le"), None)
    bound = math.inf if le in (None, "+Inf") else float(le)
    return (rest, name, bound)


# ---- the supervisor -------------------------------------------------------------------------

class Supervisor:
    def __init__(self, config_path: str, topology_path: str, control_path: str,
                 log_format: str, workers: int) -> None:
        self.config_path = os.path.abspath(config_path)
        self.topology_path = os.path.abspath(topology_path)
        self.control_path = control_path
        self.log_format = log_format
        self.count = workers
        self.python = sys.executable
        self.generation = 0
        self.started_wall = time.time()
        #: source name -> {"address": text, "fds": [fd of worker 1, ...]}
        self.listeners: Dict[str, Dict[str, Any]] = {}
        self.slots: List[WorkerSlot] = []
        self.control_server: Optional[ControlServer] = None
        self.observability_server = None
        self.observability_address = None
        self.observability_token: Optional[str] = None
        self.metrics = MetricsAggregate()
        self.restarts_total: Dict[int, int] = {}
        self.upgrade_in_progress = False
        self.last_upgrade: Optional[dict] = None
        self.stopping = False
        self.stopped = Event()
        self.children: Optional[Children] = None
        #: (config, topology) data the service runs on: what was validated at start or by the
        #: last upgrade's preflight. A worker started afresh runs on it, not on the files as
        #: they may be now.
        self.configuration: Tuple[Any, Any] = (None, None)

    # ---- start ---------------------------------------------------------------------------------

    def start_fresh(self) -> None:
        """Validate the configuration (in a child: no transform code here), bind, start the
        workers, and say so once every one of them serves."""
        answer = self._check_configuration()
        from .config import parse_address, parse_config

        self.configuration = (answer.get("config_data"), answer.get("topology_data"))
        config, problems = parse_config(answer.get("config_data"), self.config_path)
        if config is None:
            raise SystemExit(f"shotover-g: {self.config_path}: {problems}")
        from .observability import set_log_filter

        set_log_filter(config.main_log_level)
        self.observability_address = config.observability_interface
        self.observability_token = config.observability_token
        become_subreaper()
        # First what says whether this service runs already (its control socket, its workers'
        # addresses), then the metrics endpoint, and only then the listeners: joining the
        # reuseport group of a running service and leaving it again would reset the
        # connections queued on the sockets it left.
        self.control_server = ControlServer(self, self.control_path)
        self.control_server.bind()
        self._refuse_if_workers_remain()
        addresses = list(_source_addresses(answer.get("topology_data"), parse_address))
        for name, address in addresses:
            _refuse_if_listened_on(name, address)
        self._start_observability(None)
        for name, address in addresses:
            self.listeners[name] = {"fds": self._bind_group(name, address)}
            self.listeners[name]["address"] = _describe_bound(self.listeners[name]["fds"][0])
        self.children = Children(self._unclaimed_exit)
        self.slots = [self._slot(i) for i in range(1, self.count + 1)]
        for slot in self.slots:
            self._spawn(slot)
        self._wait_serving(self.slots)
        self.go_live()

    def _refuse_if_workers_remain(self) -> None:
        """Workers of an earlier run of this service (whose supervisor was killed) may still
        serve their clients: starting beside them would split the address between two
        configurations."""
        for index in range(1, self.count + 1):
            address = lifecycle.worker_control_address(self.control_path, index)
            probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
            try:
                probe.connect(lifecycle.socket_address(address))
                pid, uid = peer_credentials(probe)
            except OSError:
                continue
            finally:
                probe.close()
            if uid not in (os.getuid(), 0):
                raise OSError(f"{address}, the control address of worker {index}, is held by "
                              f"pid {pid} of another user (uid {uid}): not starting")
            raise OSError(f"worker {index} of an earlier run of this service (pid {pid}) "
                          f"still holds {address}: stop it before starting again")

    def _check_configuration(self) -> Dict[str, Any]:
        import subprocess

        command = [sys.executable, "-m", "shotover_gevent", "check", "-c", self.config_path,
                   "-t", self.topology_path, "--json"]
        done = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=lifecycle.PREFLIGHT_TIMEOUT)
        answer = lifecycle.json_answer(done.stdout)
        if answer is None:
            sys.stderr.write(done.stderr.decode("utf-8", "replace"))
            raise SystemExit("shotover-g: the configuration could not be checked; not starting")
        if not answer.get("ok"):
            for problem in answer.get("problems") or ():
                sys.stderr.write(f"error: {problem}\n")
            raise SystemExit(f"shotover-g: {len(answer.get('problems') or ())} configuration "
                             "problem(s); not starting")
        if answer.get("config_data") is None or answer.get("topology_data") is None:
            # Valid, but not expressible in JSON (a YAML date, say): read the files here.
            import yaml

            for key, path in (("config_data", self.config_path),
                              ("topology_data", self.topology_path)):
                with open(path, encoding="utf-8") as file:
                    answer[key] = yaml.safe_load(file)
        return answer

    def _bind_group(self, name: str, address) -> List[int]:
        from .netio import bind_listener

        host, port = address
        fds: List[int] = []
        try:
            for _ in range(self.count):
                listener = bind_listener(name, host, port, reuse_port=True)
                port = listener.getsockname()[1]  # port 0: the others join the port it got
                fds.append(listener.detach())
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _slot(self, index: int, python: Optional[str] = None) -> WorkerSlot:
        return WorkerSlot(index, {name: group["fds"][index - 1]
                                  for name, group in self.listeners.items()
                                  if group["fds"][index - 1] is not None},
                          lifecycle.worker_control_address(self.control_path, index),
                          python or self.python)

    def _spawn(self, slot: WorkerSlot) -> None:
        config_fd = None
        if None not in self.configuration:
            config_fd = lifecycle.configuration_memfd(*self.configuration)
        try:
            identity = lifecycle.WorkerIdentity(slot.index, self.count, os.getpid(),
                                                slot.listeners, config_fd)
            argv = lifecycle.program_argv(slot.python, self.config_path, self.topology_path,
                                          slot.control, self.log_format)
            slot.pid = spawn(argv, lifecycle.worker_environment(identity),
                             keep_fds=list(slot.listeners.values()) +
                             ([config_fd] if config_fd is not None else []))
        finally:
            if config_fd is not None:
                os.close(config_fd)
        slot.started = time.monotonic()
        slot.state = "starting"
        self._watch(slot)

    def _watch(self, slot: WorkerSlot) -> None:
        pid = slot.pid
        if pid in slot.watched:
            return
        slot.watched.add(pid)
        exited = self.children.watch(pid)
        exited.rawlink(lambda result: gevent.spawn(self._worker_exited, slot, pid,
                                                   result.value))

    def _wait_serving(self, slots: List[WorkerSlot]) -> None:
        deadline = time.monotonic() + WORKER_START_SECONDS
        for slot in slots:
            while True:
                if slot.state in ("restarting", "stopped"):
                    raise SystemExit(f"shotover-g: worker {slot.index} exited at start; not "
                                     "starting (see the messages above)")
                try:
                    answer = ask(slot.control, {"command": "status"}, 2.0)
                    if answer.get("pid") != slot.pid:
                        raise ControlError(f"answered by pid {answer.get('pid')}")
                    slot.last_status = answer
                    slot.state = "serving"
                    break
                except ControlError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"shotover-g: worker {slot.index} did not start "
                                         f"within {WORKER_START_SECONDS:g} s") from None
                    gevent.sleep(0.05)

    def _start_observability(self, listener) -> None:
        if self.observability_address is None:
            return
        from .observability import start_observability_server

        self.observability_server = start_observability_server(
            self.observability_address, listener=listener, token=self.observability_token,
            render=self.render_metrics, apply_filter=self.apply_filter)

    def go_live(self) -> None:
        self.control_server.start()
        gevent.signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        gevent.signal_handler(signal.SIGUSR2, self._upgrade_from_signal)
        gevent.signal_handler(signal.SIGHUP, lambda: log.info(
            "SIGHUP ignored: `shotover-g upgrade` (or SIGUSR2) reloads the configuration"))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        addresses = ", ".join(f"{name}={group['address']}"
                              for name, group in self.listeners.items()) or \
            "the addresses the workers bound themselves (see status)"
        extra = ""
        if self.observability_server is not None:
            extra = f"; metrics on {self.observability_server.metrics_location}"
        pids = ", ".join(str(slot.pid) for slot in self.slots)
        log.info("shotover-g %s (pid %d, generation %d) accepting connections on %s with %d "
                 "worker%s (pids %s)%s", __version__, os.getpid(), self.generation, addresses,
                 self.count, "" if self.count == 1 else "s", pids, extra)
        lifecycle.notify_service_manager()

    # ---- workers that exit -----------------------------------------------------------------------

    def _unclaimed_exit(self, pid: int, code: int) -> None:
        log.debug("collected pid %d (exit %s)", pid, code)

    def _worker_exited(self, slot: WorkerSlot, pid: int, code: int) -> None:
        if slot.pid != pid:
            return  # an earlier process of this slot
        if self.stopping:
            slot.state = "stopped"
            return
        # Its bridge may serve on (the new version died during an upgrade): whoever holds
        # the worker's control socket is that worker now.
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline and not self.stopping:
            try:
                answer = ask(slot.control, {"command": "status"}, 2.0)
            except ControlError:
                break
            serving = int(answer.get("pid") or 0)
            if serving and serving != pid and _is_child(serving):
                log.warning("worker %d: pid %d exited (%s); pid %d, the previous version, "
                            "serves its clients", slot.index, pid, _exit_text(code), serving)
                slot.pid = serving
                slot.last_status = answer
                self._watch(slot)
                return
            gevent.sleep(0.1)
        if self.stopping:
            return
        quick = time.monotonic() - slot.started < QUICK_DEATH_SECONDS
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        delay = 0.0 if slot.quick_deaths <= 1 else min(MAX_RESTART_DELAY,
                                                       0.5 * 2 ** (slot.quick_deaths - 2))
        slot.restarts += 1
        self.restarts_total[slot.index] = self.restarts_total.get(slot.index, 0) + 1
        log.error("worker %d (pid %d) exited (%s)%s; restarting it%s", slot.index, pid,
                  _exit_text(code),
                  "; its clients lost their connections" if slot.state == "serving" else "",
                  f" in {delay:g} s" if delay else "")
        slot.state = "restarting"
        if delay:
            gevent.sleep(delay)
        if self.stopping:
            return
        try:
            self._spawn(slot)
        except OSError as error:
            log.error("worker %d: cannot start %s: %s", slot.index, slot.python, error)
            gevent.spawn_later(MAX_RESTART_DELAY, self._worker_exited, slot, slot.pid, -1)
            return
        try:
            self._wait_serving([slot])
            log.info("worker %d restarted: pid %d", slot.index, slot.pid)
        except SystemExit:
            log.error("worker %d: its replacement (pid %d) did not come up; it is tried again "
                      "after a growing pause (see the messages above)", slot.index, slot.pid)

    # ---- status and metrics -------------------------------------------------------------------

    def _ask_all(self, message: Dict[str, Any], timeout: float = 5.0) -> Dict[int, Any]:
        def one(slot: WorkerSlot):
            try:
                return ask(slot.control, message, timeout)
            except ControlError as error:
                return error

        jobs = {slot.index: gevent.spawn(one, slot) for slot in self.slots}
        gevent.joinall(list(jobs.values()))
        return {index: job.value for index, job in jobs.items()}

    def status(self) -> Dict[str, Any]:
        answers = self._ask_all({"command": "status"}, WORKER_ANSWER_SECONDS)
        workers = []
        sources = {name: {"address": group["address"], "connections": 0}
                   for name, group in self.listeners.items()}
        lame_ducks: List[dict] = []
        generations = []
        reported: set = set()
        busy = self.upgrade_in_progress
        for slot in self.slots:
            answer = answers.get(slot.index)
            entry: Dict[str, Any] = {"index": slot.index, "pid": slot.pid, "state": slot.state,
                                     "restarts": slot.restarts}
            if isinstance(answer, dict) and answer.get("event") == "status":
                slot.last_status = answer
                if answer.get("bridge_pid"):
                    entry["bridge_pid"] = answer["bridge_pid"]
                entry.update({"pid": answer.get("pid", slot.pid),
                              "version": answer.get("version"),
                              "generation": answer.get("generation"),
                              "python": answer.get("python"),
                              "uptime_seconds": answer.get("uptime_seconds"),
                              "sources": {n: s.get("connections", 0)
                                          for n, s in (answer.get("sources") or {}).items()},
                              "last_upgrade": (answer.get("last_upgrade") or {}).get("summary")})
                for name, source in (answer.get("sources") or {}).items():
                    shown = sources.setdefault(name, {"address": source.get("address"),
                                                      "connections": 0})
                    if name not in reported:
                        # Where the workers listen (an upgrade may have moved the source).
                        shown["address"] = source.get("address") or shown["address"]
                        reported.add(name)
                    shown["connections"] += int(source.get("connections") or 0)
                lame_ducks.extend(dict(d, worker=slot.index)
                                  for d in answer.get("lame_ducks") or ())
                if isinstance(answer.get("generation"), int):
                    generations.append(answer["generation"])
                busy = busy or bool(answer.get("upgrade_in_progress"))
            else:
                entry["error"] = str(answer)
                last = slot.last_status.get("generation")
                if isinstance(last, int):
                    generations.append(last)  # what it last said, not nothing
            workers.append(entry)
        return {
            "version": __version__,
            "pid": os.getpid(),
            # What every worker has reached.
            "generation": min(generations) if generations else 0,
            "uptime_seconds": round(time.time() - self.started_wall, 3),
            "python": sys.executable,
            "sources": sources,
            "upgrade_in_progress": busy,
            "lame_ducks": lame_ducks,
            "last_upgrade": self.last_upgrade,
            "supervisor": {"pid": os.getpid(), "version": __version__,
                           "generation": self.generation, "python": sys.executable},
            "workers": workers,
        }

    def render_metrics(self) -> bytes:
        # Well inside the HTTP request's own deadline: a worker that is slow to answer is
        # shown with what it showed last.
        answers = self._ask_all({"command": "metrics"}, WORKER_ANSWER_SECONDS)
        pages = {index: (a.get("text") if isinstance(a, dict) else None)
                 for index, a in answers.items()}
        lineages = {index: a.get("lineage") for index, a in answers.items()
                    if isinstance(a, dict)}
        extra = ["# HELP shotover_g_worker_restarts_total Workers the supervisor restarted "
                 "after they exited, by worker.",
                 "# TYPE shotover_g_worker_restarts_total counter"]
        for slot in self.slots:
            extra.append(f'shotover_g_worker_restarts_total{{worker="{slot.index}"}} '
                         f"{self.restarts_total.get(slot.index, 0)}")
        extra += ["# HELP shotover_g_workers Worker processes of this service.",
                  "# TYPE shotover_g_workers gauge", f"shotover_g_workers {self.count}"]
        return self.metrics.render(pages, extra, lineages)

    def apply_filter(self, text: str) -> None:
        from .observability import set_log_filter

        set_log_filter(text)  # raises ValueError for a bad filter: no worker is asked then
        answers = self._ask_all({"command": "filter", "filter": text})
        failed = [f"worker {i}: {a}" for i, a in answers.items()
                  if not (isinstance(a, dict) and a.get("ok"))]
        if failed:
            raise ValueError("; ".join(failed))
        log.info("log filter set to %r in the supervisor and every worker", text.strip())

    # ---- upgrade --------------------------------------------------------------------------------

    def _upgrade_from_signal(self) -> None:
        if self.upgrade_in_progress:
            log.warning("SIGUSR2 received while an upgrade runs: ignored")
            return
        log.info("SIGUSR2 received: upgrading every worker, then the supervisor")
        self.start_upgrade({}, None)

    def start_upgrade(self, options: Dict[str, Any], channel: Optional[ControlChannel]) -> bool:
        if self.upgrade_in_progress:
            if channel is not None:
                channel.send({"event": "error", "error": "an upgrade is already in progress"})
            return False
        self.upgrade_in_progress = True
        gevent.spawn(self._run_upgrade, options, channel)
        return True

    def _run_upgrade(self, options: Dict[str, Any], channel) -> None:
        report = Reporter(channel)
        try:
            result = self._upgrade(options, report)
        except Exception as error:  # noqa: BLE001 - a bug must not stop the supervisor
            log.exception("upgrade failed unexpectedly")
            result = {"event": "result", "ok": False, "reason": str(error),
                      "summary": f"upgrade failed by an internal error of the supervisor: "
                                 f"{error}; every worker serves"}
        self.upgrade_in_progress = False
        if result is None:
            return  # the supervisor's next image reports
        self.last_upgrade = result
        extra = {k: v for k, v in result.items() if k not in ("event", "ok", "summary")}
        report.result(bool(result.get("ok")), result["summary"], **extra)

    def _upgrade(self, options: Dict[str, Any], report) -> Optional[dict]:
        from .handover import checkpoint as checkpoint_format

        python = options.get("python") or sys.executable
        if os.sep in python:
            python = os.path.abspath(python)
        else:
            import shutil

            # A command name is looked up once, here: the workers and this process exec it.
            python = shutil.which(python) or python
        report.stage("preflight", f"checking the new version with {python}")
        try:
            code, output = run_child(self.children, lifecycle.preflight_argv(
                python, self.config_path, self.topology_path, checkpoint_format.FORMAT),
                lifecycle.PREFLIGHT_TIMEOUT)
            answer = lifecycle.preflight_answer(code, output, b"")
        except OSError as error:
            return self._aborted(f"preflight: cannot run {python}: {error.strerror or error}")
        except TimeoutError:
            return self._aborted(f"preflight: {python} did not answer within "
                                 f"{lifecycle.PREFLIGHT_TIMEOUT:g} s")
        except lifecycle.PreflightFailed as error:
            return self._aborted(str(error))
        version = answer.get("version", "?")
        report.stage("preflight", f"new version {version} imports, validates the config and "
                                  f"reads checkpoint format {checkpoint_format.FORMAT}",
                     new_version=version)
        moved = self._moved_sources(answer.get("topology_data"))
        parallel = int(options.get("parallel") or 1)
        request = {k: v for k, v in options.items() if k != "parallel"}
        request.update(command="upgrade", python=python, preflight=answer)
        results: Dict[int, dict] = {}
        restarts_before = {slot.index: slot.restarts for slot in self.slots}
        pending = list(self.slots)
        while pending:
            if self.stopping:
                return self._summary(results, python, version, finished=False,
                                     interrupted="the service is stopping")
            group, pending = pending[:parallel], pending[parallel:]
            jobs = [gevent.spawn(self._upgrade_worker, slot, request, report) for slot in group]
            gevent.joinall(jobs)
            for slot, job in zip(group, jobs):
                results[slot.index] = job.value if isinstance(job.value, dict) else {
                    "ok": False, "summary": f"internal error: {job.exception}",
                    "reason": str(job.exception)}
                if results[slot.index].get("ok"):
                    self._let_go(slot, moved)
            if not all(results[slot.index].get("ok") for slot in group):
                return self._summary(results, python, version, finished=False)
        self.python = python
        self.configuration = (answer.get("config_data"), answer.get("topology_data"))
        lost = self._casualties(restarts_before)
        if lost:
            # A new image that took over and then died took its clients with it: whatever
            # its own report said, this upgrade did not go well.
            for index in lost:
                results[index] = dict(results[index], ok=False,
                                      reason=f"worker {index}: its new version exited after "
                                             "taking over; its clients lost their connections",
                                      summary=f"{results[index].get('summary')}; then its new "
                                              "version exited: its clients lost their "
                                              "connections; the worker was restarted")
            return self._summary(results, python, version, finished=False)
        if self.stopping:
            # A stop wins: no new supervisor image is started.
            return self._summary(results, python, version, finished=False,
                                 interrupted="the service is stopping")
        outcome = self._summary(results, python, version, finished=True)
        return self.exec_next(python, outcome, report)

    def _casualties(self, restarts_before: Dict[int, int]) -> List[int]:
        """Workers whose process died since `restarts_before` was taken (restarted, or dead
        and not yet noticed)."""
        return [slot.index for slot in self.slots
                if slot.restarts != restarts_before.get(slot.index, slot.restarts)
                or not _is_child(slot.pid)]

    def _moved_sources(self, topology_data) -> List[str]:
        """The sources whose listening address the new topology changes or drops: once a
        worker runs the new version, it listens there itself and this supervisor's copy of its
        old socket would only queue connections nobody accepts."""
        from .config import parse_address

        if not isinstance(topology_data, dict):
            return []  # the preflight could not pass the topology on: nothing is known to move
        wanted = dict(_source_addresses(topology_data, parse_address))
        moved = []
        for name, group in self.listeners.items():
            fd = next((f for f in group["fds"] if f is not None), None)
            if name not in wanted or fd is None or not _bound_to(fd, wanted[name]):
                moved.append(name)
        return moved

    def _let_go(self, slot: WorkerSlot, moved: List[str]) -> None:
        for name in moved:
            group = self.listeners.get(name)
            if group is None or group["fds"][slot.index - 1] is None:
                continue
            os.close(group["fds"][slot.index - 1])
            group["fds"][slot.index - 1] = None
            slot.listeners.pop(name, None)
            if all(fd is None for fd in group["fds"]):
                del self.listeners[name]
                log.info("source %s no longer listens on %s", name, group["address"])

    def _aborted(self, reason: str) -> dict:
        return {"event": "result", "ok": False, "reason": reason,
                "summary": f"upgrade aborted, {__version__} still serving: {reason}"}

    def _upgrade_worker(self, slot: WorkerSlot, request: Dict[str, Any], report) -> dict:
        label = f"[worker {slot.index}/{self.count}]"
        message = dict(request)
        if message.get("keep_checkpoint") and self.count > 1:
            message["keep_checkpoint"] = f"{message['keep_checkpoint']}.w{slot.index}"

        def relay(event: Dict[str, Any]) -> None:
            if event.get("event") == "stage":
                report.stage(f"{label} {event.get('stage')}", str(event.get("detail")))

        timeout = float(request.get("restore_timeout") or 30.0) + \
            float(request.get("drain_timeout") or 10.0) + 120.0
        try:
            result = ask(slot.control, message, timeout, relay)
        except ControlError as error:
            return {"ok": False, "reason": f"worker {slot.index}: {error}",
                    "summary": f"worker {slot.index}: the outcome is unknown ({error}); "
                               "`shotover-g status` shows what it runs"}
        if result.get("event") == "error":
            return {"ok": False, "reason": str(result.get("error")),
                    "summary": f"worker {slot.index}: {result.get('error')}"}
        pid = result.get("pid")
        if isinstance(pid, int) and pid != slot.pid and _is_child(pid):
            slot.pid = pid  # the bridge serves on: it is this worker now
            self._watch(slot)
        if result.get("ok"):
            slot.python = request["python"]
            # Counted as done only once it is seen serving (a new image that died right after
            # adopting took its clients with it: the roll-out stops there).
            try:
                answer = ask(slot.control, {"command": "status"}, WORKER_ANSWER_SECONDS)
                if answer.get("pid") != slot.pid or not _is_child(slot.pid):
                    raise ControlError(f"answered by pid {answer.get('pid')}")
            except ControlError as error:
                return dict(result, ok=False,
                            reason=f"worker {slot.index}: its new version stopped serving right "
                                   f"after the upgrade ({error})",
                            summary=f"{result.get('summary')}; then the new version stopped "
                                    f"serving ({error}): its clients lost their connections; "
                                    "the worker is restarted")
        return result

    def _summary(self, results: Dict[int, dict], python: str, version: str,
                 finished: bool, interrupted: Optional[str] = None) -> dict:
        kept = sum(int(r.get("kept") or 0) for r in results.values())
        closed = sum(int(r.get("closed") or 0) for r in results.values())
        reasons: Dict[str, int] = {}
        for r in results.values():
            for why, n in (r.get("closed_reasons") or {}).items():
                reasons[why] = reasons.get(why, 0) + int(n)
        blackouts = [float(r["blackout_ms"]) for r in results.values()
                     if isinstance(r.get("blackout_ms"), (int, float))]
        worst = max(results.values(), key=lambda r: r.get("blackout_ms") or 0)
        lines = [f"worker {index}/{self.count}: {r.get('summary')}"
                 for index, r in sorted(results.items())]
        ok = finished and all(r.get("ok") for r in results.values())
        reasons_text = lifecycle.reasons_text(reasons)
        lines.append(f"in all: {kept} connections kept, {closed} closed ({reasons_text}), "
                     f"worst blackout "
                     f"{max(blackouts):.0f} ms" if blackouts else
                     f"in all: {kept} connections kept, {closed} closed ({reasons_text})")
        result = {"event": "result", "ok": ok, "new_version": version, "kept": kept,
                  "closed": closed, "closed_reasons": reasons,
                  "blackout_ms": max(blackouts) if blackouts else None,
                  # The worst worker's stage timings, and each worker's whole result.
                  "timings": worst.get("timings"),
                  "generation": min((r.get("generation") for r in results.values()
                                     if isinstance(r.get("generation"), int)), default=None),
                  "old_version": worst.get("old_version"),
                  "workers": {str(i): r for i, r in results.items()},
                  "pid": os.getpid()}
        if ok:
            lines.append(f"every worker runs {version}")
            result["summary"] = "\n".join(lines)
            return result
        failed = next((i for i, r in sorted(results.items()) if not r.get("ok")), None)
        if failed is None:
            reason = interrupted or "interrupted"
            result["reason"] = reason
            lines.append(f"upgrade interrupted: {reason}; "
                         + ", ".join(f"worker {s.index}: "
                                     f"{'new version ' + version if s.index in results else 'previous version'}"  # noqa: E501
                                     for s in self.slots))
            result["summary"] = "\n".join(lines)
            return result
        result["reason"] = results[failed].get("reason") or results[failed].get("summary")
        untouched = [s.index for s in self.slots if s.index not in results]
        where = ", ".join(f"worker {s.index}: {'new version ' + version if results.get(s.index, {}).get('ok') else 'previous version'}"  # noqa: E501
                          for s in self.slots)
        lines.append(f"upgrade stopped at worker {failed}: {where}"
                     + (f"; workers {untouched} not tried" if untouched else "")
                     + "; `shotover-g status` shows each worker; a later `shotover-g upgrade` "
                       "finishes the job")
        result["summary"] = "\n".join(lines)
        return result

    # ---- the supervisor's own exec in place ---------------------------------------------------------

    def state(self, outcome: Optional[dict], channel_fd: Optional[int]) -> Dict[str, Any]:
        metrics_fd = None
        if self.observability_server is not None:
            metrics_fd = self.observability_server.server.socket.fileno()
        return {
            "generation": self.generation, "started_wall": self.started_wall,
            "count": self.count, "listeners": self.listeners,
            "control_fd": self.control_server.listener.fileno(), "metrics_fd": metrics_fd,
            "workers": [{"index": s.index, "pid": s.pid, "python": s.python,
                         "restarts": s.restarts, "listeners": s.listeners}
                        for s in self.slots],
            "restarts_total": self.restarts_total,
            "metrics": {"last": {str(i): [[k[0], [list(p) for p in k[1]], v]
                                          for k, v in d.items()]
                                 for i, d in self.metrics.last.items()},
                        "offset": [[k[0], [list(p) for p in k[1]], v]
                                   for k, v in self.metrics.offset.items()],
                        "kinds": self.metrics.kinds,
                        "lineages": {str(i): v for i, v in self.metrics.lineages.items()}},
            "outcome": outcome, "channel_fd": channel_fd,
            "config_fd": (lifecycle.configuration_memfd(*self.configuration)
                          if None not in self.configuration else None),
            # How to start this very version again (its search path pinned: the new image's
            # environment may lead another interpreter to the new code).
            "previous": {"python": sys.executable, "version": __version__,
                         "boot": lifecycle.fast_start_argv(
                             sys.executable, {"sys_path": sys.path,
                                              "package_root": lifecycle.package_root()})},
            "last_upgrade": self.last_upgrade,
        }

    def exec_next(self, python: str, outcome: dict, report) -> Optional[dict]:
        """Exec `python` in place as this supervisor: same PID, the workers stay its children,
        no listener is closed at any moment. Returns only when the exec failed (the result to
        report); otherwise the next image reports."""
        channel = getattr(report, "channel", None)
        channel_fd = channel.sock.fileno() if channel is not None else None
        report.stage("supervisor", f"exec {python} in place, pid {os.getpid()}")
        # Requests being answered are finished first (a scrape, a status): new ones wait in
        # the queues of the sockets the next image inherits.
        self.control_server.quiesce(EXEC_QUIESCE_SECONDS)
        if self.observability_server is not None:
            self.observability_server.server.stop_accepting()
            pool = self.observability_server.server.pool
            deadline = time.monotonic() + EXEC_QUIESCE_SECONDS
            while pool is not None and pool.free_count() < pool.size and \
                    time.monotonic() < deadline:
                gevent.sleep(0.01)
        state = self.state(outcome, channel_fd)
        state["generation"] = self.generation + 1
        error = exec_supervisor(python, self.argv(python), state)
        if state.get("config_fd") is not None:
            os.close(state["config_fd"])
        self.control_server.start()
        if self.observability_server is not None:
            self.observability_server.server.start_accepting()
        outcome = dict(outcome, ok=False, reason=f"the supervisor could not exec {python}: "
                                                 f"{error}")
        outcome["summary"] += (f"\nthe workers run the new version; the supervisor still runs "
                               f"{__version__}: exec {python} failed: {error}")
        return outcome

    def argv(self, python: str) -> List[str]:
        return lifecycle.program_argv(python, self.config_path, self.topology_path,
                                      self.control_path, self.log_format) + \
            ["--workers", str(self.count)]

    @classmethod
    def restore(cls, state: Dict[str, Any], config_path: str, topology_path: str,
                control_path: str, log_format: str) -> "Supervisor":
        supervisor = cls(config_path, topology_path, control_path, log_format,
                         int(state["count"]))
        supervisor.generation = int(state["generation"])
        supervisor.started_wall = float(state["started_wall"])
        supervisor.listeners = {name: {"address": g["address"],
                                       "fds": [None if f is None else int(f) for f in g["fds"]]}
                                for name, g in state["listeners"].items()}
        keep = {fd for g in supervisor.listeners.values() for fd in g["fds"] if fd is not None}
        keep.add(int(state["control_fd"]))
        if state.get("metrics_fd") is not None:
            keep.add(int(state["metrics_fd"]))
        if state.get("channel_fd") is not None:
            keep.add(int(state["channel_fd"]))
        for fd in keep:
            os.set_inheritable(fd, False)
        become_subreaper()
        supervisor.restarts_total = {int(k): int(v)
                                     for k, v in (state.get("restarts_total") or {}).items()}
        metrics = state.get("metrics") or {}
        supervisor.metrics.last = {
            int(i): {(name, tuple(tuple(p) for p in labels)): value
                     for name, labels, value in items}
            for i, items in (metrics.get("last") or {}).items()}
        supervisor.metrics.offset = {(name, tuple(tuple(p) for p in labels)): value
                                     for name, labels, value in metrics.get("offset") or ()}
        supervisor.metrics.kinds = dict(metrics.get("kinds") or {})
        supervisor.metrics.lineages = {int(i): v
                                       for i, v in (metrics.get("lineages") or {}).items()}
        supervisor.last_upgrade = state.get("last_upgrade")
        if state.get("config_fd") is not None:
            config_fd = int(state.pop("config_fd"))
            supervisor.configuration = lifecycle.read_configuration(config_fd)
            # A roll-back of this image gets the same data again.
            state["configuration"] = supervisor.configuration
        elif state.get("configuration") is not None:
            supervisor.configuration = tuple(state["configuration"])
        supervisor.control_server = ControlServer(
            supervisor, control_path, socket.socket(fileno=int(state["control_fd"])))
        config = parsed_config(supervisor.configuration[0], config_path)
        if config is not None:
            supervisor.observability_address = config.observability_interface
            supervisor.observability_token = config.observability_token
        listener = None
        if state.get("metrics_fd") is not None:
            listener = socket.socket(fileno=int(state["metrics_fd"]))
            if supervisor.observability_address is None:
                listener.close()
                listener = None
        supervisor.children = Children(supervisor._unclaimed_exit)
        for entry in state["workers"]:
            slot = WorkerSlot(int(entry["index"]), {k: int(v) for k, v in
                                                    entry["listeners"].items()},
                              lifecycle.worker_control_address(control_path, int(entry["index"])),
                              entry["python"], pid=int(entry["pid"]),
                              started=time.monotonic() - QUICK_DEATH_SECONDS,
                              restarts=int(entry.get("restarts") or 0), state="serving")
            supervisor.slots.append(slot)
            if _is_child(slot.pid, zombie=True):
                supervisor._watch(slot)
            else:
                # Gone (or collected by something else) while the supervisor was exec'ing.
                gevent.spawn(supervisor._worker_exited, slot, slot.pid, None)
        if listener is not None or supervisor.observability_address is not None:
            supervisor._start_observability(listener)
        return supervisor

    # ---- stop -----------------------------------------------------------------------------------

    def request_stop(self, why: str = "stop requested") -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("%s: stopping every worker", why)
        gevent.spawn(self._stop)

    def _stop(self) -> None:
        deadline = time.monotonic() + STOP_SECONDS
        signalled = 0.0
        while time.monotonic() < deadline:
            left = _children_of(os.getpid())
            if not left:
                break
            if time.monotonic() - signalled >= 1.0:
                # Again every second: a bridge that was busy with an upgrade leaves a stop to
                # the process being upgraded, and may serve on (and become a child) later.
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
                signalled = time.monotonic()
            if self.children is not None:
                self.children.wake()
            gevent.sleep(0.05)
        for pid in _children_of(os.getpid()):
            log.warning("pid %d did not stop within %g s: killed", pid, STOP_SECONDS)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._finish_stop()

    def _finish_stop(self) -> None:
        if self.control_server is not None:
            self.control_server.close(unlink=True)
        if self.observability_server is not None:
            self.observability_server.stop()
        for group in self.listeners.values():
            for fd in group["fds"]:
                try:
                    os.close(fd)
                except OSError:
                    pass
        log.info("stopped")
        self.stopped.set()

    def serve_forever(self) -> None:
        self.stopped.wait()


def exec_supervisor(python: str, argv: List[str], state: Dict[str, Any]) -> str:
    """Exec the next image of the supervisor with `state`; returns why it could not (after
    putting everything back as it was)."""
    fds = [fd for g in state["listeners"].values() for fd in g["fds"] if fd is not None]
    fds += [state["control_fd"]] + [state[k] for k in ("metrics_fd", "channel_fd", "config_fd")
                                     if state.get(k) is not None]
    for fd in _inheritable_fds():
        if fd not in fds:
            os.set_inheritable(fd, False)
    for fd in fds:
        os.set_inheritable(fd, True)
    os.environ[lifecycle.SUPERVISOR_ENV] = json.dumps(state)
    for handler in logging.getLogger().handlers:
        handler.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        os.execv(python, argv)
    except OSError as error:
        why = error.strerror or str(error)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    os.environ.pop(lifecycle.SUPERVISOR_ENV, None)
    for fd in fds:
        os.set_inheritable(fd, False)
    return why


def restore_or_roll_back(text: str, config_path: str, topology_path: str, control_path: str,
                         log_format: str) -> Supervisor:
    """The supervisor's next image: take over what the previous one held, then report; if
    that fails, exec the previous version with the same state (once)."""
    state = json.loads(text)
    os.environ.pop(lifecycle.SUPERVISOR_ENV, None)
    try:
        supervisor = Supervisor.restore(state, config_path, topology_path, control_path,
                                        log_format)
    except Exception as error:  # noqa: BLE001 - anything: the previous version takes over
        log.exception("the supervisor's new image cannot take over")
        previous = state.get("previous") or {}
        if state.get("rolled_back") or not previous.get("python"):
            raise
        state["rolled_back"] = f"new supervisor {__version__}: {error}"
        state["generation"] = int(state["generation"]) - 1
        argv = lifecycle.previous_program(previous, lifecycle.program_argv(
            previous["python"], config_path, topology_path, control_path,
            log_format)[3:] + ["--workers", str(state["count"])])
        exec_supervisor(previous["python"], argv, state)
        raise
    supervisor.go_live()
    outcome = dict(state.get("outcome") or {"event": "result", "ok": True, "summary": ""})
    dead = [slot.index for slot in supervisor.slots if not _is_child(slot.pid)]
    if dead and outcome.get("ok"):
        outcome["ok"] = False
        outcome["reason"] = (f"worker(s) {dead} exited while the supervisor was exec'ing; "
                             "their clients lost their connections")
        outcome["summary"] += f"\n{outcome['reason']}; they are restarted"
    if state.get("rolled_back"):
        outcome["ok"] = False
        outcome["reason"] = state["rolled_back"]
        outcome["summary"] += (f"\nthe workers run the new version; the supervisor rolled "
                               f"back to {__version__}: {state['rolled_back']}")
    else:
        outcome["summary"] = (f"upgraded the supervisor and {supervisor.count} worker"
                              f"{'' if supervisor.count == 1 else 's'} to {__version__} "
                              f"(supervisor pid {os.getpid()}, generation "
                              f"{supervisor.generation})\n" + outcome["summary"])
    supervisor.last_upgrade = outcome
    if state.get("channel_fd") is not None:
        channel = ControlChannel(socket.socket(fileno=int(state["channel_fd"])))
        channel.send({"event": "stage", "stage": "supervisor",
                      "detail": f"{__version__} serving as pid {os.getpid()}"})
        channel.send(outcome)
        channel.close()
    (log.info if outcome.get("ok") else log.error)("upgrade %s: %s",
                                                   "done" if outcome.get("ok") else "failed",
                                                   outcome["summary"])
    return supervisor


# ---- helpers ------------------------------------------------------------------------------------

def become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError) as error:
        log.warning("cannot become a child subreaper (%s): a worker's bridge that serves on "
                    "after a failed upgrade is not this process's child", error)


def _source_addresses(topology_data, parse_address):
    from .config import Problems

    for entry in (topology_data or {}).get("sources") or ():
        for _kind, settings in entry.items():
            problems = Problems()
            address = parse_address(settings.get("listen_addr"), "listen_addr", problems)
            if address is not None:
                yield settings.get("name"), address


def _refuse_if_listened_on(name: str, address) -> None:
    """OSError when something listens on `address` already: SO_REUSEPORT would let this
    service join it silently (same user) and take a share of its connections."""
    from .netio import bind_listener

    host, port = address
    if port != 0:
        bind_listener(name, host, port, listen=False).close()


def _bound_address(fd: int) -> Optional[Tuple[str, int]]:
    """(host, port) the socket `fd` is bound to, or None."""
    sock = stdlib_socket.socket(fileno=fd)
    try:
        return tuple(sock.getsockname()[:2])
    except OSError:
        return None
    finally:
        sock.detach()


def _bound_to(fd: int, address) -> bool:
    """Whether the listening socket `fd` is bound to (host, port) (port 0: any port)."""
    bound = _bound_address(fd)
    return bound is not None and bound[0] == address[0] and address[1] in (0, bound[1])


def _describe_bound(fd: int) -> str:
    from .config import format_address

    return format_address(_bound_address(fd))


def parsed_config(data, config_path: str):
    """config.yaml from the data the service runs on (what its last check validated), else
    as the file is now; None when neither can be had."""
    from .config import parse_config

    if data is None:
        try:
            import yaml

            with open(config_path, encoding="utf-8") as file:
                data = yaml.safe_load(file)
        except (OSError, yaml.YAMLError):
            return None
    try:
        config, _problems = parse_config(data, config_path)
    except ValueError:
        return None
    return config


def _is_child(pid: int, zombie: bool = False) -> bool:
    """Whether `pid` is a live child of this process (a worker, or a worker's bridge that was
    re-parented here); with `zombie`, one that has exited and is not yet collected counts
    too."""
    fields = _proc_stat(pid)
    return fields is not None and (zombie or fields[0] != b"Z") and \
        int(fields[1]) == os.getpid()


def _proc_stat(pid: int) -> Optional[List[bytes]]:
    """The fields of /proc/<pid>/stat after the command name (state, parent pid, ...), or
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children_of(parent: int) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _proc_stat(int(name))
        if fields is not None and int(fields[1]) == parent and fields[0] != b"Z":
            found.append(int(name))
    return found


def _exit_text(code: int) -> str:
    if code is None:
        return "status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def usable_cores() -> int:
    """The cores this process may run on, lowered to its cgroup's CPU quota (a container's
    CPU limit) when there is one."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except OSError:
        cores = max(1, os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as limit:
            quota, period = limit.read().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
