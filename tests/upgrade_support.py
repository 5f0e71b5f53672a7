"""Helpers for the in-place upgrade tests.

Driving `shotover-g upgrade` and `status` as a user would, proxies launched in unusual ways
(under a wrapper, from another virtual environment), stand-in interpreters that break an
upgrade on purpose, and a pipelining counter client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from helpers import HOST, REPO_ROOT, ProxyProcess, RawClient, encode, wait_for

CLI = [sys.executable, "-m", "shotover_gevent"]
INSPECT_TOOL = REPO_ROOT / "tools" / "inspect_checkpoint.py"
#: Logged by the old version (in its bridge process) once the new image is ready: from here on
#: every connection is being paused at its next request boundary.
DRAINING_MARK = "upgrade: the new image is ready: taking over"


def tail(path: Path, limit: int = 6000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


# ---- the command line -------------------------------------------------------------------------


class CliResult:
    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.args = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:
        return (f"<{' '.join(self.args[3:])}: exit {self.returncode}\nstdout:\n{self.stdout}"
                f"\nstderr:\n{self.stderr}>")


def cli(*args: str, timeout: float = 90.0) -> CliResult:
    command = [*CLI, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return CliResult(command, done.returncode, done.stdout, done.stderr)


def status(control_socket: str) -> Dict[str, Any]:
    result = cli("status", "--control-socket", control_socket, "--json", timeout=30)
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def upgrade(control_socket: str, *args: str, timeout: float = 90.0) -> CliResult:
    return cli("upgrade", "--control-socket", control_socket, *args, timeout=timeout)


def upgrade_ok(proxy: ProxyProcess, *args: str) -> CliResult:
    """Run `shotover-g upgrade` and insist that it reports success."""
    result = upgrade(proxy.control_socket, *args)
    assert result.returncode == 0, f"{result!r}\nproxy log:\n{tail(proxy.log_path)}"
    assert "upgraded" in result.stdout, result
    return result


class BackgroundUpgrade:
    """`shotover-g upgrade` running while the test does other things."""

    _counter = 0

    def __init__(self, control_socket: str, directory: Path, *args: str) -> None:
        BackgroundUpgrade._counter += 1
        stem = Path(directory) / f"upgrade-{BackgroundUpgrade._counter}"
        self.stdout_path = stem.with_suffix(".out")
        self.stderr_path = stem.with_suffix(".err")
        self.command = [*CLI, "upgrade", "--control-socket", control_socket, *args]
        self.started = time.monotonic()
        self.finished_at: Optional[float] = None
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        if self.process.poll() is None:
            return True
        if self.finished_at is None:
            self.finished_at = time.monotonic()
        return False

    def wait(self, timeout: float = 90.0) -> CliResult:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"`shotover-g upgrade` still running after {timeout} s; "
                                 f"output so far:\n{tail(self.stdout_path)}") from None
        if self.finished_at is None:
            self.finished_at = time.monotonic()
        return CliResult(self.command, self.process.returncode,
                         self.stdout_path.read_text(errors="replace"),
                         self.stderr_path.read_text(errors="replace"))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until_draining(proxy: ProxyProcess, log_offset: int, timeout: float = 30.0) -> None:
    """Wait until the upgrade started after `log_offset` has begun pausing connections."""
    proxy.wait_log(DRAINING_MARK, timeout=timeout, start=log_offset)


def inspect_checkpoint(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSPECT_TOOL), str(path), *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def leftover_checkpoints(pid: int) -> List[str]:
    """Checkpoint files the proxy running as `pid` wrote and left in its default directory."""
    from shotover_gevent.handover.checkpoint import default_directory

    directory = default_directory()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(f"checkpoint-{pid}-"))


def discard_checkpoints(pid: int) -> None:
    """Remove what `leftover_checkpoints(pid)` finds (after a test has failed on it)."""
    from shotover_gevent.handover.checkpoint import default_directory

    for name in leftover_checkpoints(pid):
        try:
            os.unlink(os.path.join(default_directory(), name))
        except OSError:
            pass


# ---- processes --------------------------------------------------------------------------------


def process_state(pid: int) -> Optional[str]:
    """The one-letter state of `pid` (R, S, Z, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()[0]


def process_gone(pid: int) -> bool:
    """No process runs as `pid` any more (a zombie nobody has reaped yet counts as gone)."""
    return process_state(pid) in (None, "Z")


def terminate_pid(pid: int, timeout: float = 15.0) -> None:
    """Stop a process that is not our child (e.g. an upgrade's bridge process) and wait for it."""
    if process_gone(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: process_gone(pid), timeout, f"pid {pid} to stop")
    except AssertionError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise


def children(pid: int) -> List[str]:
    """"PID (name) state" of every process whose parent is `pid`, zombies included."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        command = text[text.index("(") + 1:text.rindex(")")]
        state, parent = text.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid:
            found.append(f"{name} ({command}) {state}")
    return found


def fd_targets(pid: int) -> Dict[int, str]:
    """What each open fd of `pid` points at, as /proc shows it."""
    found = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            found[int(name)] = os.readlink(os.path.join(base, name))
        except FileNotFoundError:
            continue  # closed while we looked
    return found


def fd_kinds(targets: Dict[int, str]) -> List[str]:
    """Sorted kinds of the fds (socket, pipe, anon_inode:[eventpoll], a file path, ...)."""
    kinds = []
    for target in targets.values():
        if target.startswith(("socket:", "pipe:")):
            kinds.append(target.split(":", 1)[0])
        else:
            kinds.append(target)
    return sorted(kinds)


def settled_fd_kinds(pid: int, timeout: float = 10.0) -> List[str]:
    """fd kinds once two readings 0.1 s apart agree (closes in progress have finished)."""
    previous: List[Optional[List[str]]] = [None]

    def stable() -> Optional[List[str]]:
        current = fd_kinds(fd_targets(pid))
        same = current == previous[0]
        previous[0] = current
        if not same:
            time.sleep(0.1)
        return current if same else None

    return wait_for(stable, timeout, f"the fds of pid {pid} to settle", interval=0.0)


# ---- stand-in interpreters --------------------------------------------------------------------


def _script(directory: Path, name: str, body: str) -> str:
    path = Path(directory) / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def interpreter_exiting_at_restore(directory: Path, code: int = 3) -> str:
    """Behaves like the real interpreter, except that the new image dies at once when started
    to restore a checkpoint (its preflight check still passes)."""
    return _script(directory, "python-exits-at-restore", f"""\
case " $* " in
  *" --restore "*) echo "stand-in interpreter: dying at start" >&2; exit {code} ;;
