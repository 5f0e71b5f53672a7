"""The checkpoint file a running proxy writes just before it execs its successor:
which inherited fds to adopt (listeners, clients, control socket) and the state of each."""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import itertools
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cbor2

MAGIC = "shotover-g/checkpoint"
FORMAT = 1

# Every body key format 1 writes.  All are required on read: in particular a
# missing "rollback" must not silently default to False, or a roll-back exec
# could roll back again and loop.
BODY_KEYS = (
    "written_by",
    "created_ns",
    "pid",
    "generation",
    "argv",
    "python",
    "config_sha256",
    "listeners",
    "connections",
    "control",
    "drain",
    "rollback",
    "guardian",
)

# Session entries whose values carry credentials.  Within a dict value only the
# "password" member is secret; any other shape is hidden whole, since we cannot
# tell which part of it matters.
SECRET_SESSION_KEYS = frozenset({"auth"})
REDACTED = "<redacted>"

_SHA256_LEN = hashlib.sha256().digest_size


class CheckpointError(Exception):
    """A checkpoint could not be written or read; str() is a one-line reason."""


class DamagedCheckpoint(CheckpointError):
    """Meant to be a checkpoint, but truncated, corrupted or malformed."""


class ForeignFile(CheckpointError):
    """Not a checkpoint at all (wrong or missing magic)."""


class NewerFormat(CheckpointError):
    """Written by a newer version in a format this version cannot read."""


