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

from ..protocol.state import CARRIED_EFFECTS

MAGIC = "shotover-g/checkpoint"
#: 2: connections handed over in any state (requests in flight, transactions, MONITOR,
#: tracking, output not yet written); typed upstream records. 1 is still read.
FORMAT = 2

# Every body key formats 1 and 2 write.  All are required on read: in particular a
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


def _want_bytes_list(value: object, where: str) -> list:
    _want(value, list, where)
    for i, item in enumerate(value):
        _want(item, bytes, f"{where}[{i}]")
    return value


#: The effects an in-flight reply may still have to apply once read, as the connection state
#: model defines them; anything else in a checkpoint is damage.
REPLY_EFFECTS = frozenset("_" + effect for effect in CARRIED_EFFECTS)


@dataclass
class InflightRecord:
    """A batch of requests written to an upstream connection whose replies are not all read:
    the next image reads the rest from the inherited socket and answers the client."""

    #: Every request of the batch, as the client sent it.
    requests: list[bytes]
    #: The replies of the first len(replies) requests, complete (b"": the client gets none).
    replies: list[bytes] = field(default_factory=list)
    #: The next request's reply when it has begun to be counted: {"count": frames expected,
    #: "effect": what to apply once they are read (None or a REPLY_EFFECTS name), "frames":
    #: frames read so far, "prefix": pushes that go out in front of it}.
    current: dict | None = None
    #: The end of the batch's bytes not yet written to the server.
    unsent: bytes = b""

    def to_body(self) -> dict:
        body: dict = {"requests": self.requests, "replies": self.replies}
        if self.current is not None:
            body["current"] = self.current
        if self.unsent:
            body["unsent"] = bytes(self.unsent)
        return body

    @classmethod
    def from_body(cls, item: object, where: str) -> InflightRecord:
        _want(item, dict, where)
        requests = _want_bytes_list(_member(item, "requests", where), f"{where}.requests")
        replies = _want_bytes_list(item.get("replies", []), f"{where}.replies")
        if len(replies) > len(requests):
            raise DamagedCheckpoint(f"{where}: more replies than requests")
        current = item.get("current")
        if current is not None:
            _want(current, dict, f"{where}.current")
            _want_count(_member(current, "count", f"{where}.current"), f"{where}.current.count")
            effect = current.get("effect")
            if effect is not None and effect not in REPLY_EFFECTS:
                raise DamagedCheckpoint(f"{where}.current.effect: unknown effect {effect!r}")
            _want_bytes_list(current.get("frames", []), f"{where}.current.frames")
            _want(current.get("prefix", b""), bytes, f"{where}.current.prefix")
            if len(replies) >= len(requests):
                raise DamagedCheckpoint(f"{where}: a reply in progress after the last request")
        return cls(requests, replies, current,
                   _want(item.get("unsent", b""), bytes, f"{where}.unsent"))