esac
exec "{sys.executable}" "$@"
""")


#: Run by the stand-in below in place of the new image's start-up code: the first time the new
#: image reads its checkpoint (a sealed memory file, read with os.pread), one byte in the
#: middle of what it reads is flipped, as if the checkpoint had been damaged on the way.
_DAMAGE_ON_READ = """\
import os, sys
boot = sys.argv.pop(1)
real_pread = os.pread
damaged = []
def damaging_pread(fd, size, offset):
    data = real_pread(fd, size, offset)
    if not damaged and len(data) > 64:
        damaged.append(fd)
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
        sys.stderr.write("stand-in interpreter: damaged the checkpoint\\n")
    return data
os.pread = damaging_pread
exec(boot)
"""


def interpreter_damaging_checkpoint(directory: Path) -> str:
    """The real interpreter, except that when started to restore it flips one byte in the
    middle of the checkpoint as it reads it."""
    hook = Path(directory) / "damage_on_read.py"
    hook.write_text(_DAMAGE_ON_READ)
    return _script(directory, "python-damaging-checkpoint", f"""\
case " $* " in
  *" --restore "*) ;;
  *) exec "{sys.executable}" "$@" ;;
esac
# Started as: -S -c <start-up code> start ... --restore bridge ...
[ "$2" = "-c" ] || {{ echo "stand-in interpreter: unexpected arguments: $*" >&2; exit 98; }}
boot="$3"
shift 3
exec "{sys.executable}" -S -c "exec(open('{hook}').read())" "$boot" "$@"
""")


def interpreter_gated_at_restore(directory: Path, gate: Path) -> str:
    """The real interpreter, except that the new image starts only once `gate` exists (at
    most 60 s later): the test decides how long the old version's bridge serves alone."""
    return _script(directory, "python-gated", f"""\
case " $* " in
  *" --restore "*)
    waited=0
    while [ ! -e "{gate}" ] && [ $waited -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done ;;
esac
exec "{sys.executable}" "$@"
""")


