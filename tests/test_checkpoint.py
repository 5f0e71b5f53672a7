"""Tests for the checkpoint file format and the inspect_checkpoint tool."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest

from shotover_gevent.handover import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "inspect_checkpoint.py"
PASSWORD = "hunter2-Zq81-not-in-output"
ALL_BYTES = bytes(range(256))


def make_checkpoint(**overrides) -> ckpt.Checkpoint:
    fields = {
        "written_by": "0.1.0",
        "created_ns": time.time_ns() - 2_500_000_000,
        "pid": 4242,
        "generation": 3,
        "argv": ["/usr/bin/python3", "-m", "shotover_gevent", "--config", "/etc/shötover.yaml"],
        "python": "/usr/bin/python3",
        "config_sha256": hashlib.sha256(b"config").hexdigest(),
        "listeners": [
            ckpt.ListenerRecord(fd=3, source="redis_main", address="127.0.0.1:6379"),
            ckpt.ListenerRecord(fd=4, source="redis_tls", address="[::1]:6380"),
        ],
        "connections": [
            ckpt.ConnectionRecord(
                fd=7,
                source="redis_main",
                peer="10.1.2.3:51234",
                unread=b"*1\r\n$4\r\nPING\r\n" + ALL_BYTES,
                session={
                    "db": 2,
                    "resp": 3,
                    "client_name": b"worker-\xff",
                    "auth": {"username": "alice", "password": PASSWORD},
                    "readonly": False,
                    "subscriptions": {
                        "channels": [b"news"],
                        "patterns": [b"n*"],
                        "shard_channels": [],
                    },
                    "note": "ünïcødé ✓",
                },
            ),
            ckpt.ConnectionRecord(
                fd=8, source="redis_tls", peer="[::1]:40000", unread=b"", session={}
            ),
        ],
        "control": {"fd": 5},
        "drain": {"ms": 120, "closed": 2, "closed_reasons": {"idle": 1, "timeout": 1}},
        "rollback": False,
        "guardian": {"deadline_ns": 123, "anything": [1, "two"]},
    }
    fields.update(overrides)
    return ckpt.Checkpoint(**fields)


def envelope(body: dict, **changes) -> bytes:
    """Hand-build an envelope around `body`, with a correct checksum unless overridden."""
    body_bytes = cbor2.dumps(body)
    env = {
        "magic": ckpt.MAGIC,
        "format": ckpt.FORMAT,
        "sha256": hashlib.sha256(body_bytes).digest(),
        "body": body_bytes,
    }
    env.update(changes)
    return cbor2.dumps(env)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        check=False,
        text=True,
        cwd=str(REPO),
        timeout=60,
    )


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_full_checkpoint():
    cp = make_checkpoint()
    back = ckpt.decode(ckpt.encode(cp))
    assert back == cp
    assert back.connections[0].unread.endswith(ALL_BYTES)
    assert back.connections[0].session["client_name"] == b"worker-\xff"
    assert back.connections[0].session["note"] == "ünïcødé ✓"
    assert back.argv[-1] == "/etc/shötover.yaml"
    assert back.control == {"fd": 5}
    assert back.fds() == [3, 4, 7, 8, 5]


def test_round_trip_large_unread(tmp_path):
    big = os.urandom(1024 * 1024)
    cp = make_checkpoint(
        connections=[ckpt.ConnectionRecord(fd=9, source="s", peer="p:1", unread=big, session={})]
    )
    path = tmp_path / "cp" / "big.cbor"
    ckpt.write(str(path), cp)
    back = ckpt.read(str(path))
    assert back.connections[0].unread == big
    assert path.stat().st_size > len(big)


def test_defaults_round_trip():
    cp = ckpt.Checkpoint(
        written_by="0.1.0",
        created_ns=1,
        pid=1,
        generation=0,
        argv=[],
        python="python3",
        config_sha256="",
        listeners=[],
        connections=[],
    )
    back = ckpt.decode(ckpt.encode(cp))
    assert back == cp
    assert back.control is None and back.drain == {} and back.rollback is False
    assert back.guardian is None


def test_envelope_layout():
    data = ckpt.encode(make_checkpoint())
    env = cbor2.loads(data)
    assert list(env) == ["magic", "format", "sha256", "body"]
    assert env["magic"] == "shotover-g/checkpoint"
    assert env["format"] == ckpt.FORMAT == 2
    assert env["sha256"] == hashlib.sha256(env["body"]).digest()
    body = cbor2.loads(env["body"])
    assert body["rollback"] is False
    assert body["connections"][0]["peer"] == "10.1.2.3:51234"


def test_encode_refuses_invalid_record():
    cp = make_checkpoint(
        listeners=[ckpt.ListenerRecord(fd="3", source="s", address="a")]  # type: ignore[arg-type]
    )
    with pytest.raises(ckpt.CheckpointError, match=r"listeners\[0\]\.fd"):
        ckpt.encode(cp)


def test_encode_refuses_duplicate_fds():
    cp = make_checkpoint(control={"fd": 3})
    with pytest.raises(ckpt.CheckpointError, match="fd 3"):
        ckpt.encode(cp)


# --- write / read ---------------------------------------------------------------------------


def test_write_creates_private_file_in_private_dir(tmp_path):
    directory = tmp_path / "nested" / "shotover-g"
    path = directory / "cp.cbor"
    ckpt.write(str(path), make_checkpoint())
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ckpt.read(str(path)) == make_checkpoint(created_ns=ckpt.read(str(path)).created_ns)


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "cp.cbor"
    ckpt.write(str(path), make_checkpoint(pid=1))
    before = path.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        ckpt.write(str(path), make_checkpoint(pid=2))
    assert path.read_bytes() == before
    assert ckpt.read(str(path)).pid == 1


def test_write_refuses_world_writable_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ckpt.CheckpointError, match="writable"):
        ckpt.write(str(shared / "cp.cbor"), make_checkpoint())
    assert not (shared / "cp.cbor").exists()


def test_write_refuses_group_writable_directory(tmp_path):
    shared = tmp_path / "group"
    shared.mkdir()
    shared.chmod(0o770)
    with pytest.raises(ckpt.CheckpointError, match="writable"):
        ckpt.write(str(shared / "cp.cbor"), make_checkpoint())


def test_read_missing_file(tmp_path):
    missing = tmp_path / "nope.cbor"
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint file") as info:
        ckpt.read(str(missing))
    assert str(missing) in str(info.value)


def test_default_directory_and_new_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert ckpt.default_directory() == str(tmp_path / "shotover-g")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert ckpt.default_directory() == f"/tmp/shotover-g-{os.getuid()}"

    paths = {ckpt.new_path(str(tmp_path)) for _ in range(200)}
    assert len(paths) == 200
    for p in paths:
        assert os.path.dirname(p) == str(tmp_path)
        assert str(os.getpid()) in os.path.basename(p)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert os.path.dirname(ckpt.new_path()) == str(tmp_path / "shotover-g")


# --- decode rejects -------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 20, 30, 60, 200, -200, -33, -1])
def test_truncated_is_damaged(cut):
    data = ckpt.encode(make_checkpoint())
    with pytest.raises(ckpt.DamagedCheckpoint):
        ckpt.decode(data[:cut])


def test_empty_is_damaged():
    with pytest.raises(ckpt.DamagedCheckpoint, match="empty"):
        ckpt.decode(b"")


def test_flipped_body_byte_fails_checksum():
    data = bytearray(ckpt.encode(make_checkpoint()))
    # Somewhere inside the unread bytes, far from the envelope framing.
    index = data.index(b"PING") + 1
    data[index] ^= 0x01
    with pytest.raises(ckpt.DamagedCheckpoint, match="checksum"):
        ckpt.decode(bytes(data))


def test_trailing_garbage_is_damaged():
    with pytest.raises(ckpt.DamagedCheckpoint, match="unexpected bytes"):
        ckpt.decode(ckpt.encode(make_checkpoint()) + b"\x00")


def test_wrong_magic_is_foreign():
    body = make_checkpoint().to_body()
    with pytest.raises(ckpt.ForeignFile, match="magic"):
        ckpt.decode(envelope(body, magic="something-else/checkpoint"))
    no_magic = cbor2.dumps({"format": 1, "body": b""})
    with pytest.raises(ckpt.ForeignFile, match="no magic"):
        ckpt.decode(no_magic)


def test_random_file_is_rejected():
    noise = b"\xff\xfe random text that is not CBOR \x00\x01" + os.urandom(64)
    with pytest.raises(ckpt.ForeignFile):
        ckpt.decode(noise)
    with pytest.raises(ckpt.ForeignFile):
        ckpt.decode(b"#!/bin/sh\necho hello\n")
    # Valid CBOR that is not a map is just as foreign.
    with pytest.raises(ckpt.ForeignFile):
        ckpt.decode(cbor2.dumps([1, 2, 3]))


def test_newer_format_refused_with_both_numbers():
    body = make_checkpoint().to_body()
    with pytest.raises(ckpt.NewerFormat) as info:
        ckpt.decode(envelope(body, format=3))
    message = str(info.value)
    assert "format 3" in message and "format 2" in message
    assert "\n" not in message
    # Refused before the checksum is even looked at.
    with pytest.raises(ckpt.NewerFormat):
        ckpt.decode(envelope(body, format=7, sha256=b"x" * 32))


def test_unknown_older_format_is_damaged():
    with pytest.raises(ckpt.DamagedCheckpoint, match="format 0"):
        ckpt.decode(envelope(make_checkpoint().to_body(), format=0))


@pytest.mark.parametrize("key", ckpt.BODY_KEYS)
def test_missing_body_key_is_damaged(key):
    body = make_checkpoint().to_body()
    del body[key]
    with pytest.raises(ckpt.DamagedCheckpoint, match=repr(key)):
        ckpt.decode(envelope(body))


@pytest.mark.parametrize(
    "path, bad, named",
    [
        (("pid",), "4242", "pid"),
        (("generation",), True, "generation"),
        (("argv",), "python -m x", "argv"),
        (("rollback",), 0, "rollback"),
        (("listeners", 1, "fd"), 4.0, r"listeners\[1\]\.fd"),
        (("connections", 0, "unread"), "text, not bytes", r"connections\[0\]\.unread"),
        (("connections", 1, "session"), [], r"connections\[1\]\.session"),
        (("control",), 5, "control"),
        (("drain", "closed_reasons"), [], "drain.closed_reasons"),
        (("guardian",), "opaque", "guardian"),
    ],
)
def test_wrong_type_is_damaged_and_named(path, bad, named):
    body = make_checkpoint().to_body()
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = bad
    with pytest.raises(ckpt.DamagedCheckpoint, match=named):
        ckpt.decode(envelope(body))


_DELETE = object()


@pytest.mark.parametrize(
    "index, key, bad, message",
    [
        (1, "fd", True, "connections[1].fd: expected int, got bool"),
        (1, "fd", -1, "connections[1].fd: expected a non-negative integer, got -1"),
        (0, "fd", _DELETE, "connections[0]: missing required key 'fd'"),
        (1, "peer", _DELETE, "connections[1]: missing required key 'peer'"),
        (1, "source", None, "connections[1].source: expected str, got None"),
        (1, None, ["not", "a", "map"], "connections[1]: expected dict, got list"),
        (0, "upstream", [], "connections[0].upstream: expected dict, got list"),
        (0, ("upstream", "fd"), _DELETE, "connections[0].upstream: missing required key 'fd'"),
        (0, ("upstream", "fd"), False, "connections[0].upstream.fd: expected int, got bool"),
        (0, ("upstream", "fd"), -3, "connections[0].upstream.fd: expected a non-negative integer, got -3"),
        (0, ("upstream", "address"), b"a:1", "connections[0].upstream.address: expected str, got bytes"),
    ],
)
def test_bad_connection_field_gives_the_precise_message(index, key, bad, message):
    # Connection records are checked by an inlined fast path; whatever it rejects must still
    # be reported exactly as ConnectionRecord.from_body words it.
    body = make_checkpoint().to_body()
    body["connections"][0]["upstream"] = {"fd": 11, "sink": "s", "address": "a:1", "state": {}}
    if key is None:
        body["connections"][index] = bad
    else:
        target = body["connections"][index]
        if isinstance(key, tuple):
            target, key = target[key[0]], key[1]
        if bad is _DELETE:
            del target[key]
        else:
            target[key] = bad
    with pytest.raises(ckpt.DamagedCheckpoint) as info:
        ckpt.decode(envelope(body))
    assert str(info.value) == message


def test_subclasses_of_the_expected_types_are_still_accepted():
    # The fast path wants exact types; anything else falls back to the full checks, which
    # accept subclasses (as encode's validation of records built by the caller needs).
    class Fd(int):
        pass

    class Session(dict):
        pass

    body = make_checkpoint().to_body()
    body["connections"][1].update(fd=Fd(8), session=Session(db=1))
    cp = ckpt.Checkpoint.from_body(body)
    assert cp.connections[1].fd == 8 and type(cp.connections[1].fd) is Fd
    assert cp.connections[1].session == {"db": 1}


def test_duplicate_connection_fd_is_named():
    body = make_checkpoint().to_body()
    body["connections"][1]["upstream"] = {"fd": 7, "address": "a:1"}
    with pytest.raises(ckpt.DamagedCheckpoint) as info:
        ckpt.decode(envelope(body))
    assert str(info.value) == "fd 7 is listed more than once"


def test_missing_envelope_checksum_is_damaged():
    data = cbor2.dumps({"magic": ckpt.MAGIC, "format": 1, "body": b""})
    with pytest.raises(ckpt.DamagedCheckpoint, match="sha256"):
        ckpt.decode(data)


def test_unknown_keys_are_ignored():
    cp = make_checkpoint()
    body = cp.to_body()
    body["added_in_a_later_release"] = {"x": [1, 2]}
    body["listeners"][0]["backlog"] = 511
    body["connections"][0]["tls"] = True
    body["control"]["kind"] = "unix"
    back = ckpt.decode(envelope(body, extra_envelope_key="ignored"))
    assert back.listeners == cp.listeners
    assert back.connections[0].unread == cp.connections[0].unread
    assert back.pid == cp.pid


# --- redaction ------------------------------------------------------------------------------


def test_redact_session_hides_password_keeps_username():
    session = make_checkpoint().connections[0].session
    redacted = ckpt.redact_session(session)
    assert redacted["auth"] == {"username": "alice", "password": "<redacted>"}
    assert session["auth"]["password"] == PASSWORD  # original untouched
    assert redacted["db"] == 2 and redacted["client_name"] == b"worker-\xff"
    assert "auth" in ckpt.SECRET_SESSION_KEYS
    assert ckpt.redact_session({"auth": None}) == {"auth": None}
    assert ckpt.redact_session({"auth": ["alice", PASSWORD]}) == {"auth": "<redacted>"}


# --- inspect tool ---------------------------------------------------------------------------


@pytest.fixture
def written(tmp_path) -> Path:
    path = tmp_path / "run" / "cp.cbor"
    ckpt.write(str(path), make_checkpoint())
    return path


def test_tool_human_output(written):
    result = run_tool(str(written))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "10.1.2.3:51234" in out
    assert "redis_main" in out and "127.0.0.1:6379" in out
    unread_len = len(b"*1\r\n$4\r\nPING\r\n" + ALL_BYTES)
    assert f"{unread_len} bytes" in out
    assert "b'*1\\r\\n$4\\r\\nPING\\r\\n" in out
    assert "<redacted>" in out and "alice" in out
    assert PASSWORD not in out
    assert "generation   3" in out
    assert "4242" in out
    assert "idle: 1" in out


def test_tool_show_secrets(written):
    result = run_tool(str(written), "--show-secrets")
    assert result.returncode == 0, result.stderr
    assert PASSWORD in result.stdout
    assert "<redacted>" not in result.stdout


def test_tool_json(written):
    result = run_tool(str(written), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == ckpt.FORMAT
    assert doc["pid"] == 4242
    assert [c["peer"] for c in doc["connections"]] == ["10.1.2.3:51234", "[::1]:40000"]
    first = doc["connections"][0]
    assert first["unread"].encode("latin-1") == b"*1\r\n$4\r\nPING\r\n" + ALL_BYTES
    assert first["unread_bytes"] == 14 + 256
    assert first["session"]["auth"]["password"] == "<redacted>"
    assert PASSWORD not in result.stdout
    assert [item["fd"] for item in doc["listeners"]] == [3, 4]
    shown = json.loads(run_tool(str(written), "--json", "--show-secrets").stdout)
    assert shown["connections"][0]["session"]["auth"]["password"] == PASSWORD


def _assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inspect_checkpoint: ")
    for word in words:
        assert word in lines[0]


def test_tool_damaged_file(written):
    data = bytearray(written.read_bytes())
    data[data.index(b"PING")] ^= 0x20
    damaged = written.parent / "damaged.cbor"
    damaged.write_bytes(bytes(data))
    _assert_one_line_failure(run_tool(str(damaged)), "checksum")
    truncated = written.parent / "truncated.cbor"
    truncated.write_bytes(written.read_bytes()[:100])
    _assert_one_line_failure(run_tool(str(truncated)), "truncated")


def test_tool_foreign_file(tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_bytes(b"\xffthis is just some text\n" * 10)
    _assert_one_line_failure(run_tool(str(foreign)), "not a shotover-g checkpoint")
    _assert_one_line_failure(run_tool(str(tmp_path / "missing.cbor")), "missing.cbor")


def test_tool_newer_format(tmp_path):
    newer = tmp_path / "newer.cbor"
    newer.write_bytes(envelope(make_checkpoint().to_body(), format=3))
    _assert_one_line_failure(run_tool(str(newer)), "format 3", "format 2")


def test_tool_usage_error():
    result = run_tool()
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()


def test_write_refuses_parent_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint directory"):
        ckpt.write(str(blocker / "cp.cbor"), make_checkpoint())


# ---- format 2: connections in any state, in a sealed memory file --------------------------------

def test_format_1_is_migrated():
    """A checkpoint from a version that wrote format 1 (idle upstream state nested under
    "state", messages owed under "deliver") is read as format 2."""
    body = make_checkpoint().to_body()
    body["connections"][0]["upstream"] = {
        "fd": 11, "sink": "RedisSinkSingle", "address": "127.0.0.1:6379",
        "state": {"resp_version": 3, "reply_off": False, "skip_next": False, "push": True,
                  "subscriptions": {"channels": [b"news"]}, "buffered": b"*3\r\n$7"},
        "deliver": b">3\r\n$7\r\nmessage\r\n"}
    cp = ckpt.decode(envelope(body, format=1))
    upstream = cp.connections[0].upstream
    assert (upstream.fd, upstream.resp_version, upstream.push) == (11, 3, True)
    assert upstream.subscriptions == {"channels": [b"news"]}
    assert upstream.buffered == b"*3\r\n$7" and upstream.inflight is None
    assert cp.connections[0].output == b">3\r\n$7\r\nmessage\r\n"


def test_in_flight_records_round_trip_and_are_checked():
    cp = make_checkpoint()
    cp.connections[0].upstream = ckpt.UpstreamRecord(
        12, "RedisSinkSingle", "127.0.0.1:6379", multi=[b"*1\r\n$4\r\nPING\r\n"],
        monitor=True, held=[b"+123.4 [0 1.2.3.4:5] \"get\"\r\n"],
        inflight=ckpt.InflightRecord([b"*2\r\n$5\r\nBLPOP\r\n", b"*1\r\n$4\r\nEXEC\r\n"],
                                     [b"$1\r\nx\r\n"],
                                     {"count": 3, "effect": "_exec", "frames": [b"*2\r\n"],
                                      "prefix": b""}, unsent=b"$4\r\n"))
    cp.connections[0].output = b"+OK\r\n"
    again = ckpt.decode(ckpt.encode(cp))
    assert again.connections[0] == cp.connections[0]
    body = cp.to_body()
    body["connections"][0]["upstream"]["inflight"]["current"]["effect"] = "__init__"
    with pytest.raises(ckpt.DamagedCheckpoint, match="unknown effect"):
        ckpt.decode(envelope(body))
    body = cp.to_body()
    body["connections"][0]["upstream"]["inflight"]["replies"] *= 3
    with pytest.raises(ckpt.DamagedCheckpoint, match="more replies than requests"):
        ckpt.decode(envelope(body))


def test_memfd_is_sealed_and_verified(tmp_path):
    import fcntl

    fd = ckpt.to_memfd(make_checkpoint())
    try:
        assert ckpt.read_fd(fd).pid == make_checkpoint().pid
        with pytest.raises(OSError):
            os.write(fd, b"x")  # sealed: nobody can change it
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        kept = tmp_path / "kept.cbor"
        ckpt.copy_to_file(fd, str(kept))
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert ckpt.read(str(kept)).pid == make_checkpoint().pid
        with pytest.raises(ckpt.CheckpointError, match="already exists"):
            ckpt.copy_to_file(fd, str(kept))
        # A symbolic link planted at the path is not followed.
        target = tmp_path / "elsewhere"
        link = tmp_path / "link.cbor"
        link.symlink_to(target)
        with pytest.raises(ckpt.CheckpointError):
            ckpt.copy_to_file(fd, str(link))
        assert not target.exists()
    finally:
        os.close(fd)
    unsealed = os.memfd_create("not-sealed")
    try:
        os.write(unsealed, ckpt.encode(make_checkpoint()))
        with pytest.raises(ckpt.CheckpointError, match="not sealed"):
            ckpt.read_fd(unsealed)
    finally:
        os.close(unsealed)