@dataclass
class UpstreamRecord:
    """A client's upstream connection, handed over with it: the socket, and what the proxy
    knows of the server's side of it (the server itself keeps the rest: a blocked command,
    queued transaction commands, WATCHed keys, subscriptions, MONITOR, tracking)."""

    fd: int
    #: Which sink made it ("RedisSinkSingle") and for which server: the next image adopts it
    #: only where its topology still sends this client there.
    sink: str
    address: str
    resp_version: int = 2
    reply_off: bool = False
    skip_next: bool = False
    #: {"channels" | "patterns" | "shard_channels": [names]}
    subscriptions: dict = field(default_factory=dict)
    monitor: bool = False
    tracking: bool = False
    #: Inside MULTI: the requests the server has queued (None: not in a transaction).
    multi: list[bytes] | None = None
    #: Frames may arrive unasked (subscriptions, MONITOR, tracking): a reader owns the socket.
    push: bool = False
    #: Bytes read from the server and not yet framed (part of a reply or message).
    buffered: bytes = b""
    #: Pushes read and held to go out in front of the next reply.
    held: list[bytes] = field(default_factory=list)
    inflight: InflightRecord | None = None

    def to_body(self) -> dict:
        # Defaults are left out: a thousand idle connections are written inside the pause.
        body: dict = {"fd": self.fd, "sink": self.sink, "address": self.address}
        if self.resp_version != 2:
            body["resp_version"] = self.resp_version
        for key in ("reply_off", "skip_next", "monitor", "tracking", "push"):
            if getattr(self, key):
                body[key] = True
        if self.subscriptions:
            body["subscriptions"] = self.subscriptions
        if self.multi is not None:
            body["multi"] = self.multi
        if self.buffered:
            body["buffered"] = bytes(self.buffered)
        if self.held:
            body["held"] = self.held
        if self.inflight is not None:
            body["inflight"] = self.inflight.to_body()
        return body

    @classmethod
    def from_body(cls, item: object, where: str = "upstream") -> UpstreamRecord:
        _want(item, dict, where)
        subscriptions = _want(item.get("subscriptions", {}), dict, f"{where}.subscriptions")
        for kind, names in subscriptions.items():
            if kind not in ("channels", "patterns", "shard_channels"):
                raise DamagedCheckpoint(f"{where}.subscriptions: unknown kind {kind!r}")
            _want_bytes_list(names, f"{where}.subscriptions.{kind}")
        multi = item.get("multi")
        if multi is not None:
            _want_bytes_list(multi, f"{where}.multi")
        resp_version = _want_count(item.get("resp_version", 2), f"{where}.resp_version")
        if resp_version not in (2, 3):
            raise DamagedCheckpoint(f"{where}.resp_version: expected 2 or 3, got {resp_version}")
        inflight = item.get("inflight")
        return cls(
            fd=_want_count(_member(item, "fd", where), f"{where}.fd"),
            sink=_want(item.get("sink", ""), str, f"{where}.sink"),
            address=_want(_member(item, "address", where), str, f"{where}.address"),
            resp_version=resp_version,
            reply_off=_want(item.get("reply_off", False), bool, f"{where}.reply_off"),
            skip_next=_want(item.get("skip_next", False), bool, f"{where}.skip_next"),
            subscriptions=subscriptions,
            monitor=_want(item.get("monitor", False), bool, f"{where}.monitor"),
            tracking=_want(item.get("tracking", False), bool, f"{where}.tracking"),
            multi=multi,
            push=_want(item.get("push", False), bool, f"{where}.push"),
            buffered=_want(item.get("buffered", b""), bytes, f"{where}.buffered"),
            held=_want_bytes_list(item.get("held", []), f"{where}.held"),
            inflight=None if inflight is None else InflightRecord.from_body(inflight,
                                                                            f"{where}.inflight"),
        )


@dataclass
class ConnectionRecord:
    """One client connection as the next image takes it over."""

    fd: int
    source: str
    peer: str
    #: Bytes the client sent that no request has been made of yet (a half-sent command, a
    #: pipeline cut by the pause, or a whole batch that had not reached the server).
    unread: bytes
    #: What the client changed on its server connection (session.Session.to_dict()).
    session: dict
    #: Its upstream connection; None: the next image connects afresh and replays the session.
    upstream: UpstreamRecord | None = None
    #: Bytes owed to the client before anything else: replies and messages not yet written.
    output: bytes = b""
    #: Messages that go out after the replies of the batch in flight.
    deferred: bytes = b""

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
            body["upstream"] = self.upstream.to_body()
        if self.output:
            body["output"] = bytes(self.output)
        if self.deferred:
            body["deferred"] = bytes(self.deferred)
        return body

    @classmethod
    def from_body(cls, item: object, where: str = "connection") -> ConnectionRecord:
        _want(item, dict, where)
        upstream = item.get("upstream")
        return cls(
            fd=_want_count(_member(item, "fd", where), f"{where}.fd"),
            source=_want(_member(item, "source", where), str, f"{where}.source"),
            peer=_want(_member(item, "peer", where), str, f"{where}.peer"),
            unread=_want(_member(item, "unread", where), bytes, f"{where}.unread"),
            session=_want(_member(item, "session", where), dict, f"{where}.session"),
            upstream=None if upstream is None else UpstreamRecord.from_body(upstream,
                                                                            f"{where}.upstream"),
            output=_want(item.get("output", b""), bytes, f"{where}.output"),
            deferred=_want(item.get("deferred", b""), bytes, f"{where}.deferred"),
        )


_PLAIN_CONNECTION_KEYS = frozenset({"fd", "source", "peer", "unread", "session"})
_PLAIN_UPSTREAM_KEYS = frozenset({"fd", "sink", "address"})