def interpreter_hanging_at_restore(directory: Path) -> str:
    """The new image hangs (never adopts, never exits) when started to restore a checkpoint."""
    return _script(directory, "python-hangs-at-restore", f"""\
case " $* " in
  *" --restore "*) exec sleep 120 ;;
esac
exec "{sys.executable}" "$@"
""")


def interpreter_vanishing_after_preflight(directory: Path) -> str:
    """Answers the preflight check, then deletes itself: the exec that would follow cannot
    happen, which the upgrade notices before it touches anything."""
    return _script(directory, "python-vanishing", f"""\
"{sys.executable}" "$@"
status=$?
rm -f "$0"
exit $status
""")


def interpreter_failing_exec_after_preflight(directory: Path) -> str:
    """Answers the preflight check, then removes the interpreter named on its own #! line: the
    file is still there and executable, but execv() of it fails (ENOENT), after the bridge
    process has been forked."""
    shell_dir = Path(directory) / "vanishing-shell"
    shell_dir.mkdir(exist_ok=True)
    shell = shell_dir / "sh"
    shell.symlink_to("/bin/sh")
    path = Path(directory) / "python-failing-exec"
    path.write_text(f"""#!{shell}
"{sys.executable}" "$@"
status=$?
rm -f "{shell}"
exit $status
""")
    path.chmod(0o755)
    return str(path)


# ---- raw bytes --------------------------------------------------------------------------------


def read_until(sock, suffix: bytes, timeout: float = 10.0, limit: int = 1 << 20) -> bytes:
    """Read from a plain socket until what arrived ends with `suffix`; return all of it."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(suffix):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(data) > limit:
            raise AssertionError(f"waited for {suffix!r}; got {data[-300:]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed while waiting for {suffix!r}; got "
                                 f"{data[-300:]!r}")
        data += chunk
    return data


# ---- a launcher of our own --------------------------------------------------------------------


class LaunchedProxy(ProxyProcess):
    """A proxy started by `launcher` (an argv prefix that is followed by `start ...`), with or
    without this checkout on PYTHONPATH."""

    def __init__(self, directory: Path, topology: Dict[str, Any], launcher: Sequence[str],
                 use_checkout: bool = True, config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(directory, topology, config)
        self.launcher = list(launcher)
        self.use_checkout = use_checkout

    def command(self) -> List[str]:
        return [*self.launcher, "start", "-c", str(self.config_path), "-t",
                str(self.topology_path), "--control-socket", self.control_socket]

    def environment(self) -> Dict[str, str]:
        env = super().environment()
        if not self.use_checkout:
            env.pop("PYTHONPATH", None)
        return env


# ---- other versions in virtual environments ---------------------------------------------------


def build_wheel(version: str, out_dir: Path) -> Path:
    """A wheel of this checkout's package with `__version__` set to `version`.

    Written directly (a wheel is a zip with a .dist-info directory), so no build backend or
    `wheel` package is needed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = "shotover_gevent"
    info = f"{dist}-{version}.dist-info"
    files: Dict[str, bytes] = {}
    package = REPO_ROOT / "shotover_gevent"
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(REPO_ROOT).as_posix()
        data = path.read_bytes()
        if name == "shotover_gevent/__init__.py":
            lines = data.decode().splitlines(keepends=True)
            replaced = [f'__version__ = "{version}"\n' if line.startswith("__version__") else line
                        for line in lines]
            assert replaced != lines, "no __version__ line to replace"
            data = "".join(replaced).encode()
        files[name] = data
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: shotover-gevent\n"
                                 f"Version: {version}\n").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: shotover-gevent-tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{info}/entry_points.txt"] = (b"[console_scripts]\n"
                                         b"shotover-g = shotover_gevent.cli:main\n")
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def make_venv(path: Path, version: str) -> str:
    """A virtual environment (sharing this interpreter's site-packages for gevent and the rest)
    with a non-editable copy of the package at `version` installed by pip. Returns its python."""
    path = Path(path)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(path)], check=True, capture_output=True, timeout=120)
    python = str(path / "bin" / "python")
    if sys.prefix != sys.base_prefix:
        # Run from a virtual environment itself: "system" site-packages are the base
        # interpreter's, so the packages of the environment running the tests are added.
        import site
        import sysconfig

        target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                                 "'purelib'))"], capture_output=True, text=True, check=True,
                                timeout=60).stdout.strip()
        ours = [p for p in site.getsitepackages() if os.path.isdir(p)] or \
            [sysconfig.get_path("purelib")]
        Path(target, "outer-environment.pth").write_text("\n".join(ours) + "\n")
    wheel = build_wheel(version, path.parent / f"wheels-{path.name}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # pip from the shared site-packages installs into the environment that runs it.
    done = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index",
                           "--ignore-installed", "--disable-pip-version-check", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=180, env=env,
                          cwd=str(path))
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    shown = subprocess.run([python, "-c", "import shotover_gevent as p; print(p.__version__, "
                            "p.__file__)"], capture_output=True, text=True, timeout=60, env=env,
                           cwd=str(path))
    assert shown.stdout.split()[:1] == [version], shown
    assert str(path) in shown.stdout, f"{python} imports the package from elsewhere: {shown}"
    shutil.rmtree(path.parent / f"wheels-{path.name}", ignore_errors=True)
    return python


