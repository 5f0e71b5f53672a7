"""The contract between the processes of one service: what a supervisor tells the workers it
starts, what an upgrading image tells the image it execs, and what the supervisor tells its own
next image. Every environment variable and inherited fd of these hand-offs is named, built and
parsed here, and nowhere else.

Processes of a service:

* the **supervisor** (the PID the user started): binds the listeners, owns the control socket
  and the metrics endpoint, starts and restarts the workers, drives upgrades; never serves a
  request (supervisor.py);
* **workers**: each serves the clients its own listening sockets accept (app.py), and
  upgrades by exec in place with a bridge process (handover/);
* a worker's **bridge** or **lame duck** after an upgrade, re-parented to the supervisor when
  the worker that forked it is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

# ---- a worker ------------------------------------------------------------------------------------

#: Set by the supervisor in a worker's environment (and kept across the worker's upgrades): who
#: the worker is, and the listening sockets it inherited. JSON, see WorkerIdentity.
WORKER_ENV = "SHOTOVER_G_WORKER"


@dataclass
class WorkerIdentity:
    index: int
    count: int
    supervisor_pid: int
    #: source name -> fd of this worker's socket of the source's SO_REUSEPORT group.
    listeners: Dict[str, int] = field(default_factory=dict)
    #: A sealed memfd with the configuration data to run on (read once, at a fresh start).
    config_fd: Optional[int] = None

    @property
    def label(self) -> str:
        return f"worker {self.index}/{self.count}"

    def to_env(self) -> str:
        return json.dumps({"index": self.index, "count": self.count,
                           "supervisor_pid": self.supervisor_pid, "listeners": self.listeners,
                           "config_fd": self.config_fd})

    def as_dict(self) -> dict:
        return {"index": self.index, "count": self.count, "supervisor_pid": self.supervisor_pid}


def worker_identity() -> Optional[WorkerIdentity]:
    """This process's identity as a worker, or None when it is not one."""
    text = os.environ.get(WORKER_ENV)
    if not text:
        return None
    try:
        data = json.loads(text)
        config_fd = data.get("config_fd")
        return WorkerIdentity(int(data["index"]), int(data["count"]),
                              int(data["supervisor_pid"]),
                              {str(k): int(v) for k, v in dict(data.get("listeners") or {}).items()},
                              None if config_fd is None else int(config_fd))
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"shotover-g: {WORKER_ENV} is damaged: {text[:200]!r}") from None


def worker_control_address(control_path: str, index: int) -> str:
    """Where worker `index` of the service whose control socket is `control_path` answers
    control requests: a Unix socket in the abstract namespace ("@" + name; no file, gone with
    the last process holding it), the same for every version so that a supervisor can always
    find its workers."""
    digest = hashlib.sha256(os.path.abspath(control_path).encode()).hexdigest()[:24]
    return f"@shotover-g/{digest}/w{index}"


def control_address(text: str) -> str:
    """A control socket address as given on a command line: an absolute path, or an abstract
    name ("@...") as it is."""
    return text if text.startswith("@") else os.path.abspath(text)


def socket_address(address: str) -> str:
    """What bind() and connect() take for a control address."""
    return "\0" + address[1:] if address.startswith("@") else address


def configuration_memfd(config_data: Any, topology_data: Any) -> int:
    """A sealed memory file holding the configuration data (JSON), for a process to inherit."""
    import fcntl

    fd = os.memfd_create("shotover-g-configuration", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = json.dumps({"config": config_data, "topology": topology_data}).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK |
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


def read_configuration(fd: int) -> Tuple[Any, Any]:
    """(config, topology) data from configuration_memfd(); the fd is closed."""
    try:
        size = os.fstat(fd).st_size
        data = json.loads(os.pread(fd, size, 0).decode("utf-8"))
        return data["config"], data["topology"]
    finally:
        os.close(fd)


def worker_environment(identity: WorkerIdentity) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (NOTIFY_ENV, SUPERVISOR_ENV, WORKER_ENV)}
    env[WORKER_ENV] = identity.to_env()
    return env


# ---- an upgrade's exec in place (one worker) ---------------------------------------------------

