"""Helpers for the feature, TLS and differential tests: exact-byte RESP clients, certificates,
TLS-enabled redis-server processes, and upgrades driven through the command line."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from helpers import HOST, REDIS_SERVER, Abort, encode, free_port, wait_for

CLI = [sys.executable, "-m", "shotover_gevent"]


# ---- topologies ---------------------------------------------------------------------------------


def topology(redis_port: int, listen_port: Optional[int] = None, *, source_tls=None,
             sink_tls=None, connection_limit: Optional[int] = None,
             redis_host: str = HOST) -> Dict[str, Any]:
    """One source passing everything to one server, optionally with TLS on either side."""
    sink: Dict[str, Any] = {"remote_address": f"{redis_host}:{redis_port}",
                            "connect_timeout_ms": 3000}
    if sink_tls is not None:
        sink["tls"] = dict(sink_tls)
    source: Dict[str, Any] = {"name": "redis",
                              "listen_addr": f"{HOST}:{listen_port or free_port()}"}
    if connection_limit is not None:
        source["connection_limit"] = connection_limit
    if source_tls is not None:
        source["tls"] = dict(source_tls)
    source["chain"] = [{"RedisSinkSingle": sink}]
    return {"sources": [{"Redis": source}]}


# ---- RESP frames as bytes -------------------------------------------------------------------------


def frame_end(buf, pos: int = 0) -> int:
    """End offset of the complete RESP2/RESP3 frame starting at `pos`, or -1 if incomplete.

    Written independently of the proxy's framer, so the tests do not trust the code under test.
    """
    owed = 1
    end = len(buf)
    while owed:
        if pos >= end:
            return -1
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return -1
        kind = bytes(buf[pos:pos + 1])
        owed -= 1
        if kind in (b"$", b"!", b"="):
            length = int(buf[pos + 1:nl])
            if length < 0:
                pos = nl + 2
                continue
            stop = nl + 2 + length + 2
            if stop > end:
                return -1
            pos = stop
        elif kind in (b"*", b">", b"~", b"%", b"|"):
            count = int(buf[pos + 1:nl])
            pos = nl + 2
            if count > 0:
                owed += count * (2 if kind in (b"%", b"|") else 1) + (1 if kind == b"|" else 0)
        elif kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
            pos = nl + 2
        else:
            raise ValueError(f"not RESP at offset {pos}: {bytes(buf[pos:pos + 20])!r}")
    return pos


class ByteClient:
    """A TCP (or TLS) client that sends commands and reads replies as exact frame bytes."""

    def __init__(self, port: int, timeout: float = 10.0, ssl_context=None,
                 host: str = HOST) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host,
                                           suppress_ragged_eofs=False)
        self.sock = sock
        self.timeout = timeout
        self.buffer = bytearray()
        self.eof = False
        # With TLS: whether the peer ended the session properly (close_notify) before closing.
        self.clean_close: Optional[bool] = None

    def __enter__(self) -> "ByteClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, *args: Any) -> None:
        self.sock.sendall(encode(*args))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except ssl.SSLEOFError:
            self.clean_close = False
            data = b""
        except ConnectionResetError:
            data = b""
        if not data:
            if self.clean_close is None and isinstance(self.sock, ssl.SSLSocket):
                self.clean_close = True
            self.eof = True
            return
        self.buffer += data

    def read_frame(self, timeout: Optional[float] = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            end = frame_end(self.buffer) if self.buffer else -1
            if end >= 0:
                frame = bytes(self.buffer[:end])
                del self.buffer[:end]
                return frame
            if self.eof:
                raise EOFError(f"connection closed; unparsed bytes: {bytes(self.buffer[:200])!r}")
            try:
                self._fill(deadline)
            except socket.timeout:
                raise AssertionError(f"no complete reply within {timeout or self.timeout}s; "
                                     f"have {bytes(self.buffer[:200])!r}") from None

    def read_frames(self, count: int, timeout: Optional[float] = None) -> bytes:
        return b"".join(self.read_frame(timeout) for _ in range(count))

    def call(self, *args: Any, frames: int = 1) -> bytes:
        self.send(*args)
        return self.read_frames(frames)

    def quiet_for(self, seconds: float) -> bool:
        """True when nothing at all (no byte, no close) arrives for `seconds`."""
        if self.buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""
        if not data:
            self.eof = True
        self.buffer += data
        return False

    def wait_eof(self, timeout: Optional[float] = None) -> bytes:
        """Read until the peer closes; return whatever came before the close."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.eof:
            try:
                self._fill(deadline)
            except socket.timeout:
                raise AssertionError(f"still open after {timeout or self.timeout}s; "
                                     f"got {bytes(self.buffer[:200])!r}") from None
            except OSError:
                self.eof = True
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def mask_hello_id(frame: bytes) -> bytes:
    """A HELLO reply with its connection id replaced (it names a different connection)."""
    marker = b"$2\r\nid\r\n:"
    start = frame.find(marker)
    if start < 0:
        return frame
    start += len(marker)
    end = frame.index(b"\r\n", start)
    return frame[:start] + b"<id>" + frame[end:]


