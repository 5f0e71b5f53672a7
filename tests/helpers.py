"""Process and socket helpers for the integration tests: real redis-server and proxy processes.

Everything listens on 127.0.0.1 only. Every wait is a poll against a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import hiredis
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
POLL_INTERVAL = 0.02
_INCOMPLETE = object()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> List[int]:
    """`count` distinct free ports (all probes stay bound until every port is chosen)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind((HOST, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class Abort(Exception):
    """Raised by a wait_for predicate when waiting longer is pointless (the process died)."""


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = POLL_INTERVAL) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            result = predicate()
        except Abort:
            raise
        except Exception as error:  # a probe that raises counts as "not yet"
            last_error = error
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


def no_retry() -> Retry:
    """A redis-py retry policy that never retries, so every failure is seen by the test."""
    return Retry(NoBackoff(), 0)


def redis_client(port: int, **kwargs: Any) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 10)
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs.setdefault("retry", no_retry())
    return redis.Redis(host=HOST, port=port, **kwargs)


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-limit:]


class RedisServer:
    """A redis-server child process on a fixed port; it can be stopped and started again."""

    def __init__(self, directory: Path, port: Optional[int] = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.log_path = self.directory / f"redis-{self.port}.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert self.process is None or self.process.poll() is not None, "already running"
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory),
                *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise Abort(f"redis-server exited with code {self.process.returncode}")
            with redis_client(self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as c:
                return c.ping()

        try:
            wait_for(ready, timeout, f"redis-server on port {self.port} to answer PING")
        except (AssertionError, Abort) as error:
            self.kill()
            raise AssertionError(f"{error}\nredis-server log:\n{_tail(self.log_path)}") from None
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis_client(self.port, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM) and wait until the process has gone."""
        if not self.running:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill abruptly (SIGKILL), as a crash would."""
        if not self.running:
            return
        self.process.kill()
        self.process.wait(timeout)


class ProxyProcess:
    """The proxy run as `python -m shotover_gevent start` with its own config files."""

    def __init__(self, directory: Path, topology: Dict[str, Any],
                 config: Optional[Dict[str, Any]] = None, log_format: Optional[str] = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.topology = topology
        self.config = dict(config) if config is not None else {"main_log_level": "info"}
        self.config_path = self.directory / "config.yaml"
        self.topology_path = self.directory / "topology.yaml"
        self.log_path = self.directory / "proxy.log"
        # Unix socket paths are limited to about 100 bytes, so keep this one short.
        self.socket_dir = tempfile.mkdtemp(prefix="sgp")
        self.control_socket = os.path.join(self.socket_dir, "ctl.sock")
        self.log_format = log_format
        self.extra_args = list(extra_args)
        self.process: Optional[subprocess.Popen] = None
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.topology_path.write_text(yaml.safe_dump(self.topology, sort_keys=False))

    # ---- addresses ------------------------------------------------------------------------------

    def _source(self, index: int) -> Dict[str, Any]:
        entry = self.topology["sources"][index]
        return next(iter(entry.values()))

    @property
    def port(self) -> int:
        """Listen port of the first source."""
        return self.port_of(0)

    def port_of(self, index: int) -> int:
        return int(self._source(index)["listen_addr"].rsplit(":", 1)[1])

    @property
    def metrics_url(self) -> Optional[str]:
        address = self.config.get("observability_interface")
        return f"http://{address}/metrics" if address else None

    @property
    def filter_url(self) -> Optional[str]:
        address = self.config.get("observability_interface")
        return f"http://{address}/filter" if address else None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    # ---- lifecycle ------------------------------------------------------------------------------

    def command(self) -> List[str]:
        args = [sys.executable, "-m", "shotover_gevent", "start", "-c", str(self.config_path),
                "-t", str(self.topology_path), "--control-socket", self.control_socket]
        if self.log_format:
            args += ["--log-format", self.log_format]
        return args + self.extra_args

    def environment(self) -> Dict[str, str]:
        """The proxy's environment: this checkout first on PYTHONPATH."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=str(self.directory),
                                            env=self.environment())

        def ready() -> bool:
            if self.process.poll() is not None:
                raise Abort(f"proxy exited with code {self.process.returncode}")
            return "accepting connections" in self.log_text()

        try:
            wait_for(ready, timeout, "the proxy to log 'accepting connections'")
        except (AssertionError, Abort) as error:
            self.kill()
            raise AssertionError(f"{error}\nproxy log:\n{_tail(self.log_path)}") from None
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, substring: str, timeout: float = 10.0, start: int = 0) -> str:
        """Wait until the log (from character offset `start`) contains `substring`."""
        try:
            wait_for(lambda: substring in self.log_text()[start:], timeout,
                     f"{substring!r} in the proxy log")
        except AssertionError as error:
            raise AssertionError(f"{error}\nproxy log:\n{_tail(self.log_path)}") from None
        return self.log_text()

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis_client(self.port, **kwargs)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"proxy still running {timeout}s later\nproxy log:\n"
                                 f"{_tail(self.log_path)}") from None

    def stop(self, expect_code: Optional[int] = 0, timeout: float = 15.0) -> int:
        """SIGTERM, wait for exit, check the exit code (unless `expect_code` is None)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"proxy ignored SIGTERM for {timeout}s\nproxy log:\n"
                                     f"{_tail(self.log_path)}") from None
        code = self.process.returncode
        if expect_code is not None:
            assert code == expect_code, (f"proxy exited with {code}, expected {expect_code}\n"
                                         f"proxy log:\n{_tail(self.log_path)}")
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def source_entry(name: str, listen_port: int, chain: List[Any], kind: str = "Redis",
                 **options: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"name": name, "listen_addr": f"{HOST}:{listen_port}"}
    body.update(options)
    body["chain"] = chain
    return {kind: body}


def sink(redis_port: int, kind: str = "RedisSinkSingle", **options: Any) -> Dict[str, Any]:
    settings: Dict[str, Any] = {"remote_address": f"{HOST}:{redis_port}",
                                "connect_timeout_ms": 3000}
    settings.update(options)
    return {kind: settings}


def passthrough_topology(redis_port: int, listen_port: Optional[int] = None,
                         chain_prefix: Sequence[Any] = (), name: str = "redis",
                         **source_options: Any) -> Dict[str, Any]:
    """One source on `listen_port` whose chain is `chain_prefix` then a RedisSinkSingle."""
    listen_port = listen_port or free_port()
    chain = list(chain_prefix) + [sink(redis_port)]
    return {"sources": [source_entry(name, listen_port, chain, **source_options)]}


def shared_topology(redis_port: int, count: int = 1, chain_prefix: Sequence[Any] = (),
                    name: str = "redis", **sink_options: Any) -> Dict[str, Any]:
    """passthrough_topology with the sink's `shared_connections: count` (and `sink_options`)."""
    topology = passthrough_topology(redis_port, free_port(), chain_prefix=chain_prefix,
                                    name=name)
    settings = topology["sources"][0]["Redis"]["chain"][-1]["RedisSinkSingle"]
    settings["shared_connections"] = count
    settings.update(sink_options)
    return topology


def terminal_topology(terminal: Any, listen_port: Optional[int] = None,
                      chain_prefix: Sequence[Any] = (), name: str = "redis") -> Dict[str, Any]:
    """One source whose chain ends in `terminal` (NullSink, DebugReturner, ...) with no server."""
    listen_port = listen_port or free_port()
    return {"sources": [source_entry(name, listen_port, list(chain_prefix) + [terminal])]}


# ---- raw sockets ------------------------------------------------------------------------------


class RawClient:
    """A plain TCP client that sends exact bytes and reads replies with hiredis."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.eof = False

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self.reader.feed(data)

    def read_reply(self, timeout: Optional[float] = None) -> Any:
        """One reply; errors come back as hiredis.ReplyError values, not raised."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self.reader.gets()
            if reply is not _INCOMPLETE:
                return reply
            if self.eof:
                raise EOFError("connection closed before a whole reply arrived")
            self._fill(deadline)

    def read_replies(self, count: int, timeout: Optional[float] = None) -> List[Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        return [self.read_reply(max(0.001, deadline - time.monotonic())) for _ in range(count)]

    def call(self, *args: Any) -> Any:
        self.send(encode(*args))
        return self.read_reply()

    def no_reply_within(self, seconds: float) -> bool:
        """True when nothing (no reply, no EOF) arrives for `seconds`."""
        if self.reader.gets() is not _INCOMPLETE:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        else:
            self.reader.feed(data)
        return False

    def wait_eof(self, timeout: Optional[float] = None) -> List[Any]:
        """Read until the peer closes; return every reply that came before the close."""
        deadline = time.monotonic() + (timeout or self.timeout)
        replies = []
        while True:
            reply = self.reader.gets()
            while reply is not _INCOMPLETE:
                replies.append(reply)
                reply = self.reader.gets()
            if self.eof:
                return replies
            try:
                self._fill(deadline)
            except socket.timeout:
                raise AssertionError(f"connection still open after {timeout or self.timeout}s; "
                                     f"replies so far: {replies!r}") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def encode(*args: Any) -> bytes:
    """A command as a RESP multibulk (independent of the package's own encoder)."""
    out = [b"*" + str(len(args)).encode() + b"\r\n"]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        out.append(b"$" + str(len(arg)).encode() + b"\r\n" + arg + b"\r\n")
    return b"".join(out)


# ---- HTTP and metrics -------------------------------------------------------------------------


def http_request(url: str, method: str = "GET", body: Optional[bytes] = None,
                 timeout: float = 5.0) -> tuple:
    """(status, body text) of one request; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def metric_samples(text: str) -> Dict[tuple, float]:
    """{(sample name exactly as exposed, sorted label items): value} from a text exposition."""
    samples = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        assert match, f"unparseable metrics line {line!r}"
        name, label_text, value = match.groups()
        labels = {}
        if label_text:
            for key, raw in _LABEL.findall(label_text):
                labels[key] = raw.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        samples[(name, tuple(sorted(labels.items())))] = float(value)
    return samples


def metric_value(text: str, name: str, /, **labels: str) -> Optional[float]:
    """The value of the sample `name` whose labels include `labels`, or None.

    Exactly one sample may match; more than one is an error in the test.
    """
    found = []
    for (sample_name, sample_labels), value in metric_samples(text).items():
        if sample_name != name:
            continue
        label_map = dict(sample_labels)
        if all(label_map.get(k) == v for k, v in labels.items()):
            found.append(value)
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}"
    return found[0] if found else None


def stop_proxies(proxies, show_logs: bool = False) -> None:
    """Stop every proxy a test started and fail the test if one did not exit cleanly."""
    import pytest

    problems = []
    for proxy in proxies:
        if show_logs:
            # Shown by pytest only when the test fails.
            print(f"---- log of proxy in {proxy.directory} ----\n{proxy.log_text()[-20000:]}")
        try:
            if proxy.running:
                proxy.stop(expect_code=0)
        except AssertionError as error:
            problems.append(str(error))
        finally:
            proxy.cleanup()
    if problems:
        pytest.fail("a proxy did not shut down cleanly:\n" + "\n".join(problems))
