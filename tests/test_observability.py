"""Tests for metrics exposition, log filters, log formats and the observability HTTP server.

HTTP requests go over loopback from an OS thread while the gevent hub serves them.
"""

import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.request

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shotover_gevent import observability as obs


def _http(server, method, path, body=None, headers=None):
    """Perform one request from a real thread; return (status, content type, body text)."""
    url = f"http://{server.address[0]}:{server.address[1]}{path}"

    def call():
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers.get("Content-Type"), response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type"), err.read()

    # .get() yields to the hub, so the server greenlets run while the thread waits.
    status, content_type, data = gevent.get_hub().threadpool.spawn(call).get(timeout=10)
    return status, content_type, data.decode("utf-8")


@pytest.fixture
def server():
    srv = obs.start_observability_server(("127.0.0.1", 0))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    saved_root_level = root.level
    saved_handlers = list(root.handlers)
    saved = {name: logging.getLogger(name).level for name in ("shotover_gevent", "other.lib")}
    yield
    obs.set_log_filter("warn")  # forget loggers named by filters set in the test
    root.setLevel(saved_root_level)
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _sample_value(text, line_prefix):
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_prefix!r} in:\n{text}")


def test_metrics_endpoint_exposes_shotover_names(server):
    chain = obs.chain_metrics("redis_chain")
    assert obs.chain_metrics("redis_chain") is chain
    chain.record_batch(0.0004, failed=False)
    chain.record_batch(0.003, failed=True)
    chain.record_batch(0.2, failed=False, requests=3, responses=3)
    sink = obs.transform_metrics("RedisSinkSingle")
    sink.record(0.002, failed=False)
    sink.record(0.5, failed=True)
    count = obs.query_counter("redis-chain")
    for command in ("GET", "set", "SET"):
        count(command)
    obs.failed_requests("redis_chain")(2)
    obs.available_connections("redis_source").set(4)
    obs.available_connections("redis_source").dec()
    obs.connections_open("redis_source").inc(5)
    obs.record_upgrade(0.015)
    obs.set_generation(3)

    status, content_type, text = _http(server, "GET", "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    lines = set(text.splitlines())
    expected = [
        '# TYPE shotover_chain_total_count counter',
        'shotover_chain_total_count{chain="redis_chain"} 3.0',
        'shotover_chain_failures_count{chain="redis_chain"} 1.0',
        'shotover_transform_total_count{transform="RedisSinkSingle"} 2.0',
        'shotover_transform_failures_count{transform="RedisSinkSingle"} 1.0',
        'shotover_query_count{name="redis-chain",query="GET",type="redis"} 1.0',
        'shotover_query_count{name="redis-chain",query="SET",type="redis"} 2.0',
        'shotover_failed_requests_count{chain="redis_chain",transform="RedisSinkSingle"} 2.0',
        '# TYPE shotover_available_connections_count gauge',
        'shotover_available_connections_count{source="redis_source"} 3.0',
        'shotover_g_connections_open{source="redis_source"} 5.0',
        '# TYPE shotover_g_upgrades_total counter',
        'shotover_g_upgrades_total 1.0',
        'shotover_g_upgrade_blackout_seconds 0.015',
        'shotover_g_generation 3.0',
        # histogram: cumulative buckets, count and sum
        '# TYPE shotover_chain_latency_seconds histogram',
        'shotover_chain_latency_seconds_bucket{chain="redis_chain",le="0.0001"} 0.0',
        'shotover_chain_latency_seconds_bucket{chain="redis_chain",le="0.0005"} 1.0',
        'shotover_chain_latency_seconds_bucket{chain="redis_chain",le="0.005"} 2.0',
        'shotover_chain_latency_seconds_bucket{chain="redis_chain",le="0.1"} 2.0',
        'shotover_chain_latency_seconds_bucket{chain="redis_chain",le="0.25"} 3.0',
        'shotover_chain_latency_seconds_bucket{chain="redis_chain",le="+Inf"} 3.0',
        'shotover_chain_latency_seconds_count{chain="redis_chain"} 3.0',
        'shotover_transform_latency_seconds_count{transform="RedisSinkSingle"} 2.0',
        'shotover_chain_requests_batch_size_count{chain="redis_chain"} 1.0',
        'shotover_chain_requests_batch_size_bucket{chain="redis_chain",le="4.0"} 1.0',
    ]
    missing = [line for line in expected if line not in lines]
    assert not missing, "missing lines:\n" + "\n".join(missing) + "\n--- got:\n" + text
    latency_sum = _sample_value(text, 'shotover_chain_latency_seconds_sum{chain="redis_chain"}')
    assert latency_sum == pytest.approx(0.2034)
    # Plain shotover names: no suffix added, no OpenMetrics extras.
    assert "shotover_chain_total_count_total" not in text
    assert "_created" not in text
    # The output is valid exposition text.
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["shotover_chain_latency_seconds"] == "histogram"
    assert families["shotover_available_connections_count"] == "gauge"


def test_new_chain_series_start_at_zero():
    obs.chain_metrics("fresh_chain")
    text = obs.render_metrics().decode()
    assert 'shotover_chain_total_count{chain="fresh_chain"} 0.0' in text
    assert 'shotover_chain_failures_count{chain="fresh_chain"} 0.0' in text
    assert 'shotover_chain_latency_seconds_count{chain="fresh_chain"} 0.0' in text


def test_batches_recorded_in_one_append_are_in_every_series_when_read():
    chain = obs.chain_metrics("batched_chain")
    screen, sink = obs.transform_metrics("BatchedScreen"), obs.transform_metrics("BatchedSink")
    series = obs.batch_series(chain, [screen, sink])
    assert obs.batch_series(chain, [screen, sink]) is series  # one per chain and transforms
    series.pending += [0.0004, 0.003]  # what Chain.record appends for two batches
    text = obs.render_metrics().decode()
    for line in ('shotover_chain_total_count{chain="batched_chain"} 2.0',
                 'shotover_transform_total_count{transform="BatchedScreen"} 2.0',
                 'shotover_transform_total_count{transform="BatchedSink"} 2.0',
                 'shotover_chain_latency_seconds_bucket{chain="batched_chain",le="0.0005"} 1.0',
                 'shotover_transform_latency_seconds_count{transform="BatchedSink"} 2.0'):
        assert line in text
    series.pending += [0.2] * 300  # past the fold: still counted once each
    series.drain()
    exported = {(name, tuple(key)): state for name, key, state in obs.export_counters()}
    assert exported[("shotover_chain_total_count", ("batched_chain",))] == 302.0
    assert exported[("shotover_transform_latency_seconds", ("BatchedScreen",))][2] == 302


def test_query_counter_bounds_distinct_names(monkeypatch):
    monkeypatch.setattr(obs, "MAX_QUERY_LABELS", 2)
    count = obs.query_counter("bounded")
    for command in ("get", "set", "foo1", "foo2", "get"):
        count(command)
    text = obs.render_metrics().decode()
    assert 'shotover_query_count{name="bounded",query="GET",type="redis"} 2.0' in text
    assert 'shotover_query_count{name="bounded",query="unknown",type="redis"} 2.0' in text
    assert 'query="FOO1"' not in text


def test_query_counter_gives_junk_names_no_label_of_their_own():
    """A client's junk (a 70,000-byte name, control characters) counts as `unknown`: it
    neither makes a label of that size in every scrape nor takes one of the bounded series
    from the commands that come later."""
    count = obs.query_counter("junk")
    count("x" * 70_000)
    count("GET\x00\x01")
    count.cell("ünïcode")  # what the screens' plans add to
    count("get")
    count("json.get")  # a module's command is a name like any other
    text = obs.render_metrics().decode()
    assert 'shotover_query_count{name="junk",query="GET",type="redis"} 1.0' in text
    assert 'shotover_query_count{name="junk",query="JSON.GET",type="redis"} 1.0' in text
    assert 'shotover_query_count{name="junk",query="unknown",type="redis"} 2.0' in text
    assert "xxxxxxxx" not in text and "NICODE" not in text


def test_metrics_are_on_a_dedicated_registry():
    from prometheus_client import REGISTRY as default_registry
    from prometheus_client import generate_latest

    assert obs.REGISTRY is not default_registry
    assert b"shotover_chain_total_count" not in generate_latest(default_registry)


def test_put_filter_bare_level(server):
    logging.getLogger().setLevel(logging.WARNING)
    status, _, body = _http(server, "PUT", "/filter", b"debug")
    assert (status, body) == (200, "ok")
    assert logging.getLogger().level == logging.DEBUG


def test_put_filter_with_target(server):
    status, _, _ = _http(server, "PUT", "/filter", b"shotover=debug,warn")
    assert status == 200
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("shotover_gevent").level == logging.DEBUG
    # A later filter replaces the earlier one, including its targets.
    status, _, _ = _http(server, "PUT", "/filter", b"info")
    assert status == 200
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("shotover_gevent").level == logging.NOTSET


def test_put_bad_filter_is_rejected_without_change(server):
    obs.set_log_filter("error,shotover=info")
    for bad in (b"loud", b"shotover=loud", b"info,shotover_gevent=", b""):
        status, _, body = _http(server, "PUT", "/filter", bad)
        assert status == 400, bad
        assert body.strip(), bad
        assert logging.getLogger().level == logging.ERROR
        assert logging.getLogger("shotover_gevent").level == logging.INFO
    _, _, body = _http(server, "PUT", "/filter", b"shotover=loud")
    assert "loud" in body


def test_unknown_path_and_wrong_method(server):
    assert _http(server, "GET", "/nope")[0] == 404
    assert _http(server, "GET", "/")[0] == 404
    assert _http(server, "GET", "/filter")[0] == 405
    assert _http(server, "POST", "/metrics", b"x")[0] == 405


def test_server_address_and_stop():
    srv = obs.start_observability_server(("127.0.0.1", 0))
    host, port = srv.address
    assert host == "127.0.0.1" and port > 0
    assert _http(srv, "GET", "/metrics")[0] == 200
    srv.stop()
    with pytest.raises(OSError):
        _http(srv, "GET", "/metrics")


@pytest.mark.parametrize(
    "text, root, targets",
    [
        ("info", logging.INFO, {}),
        ("WARN", logging.WARNING, {}),
        ("trace", logging.DEBUG, {}),
        ("off", obs.OFF, {}),
        ("warn,shotover_gevent=debug", logging.WARNING, {"shotover_gevent": logging.DEBUG}),
        ("shotover_proxy=error", None, {"shotover_gevent": logging.ERROR}),
        (
            "info, shotover::connection_span=debug",
            logging.INFO,
            {"shotover_gevent.connection_span": logging.DEBUG},
        ),
        ("other.lib=error,debug", logging.DEBUG, {"other.lib": logging.ERROR}),
        ("shotover::codec", None, {"shotover_gevent.codec": logging.DEBUG}),
        ("shotover[conn{id=1}]=info", None, {"shotover_gevent": logging.INFO}),
    ],
)
def test_parse_log_filter(text, root, targets):
    assert obs.parse_log_filter(text) == (root, targets)


@pytest.mark.parametrize("text", ["", " , ", "verbose", "shotover=", "x=1=2", "shotover=chatty"])
def test_parse_log_filter_rejects(text):
    with pytest.raises(ValueError):
        obs.parse_log_filter(text)


def test_set_log_filter_other_target():
    obs.set_log_filter("other.lib=error")
    assert logging.getLogger("other.lib").level == logging.ERROR


def test_json_log_format(capfd):
    obs.setup_logging("info", "json")
    logger = logging.getLogger("shotover_gevent.source")
    logger.debug("hidden")
    logger.info("hello %s", "world")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    err = capfd.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert [r["message"] for r in records] == ["hello world", "failed"]
    first, second = records
    assert first["level"] == "INFO"
    assert first["logger"] == "shotover_gevent.source"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert "exc_info" not in first
    assert second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["exc_info"]


def test_human_log_format(capfd):
    obs.setup_logging("warn,shotover=debug")
    obs.setup_logging("warn,shotover=debug")  # a second call replaces the handler
    logging.getLogger("shotover_gevent.source").debug("listening on %d", 6379)
    logging.getLogger("elsewhere").info("hidden")
    logging.getLogger("elsewhere").warning("careful")
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z DEBUG shotover_gevent\.source: listening on 6379",
        lines[0],
    )
    assert lines[1].endswith(" WARN elsewhere: careful")