# ---- certificates -----------------------------------------------------------------------------


@dataclass
class Certificates:
    directory: Path
    ca: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed none of the above
    elsewhere_cert: str  # signed by the CA, for a name other than 127.0.0.1/localhost
    elsewhere_key: str


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, all signed by
    the CA, and an unrelated CA (with the `cryptography` package, else the openssl CLI)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: str(directory / name) for name in (
        "ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key",
        "other-ca.crt", "other-ca.key", "elsewhere.crt", "elsewhere.key")}
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _certificates_with_openssl(directory, paths)
    else:
        _certificates_with_cryptography(paths)
    return Certificates(directory, paths["ca.crt"], paths["ca.key"], paths["server.crt"],
                        paths["server.key"], paths["client.crt"], paths["client.key"],
                        paths["other-ca.crt"], paths["elsewhere.crt"], paths["elsewhere.key"])


def _certificates_with_cryptography(paths: Dict[str, str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, path: str) -> None:
        Path(path).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(path, 0o600)

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def make_ca(common: str, cert_path: str, key_path: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(name(common))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, key_path)
        return cert, key

    ca_cert, ca_key = make_ca("shotover-g test CA", paths["ca.crt"], paths["ca.key"])
    make_ca("unrelated test CA", paths["other-ca.crt"], paths["other-ca.key"])

    def leaf(common: str, usage, cert_path: str, key_path: str, names=None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False)
                   .add_extension(x509.SubjectAlternativeName(names or [
                       x509.DNSName("localhost"),
                       x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False))
        cert = builder.sign(ca_key, hashes.SHA256())
        Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, key_path)

    leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, paths["server.crt"], paths["server.key"])
    leaf("test client", ExtendedKeyUsageOID.CLIENT_AUTH, paths["client.crt"],
         paths["client.key"])
    leaf("elsewhere.invalid", ExtendedKeyUsageOID.SERVER_AUTH, paths["elsewhere.crt"],
         paths["elsewhere.key"], [x509.DNSName("elsewhere.invalid")])


def _certificates_with_openssl(directory: Path, paths: Dict[str, str]) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "neither the cryptography package nor the openssl command is available"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60,
                       cwd=str(directory))

    for stem, common in (("ca", "shotover-g test CA"), ("other-ca", "unrelated test CA")):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "30", "-subj", f"/CN={common}", "-keyout", paths[f"{stem}.key"],
            "-out", paths[f"{stem}.crt"], "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for stem, usage, names in (("server", "serverAuth", f"DNS:localhost,IP:{HOST}"),
                               ("client", "clientAuth", f"DNS:localhost,IP:{HOST}"),
                               ("elsewhere", "serverAuth", "DNS:elsewhere.invalid")):
        csr = str(directory / f"{stem}.csr")
        ext = directory / f"{stem}.ext"
        ext.write_text(f"subjectAltName={names}\nextendedKeyUsage={usage}\n"
                       "basicConstraints=critical,CA:FALSE\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={stem}", "-keyout", paths[f"{stem}.key"], "-out", csr)
        run("x509", "-req", "-in", csr, "-CA", paths["ca.crt"], "-CAkey", paths["ca.key"],
            "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", paths[f"{stem}.crt"])


