"""The control socket: a unix socket (mode 0600, peer uid checked) on which `shotover-g status`
and `shotover-g upgrade` talk to the running proxy in JSON lines."""

from __future__ import annotations

import json
import logging
import os
import socket as stdlib_socket
import struct
from typing import Any, Callable, Dict, Optional

import gevent
from gevent import socket

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024


class ControlError(Exception):
    """The proxy could not be reached on its control socket."""


def peer_uid(sock) -> int:
    creds = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED,
                            struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


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


class ControlServer:
    def __init__(self, proxy, path: str, listener=None) -> None:
        self.proxy = proxy
        self.path = path
        self.listener = listener
        self._greenlet: Optional[gevent.Greenlet] = None

    def bind(self) -> None:
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

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._accept_loop)

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
        try:
            uid = peer_uid(client)
            if uid != os.getuid() and uid != 0:
                log.warning("control socket: refused a request from uid %d", uid)
                channel.send({"event": "error", "error": "permission denied: different user"})
                return
            client.settimeout(10)
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST_BYTES:
                chunk = client.recv(4096)
                if not chunk:
                    return
                data += chunk
            client.settimeout(None)
            request = json.loads(data.decode())
            command = request.get("command")
            if command == "status":
                channel.send({"event": "status", **self.proxy.status()})
            elif command == "upgrade":
                from .upgrade import UpgradeRequest, start_upgrade

                keep_open = start_upgrade(self.proxy, UpgradeRequest.from_json(request), channel)
            else:
                channel.send({"event": "error", "error": f"unknown command {command!r}"})
        except (OSError, ValueError) as error:
            channel.send({"event": "error", "error": f"bad control request: {error}"})
        finally:
            if not keep_open:
                channel.close()

    def close(self, unlink: bool = False) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self.listener is not None:
            self.listener.close()
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass


# ---- client side (used by the CLI, plain blocking sockets) -------------------------------------

def request(path: str, message: Dict[str, Any], on_event: Callable[[Dict[str, Any]], None],
            timeout: float) -> Dict[str, Any]:
    """Send one request; pass each event to `on_event`; return the final one ("result",
    "status" or "error"). Raises ControlError when the proxy cannot be reached."""
    client = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(path)
    except OSError as error:
        client.close()
        raise ControlError(f"cannot reach shotover-g on control socket {path}: "
                           f"{error.strerror or error}") from None
    try:
        client.sendall(json.dumps(message).encode() + b"\n")
        buffer = b""
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line.decode())
                on_event(event)
                if event.get("event") in ("result", "status", "error"):
                    return event
            try:
                chunk = client.recv(65536)
            except stdlib_socket.timeout:
                raise ControlError(f"no answer from shotover-g within {timeout:g} s") from None
            if not chunk:
                raise ControlError("shotover-g closed the control connection without a result")
            buffer += chunk
    finally:
        client.close()