def _connections_from_body(items: list) -> list[ConnectionRecord]:
    """ConnectionRecord.from_body for every item, with its checks inlined for the common case.

    Thousands of records are read inside the clients' pause.  An idle connection (its idle
    upstream connection at most) whose fields all have exactly the expected types is built
    directly; any other item goes through ConnectionRecord.from_body, which accepts it or
    names the first bad field.
    """
    records: list[ConnectionRecord] = []
    append = records.append
    new = ConnectionRecord
    new_upstream = UpstreamRecord
    for i, item in enumerate(items):
        if item.__class__ is dict:
            upstream = item.get("upstream")
            keys = item.keys()
            if (keys == _PLAIN_CONNECTION_KEYS or (upstream is not None and len(keys) == 6
                                                    and keys - _PLAIN_CONNECTION_KEYS
                                                    == {"upstream"})):
                fd = item["fd"]
                source = item["source"]
                peer = item["peer"]
                unread = item["unread"]
                session = item["session"]
                # `type(x) is int` also keeps out bool, as _want does.
                if (
                    fd.__class__ is int
                    and fd >= 0
                    and source.__class__ is str
                    and peer.__class__ is str
                    and unread.__class__ is bytes
                    and session.__class__ is dict
                ):
                    if upstream is None:
                        append(new(fd, source, peer, unread, session))
                        continue
                    if (upstream.__class__ is dict and upstream.keys() == _PLAIN_UPSTREAM_KEYS
                            and upstream["fd"].__class__ is int and upstream["fd"] >= 0
                            and upstream["sink"].__class__ is str
                            and upstream["address"].__class__ is str):
                        append(new(fd, source, peer, unread, session,
                                   new_upstream(upstream["fd"], upstream["sink"],
                                                upstream["address"])))
                        continue
        append(ConnectionRecord.from_body(item, f"connections[{i}]"))
    return records


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
        found += [rec.upstream.fd for rec in self.connections if rec.upstream is not None]
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


def _format_1_to_2(body: dict) -> dict:
    """Format 1 nested an idle upstream connection's state under "state" and the messages not
    yet written to its client under "deliver"; format 2 keeps both flat."""
    connections = body.get("connections")
    if not isinstance(connections, list):
        return body
    migrated = []
    for item in connections:
        upstream = item.get("upstream") if isinstance(item, dict) else None
        if isinstance(upstream, dict):
            item = dict(item)
            upstream = dict(upstream)
            state = upstream.pop("state", None)
            deliver = upstream.pop("deliver", None)
            if isinstance(state, dict):
                for key in ("resp_version", "reply_off", "skip_next", "push", "subscriptions",
                            "buffered"):
                    if key in state:
                        upstream[key] = state[key]
            item["upstream"] = upstream
            if deliver:
                item["output"] = deliver
        migrated.append(item)
    return dict(body, connections=migrated)


# Body migrations keyed by the format they read: _MIGRATIONS[n] turns a
# format-n body into a format-(n + 1) body.
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _format_1_to_2}


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

    _create_file(path, data, f"checkpoint file {path}")
    try:
        _fsync_directory(directory)
    except OSError as exc:
        _remove(path)
        raise CheckpointError(f"cannot write checkpoint file {path}: {exc.strerror}") from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _create_file(path: str, data: bytes, label: str) -> None:
    """Write `data` to a new file at `path` (0600, fsync'ed). O_EXCL: never an existing file,
    nor a symbolic link planted at the path; nothing half-written is left behind."""
    flags = (os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CheckpointError(f"{label} already exists") from None
    except OSError as exc:
        raise CheckpointError(f"cannot create {label}: {exc.strerror}") from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _remove(path)
        raise CheckpointError(f"cannot write {label}: {exc.strerror}") from exc


#: Seals a checkpoint memfd must carry: nobody can change it once written.
_SEALS = ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")


def to_memfd(cp: Checkpoint | bytes) -> int:
    """Write a checkpoint into a sealed anonymous memory file and return its fd.

    Nothing is created in any directory: no path another user could pre-create, replace or
    point a symbolic link at, nothing left on disk (credentials included) when a process is
    killed mid-upgrade. The next image gets the fd over the bridge socket; the memory is freed
    when the last process holding it closes it.
    """
    import fcntl

    data = cp if isinstance(cp, (bytes, bytearray)) else encode(cp)
    try:
        fd = os.memfd_create("shotover-g-checkpoint", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError) as exc:
        raise CheckpointError(f"cannot create the checkpoint in memory: "
                              f"{getattr(exc, 'strerror', None) or exc}") from exc
    try:
        _write_all(fd, data)
        seals = 0
        for name in _SEALS:
            seals |= getattr(fcntl, name)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(f"cannot write the checkpoint in memory: {exc.strerror}") from exc
    return fd


def copy_to_file(fd: int, path: str) -> None:
    """Copy the checkpoint in memfd `fd` to a new file at `path` (0600): never an existing file
    or a symbolic link planted there, nothing half-written left behind."""
    _create_file(path, _memfd_bytes(fd), path)


def _memfd_bytes(fd: int) -> bytes:
    try:
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint: {exc.strerror}") from exc
    return b"".join(chunks)


def read_fd(fd: int) -> Checkpoint:
    """Read and verify the checkpoint in a memfd made by to_memfd (it must be sealed)."""
    import fcntl

    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint: {exc.strerror}") from exc
    for name in _SEALS[1:]:
        if not seals & getattr(fcntl, name):
            raise CheckpointError("the checkpoint's memory file is not sealed against changes")
    return decode(_memfd_bytes(fd))


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
