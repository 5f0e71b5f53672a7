"""Shared fixtures: real redis-server processes and proxy processes, always cleaned up."""

from __future__ import annotations

import itertools
import re
from typing import Any, Dict, List, Optional

import pytest

from helpers import ProxyProcess, RedisServer, free_port, passthrough_topology, stop_proxies


@pytest.fixture(scope="session")
def _shared_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-shared")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(_shared_redis):
    """A running redis-server with every database empty at the start of the test."""
    if not _shared_redis.running:  # a previous test stopped it: bring it back
        _shared_redis.start()
    with _shared_redis.client() as client:
        client.flushall()
    return _shared_redis


@pytest.fixture
def redis_factory(tmp_path):
    """Start extra redis-server processes: `redis_factory(extra_args=(), port=None)`."""
    servers: List[RedisServer] = []
    counter = itertools.count()

    def make(extra_args=(), port: Optional[int] = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{next(counter)}", port=port,
                             extra_args=extra_args)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def proxy_factory(tmp_path, redis_server):
    """Start proxies: `proxy_factory(topology_dict=None, config_dict=None, observability=False,
    log_format=None, extra_args=(), start=True)`.

    Without a topology, the proxy passes everything to `redis_server`. Each proxy still
    running at the end of the test is stopped with SIGTERM and must exit with code 0.
    """
    proxies: List[ProxyProcess] = []
    counter = itertools.count()

    def make(topology_dict: Optional[Dict[str, Any]] = None,
             config_dict: Optional[Dict[str, Any]] = None, observability: bool = False,
             log_format: Optional[str] = None, extra_args=(), start: bool = True) -> ProxyProcess:
        topology = topology_dict or passthrough_topology(redis_server.port, free_port())
        config = dict(config_dict) if config_dict is not None else {"main_log_level": "info"}
        if observability and "observability_interface" not in config:
            taken = set(re.findall(r":(\d+)\b", repr(topology)))
            for _ in range(100):  # a just-released port can be handed out again at once
                port = free_port()
                if str(port) not in taken:
                    break
            config["observability_interface"] = f"127.0.0.1:{port}"
        proxy = ProxyProcess(tmp_path / f"proxy-{next(counter)}", topology, config,
                             log_format=log_format, extra_args=extra_args)
        proxies.append(proxy)
        return proxy.start() if start else proxy

    yield make
    stop_proxies(proxies, show_logs=True)


@pytest.fixture
def proxy(proxy_factory):
    """A proxy passing every request to `redis_server`."""
    return proxy_factory()