#: The program to exec back if the new image cannot restore (JSON: python, argv, boot, version).
PREVIOUS_ENV = "SHOTOVER_G_PREVIOUS"
#: When the old image called execv (ns since the epoch), for the new image's timing report.
EXEC_TIME_ENV = "SHOTOVER_G_EXEC_NS"
#: Why a roll-back image runs, for its report.
ROLLBACK_REASON_ENV = "SHOTOVER_G_ROLLBACK_REASON"
#: Set when the new version never ran (its exec failed): the report says "aborted".
ABORTED_ENV = "SHOTOVER_G_ABORTED"
#: The value of --restore when the checkpoint comes over the bridge socket (a sealed memfd).
FROM_BRIDGE = "bridge"


def restore_args(bridge_fd: int, bridge_pid: int, rollback: bool = False) -> List[str]:
    args = ["--restore", FROM_BRIDGE, "--bridge-fd", str(bridge_fd), "--bridge-pid",
            str(bridge_pid)]
    return args + (["--rollback"] if rollback else [])


def previous_program(previous: Dict[str, Any], args: List[str]) -> List[str]:
    """The argv that starts the version recorded in `previous` (its interpreter, and the boot
    line pinning its search path) with these arguments after `python -m shotover_gevent`."""
    boot = list(previous.get("boot") or [previous["python"], "-m", "shotover_gevent"])
    return boot + list(args)


def package_root() -> str:
    """The directory this package is imported from."""
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


# ---- the supervisor's exec in place -------------------------------------------------------------

#: Set by a supervisor for the image it execs: everything it holds (JSON, see supervisor.py's
#: SupervisorState). Present: restore from it; absent: start afresh.
SUPERVISOR_ENV = "SHOTOVER_G_SUPERVISOR"
#: The service manager's notification socket (Type=notify): only the supervisor talks to it.
NOTIFY_ENV = "NOTIFY_SOCKET"


def program_argv(python: str, config_path: str, topology_path: str, control_path: str,
                 log_format: str) -> List[str]:
    """How to start the proxy with `python` on these files."""
    return [python, "-m", "shotover_gevent", "start", "-c", os.path.abspath(config_path),
            "-t", os.path.abspath(topology_path), "--control-socket", control_path,
            "--log-format", log_format]


# ---- the preflight of an upgrade -------------------------------------------------------------

#: How long the new version's `check` may take.
PREFLIGHT_TIMEOUT = 60.0


def preflight_argv(python: str, config_path: str, topology_path: str,
                   checkpoint_format: int) -> List[str]:
    """The new version's `check`: it must import, accept the configuration and read this
    checkpoint format; it answers with one JSON object."""
    return [python, "-m", "shotover_gevent", "check", "-c", os.path.abspath(config_path),
            "-t", os.path.abspath(topology_path), "--checkpoint-format", str(checkpoint_format),
            "--json"]


class PreflightFailed(Exception):
    """The new version cannot take over; the text says why."""


def json_answer(out: bytes) -> Optional[dict]:
    """The last JSON object line `check --json` printed (other lines are ignored), or None."""
    answer = None
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            try:
                answer = json.loads(line)
            except ValueError:
                pass
    return answer if isinstance(answer, dict) else None


def preflight_answer(returncode: int, out: bytes, err: bytes) -> dict:
    """The answer of a preflight that exited with `returncode`, or PreflightFailed."""
    answer = json_answer(out)
    if returncode != 0 or not isinstance(answer, dict) or not answer.get("ok"):
        reason = ""
        if isinstance(answer, dict) and answer.get("problems"):
            reason = "; ".join(str(p) for p in answer["problems"])
        if not reason:
            tail = (err or out).decode("utf-8", "replace").strip().splitlines()[-3:]
            reason = " | ".join(tail) or f"exit status {returncode}"
        raise PreflightFailed(f"preflight failed: {reason}")
    return answer


# ---- the service manager ---------------------------------------------------------------------

def notify_service_manager() -> None:
    """Tell a Type=notify service manager that the service serves, and which PID is its main
    one (a worker's environment has no NOTIFY_SOCKET: only the supervisor talks to it; a
    proxy run without a supervisor may change PID when a bridge serves on)."""
    address = os.environ.get(NOTIFY_ENV)
    if not address:
        return
    import socket as stdlib_socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM) as sock:
            sock.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), address)
    except OSError as error:
        logging.getLogger(__name__).warning("service manager notification failed: %s", error)


def reasons_text(counts: dict, empty: str = "none") -> str:
    """Connections closed, by why, as the upgrade reports print them ("why: how many")."""
    return ", ".join(f"{why}: {count}" for why, count in counts.items()) or empty