def _one_line(text: object) -> str:
    # Callers print these reasons as single log or stderr lines.
    return " ".join(str(text).split())


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _want(value: object, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int subclass, but True where an fd or pid belongs is a bug.
    if isinstance(value, bool) and kind is not bool:
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DamagedCheckpoint(f"{where}: expected {names}, got {_type_name(value)}")
    return value


def _want_count(value: object, where: str) -> int:
    _want(value, int, where)
    if value < 0:
        raise DamagedCheckpoint(f"{where}: expected a non-negative integer, got {value}")
    return value


def _member(mapping: dict, key: str, where: str) -> Any:
    if key not in mapping:
        raise DamagedCheckpoint(f"{where}: missing required key {key!r}")
    return mapping[key]


@dataclass
class ListenerRecord:
    fd: int
    source: str
    address: str

    def to_body(self) -> dict:
        return {"fd": self.fd, "source": self.source, "address": self.address}

    @classmethod
    def from_body(cls, item: object, where: str = "listener") -> ListenerRecord:
        _want(item, dict, where)
        return cls(
            fd=_want_count(_member(item, "fd", where), f"{where}.fd"),
            source=_want(_member(item, "source", where), str, f"{where}.source"),
            address=_want(_member(item, "address", where), str, f"{where}.address"),
        )


@dataclass
class ConnectionRecord:
    fd: int
    source: str
    peer: str
    unread: bytes
    session: dict
    #: The client's idle upstream connection, handed over with it: {"fd", "sink", "address",
    #: "state"}. Optional: absent, the new image connects afresh and replays the session.
    upstream: dict | None = None

    def to_body(self) -> dict:
        body = {
            "fd": self.fd,
            "source": self.source,
            "peer": self.peer,
            # A bytearray or memoryview would otherwise encode as something
            # other than a CBOR byte string.
            "unread": self.unread if self.unread.__class__ is bytes else bytes(self.unread),
            "session": self.session,
        }
        if self.upstream is not None:
            body["upstream"] = self.upstream
        return body

    @classmethod
    def from_body(cls, item: object, where: str = "connection") -> ConnectionRecord:
        _want(item, dict, where)
        return cls(
            fd=_want_count(_member(item, "fd", where), f"{where}.fd"),
            source=_want(_member(item, "source", where), str, f"{where}.source"),
            peer=_want(_member(item, "peer", where), str, f"{where}.peer"),
            unread=_want(_member(item, "unread", where), bytes, f"{where}.unread"),
            session=_want(_member(item, "session", where), dict, f"{where}.session"),
            upstream=_check_upstream(item.get("upstream"), f"{where}.upstream"),
        )


def _connections_from_body(items: list) -> list[ConnectionRecord]:
    """ConnectionRecord.from_body for every item, with its checks inlined for the common case.

    Thousands of records are read inside the clients' pause.  An item whose fields all have
    exactly the expected types is built directly; any other item (a wrong type, a missing key,
    or only a subclass of the expected type) goes through ConnectionRecord.from_body, which
    accepts it or names the first bad field just as it always has.
    """
    records: list[ConnectionRecord] = []
    append = records.append
    new = ConnectionRecord
    for i, item in enumerate(items):
        if item.__class__ is dict:
            try:
                fd = item["fd"]
                source = item["source"]
                peer = item["peer"]
                unread = item["unread"]
                session = item["session"]
            except KeyError:
                pass
            else:
                upstream = item.get("upstream")
                # `type(x) is int` also keeps out bool, as _want does.
                if (
                    fd.__class__ is int
                    and fd >= 0
                    and source.__class__ is str
                    and peer.__class__ is str
                    and unread.__class__ is bytes
                    and session.__class__ is dict
                    and (
                        upstream is None
                        or (
                            upstream.__class__ is dict
                            and upstream.get("fd").__class__ is int
                            and upstream["fd"] >= 0
                            and upstream.get("address").__class__ is str
                        )
                    )
                ):
                    append(new(fd, source, peer, unread, session, upstream))
                    continue
        append(ConnectionRecord.from_body(item, f"connections[{i}]"))
    return records


def _check_upstream(upstream: object, where: str) -> dict | None:
    if upstream is None:
        return None
    _want(upstream, dict, where)
    _want_count(_member(upstream, "fd", where), f"{where}.fd")
    _want(_member(upstream, "address", where), str, f"{where}.address")
    return upstream


def _check_drain(drain: object) -> dict:
    # Every member is optional (a process that never drained writes {}), but
    # those present must have the documented types.
    _want(drain, dict, "drain")
    for key in ("ms", "closed"):
        if key in drain:
            _want_count(drain[key], f"drain.{key}")
    if "closed_reasons" in drain:
        reasons = _want(drain["closed_reasons"], dict, "drain.closed_reasons")
        for reason, count in reasons.items():
            _want(reason, str, "drain.closed_reasons key")
            _want_count(count, f"drain.closed_reasons[{reason!r}]")
    return drain


def _check_control(control: object) -> dict | None:
    if control is None:
        return None
    _want(control, dict, "control")
    _want_count(_member(control, "fd", "control"), "control.fd")
    return control


@dataclass
class Checkpoint:
    written_by: str
    created_ns: int
    pid: int
    generation: int
    argv: list[str]
    python: str
    config_sha256: str
    listeners: list[ListenerRecord]
    connections: list[ConnectionRecord]
    control: dict | None = None
    drain: dict = field(default_factory=dict)
    rollback: bool = False
    #: The process watching over the handover, for people reading the file: the old version's
    #: bridge process ({"bridge_pid": N}). Opaque to readers.
    guardian: dict | None = None
    #: Optional hints for the restoring image (validated config data, timings). Absent in
    #: files from writers that predate it, so readers must cope without it.
    restore: dict = field(default_factory=dict)

    def fds(self) -> list[int]:
        """Every inherited fd the checkpoint names: listeners, connections, control."""
        found = [rec.fd for rec in self.listeners] + [rec.fd for rec in self.connections]
        found += [rec.upstream["fd"] for rec in self.connections if rec.upstream is not None]
        if self.control is not None:
            found.append(self.control["fd"])
        return found

    def to_body(self) -> dict:
        return {
            "written_by": self.written_by,
            "created_ns": self.created_ns,
            "pid": self.pid,
            "generation": self.generation,
            "argv": list(self.argv),
            "python": self.python,
            "config_sha256": self.config_sha256,
            "listeners": [rec.to_body() for rec in self.listeners],
            "connections": [rec.to_body() for rec in self.connections],
            "control": self.control,
            "drain": self.drain,
            "rollback": self.rollback,
            "guardian": self.guardian,
            "restore": self.restore,
        }

    @classmethod
    def from_body(cls, body: object) -> Checkpoint:
        """Build from a decoded body map, raising DamagedCheckpoint on any bad field."""
        _want(body, dict, "body")
        for key in BODY_KEYS:
            _member(body, key, "body")
        argv = _want(body["argv"], list, "argv")
        for i, arg in enumerate(argv):
            _want(arg, str, f"argv[{i}]")
        listeners = [
            ListenerRecord.from_body(item, f"listeners[{i}]")
            for i, item in enumerate(_want(body["listeners"], list, "listeners"))
        ]
        connections = _connections_from_body(_want(body["connections"], list, "connections"))
        cp = cls(
            written_by=_want(body["written_by"], str, "written_by"),
            created_ns=_want(body["created_ns"], int, "created_ns"),
            pid=_want_count(body["pid"], "pid"),
            generation=_want_count(body["generation"], "generation"),
            argv=list(argv),
            python=_want(body["python"], str, "python"),
            config_sha256=_want(body["config_sha256"], str, "config_sha256"),
            listeners=listeners,
            connections=connections,
            control=_check_control(body["control"]),
            drain=_check_drain(body["drain"]),
            rollback=_want(body["rollback"], bool, "rollback"),
            guardian=_want(body["guardian"], (dict, type(None)), "guardian"),
            restore=_want(body.get("restore", {}), dict, "restore"),
        )
        # Adopting one fd as two different sockets would have both wrappers
        # closing it under each other.
        fds = cp.fds()
        if len(set(fds)) != len(fds):
            seen: set[int] = set()
            for fd in fds:
                if fd in seen:
                    raise DamagedCheckpoint(f"fd {fd} is listed more than once")
                seen.add(fd)
        return cp


# Body migrations keyed by the format they read: _MIGRATIONS[n] turns a
# format-n body into a format-(n + 1) body.  Format 1 is the first, so there
# are none yet; when FORMAT becomes 2, add _MIGRATIONS[1].
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def _migrate(body: dict, found: int) -> dict:
    for step in range(found, FORMAT):
        body = _MIGRATIONS[step](body)
    return body


def encode(cp: Checkpoint, validate: bool = True) -> bytes:
    """Serialise a checkpoint into its checksummed envelope.

    `validate=False` skips re-checking the records with the reader's rules: an upgrade does
    that inside the client-visible pause, and the reader checks everything anyway.
    """
    body = cp.to_body()
    # Validate with the reader's own rules, so a bad record is reported here,
    # while the old process is still serving, rather than after exec.
    if validate:
        try:
            Checkpoint.from_body(body)
        except DamagedCheckpoint as exc:
            raise CheckpointError(f"refusing to write an invalid checkpoint: {exc}") from None
    try:
        body_bytes = cbor2.dumps(body)
    except Exception as exc:
        raise CheckpointError(f"cannot encode checkpoint: {_one_line(exc)}") from exc
    # "magic" must stay the first key: _looks_like_checkpoint recognises
    # truncated files by their opening bytes.
    return cbor2.dumps(
        {
            "magic": MAGIC,
            "format": FORMAT,
            "sha256": hashlib.sha256(body_bytes).digest(),
            "body": body_bytes,
        }
    )


# What follows the map header of every envelope encode() produces.
_OPENING = cbor2.dumps("magic") + cbor2.dumps(MAGIC)


def _looks_like_checkpoint(data: bytes) -> bool:
    # Decides whether undecodable bytes are a damaged checkpoint (for example
    # cut short) or some unrelated file: a CBOR map header followed by the
    # magic entry, or a prefix of that.
    if not data or data[0] >> 5 != 5:
        return False
    rest = data[1:]
    return rest.startswith(_OPENING) or _OPENING.startswith(rest)


def _load_one(data: bytes) -> tuple[Any, int]:
    # cbor2.loads ignores trailing bytes; the decoder's position tells us
    # whether anything followed the first item.
    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream).decode()
    return value, stream.tell()


