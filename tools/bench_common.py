"""Shared pieces of tools/bench.py and tools/bench_upgrade.py.

A `Stack` owns every process a benchmark starts (redis-server, the nodes of a Redis Cluster,
the proxy, HAProxy) and one
temporary directory, and stops them all when it is closed: on normal exit, on an exception,
on Ctrl-C and on SIGTERM. Children also get PR_SET_PDEATHSIG, so they are told to stop even
if the benchmark itself is killed with SIGKILL. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)  # an installed shotover_gevent comes first, else this checkout
from shotover_gevent.handover import control  # noqa: E402
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_BENCHMARK = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy")
                                      else None)

PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the benchmark process dies without cleaning up."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class BenchError(Exception):
    """A benchmark could not run; the text says why."""


# ---- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            result = predicate()
        except BenchError:
            raise
        except Exception as error:  # a probe that fails counts as "not yet"
            last, result = error, None
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = f" (last error: {last})" if last is not None else ""
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def raise_nofile(wanted: Optional[int] = None) -> int:
    """Raise this process's open-file soft limit (to `wanted`, or to the hard limit).

    Children started afterwards inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def proc_status_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def proc_nofile_limit(pid: int) -> int:
    """The soft 'Max open files' of a running process, from /proc/<pid>/limits."""
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return -1 if value == "unlimited" else int(value)
    raise BenchError(f"no open-files limit in /proc/{pid}/limits")


def proc_cpu_seconds(pid: int) -> Tuple[float, float]:
    """(user, system) CPU seconds a process has used so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by `root` and its live descendants (a supervisor
    and its workers), plus what the descendants it waited for used."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in process_tree([root]):
        try:
            _parent, user, system, child_user, child_system = proc_stat_ticks(pid)
        except (OSError, ValueError, IndexError):
            continue
        total += (user + system + child_user + child_system) / ticks
    return total


def proc_stat_ticks(pid: int) -> Tuple[int, int, int, int, int]:
    """(parent pid, user, system, waited-for children's user, their system) of a process from
    /proc/<pid>/stat, times in clock ticks (SC_CLK_TCK a second). The process's own times
    cover all its threads."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]), int(fields[12]), int(fields[13]), int(fields[14])


def process_tree(roots: Sequence[int]) -> List[int]:
    """`roots` and every live descendant of theirs (children, grandchildren...), from the
    parent pids in /proc."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            parent = proc_stat_ticks(int(name))[0]
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(name))
    found: List[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def machine_load() -> Dict[str, Any]:
    """Load average and CPU pressure: how much else competed for the CPUs."""
    info: Dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        with open("/proc/loadavg") as handle:
            info["loadavg_1m"] = float(handle.read().split()[0])
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/pressure/cpu") as handle:
            for line in handle:
                if line.startswith("some"):
                    values = dict(item.split("=") for item in line.split()[1:])
                    info["cpu_pressure_avg10"] = float(values["avg10"])
                    info["cpu_pressure_avg60"] = float(values["avg60"])
    except (OSError, ValueError, KeyError):
        pass
    return info


def describe_load(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    text = f"machine: {before.get('cpus')} CPU(s)"
    if "loadavg_1m" in before:
        text += f", load average {before['loadavg_1m']:.2f} before / " \
                f"{after.get('loadavg_1m', float('nan')):.2f} after"
    if "cpu_pressure_avg60" in after:
        text += (f", CPU pressure (some, avg60) {after['cpu_pressure_avg60']:.0f}% at the end: "
                 "the share of time runnable tasks waited for a CPU")
    return text


def proc_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`, which need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n), at least 1
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 right: Sequence[bool] = ()) -> str:
    """A plain-text table; columns flagged True in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row]
                                           for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    flags = list(right) + [False] * (len(headers) - len(right))

    def line(row: Sequence[str]) -> str:
        out = []
        for text, width, flag in zip(row, widths, flags):
            out.append(text.rjust(width) if flag else text.ljust(width))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def ping(port: int, timeout: float = 1.0) -> bool:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                return False
            data += chunk
        return data == b"+PONG\r\n"


