"""TLS on sources (clients to the proxy) and on RedisSinkSingle (the proxy to a TLS-only
redis-server), with certificates made by the tests, and what an upgrade does to TLS clients."""

from __future__ import annotations

import json
import os
import ssl
import subprocess

import pytest
import redis

from feature_support import (CLI, ByteClient, TlsRedisServer, client_ssl_context,
                             make_certificates, topology, upgrade)
from helpers import redis_client, wait_for


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def tls_redis(tmp_path, certs):
    servers = []

    def make(**options) -> TlsRedisServer:
        server = TlsRedisServer(tmp_path / f"tls-redis-{len(servers)}", certs, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


def source_tls(certs, require_client_certificates: bool = False):
    settings = {"certificate_path": certs.server_cert, "private_key_path": certs.server_key}
    if require_client_certificates:
        settings["certificate_authority_path"] = certs.ca
    return settings


def tls_client(proxy, certs, **kwargs) -> redis.Redis:
    return redis_client(proxy.port, ssl=True, ssl_ca_certs=certs.ca, **kwargs)


# ---- sources ----------------------------------------------------------------------------------


def test_redis_py_over_tls_through_the_proxy(redis_server, proxy_factory, certs):
    proxy = proxy_factory(topology(redis_server.port, source_tls=source_tls(certs)))
    with tls_client(proxy, certs) as client:
        assert client.ping() is True
        assert client.set("over-tls", "yes") is True
        assert client.get("over-tls") == b"yes"
        pipe = client.pipeline(transaction=True)
        pipe.incr("n").incr("n").get("over-tls")
        assert pipe.execute() == [1, 2, b"yes"]
        value = b"x" * (4 * 1024 * 1024)  # many TLS records each way
        client.set("big", value)
        assert client.get("big") == value
    with tls_client(proxy, certs, protocol=3) as client:
        assert client.hset("h", "f", "v") == 1
        assert client.hgetall("h") == {b"f": b"v"}
    # A plain-text client gets no Redis reply from a TLS listener.
    with ByteClient(proxy.port, timeout=5) as plain:
        plain.send("PING")
        data = plain.wait_eof()
        assert b"PONG" not in data


def test_pubsub_over_tls_while_idle(redis_server, proxy_factory, certs):
    proxy = proxy_factory(topology(redis_server.port, source_tls=source_tls(certs)))
    context = client_ssl_context(certs)
    with ByteClient(proxy.port, ssl_context=context) as subscriber:
        assert subscriber.call("SUBSCRIBE", "tls-news") == (
            b"*3\r\n$9\r\nsubscribe\r\n$8\r\ntls-news\r\n:1\r\n")
        with redis_server.client() as publisher:
            for number in range(20):
                publisher.publish("tls-news", str(number))
        for number in range(20):
            assert subscriber.read_frame() == b"*3\r\n$7\r\nmessage\r\n$8\r\ntls-news\r\n$%d\r\n%d\r\n" % (
                len(str(number)), number)


def test_source_requiring_client_certificates(redis_server, proxy_factory, certs):
    proxy = proxy_factory(topology(redis_server.port,
                                   source_tls=source_tls(certs, require_client_certificates=True)))
    with tls_client(proxy, certs, ssl_certfile=certs.client_cert,
                    ssl_keyfile=certs.client_key) as client:
        assert client.ping() is True
    with pytest.raises((redis.ConnectionError, ssl.SSLError, OSError)):
        with tls_client(proxy, certs) as client:
            client.ping()
    # The proxy carries on serving after a refused handshake.
    with tls_client(proxy, certs, ssl_certfile=certs.client_cert,
                    ssl_keyfile=certs.client_key) as client:
        assert client.set("still", "served") is True


# ---- sinks ------------------------------------------------------------------------------------


def test_sink_to_a_tls_only_server(tls_redis, proxy_factory, certs):
    server = tls_redis()
    proxy = proxy_factory(topology(server.port,
                                   sink_tls={"certificate_authority_path": certs.ca}))
    with proxy.client() as client:
        assert client.ping() is True
        client.set("k", "v")
        assert client.get("k") == b"v"
    with proxy.client(protocol=3) as client:
        assert client.hset("h", "a", "1") == 1
        assert client.hgetall("h") == {b"a": b"1"}
    # Subscriptions through a TLS upstream connection, delivered while idle.
    with ByteClient(proxy.port) as subscriber, ByteClient(proxy.port) as publisher:
        subscriber.call("SUBSCRIBE", "c")
        assert publisher.call("PUBLISH", "c", "m") == b":1\r\n"
        assert subscriber.read_frame() == b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n"


def test_sink_with_a_client_certificate(tls_redis, proxy_factory, certs):
    server = tls_redis(auth_clients="yes")
    with_cert = proxy_factory(topology(server.port, sink_tls={
        "certificate_authority_path": certs.ca, "certificate_path": certs.client_cert,
        "private_key_path": certs.client_key}))
    without = proxy_factory(topology(server.port,
                                     sink_tls={"certificate_authority_path": certs.ca}))
    with with_cert.client() as client:
        assert client.ping() is True
    with ByteClient(without.port) as client:
        reply = client.call("PING")
        assert reply.startswith(b"-ERR ") and b"127.0.0.1:%d" % server.port in reply, reply


def test_sink_verifies_the_server(tls_redis, proxy_factory, certs):
    server = tls_redis()
    proxy = proxy_factory(topology(server.port,
                                   sink_tls={"certificate_authority_path": certs.other_ca}))
    with ByteClient(proxy.port) as client:
        reply = client.call("PING")
    assert reply.startswith(b"-ERR TLS handshake with 127.0.0.1:") and b"CERTIFICATE" in reply, \
        reply


def test_verify_hostname(tls_redis, proxy_factory, certs):
    server = tls_redis(cert=certs.elsewhere_cert, key=certs.elsewhere_key)
    checking = proxy_factory(topology(server.port, sink_tls={
        "certificate_authority_path": certs.ca}))
    trusting = proxy_factory(topology(server.port, sink_tls={
        "certificate_authority_path": certs.ca, "verify_hostname": False}))
    with ByteClient(checking.port) as client:
        reply = client.call("PING")
    assert reply.startswith(b"-ERR TLS handshake") and b"127.0.0.1" in reply, reply
    with trusting.client() as client:
        assert client.ping() is True
    # Without a name check the chain is still checked.
    other_ca = proxy_factory(topology(server.port, sink_tls={
        "certificate_authority_path": certs.other_ca, "verify_hostname": False}))
    with ByteClient(other_ca.port) as client:
        assert client.call("PING").startswith(b"-ERR TLS handshake")


def test_sink_by_host_name(tls_redis, proxy_factory, certs):
    server = tls_redis()
    proxy = proxy_factory(topology(server.port, redis_host="localhost",
                                   sink_tls={"certificate_authority_path": certs.ca}))
    with proxy.client() as client:
        assert client.ping() is True


# ---- upgrades -----------------------------------------------------------------------------------


def _status(proxy) -> dict:
    done = subprocess.run([*CLI, "status", "--control-socket", proxy.control_socket, "--json"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_tls_clients_stay_with_the_previous_version_until_they_leave(redis_server,
                                                                     proxy_factory, certs):
    """TLS state cannot cross the exec: the previous version keeps serving its TLS clients
    (subscribers too) as a lame duck; new TLS clients go to the new version; a second upgrade
    while it still serves chains; it exits once its last client has left."""
    proxy = proxy_factory(topology(redis_server.port, source_tls=source_tls(certs)))
    context = client_ssl_context(certs)
    first, second = ByteClient(proxy.port, ssl_context=context), \
        ByteClient(proxy.port, ssl_context=context)
    with first, second:
        assert first.call("SET", "k", "v") == b"+OK\r\n"
        assert second.call("SUBSCRIBE", "c") .startswith(b"*3\r\n")
        result = upgrade(proxy)
        assert result["closed"] == 0 and result["kept"] == 0, result
        ducks = _status(proxy)["lame_ducks"]
        assert len(ducks) == 1 and ducks[0]["tls_connections"] == 2, ducks
        assert ducks[0]["pid"] != proxy.pid
        # Still served, by the previous version.
        assert first.call("GET", "k") == b"$1\r\nv\r\n"
        with redis_server.client() as admin:
            assert admin.publish("c", "hello") == 1
        assert second.read_frame() == b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$5\r\nhello\r\n"
        # Same listening socket, new image: a new TLS client is served by the new version,
        # and stays connected through a second upgrade (which chains a second lame duck).
        with ByteClient(proxy.port, ssl_context=context) as third:
            assert third.call("GET", "k") == b"$1\r\nv\r\n"
            upgrade(proxy)
            ducks = _status(proxy)["lame_ducks"]
            assert sorted(d["tls_connections"] for d in ducks) == [1, 2], ducks
            assert third.call("INCR", "n") == b":1\r\n"
            assert first.call("INCR", "n") == b":2\r\n"
        wait_for(lambda: [d["tls_connections"] for d in _status(proxy)["lame_ducks"]] == [2],
                 15, "the second lame duck to exit once its client left")
        first_duck = _status(proxy)["lame_ducks"][0]["pid"]
    # Its last clients gone, the first lame duck exits too (and is collected).
    wait_for(lambda: not _status(proxy)["lame_ducks"], 15, "the first lame duck to exit")
    wait_for(lambda: not os.path.exists(f"/proc/{first_duck}"), 15, "the lame duck reaped")


def test_tls_drain_timeout_closes_the_last_tls_clients_cleanly(redis_server, proxy_factory,
                                                               certs):
    """Like Redis, the proxy ends a TLS session with close_notify: after QUIT, and when the
    previous version's TLS drain time is over."""
    proxy = proxy_factory(topology(redis_server.port, source_tls=source_tls(certs)))
    context = client_ssl_context(certs)
    with ByteClient(proxy.port, ssl_context=context) as quitting, \
            ByteClient(proxy.port, ssl_context=context) as upgraded:
        quitting.send("QUIT")
        assert quitting.wait_eof() == b"+OK\r\n" and quitting.clean_close is True
        assert upgraded.call("PING") == b"+PONG\r\n"
        upgrade(proxy, "--tls-drain-timeout", "1")
        assert upgraded.wait_eof() == b"" and upgraded.clean_close is True
    wait_for(lambda: not _status(proxy)["lame_ducks"], 15, "the lame duck to exit")


def test_upgrade_keeps_plain_clients_of_a_tls_sink(tls_redis, proxy_factory, certs):
    server = tls_redis()
    proxy = proxy_factory(topology(server.port,
                                   sink_tls={"certificate_authority_path": certs.ca}))
    with ByteClient(proxy.port) as subscriber, ByteClient(proxy.port) as client:
        client.call("SELECT", "1")
        client.call("SET", "k", "v")
        subscriber.call("SUBSCRIBE", "c")
        result = upgrade(proxy)
        assert result["kept"] == 2 and result["closed"] == 0, result
        assert client.call("GET", "k") == b"$1\r\nv\r\n"

        def delivered() -> bool:
            return client.call("PUBLISH", "c", "after") == b":1\r\n"

        wait_for(delivered, 10, "the subscriber's new TLS upstream connection")
        assert subscriber.read_frame() == b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$5\r\nafter\r\n"