# ---- a pipelining counter client ------------------------------------------------------------


class CounterClient(threading.Thread):
    """Pipelines INCR on its own key in batches of 1-10, checking that the replies count up
    by exactly one, until told to stop (or until its own limits on batches and time)."""

    def __init__(self, port: int, key: str, stop: threading.Event, seed: int,
                 max_batches: int = 5000, max_seconds: float = 150.0,
                 pause: Sequence[float] = (0.02, 0.08)) -> None:
        super().__init__(name=f"counter-{key}", daemon=True)
        self.port = port
        self.key = key
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.max_batches = max_batches
        self.max_seconds = max_seconds
        self.pause = pause
        self.received = 0
        self.batches = 0
        self.error: Optional[str] = None
        self.connected = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            client = RawClient(self.port, timeout=30.0)
        except OSError as error:
            self.error = f"connect failed: {error!r}"
            self.connected.set()
            return
        self.connected.set()
        command = encode("INCR", self.key)
        try:
            while (not self.stop_event.is_set() and self.batches < self.max_batches
                   and time.monotonic() < deadline):
                count = self.rng.randint(1, 10)
                client.send(command * count)
                for reply in client.read_replies(count, timeout=30.0):
                    if reply != self.received + 1:
                        self.error = (f"reply {reply!r} where {self.received + 1} was due "
                                      f"(batch {self.batches})")
                        return
                    self.received += 1
                self.batches += 1
                self.stop_event.wait(self.rng.uniform(*self.pause))
        except Exception as error:  # a disconnect, a timeout: all are failures here
            self.error = f"after {self.received} replies: {error!r}"
        finally:
            client.close()


class CounterLoad:
    """`count` CounterClients (keys `prefix:i`) as one load: started, each connected and past
    its first batch on entering; stopped and joined on leaving, whatever happened."""

    def __init__(self, port: int, prefix: str, count: int) -> None:
        self.stop = threading.Event()
        self.clients = [CounterClient(port, f"{prefix}:{i}", self.stop, seed=i)
                        for i in range(count)]

    def __enter__(self) -> "CounterLoad":
        for client in self.clients:
            client.start()
        try:
            for client in self.clients:
                assert client.connected.wait(15), f"{client.key} could not connect"
            wait_for(lambda: all(c.batches > 0 or c.error for c in self.clients), 30,
                     "every client to complete a batch")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for client in self.clients:
            client.join(40)

    def failures(self) -> List[str]:
        return [f"{c.key}: {c.error}" for c in self.clients if c.error]

    def received(self) -> int:
        return sum(client.received for client in self.clients)

    def wait_for_more_batches(self, more: int = 2) -> None:
        """Wait until every client has completed `more` batches from now (or failed)."""
        marks = {client.key: client.batches for client in self.clients}
        wait_for(lambda: all(c.batches >= marks[c.key] + more or c.error for c in self.clients),
                 60, f"every client to complete {more} more batches")

    def stuck(self) -> bool:
        return any(client.is_alive() for client in self.clients)

    def counts_match(self, client) -> bool:
        """Whether Redis (through the redis-py `client`) holds exactly the count each client
        saw."""
        counts = client.mget([c.key for c in self.clients])
        return [int(n or 0) for n in counts] == [c.received for c in self.clients]


def ping_on_a_new_connection(port: int, timeout: float = 15.0) -> bytes:
    """Connect, send PING, and return the first line that comes back (b"" on EOF)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            answer += chunk
    return answer
