"""Configuration loading and validation, directly and through `shotover_gevent check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT
from shotover_gevent import config as cfg

CONF = REPO_ROOT / "conf"
EXAMPLES = sorted((CONF / "examples").glob("*.yaml")) if (CONF / "examples").is_dir() else []


def run_check(config_path, topology_path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "shotover_gevent", "check", "-c", str(config_path),
         "-t", str(topology_path)],
        capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO_ROOT))


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def sink(address="127.0.0.1:6379"):
    return {"RedisSinkSingle": {"remote_address": address, "connect_timeout_ms": 3000}}


def source(name, listen_addr, chain, kind="Redis", **options):
    body = {"name": name, "listen_addr": listen_addr, **options, "chain": chain}
    return {kind: body}


GOOD_CONFIG = {"main_log_level": "info", "observability_interface": "127.0.0.1:9001"}


# ---- valid files -------------------------------------------------------------------------------

def test_default_files_are_valid():
    config_path, topology_path = CONF / "config.yaml", CONF / "topology.yaml"
    assert config_path.is_file() and topology_path.is_file(), "conf/ must ship default files"
    config, topology = cfg.load(str(config_path), str(topology_path))
    assert config.main_log_level == "info"
    assert config.observability_interface == ("127.0.0.1", 9001)
    assert [s.name for s in topology.sources] == ["redis"]
    only = topology.sources[0]
    assert only.listen_addr == ("127.0.0.1", 6380)
    assert only.chain[-1].type_name == "RedisSinkSingle"
    assert only.chain[-1].settings.remote_address == ("127.0.0.1", 6379)
    result = run_check(config_path, topology_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _example_pair(path: Path):
    """An example file is a topology (it has `sources`) checked with the default config, or
    a config checked with the default topology."""
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "sources" in data:
        return CONF / "config.yaml", path
    return path, CONF / "topology.yaml"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(example):
    config_path, topology_path = _example_pair(example)
    cfg.load(str(config_path), str(topology_path))
    result = run_check(config_path, topology_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_topology_loads_with_every_option(tmp_path):
    topology = {"sources": [
        source("main", "127.0.0.1:6380", [
            {"QueryCounter": {"name": "main"}},
            {"QueryTypeFilter": {"DenyList": ["Write"]}},
            "DebugPrinter",
            sink(),
        ], connection_limit=10, hard_connection_limit=True, timeout=30),
        source("other", "127.0.0.1:6381", ["NullSink"]),
        source("fixed", "[::1]:6382", [{"DebugReturner": {"Redis": "42"}}]),
        source("failing", "127.0.0.1:6383", [{"DebugReturner": "Fail"}]),
    ]}
    config, loaded = cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)),
                              str(write(tmp_path / "topology.yaml", topology)))
    main, other, fixed, failing = loaded.sources
    assert (main.connection_limit, main.hard_connection_limit, main.timeout) == (10, True, 30)
    assert [t.type_name for t in main.chain] == ["QueryCounter", "QueryTypeFilter",
                                                 "DebugPrinter", "RedisSinkSingle"]
    assert [t.terminating for t in main.chain] == [False, False, False, True]
    assert (other.connection_limit, other.hard_connection_limit, other.timeout) == \
        (512, False, None)
    assert fixed.listen_addr == ("::1", 6382)
    assert failing.chain[0].type_name == "DebugReturner"
    result = run_check(tmp_path / "config.yaml", tmp_path / "topology.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_valkey_spellings_load(tmp_path):
    topology = {"sources": [source("vk", "127.0.0.1:6390", [
        {"ValkeySinkSingle": {"remote_address": "127.0.0.1:6379"}}], kind="Valkey")]}
    _, loaded = cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)),
                         str(write(tmp_path / "topology.yaml", topology)))
    assert loaded.sources[0].kind == "Redis"
    assert loaded.sources[0].chain[0].type_name == "RedisSinkSingle"
    assert loaded.sources[0].chain[0].settings.remote_address == ("127.0.0.1", 6379)
    result = run_check(tmp_path / "config.yaml", tmp_path / "topology.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_empty_config_file_means_defaults(tmp_path):
    topology = {"sources": [source("r", "127.0.0.1:6380", [sink()])]}
    config, _ = cfg.load(str(write(tmp_path / "config.yaml", "")),
                         str(write(tmp_path / "topology.yaml", topology)))
    assert config.main_log_level == "info"
    assert config.observability_interface is None


# ---- every problem, all at once ----------------------------------------------------------------

BAD_TOPOLOGY = {"sources": [
    # 0: unknown key at source level and inside a transform
    source("zero", "127.0.0.1:7000", [{"RedisSinkSingle": {
        "remote_address": "127.0.0.1:6379", "bogus_setting": 1}}], colour="blue"),
    # 1: bad address and an empty chain
    source("dup", "localhost", []),
    # 2: port out of range, duplicate source name, sink not last, last not a sink
    source("dup", "1.2.3.4:99999", [sink(), {"QueryCounter": {"name": "c"}}]),
    # 3: empty host and port, unknown transform
    source("three", ":", ["DebugPrinter", {"NoSuchTransform": {}}, "NullSink"]),
    # 4: two transforms with the same name
    source("four", "127.0.0.1:7004", [
        {"QueryTypeFilter": {"name": "f", "DenyList": ["Write"]}},
        {"QueryTypeFilter": {"name": "f", "AllowList": ["Read"]}},
        "NullSink"]),
    # 5: unknown source type
    {"Cassandra": {"name": "five", "listen_addr": "127.0.0.1:7005", "chain": ["NullSink"]}},
    # 6: wrong type for connection_limit
    source("six", "127.0.0.1:7006", ["NullSink"], connection_limit="many"),
]}

# Key path each problem must name, and a word its message must contain.
EXPECTED_TOPOLOGY_PROBLEMS = [
    ("sources[0].Redis.colour", "unknown"),
    ("sources[0].Redis.chain[0].RedisSinkSingle.bogus_setting", "unknown"),
    ("sources[1].Redis.listen_addr", "localhost"),
    ("sources[1].Redis.chain", "empty"),
    ("sources[2].Redis.listen_addr", "99999"),
    ("sources[2].Redis.name", "duplicate"),
    ("sources[2].Redis.chain[0].RedisSinkSingle", "last"),
    ("sources[2].Redis.chain[1].QueryCounter", "terminating"),
    ("sources[3].Redis.listen_addr", "':'"),
    ("sources[3].Redis.chain[1]", "NoSuchTransform"),
    ("sources[4].Redis.chain[1].QueryTypeFilter.name", "duplicate"),
    ("sources[5]", "Cassandra"),
    ("sources[6].Redis.connection_limit", "integer"),
]


def _find(problems, path_fragment, word):
    found = [p for p in problems if path_fragment + ":" in p and word in p]
    assert found, f"no problem for {path_fragment} mentioning {word!r} among:\n" + \
        "\n".join(problems)
    return found


def test_every_problem_is_reported_at_once(tmp_path):
    config_path = write(tmp_path / "config.yaml", "main_log_level: [unclosed\n")
    topology_path = write(tmp_path / "topology.yaml", BAD_TOPOLOGY)
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(config_path), str(topology_path))
    problems = caught.value.problems
    for path_fragment, word in EXPECTED_TOPOLOGY_PROBLEMS:
        _find(problems, f"{topology_path}: {path_fragment}", word)
    assert any(p.startswith(f"{config_path}: ") and "YAML" in p for p in problems), problems
    for problem in problems:
        assert problem.startswith((f"{config_path}: ", f"{topology_path}: ")), problem

    result = run_check(config_path, topology_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    for path_fragment, word in EXPECTED_TOPOLOGY_PROBLEMS:
        _find(output.splitlines(), f"topology.yaml: {path_fragment}", word)
    assert "config.yaml" in output and "YAML" in output
    assert "Traceback" not in output


def test_missing_file_and_invalid_yaml_together(tmp_path):
    missing = tmp_path / "no-such-config.yaml"
    topology_path = write(tmp_path / "topology.yaml", "sources:\n  - Redis: {name: [\n")
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(missing), str(topology_path))
    problems = caught.value.problems
    assert any(p.startswith(str(missing)) for p in problems), problems
    assert any(p.startswith(str(topology_path)) and "line" in p for p in problems), problems

    result = run_check(missing, topology_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "no-such-config.yaml" in output and "topology.yaml" in output
    assert "Traceback" not in output


def test_config_file_problems(tmp_path):
    config_path = write(tmp_path / "config.yaml", {
        "main_log_level": "loud",
        "observability_interface": "127.0.0.1:http",
        "colour": "blue",
    })
    topology_path = write(tmp_path / "topology.yaml",
                          {"sources": [source("r", "127.0.0.1:6380", [sink()])]})
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(config_path), str(topology_path))
    _find(caught.value.problems, f"{config_path}: colour", "unknown")

    # With the unknown key gone, the value problems are reported too.
    write(config_path, {"main_log_level": "loud", "observability_interface": "127.0.0.1:http"})
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(config_path), str(topology_path))
    _find(caught.value.problems, f"{config_path}: main_log_level", "loud")
    _find(caught.value.problems, f"{config_path}: observability_interface", "127.0.0.1:http")
    result = run_check(config_path, topology_path)
    assert result.returncode == 1
    assert "main_log_level" in result.stdout + result.stderr


@pytest.mark.parametrize("bad_address", ["localhost", "1.2.3.4:99999", ":", "127.0.0.1:",
                                         "127.0.0.1:-1", "[::1:6379", 6379])
def test_bad_listen_addresses(tmp_path, bad_address):
    topology_path = write(tmp_path / "topology.yaml",
                          {"sources": [source("r", bad_address, [sink()])]})
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)), str(topology_path))
    _find(caught.value.problems, f"{topology_path}: sources[0].Redis.listen_addr", "address")


@pytest.mark.parametrize("chain, path_fragment, word", [
    ([{"RedisSinkSingle": {}}], "chain[0].RedisSinkSingle.remote_address", "missing"),
    ([{"RedisSinkSingle": {"remote_address": "nowhere"}}],
     "chain[0].RedisSinkSingle.remote_address", "nowhere"),
    ([{"RedisSinkSingle": {"remote_address": "127.0.0.1:6379", "connect_timeout_ms": 0}}],
     "chain[0].RedisSinkSingle.connect_timeout_ms", "positive"),
    ([{"QueryTypeFilter": {"DenyList": ["Sideways"]}}, "NullSink"],
     "chain[0].QueryTypeFilter.DenyList", "Sideways"),
    ([{"QueryTypeFilter": {}}, "NullSink"], "chain[0].QueryTypeFilter", "DenyList"),
    ([{"DebugReturner": {"Kafka": "x"}}], "chain[0].DebugReturner", "Fail"),
    ([{"NullSink": {"x": 1}}], "chain[0].NullSink", "settings"),
    (["QueryCounter"], "chain[0].QueryCounter", "terminating"),
    ([{"RedisSinkSingle": {"remote_address": "127.0.0.1:6379", "shared_connections": -1}}],
     "chain[0].RedisSinkSingle.shared_connections", "0 (none)"),
    ([{"RedisSinkSingle": {"remote_address": "127.0.0.1:6379", "shared_connections": 2,
                           "tls": {"verify_hostname": False}}}],
     "chain[0].RedisSinkSingle.shared_connections", "tls"),
])
def test_transform_setting_problems(tmp_path, chain, path_fragment, word):
    topology_path = write(tmp_path / "topology.yaml",
                          {"sources": [source("r", "127.0.0.1:6380", chain)]})
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)), str(topology_path))
    _find(caught.value.problems, f"{topology_path}: sources[0].Redis.{path_fragment}", word)


def test_source_setting_problems(tmp_path):
    topology_path = write(tmp_path / "topology.yaml", {"sources": [
        source("a", "127.0.0.1:6380", ["NullSink"], connection_limit=0),
        source("b", "127.0.0.1:6380", ["NullSink"], timeout=-1),
        source("c", "127.0.0.1:6382", ["NullSink"], hard_connection_limit="yes"),
        {"Redis": {"listen_addr": "127.0.0.1:6383", "chain": ["NullSink"]}},
    ]})
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)), str(topology_path))
    problems = caught.value.problems
    where = f"{topology_path}: sources"
    _find(problems, f"{where}[0].Redis.connection_limit", "at least 1")
    _find(problems, f"{where}[1].Redis.timeout", "positive")
    _find(problems, f"{where}[1].Redis.listen_addr", "already used")
    _find(problems, f"{where}[2].Redis.hard_connection_limit", "true or false")
    _find(problems, f"{where}[3].Redis.name", "missing")


@pytest.mark.parametrize("content", [{"sources": []}, {}, "just a string\n", {"sources": "x"}])
def test_no_sources(tmp_path, content):
    topology_path = write(tmp_path / "topology.yaml", content)
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)), str(topology_path))
    assert caught.value.problems
    assert all(p.startswith(f"{topology_path}: ") for p in caught.value.problems), \
        caught.value.problems


def test_unknown_top_level_key(tmp_path):
    topology_path = write(tmp_path / "topology.yaml", {
        "sources": [source("r", "127.0.0.1:6380", ["NullSink"])], "chain_config": {}})
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(str(write(tmp_path / "config.yaml", GOOD_CONFIG)), str(topology_path))
    _find(caught.value.problems, f"{topology_path}: chain_config", "unknown")