def redis_call(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command on a fresh connection; returns a simple, integer or bulk string reply as text
    (enough for CLUSTER INFO / CLUSTER NODES). An error reply raises BenchError."""
    command = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(command.encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"port {port} closed the connection without a reply")
            data += chunk
            if b"\r\n" not in data:
                continue
            header, rest = data.split(b"\r\n", 1)
            kind, body = header[:1], header[1:].decode()
            if kind == b"-":
                raise BenchError(f"port {port} answered {' '.join(args)} with {body}")
            if kind in (b"+", b":"):
                return body
            if kind == b"$":
                length = int(body)
                if length < 0:
                    return ""
                if len(rest) >= length + 2:
                    return rest[:length].decode("utf-8", "replace")
                continue
            raise BenchError(f"unexpected reply to {' '.join(args)} from port {port}: {header!r}")


def control_request(path: str, message: Dict[str, Any], timeout: float = 10.0) -> Dict[str, Any]:
    """One request on the proxy's control socket, with the proxy's own client; returns the
    final event."""
    return control.request(path, message, lambda event: None, timeout)


def log_tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return "<no log>"


def tool_version(argv: List[str]) -> str:
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = out.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else "?"


# ---- topologies -----------------------------------------------------------------------------


def topology_yaml(kind: str, listen_port: int, redis_port: Optional[int], connection_limit: int,
                  contact_points: Sequence[str] = ()) -> str:
    """`passthrough`: RedisSinkSingle only. `shared`: the same with `shared_connections: 1`.
    `filtered`: QueryCounter + QueryTypeFilter + sink; `shared-filtered`: with the shared sink.
    `cluster`: RedisSinkCluster over `contact_points` ("host:port"), the cluster hidden."""
    chain = []
    if kind == "cluster":
        if not contact_points:
            raise ValueError("the cluster topology needs contact points")
        points = ", ".join(f'"{point}"' for point in contact_points)
        chain += ["        - RedisSinkCluster:",
                  f"            first_contact_points: [{points}]",
                  "            connect_timeout_ms: 3000",
                  f"            connection_count: {CLUSTER_SINK_CONNECTIONS}"]
    else:
        if kind in ("filtered", "shared-filtered"):
            chain += ["        - QueryCounter:", "            name: bench",
                      "        - QueryTypeFilter:", "            DenyList: [SchemaChange]"]
        elif kind not in ("passthrough", "shared"):
            raise ValueError(f"unknown topology {kind!r}")
        chain += ["        - RedisSinkSingle:",
                  f'            remote_address: "{HOST}:{redis_port}"',
                  "            connect_timeout_ms: 3000"]
        if kind in ("shared", "shared-filtered"):
            chain.append("            shared_connections: 1")
    return "\n".join([
        "---",
        "sources:",
        "  - Redis:",
        '      name: "redis"',
        f'      listen_addr: "{HOST}:{listen_port}"',
        f"      connection_limit: {connection_limit}",
        "      chain:",
        *chain,
        "",
    ])


CONFIG_YAML = "---\nmain_log_level: \"info\"\n"
#: RedisSinkCluster connection_count in the cluster topology.
CLUSTER_SINK_CONNECTIONS = 4
#: cluster-node-timeout of the benchmark's cluster nodes, in milliseconds.
CLUSTER_NODE_TIMEOUT_MS = 2000


# ---- processes ----------------------------------------------------------------------------------


class Child:
    """One process started by a Stack."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: str,
                 port: Optional[int] = None) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.port = port

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.running:
            raise BenchError(f"{self.name} exited with status {self.process.returncode}; log "
                             f"tail:\n{log_tail(self.log_path)}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class Proxy(Child):
    def __init__(self, name: str, process: subprocess.Popen, log_path: str, port: int,
                 control_path: str, topology: str) -> None:
        super().__init__(name, process, log_path, port)
        self.control_path = control_path
        self.topology = topology

    def status(self, timeout: float = 10.0) -> Dict[str, Any]:
        try:
            return control_request(self.control_path, {"command": "status"}, timeout)
        except (control.ControlError, ValueError) as error:
            state = "running" if self.running else f"exited with {self.process.returncode}"
            raise BenchError(f"{self.name} ({state}) did not answer `status`: {error}; log "
                             f"tail:\n{log_tail(self.log_path)}") from None

    def connections(self) -> int:
        return sum(s["connections"] for s in self.status()["sources"].values())

    @property
    def serving_pid(self) -> int:
        """The process that holds the clients: the first worker (a proxy from before the
        supervisor existed serves them itself)."""
        workers = self.status().get("workers") or []
        return int(workers[0]["pid"]) if workers else self.pid


class RedisCluster:
    """The nodes of a Redis Cluster started by a Stack (each one a Child of that Stack)."""

    def __init__(self, nodes: List[Child], masters: List[Child]) -> None:
        self.nodes = nodes
        self.masters = masters

    @property
    def contact_points(self) -> List[str]:
        return [f"{HOST}:{node.port}" for node in self.nodes]

    @property
    def pids(self) -> List[int]:
        return [node.pid for node in self.nodes]


class _Terminated(BaseException):
    """SIGTERM turned into an exception, so that `finally` blocks stop the children."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class Stack:
    """Owns a temporary directory and every child process; use as a context manager."""

    def __init__(self, keep: bool = False, quiet: bool = False) -> None:
        self.directory = tempfile.mkdtemp(prefix="sgbench")
        self.keep = keep
        self.quiet = quiet
        self.children: List[Child] = []
        self._previous_sigterm = None

    def __enter__(self) -> "Stack":
        self._previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        self.close()
        signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
        if kind is _Terminated:
            sys.stderr.write("terminated: every process this benchmark started was stopped\n")
            raise SystemExit(143)
        return False

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _spawn(self, name: str, argv: List[str], log_name: str, port: Optional[int] = None,
               env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
               child_class=Child, **extra) -> Child:
        log_path = self.path(log_name)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                       start_new_session=True, preexec_fn=_die_with_parent)
        child = child_class(name, process, log_path, port, **extra)
        self.children.append(child)
        return child

    def start_redis(self, max_clients: int = 10000, timeout: float = 15.0,
                    port: Optional[int] = None, extra_args: Sequence[str] = (),
                    name: str = "redis-server") -> Child:
        port = port or free_port()
        argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", self.directory,
                "--maxclients", str(max_clients), "--tcp-backlog", "4096",
                "--logfile", "", *extra_args]
        child = self._spawn(name, argv, f"redis-{port}.log", port)

        def ready() -> bool:
            child.check_alive()
            return ping(port)

        wait_until(ready, timeout, f"{name} on port {port}")
        self.say(f"{name} pid {child.pid} on {HOST}:{port}")
        return child

    def start_cluster(self, size: int = 6, replicas: int = 1, max_clients: int = 10000,
                      timeout: float = 60.0) -> RedisCluster:
        """`size` cluster-enabled redis-servers made into size/(replicas+1) masters with
        `replicas` replicas each by `redis-cli --cluster create`; waits until every node sees
        every slot covered and every node connected. Every node is a child of this Stack."""
        nodes = []
        for _ in range(size):
            port, bus_port = free_port(), free_port()
            nodes.append(self.start_redis(
                max_clients=max_clients, port=port, name="redis-cluster-node",
                extra_args=["--cluster-enabled", "yes",
                            "--cluster-config-file", self.path(f"nodes-{port}.conf"),
                            "--cluster-port", str(bus_port),
                            "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)]))
        argv = [REDIS_CLI, "--cluster", "create", *[f"{HOST}:{n.port}" for n in nodes],
                "--cluster-replicas", str(replicas), "--cluster-yes"]
        try:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"redis-cli --cluster create took more than {timeout:g} s") from None
        if done.returncode != 0:
            raise BenchError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                             f"{done.stdout.decode('utf-8', 'replace')[-1500:]}")
        master_count = size // (replicas + 1)

        def healthy() -> bool:
            for node in nodes:
                node.check_alive()
                info = dict(line.split(":", 1) for line in
                            redis_call(node.port, "CLUSTER", "INFO").splitlines() if ":" in line)
                if (info.get("cluster_state", "").strip() != "ok"
                        or info.get("cluster_slots_ok", "").strip() != "16384"
                        or int(info.get("cluster_known_nodes", "0")) != size):
                    return False
                lines = redis_call(node.port, "CLUSTER", "NODES").splitlines()
                if (len(lines) != size or any(" connected" not in line for line in lines)
                        or sum(" master" in line or ",master" in line for line in lines)
                        != master_count):
                    return False
            return True

        wait_until(healthy, timeout, "the Redis Cluster to be healthy", interval=0.1)
        masters = []
        for line in redis_call(nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2].split(","):
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                masters.extend(node for node in nodes if node.port == port)
        self.say(f"Redis Cluster: {master_count} masters ("
                 f"{', '.join(str(m.port) for m in masters)}), {size - master_count} replicas")
        return RedisCluster(nodes, masters)

    def start_proxy(self, topology: str, redis_port: Optional[int],
                    connection_limit: int = 10000, timeout: float = 30.0,
                    contact_points: Sequence[str] = (), source_root: str = REPO_ROOT,
                    label: str = "", workers: int = 1) -> Proxy:
        """The proxy of this checkout, or of the one at `source_root` (named with `label`
        after its topology: proxy[passthrough]@label), with `workers` worker processes."""
        port = free_port()
        tag = f"{topology}-{port}"
        config_path = self.path(f"config-{tag}.yaml")
        topology_path = self.path(f"topology-{tag}.yaml")
        with open(config_path, "w") as handle:
            handle.write(CONFIG_YAML)
        with open(topology_path, "w") as handle:
            handle.write(topology_yaml(topology, port, redis_port, connection_limit,
                                       contact_points))
        control_path = self.path(f"ctl-{port}.sock")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([source_root] + ([env["PYTHONPATH"]]
                                                          if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        argv = [sys.executable, "-m", "shotover_gevent", "start", "-c", config_path,
                "-t", topology_path, "--control-socket", control_path]
        if workers != 1:
            argv += ["--workers", str(workers)]
        name = f"proxy[{topology}]" + (f"@{label}" if label else "")
        child = self._spawn(name, argv, f"proxy-{tag}.log", port, env=env,
                            cwd=self.directory, child_class=Proxy, control_path=control_path,
                            topology=topology)

        def ready() -> bool:
            child.check_alive()
            return "accepting connections" in child.log_text()

        wait_until(ready, timeout, f"{child.name} to log 'accepting connections'")
        self.say(f"{child.name} pid {child.pid} on {HOST}:{port}")
        return child  # type: ignore[return-value]

    def start_haproxy(self, backend_port: int, threads: int = 1, max_conn: int = 4096,
                      timeout: float = 15.0) -> Optional[Child]:
        if HAPROXY is None:
            return None
        port = free_port()
        config_path = self.path(f"haproxy-{port}.cfg")
        with open(config_path, "w") as handle:
            handle.write("\n".join([
                "global",
                f"    maxconn {max_conn}",
                f"    nbthread {threads}",
                "defaults",
                "    mode tcp",
                "    timeout connect 5s",
                "    timeout client 120s",
                "    timeout server 120s",
                "frontend bench",
                f"    bind {HOST}:{port}",
                "    default_backend redis",
                "backend redis",
                f"    server redis {HOST}:{backend_port}",
                "",
            ]))
        child = self._spawn("haproxy", [HAPROXY, "-db", "-f", config_path],
                            f"haproxy-{port}.log", port)

        def ready() -> bool:
            child.check_alive()
            return ping(port)

        wait_until(ready, timeout, f"haproxy on port {port}")
        self.say(f"haproxy pid {child.pid} on {HOST}:{port} ({threads} thread(s), mode tcp)")
        return child

    def close(self) -> None:
        # Proxies first (they hold connections to redis), redis last.
        for child in reversed(self.children):
            try:
                child.stop()
            except BaseException as error:  # keep stopping the others
                sys.stderr.write(f"could not stop {child.name} (pid {child.pid}): {error}\n")
                try:
                    child.process.kill()
                except OSError:
                    pass
        self.children.clear()
        if self.keep:
            self.say(f"logs kept in {self.directory}")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
