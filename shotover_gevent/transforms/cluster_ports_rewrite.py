"""RedisClusterPortsRewrite (alias ValkeyClusterPortsRewrite): makes CLUSTER SLOTS, CLUSTER
SHARDS, CLUSTER NODES and CLUSTER REPLICAS/SLAVES replies name `new_port` for every node, so that
cluster-aware clients send everything through the proxy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Problems, take_mapping
from ..message import Message
from . import TransformType, register


@dataclass
class PortsRewriteConfig:
    new_port: int


def parse(settings: Any, where: str, problems: Problems) -> Optional[PortsRewriteConfig]:
    values = take_mapping(settings, where, problems, required={"new_port": int}, optional={})
    if values is None:
        return None
    if not 0 < values["new_port"] <= 65535:
        problems.add(f"{where}.new_port", "must be a port number from 1 to 65535")
        return None
    return PortsRewriteConfig(values["new_port"])


class PortsRewriteBuilder(TransformBuilder):
    terminating = False

    def __init__(self, config: PortsRewriteConfig, name: str, chain_name: str) -> None:
        self.config = config
        self.name = name

    def build(self, context: ConnectionContext) -> Transform:
        return PortsRewrite(self.config.new_port)


_SUBCOMMANDS = {"SLOTS": "slots", "SHARDS": "shards", "NODES": "nodes", "REPLICAS": "replicas",
                "SLAVES": "replicas"}


class PortsRewrite(Transform):
    """Only the client port changes: hosts, node ids and (in CLUSTER NODES) the cluster bus port
    after `@` stay as the cluster reported them. Replies are edited in their RESP form, so RESP2
    and RESP3 replies keep their types; a reply that does not have the expected shape passes
    unchanged."""

    __slots__ = ("new_port",)

    def __init__(self, new_port: int) -> None:
        self.new_port = new_port

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        kinds = []
        for index, request in enumerate(requests):
            if request.command == "CLUSTER":
                kind = _SUBCOMMANDS.get(request.subcommand())
                if kind is not None:
                    kinds.append((index, kind))
        replies = call_next(requests)
        if not kinds:
            return replies
        replies = list(replies)
        for index, kind in kinds:
            reply = replies[index]
            if not reply.raw or reply.is_error:
                continue
            rewritten = rewrite(kind, reply.raw, self.new_port)
            if rewritten is not None:
                replies[index] = Message(rewritten)
        return replies


# ---- a minimal RESP tree: [type byte, header, payload bytes | children list | None] ----------

_BLOBS = (b"$", b"!", b"=")
_AGGREGATES = (b"*", b"~", b">", b"%", b"|")


def _parse(buf: bytes, pos: int) -> Tuple[list, int]:
    kind = buf[pos : pos + 1]
    end = buf.index(b"\r\n", pos)
    header = buf[pos + 1 : end]
    pos = end + 2
    if kind in _BLOBS and header != b"-1":
        length = int(header)
        return [kind, header, buf[pos : pos + length]], pos + length + 2
    if kind in _AGGREGATES and header != b"-1":
        count = int(header) * (2 if kind in (b"%", b"|") else 1)
        children = []
        for _ in range(count):
            child, pos = _parse(buf, pos)
            children.append(child)
        if kind == b"|":  # an attribute precedes the value it describes
            value, pos = _parse(buf, pos)
            children.append(value)
        return [kind, header, children], pos
    return [kind, header, None], pos


def _dump(node: list, out: List[bytes]) -> None:
    kind, header, body = node
    if isinstance(body, bytes):
        out.append(b"%s%d\r\n%s\r\n" % (kind, len(body), body))
        return
    out.append(kind + header + b"\r\n")
    if body is not None:
        for child in body:
            _dump(child, out)


def _set_integer(node: list, value: int) -> bool:
    if node[0] == b":":
        node[1] = str(value).encode()
        return True
    return False


def _pairs(node: list):
    """(name, value node) of a map, or of a RESP2 array of alternating names and values."""
    body = node[2]
    if node[0] in (b"%", b"*") and isinstance(body, list):
        for index in range(0, len(body) - 1, 2):
            key = body[index]
            name = key[2] if key[0] == b"$" else key[1] if key[0] == b"+" else None
            if isinstance(name, bytes):
                yield name, body[index + 1]


def _rewrite_slots(tree: list, port: int) -> bool:
    changed = False
    for entry in tree[2] or ():
        for node in (entry[2] or ())[2:]:
            children = node[2]
            if isinstance(children, list) and len(children) >= 2:
                changed |= _set_integer(children[1], port)
    return changed


def _rewrite_shards(tree: list, port: int) -> bool:
    changed = False
    for shard in tree[2] or ():
        for name, value in _pairs(shard):
            if name != b"nodes" or not isinstance(value[2], list):
                continue
            for node in value[2]:
                for field, field_value in _pairs(node):
                    if field in (b"port", b"tls-port"):
                        changed |= _set_integer(field_value, port)
    return changed


def rewrite_node_line(line: bytes, port: int) -> bytes:
    """One CLUSTER NODES line: `id host:port@cport[,hostname] flags ...` with the port replaced."""
    fields = line.split(b" ")
    if len(fields) < 2 or not fields[1]:
        return line
    address = fields[1]
    endpoint, at, bus = address.partition(b"@")
    host, colon, _old = endpoint.rpartition(b":")
    if not colon:
        return line
    fields[1] = host + b":" + str(port).encode() + at + bus
    return b" ".join(fields)


def _rewrite_text(text: bytes, port: int) -> bytes:
    return b"\n".join(rewrite_node_line(line, port) for line in text.split(b"\n"))


def _rewrite_string(node: list, port: int) -> bool:
    kind, _header, body = node
    if not isinstance(body, bytes):
        return False
    if kind == b"=" and body[3:4] == b":":
        node[2] = body[:4] + _rewrite_text(body[4:], port)
    elif kind == b"$":
        node[2] = _rewrite_text(body, port)
    else:
        return False
    return node[2] != body


def rewrite(kind: str, raw: bytes, port: int) -> Optional[bytes]:
    """The reply with every node port replaced, or None when there is nothing to change."""
    try:
        tree, end = _parse(raw, 0)
    except (ValueError, IndexError):
        return None
    if end != len(raw):
        return None
    if kind == "slots":
        changed = tree[0] == b"*" and _rewrite_slots(tree, port)
    elif kind == "shards":
        changed = tree[0] == b"*" and _rewrite_shards(tree, port)
    elif kind == "nodes":
        changed = _rewrite_string(tree, port)
    else:  # replicas: an array of CLUSTER NODES lines
        changed = False
        for child in tree[2] if isinstance(tree[2], list) else ():
            changed |= _rewrite_string(child, port)
    if not changed:
        return None
    out: List[bytes] = []
    _dump(tree, out)
    return b"".join(out)


KIND = register(TransformType(("RedisClusterPortsRewrite", "ValkeyClusterPortsRewrite"), False,
                              parse, PortsRewriteBuilder))