def decode(data: bytes) -> Checkpoint:
    """Verify and parse checkpoint bytes: magic, then format, then checksum, then fields."""
    if not data:
        raise DamagedCheckpoint("checkpoint is empty")
    try:
        envelope, used = _load_one(data)
    except Exception as exc:  # noqa: BLE001
        # The bytes are untrusted, and the decoder and its tag handlers raise
        # assorted exception types; whichever it is, these bytes are not CBOR.
        if _looks_like_checkpoint(data):
            raise DamagedCheckpoint(
                f"checkpoint is truncated or corrupt: {_one_line(exc)}"
            ) from None
        raise ForeignFile("not a shotover-g checkpoint (not CBOR)") from None
    if not isinstance(envelope, dict):
        raise ForeignFile(
            f"not a shotover-g checkpoint (top-level CBOR item is {_type_name(envelope)})"
        )
    magic = envelope.get("magic")
    if magic != MAGIC:
        if magic is None:
            raise ForeignFile("not a shotover-g checkpoint (no magic)")
        raise ForeignFile(f"not a shotover-g checkpoint (magic is {_one_line(repr(magic))[:60]})")
    if used != len(data):
        raise DamagedCheckpoint(f"{len(data) - used} unexpected bytes after the checkpoint")

    found = _want(_member(envelope, "format", "envelope"), int, "format")
    if found > FORMAT:
        raise NewerFormat(
            f"checkpoint format {found} is newer than format {FORMAT}, "
            f"the newest this version reads"
        )
    if found < FORMAT and any(step not in _MIGRATIONS for step in range(found, FORMAT)):
        raise DamagedCheckpoint(f"checkpoint format {found} is not a known format")

    digest = _want(_member(envelope, "sha256", "envelope"), bytes, "sha256")
    body_bytes = _want(_member(envelope, "body", "envelope"), bytes, "body")
    if len(digest) != _SHA256_LEN:
        raise DamagedCheckpoint(f"sha256: expected {_SHA256_LEN} bytes, got {len(digest)}")
    if hashlib.sha256(body_bytes).digest() != digest:
        raise DamagedCheckpoint("checksum mismatch: the checkpoint body is corrupt")

    try:
        body, used = _load_one(body_bytes)
    except Exception as exc:  # noqa: BLE001 - same reasoning as for the envelope
        # The checksum matched, so the writer itself produced bad CBOR.
        raise DamagedCheckpoint(f"checkpoint body is not CBOR: {_one_line(exc)}") from None
    if used != len(body_bytes):
        raise DamagedCheckpoint("unexpected bytes after the checkpoint body")
    _want(body, dict, "body")
    return Checkpoint.from_body(_migrate(body, found))


