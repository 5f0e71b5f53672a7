"""The control socket: a unix socket (mode 0600, peer uid checked) on which `shotover-g status`
and `shotover-g upgrade` talk to the running proxy in JSON lines."""

from __future__ import annotations

import json
import logging
import math
import os
import socket as stdlib_socket
import struct
import time
from typing import Any, Callable, Dict, Optional, Tuple

import gevent
from gevent import socket

from ..lifecycle import socket_address

log = logging.getLogger(__name__)

#: Large enough for an upgrade request carrying a preflight's answer (the configuration).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: A request line must arrive whole within this many seconds of the connection, however it
#: trickles in: a stalled or slow caller does not hold a socket and a greenlet for longer.
REQUEST_DEADLINE_SECONDS = 5.0
#: The longest drain or restore timeout an upgrade request may ask for (a day): larger values
#: overflow the waits they end up in.
MAX_UPGRADE_TIMEOUT_SECONDS = 86400.0
#: The longest a previous version may keep serving TLS clients after an upgrade: a week.
MAX_TLS_DRAIN_SECONDS = 7 * 86400.0


class ControlError(Exception):
    """The proxy could not be reached on its control socket."""


class BadRequest(Exception):
    """A control request that cannot be served; its text is the error sent back."""


def peer_credentials(sock) -> Tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED,
                            struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