def test_setup_logging_rejects_bad_input():
    with pytest.raises(ValueError):
        obs.setup_logging("info", "xml")
    with pytest.raises(ValueError):
        obs.setup_logging("loud")


# ---- who may change the filter, where the endpoint listens, how long a request may take ------

TOKEN = "dGVzdC10b2tlbi1mb3ItdGhlLWZpbHRlcg"


def _in_thread(function):
    """Run a blocking function in a real thread while the hub serves; return its result."""
    return gevent.get_hub().threadpool.spawn(function).get(timeout=20)


def _wait_in_hub(predicate, timeout, what):
    """Poll `predicate` from the hub (the servers under test need it to run) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        gevent.sleep(0.02)


def test_filter_needs_the_bearer_token_when_given_one():
    srv = obs.start_observability_server(("127.0.0.1", 0), token=TOKEN)
    try:
        logging.getLogger().setLevel(logging.WARNING)
        assert _http(srv, "GET", "/metrics")[0] == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            status, _, body = _http(srv, "PUT", "/filter", b"debug", headers)
            assert status == 401, headers
            assert "observability_token" in body
        assert logging.getLogger().level == logging.WARNING
        status, _, body = _http(srv, "PUT", "/filter", b"debug",
                                {"Authorization": f"Bearer {TOKEN}"})
        assert (status, body) == (200, "ok")
        assert logging.getLogger().level == logging.DEBUG
    finally:
        srv.stop()


@pytest.fixture
def socket_path():
    directory = tempfile.mkdtemp(prefix="sgo")  # Unix socket paths are short
    yield os.path.join(directory, "sub", "metrics.sock")
    shutil.rmtree(directory, ignore_errors=True)


def _unix_get(path):
    def call():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return data
                data += chunk

    return _in_thread(call)


def test_unix_socket_server_serves_and_removes_its_file(socket_path):
    srv = obs.start_observability_server(socket_path)
    try:
        assert srv.address == socket_path
        assert srv.metrics_location.startswith(f"unix:{socket_path}")
        mode = os.stat(socket_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o700
        assert _unix_get(socket_path).startswith(b"HTTP/1.1 200 ")
    finally:
        srv.stop()
    assert not os.path.exists(socket_path)


def test_unix_socket_server_leaves_other_files_alone(socket_path):
    os.makedirs(os.path.dirname(socket_path))
    with open(socket_path, "w") as handle:
        handle.write("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        obs.start_observability_server(socket_path)
    with open(socket_path) as handle:
        assert handle.read() == "not a socket"


def test_unix_socket_server_does_not_take_a_path_in_use(socket_path):
    os.makedirs(os.path.dirname(socket_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(socket_path)
        other.listen(1)
        with pytest.raises(OSError, match="a running process listens there"):
            obs.start_observability_server(socket_path)
        assert os.path.exists(socket_path)


def test_inherited_unix_listener_elsewhere_is_replaced(socket_path):
    from gevent import socket as gevent_socket

    os.makedirs(os.path.dirname(socket_path))
    elsewhere = socket_path + ".old"
    inherited = gevent_socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inherited.bind(elsewhere)
    inherited.listen(1)
    srv = obs.start_observability_server(socket_path, listener=inherited)
    try:
        assert srv.address == socket_path
        assert inherited.fileno() == -1  # closed
        assert _unix_get(socket_path).startswith(b"HTTP/1.1 200 ")
    finally:
        srv.stop()


def test_idle_kept_alive_connection_is_closed(server, monkeypatch):
    monkeypatch.setattr(obs, "REQUEST_DEADLINE_SECONDS", 0.5)

    def call():
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while True:  # the answer, then the close (no Connection: close was asked for)
                chunk = sock.recv(65536)
                if not chunk:
                    return data
                data += chunk

    assert _in_thread(call).startswith(b"HTTP/1.1 200 ")


def test_client_that_does_not_read_its_answers_is_closed(server, monkeypatch):
    monkeypatch.setattr(obs, "REQUEST_DEADLINE_SECONDS", 0.5)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    try:
        # Pipelined scrapes whose answers are never read: the proxy's writes soon block.
        _in_thread(lambda: client.connect(server.address))
        _in_thread(lambda: client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000))
        pool = server.server.pool
        _wait_in_hub(lambda: len(pool) == 1, 10, "the connection to be served")
        _wait_in_hub(lambda: len(pool) == 0, 10, "the connection to be closed")
    finally:
        client.close()