def _check_directory(directory: str) -> None:
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise CheckpointError(
            f"cannot use checkpoint directory {directory}: {exc.strerror}"
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint directory {directory} is not a directory")
    # Anyone else able to write here could swap in their own checkpoint, and
    # with it choose which fds the new process adopts and with what session.
    if st.st_uid != os.geteuid():
        raise CheckpointError(
            f"checkpoint directory {directory} is owned by uid {st.st_uid}, not by us"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CheckpointError(
            f"checkpoint directory {directory} is group- or world-writable "
            f"(mode {stat.S_IMODE(st.st_mode):04o})"
        )


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot sync a directory; the file itself is synced.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def write(path: str, cp: Checkpoint | bytes) -> None:
    """Write a new checkpoint file (mode 0600); never replaces an existing file.

    `cp` may be a Checkpoint or the bytes `encode` already made of one.
    """
    data = cp if isinstance(cp, (bytes, bytearray)) else encode(cp)
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {directory}: {exc.strerror}"
            ) from exc
    _check_directory(directory)

    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CheckpointError(f"checkpoint file {path} already exists") from None
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint file {path}: {exc.strerror}") from exc
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(directory)
    except OSError as exc:
        # Leave no half-written file for a successor to trip over.
        try:
            os.unlink(path)
        except OSError:
            pass
        raise CheckpointError(f"cannot write checkpoint file {path}: {exc.strerror}") from exc


def read(path: str) -> Checkpoint:
    """Read and verify a checkpoint file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint file at {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc.strerror}") from exc
    return decode(data)


def default_directory() -> str:
    """Where checkpoints go unless configured: a per-user runtime directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "shotover-g")
    return f"/tmp/shotover-g-{os.getuid()}"


# Two checkpoints from one process within one clock tick must still differ.
_sequence = itertools.count()


def new_path(directory: str | None = None) -> str:
    """A file name in `directory` (default: default_directory()) no earlier call has returned."""
    if directory is None:
        directory = default_directory()
    name = f"checkpoint-{os.getpid()}-{time.time_ns()}-{next(_sequence)}.cbor"
    return os.path.join(directory, name)


def redact_session(session: dict) -> dict:
    """Copy of a session map with credentials replaced by "<redacted>" (username kept)."""
    result = copy.deepcopy(session)
    for key in SECRET_SESSION_KEYS:
        value = result.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            if value.get("password") is not None:
                value["password"] = REDACTED
        else:
            result[key] = REDACTED
    return result