class ControlChannel:
    """One accepted control connection; events are JSON objects, one per line."""

    def __init__(self, sock) -> None:
        self.sock = sock

    def send(self, event: Dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(event, default=str).encode() + b"\n")
        except OSError:
            pass  # the CLI went away; the upgrade carries on regardless

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Reporter:
    """Sends each stage to the waiting CLI (if any) and to the log."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self.started = time.monotonic()

    def stage(self, stage: str, detail: str, **extra) -> None:
        elapsed_ms = round((time.monotonic() - self.started) * 1000, 1)
        log.info("upgrade: %s: %s", stage, detail)
        if self.channel is not None:
            self.channel.send({"event": "stage", "stage": stage, "detail": detail,
                               "elapsed_ms": elapsed_ms, **extra})

    def result(self, ok: bool, summary: str, **extra) -> None:
        (log.info if ok else log.error)("upgrade %s: %s", "done" if ok else "failed", summary)
        if self.channel is not None:
            self.channel.send({"event": "result", "ok": ok, "summary": summary, **extra})
            self.channel.close()


class ControlServer:
    def __init__(self, proxy, path: str, listener=None) -> None:
        self.proxy = proxy
        self.path = path
        self.listener = listener
        self._greenlet: Optional[gevent.Greenlet] = None
        #: Whether this process created the socket file (only then does close() remove it).
        self.bound_here = False
        #: Requests being served right now.
        self.serving = 0

    def bind(self) -> None:
        if self.path.startswith("@"):
            # An abstract name (a worker's): no file, nobody else's to remove.
            listener = socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
            try:
                listener.bind(socket_address(self.path))
            except OSError as error:
                listener.close()
                raise OSError(f"control socket {self.path} is in use: {error.strerror}") from None
            listener.listen(64)
            self.listener = listener
            return
        if os.path.exists(self.path):
            probe = socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # left behind by a process that is gone
            else:
                probe.close()
                raise OSError(f"control socket {self.path} is in use by a running shotover-g")
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        listener = socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is born 0600: no window for others
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self.listener = listener
        self.bound_here = True

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._accept_loop)

    def quiesce(self, timeout: float) -> None:
        """Stop accepting (new connections wait in the queue) and give the requests being
        served up to `timeout` seconds to finish (an upgrade reporting on its channel is not
        one of them)."""
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        deadline = time.monotonic() + timeout
        while self.serving > 0 and time.monotonic() < deadline:
            gevent.sleep(0.01)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            gevent.spawn(self._serve, client)

    def _serve(self, client) -> None:
        channel = ControlChannel(client)
        keep_open = False
        self.serving += 1
        try:
            _pid, uid = peer_credentials(client)
            if uid != os.getuid() and uid != 0:
                log.warning("control socket: refused a request from uid %d", uid)
                channel.send({"event": "error", "error": "permission denied: different user"})
                return
            line = read_request_line(client)
            if line is None:
                return  # connected and left without asking anything
            request = parse_request(line)
            keep_open = self.handle(request, channel)
        except BadRequest as error:
            channel.send({"event": "error", "error": f"bad control request: {error}"})
        except OSError as error:
            log.debug("control connection failed: %s", error)
            channel.send({"event": "error", "error": f"control connection failed: {error}"})
        except Exception as error:  # a bug here must not cost the caller its answer
            log.exception("control request failed")
            channel.send({"event": "error", "error": f"internal error: {error}"})
        finally:
            self.serving -= 1
            if not keep_open:
                channel.close()

    def handle(self, request: Dict[str, Any], channel: ControlChannel) -> bool:
        """Serve one request; True when the channel stays open (an upgrade reports on it).
        The process served (a proxy or a supervisor) answers status(), render_metrics(),
        apply_filter(text) and start_upgrade(options, channel)."""
        served = self.proxy
        command = request["command"]
        if command == "status":
            channel.send({"event": "status", **served.status()})
        elif command == "metrics":
            # The lineage: when this process's line of images started afresh (an upgrade
            # carries its counters on; a fresh start begins them again).
            channel.send({"event": "metrics",
                          "text": served.render_metrics().decode("utf-8", "replace"),
                          "lineage": getattr(served, "started_wall", None)})
        elif command == "filter":
            text = request.get("filter")
            if not isinstance(text, str):
                raise BadRequest('"filter" must be a string')
            try:
                served.apply_filter(text)
            except ValueError as error:
                raise BadRequest(str(error)) from None
            channel.send({"event": "result", "ok": True})
        elif command == "upgrade":
            return served.start_upgrade(upgrade_options(request), channel)
        else:
            raise BadRequest(f"unknown command {command!r}; valid commands: status, upgrade, "
                             "metrics, filter")
        return False

    def close(self, unlink: bool = False) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self.listener is not None:
            self.listener.close()
        if unlink and (self.bound_here or self.listener is not None) and \
                not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except OSError:
                pass


def read_request_line(client) -> Optional[bytes]:
    """The request: one line (its newline, or the caller's end of sending, ends it), at most
    MAX_REQUEST_BYTES, whole within REQUEST_DEADLINE_SECONDS. None when nothing came at all."""
    deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
    data = bytearray()
    while True:
        end = data.find(b"\n", 0, MAX_REQUEST_BYTES + 1)
        if end >= 0:
            return bytes(data[:end])
        if len(data) > MAX_REQUEST_BYTES:
            raise BadRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BadRequest(f"no complete request line within {REQUEST_DEADLINE_SECONDS:g} s")
        client.settimeout(remaining)
        try:
            chunk = client.recv(65536)
        except socket.timeout:
            raise BadRequest(f"no complete request line within "
                             f"{REQUEST_DEADLINE_SECONDS:g} s") from None
        finally:
            client.settimeout(None)
        if not chunk:
            return bytes(data) if data.strip() else None
        data += chunk


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true or false", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def parse_request(line: bytes) -> Dict[str, Any]:
    """A JSON object with a string "command"; BadRequest otherwise."""
    try:
        request = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8 text") from None
    except RecursionError:
        raise BadRequest("the request is nested too deeply") from None
    except ValueError as error:
        raise BadRequest(f"the request is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise BadRequest(f'expected a JSON object such as {{"command": "status"}}, got '
                         f"{_json_type(request)}")
    command = request.get("command")
    if not isinstance(command, str):
        raise BadRequest(f'"command" must be a string (status or upgrade), got '
                         f"{_json_type(command)}")
    return request


#: The options of an upgrade request: name -> (what is valid, check).
_UPGRADE_OPTIONS: Dict[str, Any] = {
    "python": ("a path or command name",
               lambda v: isinstance(v, str) and "\0" not in v),
    "keep_checkpoint": ("a path",
                        lambda v: isinstance(v, str) and "\0" not in v),
    "drain_timeout": (f"a number of seconds from 0 to {MAX_UPGRADE_TIMEOUT_SECONDS:g}",
                      lambda v: _is_seconds(v, 0.0)),
    "restore_timeout": (f"a number of seconds from 1 to {MAX_UPGRADE_TIMEOUT_SECONDS:g}",
                        lambda v: _is_seconds(v, 1.0)),
    "tls_drain_timeout": (f"a number of seconds from 0 to {MAX_TLS_DRAIN_SECONDS:g}",
                          lambda v: _is_seconds(v, 0.0, MAX_TLS_DRAIN_SECONDS)),
    # The supervisor's own preflight of this upgrade, for each worker it upgrades.
    "preflight": ("the answer of a preflight check", lambda v: isinstance(v, dict)),
    # How many workers a supervisor upgrades at once.
    "parallel": ("a whole number from 1 to 1024",
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024),
}


def _is_seconds(value: Any, least: float, most: float = 0.0) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and least <= value <= (most or MAX_UPGRADE_TIMEOUT_SECONDS))


def upgrade_options(request: Dict[str, Any]) -> Dict[str, Any]:
    """The options of an upgrade request, each checked (null means its default)."""
    options = {}
    for name, value in request.items():
        if name == "command" or value is None:
            continue
        if name not in _UPGRADE_OPTIONS:
            raise BadRequest(f"unknown upgrade option {name!r}; valid options: "
                             f"{', '.join(_UPGRADE_OPTIONS)}")
        valid, check = _UPGRADE_OPTIONS[name]
        if not check(value):
            shown = json.dumps(value)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            raise BadRequest(f"upgrade option {name!r} must be {valid}, got {shown}")
        options[name] = value
    return options


# ---- client side (used by the CLI, plain blocking sockets) -------------------------------------

def request(path: str, message: Dict[str, Any], on_event: Callable[[Dict[str, Any]], None],
            timeout: float, socket_module=stdlib_socket,
            own_user_only: bool = False) -> Dict[str, Any]:
    """Send one request; pass each event to `on_event`; return the final one ("result",
    "status", "metrics" or "error"). Raises ControlError when the proxy cannot be reached.
    `socket_module`: the CLI's plain sockets, or gevent's for a caller on a hub. With
    `own_user_only`, nothing is sent to a peer of another user (an abstract address has no
    file permissions to keep others from listening there)."""
    client = socket_module.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        try:
            client.connect(socket_address(path))
        except OSError as error:
            raise ControlError(f"cannot reach shotover-g on control socket {path}: "
                               f"{error.strerror or error}") from None
        if own_user_only:
            pid, uid = peer_credentials(client)
            if uid not in (os.getuid(), 0):
                raise ControlError(f"{path} is held by pid {pid} of uid {uid}, not by a "
                                   "process of this service")
        try:
            client.sendall(json.dumps(message).encode() + b"\n")
        except OSError as error:
            raise ControlError(f"cannot send the request to shotover-g on {path}: "
                               f"{error.strerror or error}") from None
        buffer = b""
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = _parse_event(line)
                on_event(event)
                if event.get("event") in ("result", "status", "metrics", "error"):
                    return event
            try:
                chunk = client.recv(1 << 20)
            except stdlib_socket.timeout:
                raise ControlError(f"no answer from shotover-g within {timeout:g} s") from None
            except OSError as error:
                raise ControlError(f"the control connection failed: "
                                   f"{error.strerror or error}") from None
            if not chunk:
                raise ControlError("shotover-g closed the control connection without a result")
            buffer += chunk
    finally:
        client.close()


def _parse_event(line: bytes) -> Dict[str, Any]:
    try:
        event = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        event = None
    if not isinstance(event, dict):
        raise ControlError(f"shotover-g answered something other than a JSON object: "
                           f"{line[:200]!r}")
    return event