def client_ssl_context(certs: Certificates, with_client_cert: bool = False,
                       ca: Optional[str] = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca or certs.ca)
    if with_client_cert:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


# ---- a redis-server that only speaks TLS -----------------------------------------------------------


class TlsRedisServer:
    """redis-server listening with TLS only (`--port 0 --tls-port P`)."""

    def __init__(self, directory: Path, certs: Certificates, auth_clients: str = "no",
                 cert: Optional[str] = None, key: Optional[str] = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.cert = cert or certs.server_cert
        self.key = key or certs.server_key
        self.port = free_port()
        self.auth_clients = auth_clients
        self.log_path = self.directory / f"redis-tls-{self.port}.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> "TlsRedisServer":
        args = [REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--bind", HOST,
                "--tls-cert-file", self.cert, "--tls-key-file", self.key,
                "--tls-ca-cert-file", self.certs.ca,
                "--tls-auth-clients", self.auth_clients, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.directory)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        context = client_ssl_context(self.certs, with_client_cert=True)
        context.check_hostname = False

        def ready() -> bool:
            if self.process.poll() is not None:
                raise Abort(f"redis-server exited with code {self.process.returncode}: "
                            f"{self.log_path.read_text(errors='replace')[-2000:]}")
            with ByteClient(self.port, timeout=1.0, ssl_context=context) as client:
                return client.call("PING") == b"+PONG\r\n"

        wait_for(ready, timeout, f"TLS redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# ---- upgrades -------------------------------------------------------------------------------------


class Upgrade:
    """`shotover-g upgrade` as a child process, started at once; `wait()` gives its outcome."""

    def __init__(self, proxy, *args: str) -> None:
        self.proxy = proxy
        self.log_offset = len(proxy.log_text())
        self.out_path = Path(proxy.directory) / f"upgrade-{time.monotonic_ns()}.out"
        self.command = [*CLI, "upgrade", "--control-socket", proxy.control_socket, *args]
        with open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def wait_draining(self, timeout: float = 30.0) -> None:
        """Until the old version has started pausing connections."""
        self.proxy.wait_log("the new image is ready: pausing", timeout=timeout,
                            start=self.log_offset)

    def wait(self, timeout: float = 60.0) -> str:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"upgrade still running after {timeout}s:\n"
                                 f"{self.output()}") from None
        return self.output()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_ok(self, timeout: float = 60.0) -> Dict[str, Any]:
        """Wait, insist on success, return the proxy's record of the upgrade."""
        output = self.wait(timeout)
        assert self.process.returncode == 0 and "upgraded" in output, (
            f"upgrade failed ({self.process.returncode}):\n{output}\nproxy log:\n"
            f"{self.proxy.log_text()[-6000:]}")
        return last_upgrade(self.proxy)


def upgrade(proxy, *args: str, timeout: float = 60.0) -> Dict[str, Any]:
    """Upgrade in place, insist that it worked, return the proxy's record of it."""
    return Upgrade(proxy, *args).wait_ok(timeout)


def last_upgrade(proxy) -> Dict[str, Any]:
    done = subprocess.run([*CLI, "status", "--control-socket", proxy.control_socket, "--json"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["last_upgrade"]


def server_clients(admin, name_prefix: Optional[str] = None) -> List[Dict[str, str]]:
    """CLIENT LIST of a server as dicts (optionally only clients whose name has the prefix)."""
    text = admin.execute_command("CLIENT", "LIST")
    if isinstance(text, bytes):
        text = text.decode()
    clients = []
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in line.split(" ") if "=" in item)
        if name_prefix is None or fields.get("name", "").startswith(name_prefix):
            clients.append(fields)
    return clients


def wait_quiet_server(admin, baseline: int = 1, timeout: float = 10.0) -> None:
    """Until the server has only `baseline` clients (the admin connection itself)."""
    wait_for(lambda: len(server_clients(admin)) <= baseline, timeout,
             f"the server to be down to {baseline} client(s)")

