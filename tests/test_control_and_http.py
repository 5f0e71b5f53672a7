"""The control socket and the HTTP observability endpoint of a running proxy, facing callers that
send the wrong thing, stall, trickle, or may not change the log filter.

Every wait is on a condition (an answer, an EOF) with a generous deadline.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml
from helpers import REPO_ROOT, http_request, passthrough_topology, wait_for
from upgrade_support import upgrade_ok

from shotover_gevent.handover import control

#: Within how long the proxy must have given up on a caller whose request never completes
#: (its deadlines are a few seconds; this leaves room for a slow machine).
CUT_OFF_WITHIN = 15.0
#: How often a trickling caller sends its next byte.
TRICKLE_PACE = 0.5
TOKEN = "Zm9vYmFyYmF6cXV4LXRlc3QtdG9rZW4tMTIz"


# ---- plain sockets ----------------------------------------------------------------------------


def read_to_eof(sock: socket.socket, timeout: float = CUT_OFF_WITHIN) -> bytes:
    """Everything the peer sends until it closes; AssertionError if it is still open at the
    deadline."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"connection still open after {timeout} s; got {data[-300:]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def trickle_until_answered(sock: socket.socket, byte: bytes,
                           timeout: float = CUT_OFF_WITHIN) -> bytes:
    """Send `byte` every TRICKLE_PACE seconds until the peer answers or closes; return what it
    sent up to its close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            break  # closed: what it said before is still readable
        readable, _, _ = select.select([sock], [], [], TRICKLE_PACE)
        if readable:
            break
    else:
        raise AssertionError(f"still accepting a trickled request after {timeout} s")
    return read_to_eof(sock, max(1.0, deadline - time.monotonic()))


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed `sock` (any bytes it sent first are read and dropped)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


# ---- the control socket -----------------------------------------------------------------------


def control_exchange(path: str, payload: bytes, shut_write: bool = False) -> List[Dict[str, Any]]:
    """Send raw bytes on the control socket; return the events read until the proxy closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(payload)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the proxy stopped reading: its answer is still there to read
        data = read_to_eof(sock)
    return [json.loads(line) for line in data.splitlines()]


def assert_one_error(events: List[Dict[str, Any]], *fragments: str) -> str:
    assert len(events) == 1 and events[0].get("event") == "error", events
    text = events[0]["error"]
    for fragment in fragments:
        assert fragment in text, text
    return text


def assert_serves_on(proxy) -> None:
    """The proxy answers on its control socket and logged no traceback."""
    events = control_exchange(proxy.control_socket, b'{"command": "status"}\n')
    assert [e["event"] for e in events] == ["status"], events
    assert not events[0]["upgrade_in_progress"]
    assert events[0]["last_upgrade"] is None
    assert "Traceback" not in proxy.log_text(), proxy.log_text()[-3000:]


DEEPLY_NESTED = b"[" * 30000 + b"]" * 30000


@pytest.mark.parametrize("payload, fragment", [
    (b"[1, 2]", "expected a JSON object"),
    (b"null", "expected a JSON object"),
    (b"42", "expected a JSON object"),
    (b'"x"', "expected a JSON object"),
    (b"{}", '"command" must be a string'),
    (b'{"command": 5}', '"command" must be a string'),
    (b'{"command": ["status"]}', '"command" must be a string'),
    (b'{"command": "stop"}', "unknown command 'stop'"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (DEEPLY_NESTED, "nested too deeply"),
], ids=["array", "null", "number", "string", "no-command", "numeric-command", "list-command",
        "unknown-command", "not-json", "not-utf8", "deeply-nested"])
def test_control_request_that_is_not_a_command_object_gets_an_error(proxy, payload, fragment):
    events = control_exchange(proxy.control_socket, payload + b"\n")
    assert_one_error(events, "bad control request", fragment)
    assert_serves_on(proxy)


@pytest.mark.parametrize("options, fragment", [
    ({"drain_timeout": "abc"}, "'drain_timeout' must be a number of seconds"),
    ({"drain_timeout": [1]}, "'drain_timeout' must be a number of seconds"),
    ({"drain_timeout": True}, "'drain_timeout' must be a number of seconds"),
    ({"drain_timeout": -1}, "'drain_timeout' must be a number of seconds"),
    ({"restore_timeout": float("inf")}, "'restore_timeout' must be a number of seconds"),
    ({"restore_timeout": 1e300}, "'restore_timeout' must be a number of seconds"),
    ({"restore_timeout": 0}, "'restore_timeout' must be a number of seconds"),
    ({"python": 42}, "'python' must be a path"),
    ({"keep_checkpoint": {"path": "/tmp/x"}}, "'keep_checkpoint' must be a path"),
    ({"colour": "blue"}, "unknown upgrade option 'colour'"),
])
def test_control_upgrade_options_of_the_wrong_kind_get_an_error(proxy, options, fragment):
    payload = json.dumps({"command": "upgrade", **options}).encode() + b"\n"
    events = control_exchange(proxy.control_socket, payload)
    assert_one_error(events, "bad control request", fragment)
    assert_serves_on(proxy)


def test_control_request_trickling_in_is_cut_off(proxy):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(proxy.control_socket)
        sock.sendall(b'{"command": "status"')
        # Never a newline, but never a pause long enough for a timeout per read either.
        answer = trickle_until_answered(sock, b" ")
    events = [json.loads(line) for line in answer.splitlines()]
    assert_one_error(events, "no complete request line within")
    assert_serves_on(proxy)


def test_control_request_that_stalls_is_cut_off(proxy):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(proxy.control_socket)
        sock.sendall(b'{"command": "sta')
        answer = read_to_eof(sock)
    events = [json.loads(line) for line in answer.splitlines()]
    assert_one_error(events, "no complete request line within")
    assert_serves_on(proxy)


@pytest.mark.parametrize("newline", [b"", b"\n"], ids=["unterminated", "terminated"])
def test_control_request_larger_than_the_limit_gets_an_error(proxy, newline):
    padding = b" " * control.MAX_REQUEST_BYTES
    events = control_exchange(proxy.control_socket, b'{"command": "status",' + padding + b"}"
                              + newline)
    assert_one_error(events, f"larger than {control.MAX_REQUEST_BYTES} bytes")
    assert_serves_on(proxy)


def test_control_request_ended_by_the_callers_shutdown_is_answered(proxy):
    events = control_exchange(proxy.control_socket, b'{"command": "status"}', shut_write=True)
    assert [e["event"] for e in events] == ["status"], events


class OneAnswerServer(threading.Thread):
    """A Unix socket peer that answers the first request with fixed bytes (for the client)."""

    def __init__(self, path: str, answer: bytes) -> None:
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.answer = answer

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                conn.recv(65536)
                conn.sendall(self.answer)
            except OSError:
                pass
        self.listener.close()


@pytest.mark.parametrize("answer", [b"not json\n", b"[1, 2]\n", b"\xff\n"],
                         ids=["not-json", "array", "not-utf8"])
def test_control_client_reports_a_garbled_answer(answer):
    directory = tempfile.mkdtemp(prefix="sgc")
    try:
        path = os.path.join(directory, "ctl.sock")
        server = OneAnswerServer(path, answer)
        server.start()
        with pytest.raises(control.ControlError, match="other than a JSON object"):
            control.request(path, {"command": "status"}, lambda event: None, 10)
        server.join(10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---- the HTTP endpoint: stalled and slow clients ----------------------------------------------


def metrics_address(proxy) -> Tuple[str, int]:
    host, port = proxy.config["observability_interface"].rsplit(":", 1)
    return host, int(port)


def test_half_sent_http_requests_are_closed_while_others_are_served(proxy_factory):
    proxy = proxy_factory(observability=True)
    stalled = []
    try:
        for _ in range(100):
            sock = socket.create_connection(metrics_address(proxy), timeout=10)
            sock.sendall(b"GET /metr")
            stalled.append(sock)
        status, text = http_request(proxy.metrics_url, timeout=10)
        assert status == 200
        assert "shotover_g_generation" in text

        def all_closed() -> bool:
            stalled[:] = [sock for sock in stalled if not closed_by_peer(sock)]
            return not stalled

        wait_for(all_closed, CUT_OFF_WITHIN, "the proxy to close every half-sent request")
    finally:
        for sock in stalled:
            sock.close()
    assert http_request(proxy.metrics_url)[0] == 200
    assert "Traceback" not in proxy.log_text()


@pytest.mark.parametrize("start", [
    b"PUT /filter HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100\r\n\r\ndeb",
    b"GET /metrics HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: proxy\r\n",
], ids=["filter-body-stalls", "metrics-body-stalls", "head-stalls"])
def test_http_request_that_stalls_is_closed(proxy_factory, start):
    proxy = proxy_factory(observability=True)
    with socket.create_connection(metrics_address(proxy), timeout=10) as sock:
        sock.sendall(start)
        read_to_eof(sock)
    assert "log filter set" not in proxy.log_text()
    assert http_request(proxy.metrics_url)[0] == 200
    assert "Traceback" not in proxy.log_text()


def test_http_request_head_trickling_in_is_closed(proxy_factory):
    proxy = proxy_factory(observability=True)
    with socket.create_connection(metrics_address(proxy), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")
        answer = trickle_until_answered(sock, b"a")
    assert b"200 OK" not in answer
    assert http_request(proxy.metrics_url)[0] == 200
    assert "Traceback" not in proxy.log_text()


# ---- the HTTP endpoint: who may change the log filter -----------------------------------------


def http_call(url: str, method: str = "GET", body: Optional[bytes] = None,
              headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_filter_change_needs_the_token_when_one_is_configured(proxy_factory):
    proxy = proxy_factory(config_dict={"main_log_level": "info", "observability_token": TOKEN},
                          observability=True)
    assert http_call(proxy.metrics_url)[0] == 200  # scrapes need no token

    refused = [
        {},
        {"Authorization": "Bearer wrong-token-of-enough-length"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer \u00e9t\u00e9"},
    ]
    for headers in refused:
        status, response_headers, body = http_call(proxy.filter_url, "PUT", b"debug", headers)
        assert status == 401, (headers, body)
        assert response_headers.get("WWW-Authenticate", "").startswith("Bearer"), headers
    assert "log filter set" not in proxy.log_text()
    proxy.wait_log("PUT /filter refused")

    status, _, body = http_call(proxy.filter_url, "PUT", b"debug",
                                {"Authorization": f"bearer {TOKEN}"})
    assert status == 200, body
    proxy.wait_log("log filter set to 'debug'")
    assert TOKEN not in proxy.log_text()


@pytest.mark.parametrize("entries, key, fragment", [
    ({"observability_interface": "unix:relative/metrics.sock"}, "observability_interface",
     "absolute path"),
    ({"observability_interface": "unix:"}, "observability_interface", "absolute path"),
    ({"observability_interface": "unix:/" + "x" * 200}, "observability_interface",
     "at most 107"),
    ({"observability_interface": "127.0.0.1:9", "observability_token": "short"},
     "observability_token", "at least 16 characters"),
    ({"observability_interface": "127.0.0.1:9",
      "observability_token": "a secret with spaces in it"},
     "observability_token", "other characters"),
    ({"observability_interface": "127.0.0.1:9", "observability_token": 12345678901234567890},
     "observability_token", "put the token in quotes"),
], ids=["relative", "empty", "too-long", "short-token", "token-with-spaces", "numeric-token"])
def test_observability_config_mistakes_name_the_file_and_key(tmp_path, entries, key, fragment):
    config_path = tmp_path / "config.yaml"
    topology_path = tmp_path / "topology.yaml"
    config_path.write_text(yaml.safe_dump({"main_log_level": "info", **entries}))
    topology_path.write_text(yaml.safe_dump(passthrough_topology(6379, 16379)))
    done = subprocess.run([sys.executable, "-m", "shotover_gevent", "start", "-c",
                           str(config_path), "-t", str(topology_path), "--control-socket",
                           str(tmp_path / "ctl.sock")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 1, done
    problem = next((line for line in done.stderr.splitlines() if f": {key}:" in line), None)
    assert problem is not None, done.stderr
    assert f"{config_path}: {key}:" in problem and fragment in problem, problem
    token = entries.get("observability_token")
    assert token is None or str(token) not in done.stderr


# ---- the HTTP endpoint on a Unix socket -------------------------------------------------------


def unix_http(path: str, request: bytes) -> Tuple[int, str]:
    """(status, body) of one HTTP/1.1 request sent over a Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(request)
        answer = read_to_eof(sock, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def get_metrics(path: str) -> Tuple[int, str]:
    return unix_http(path, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")


@pytest.fixture
def metrics_socket():
    # Unix socket paths are limited to about 100 bytes: a short directory of its own.
    directory = tempfile.mkdtemp(prefix="sgm")
    yield os.path.join(directory, "metrics.sock")
    shutil.rmtree(directory, ignore_errors=True)


def stale_socket_at(path: str) -> None:
    """A socket file nobody listens on, as a process killed without cleanup leaves."""
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()


def test_metrics_on_a_unix_socket(proxy_factory, metrics_socket):
    stale_socket_at(metrics_socket)
    proxy = proxy_factory(config_dict={"main_log_level": "info",
                                       "observability_interface": f"unix:{metrics_socket}"})
    mode = os.stat(metrics_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    status, text = get_metrics(metrics_socket)
    assert status == 200 and "shotover_g_generation 0.0" in text, text
    status, _ = unix_http(metrics_socket, b"PUT /filter HTTP/1.1\r\nHost: localhost\r\n"
                                          b"Content-Length: 4\r\nConnection: close\r\n\r\ninfo")
    assert status == 200
    proxy.wait_log("log filter set to 'info'")
    proxy.stop()
    assert not os.path.exists(metrics_socket)


def test_unix_metrics_socket_is_kept_through_an_upgrade(proxy_factory, metrics_socket):
    proxy = proxy_factory(config_dict={"main_log_level": "info",
                                       "observability_interface": f"unix:{metrics_socket}"})
    inode = os.stat(metrics_socket).st_ino
    upgrade_ok(proxy)

    def generation_one() -> bool:
        status, text = get_metrics(metrics_socket)
        return status == 200 and "shotover_g_generation 1.0" in text

    wait_for(generation_one, 30, "the upgraded proxy to serve metrics on the Unix socket")
    # The same socket, inherited: not a new one bound in its place.
    assert os.stat(metrics_socket).st_ino == inode
    assert stat.S_IMODE(os.stat(metrics_socket).st_mode) == 0o600


def test_filter_token_is_required_after_an_upgrade(proxy_factory):
    proxy = proxy_factory(config_dict={"main_log_level": "info", "observability_token": TOKEN},
                          observability=True)
    upgrade_ok(proxy)

    def upgraded() -> bool:
        status, text = http_request(proxy.metrics_url)
        return status == 200 and "shotover_g_generation 1.0" in text

    wait_for(upgraded, 30, "the upgraded proxy to serve metrics")
    assert http_call(proxy.filter_url, "PUT", b"debug")[0] == 401

