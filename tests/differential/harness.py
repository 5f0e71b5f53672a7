"""Runs one command script against a server directly and through the proxy, reply bytes each.

A script is text, one command per line; `compare` finds the first reply that differs.
"""

from __future__ import annotations

import codecs
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from feature_support import ByteClient, frame_end, mask_hello_id
from helpers import wait_for

SCRIPT_DIR = Path(__file__).resolve().parent / "scripts"
#: Commands sent back to back on one connection before their replies are read.
PIPELINE_DEPTH = 32

# ---- what may differ ------------------------------------------------------------------------------

#: Replies that differ between two runs against Redis itself (time, randomness, hash-table
#: order of the keyspace), so they are compared by a weaker rule. Key: command name, or
#: "COMMAND SUBCOMMAND".
NONDETERMINISTIC: Dict[str, str] = {
    "TIME": "type",
    "LASTSAVE": "type",
    "RANDOMKEY": "type",
    "SRANDMEMBER": "type",
    "HRANDFIELD": "type",
    "ZRANDMEMBER": "type",
    "TTL": "ttl",
    "PTTL": "ttl",
    "OBJECT IDLETIME": "type",
    "INFO": "type",
    "MEMORY USAGE": "type",
    "XINFO CONSUMERS": "type",
    "KEYS": "unordered",
    "SCAN": "scan",
    "PUBSUB CHANNELS": "unordered",
    "PUBSUB SHARDCHANNELS": "unordered",
}

#: Replies that differ because a proxy sits in between; each is a documented difference.
PROXY_DIFFERENCES: Dict[str, Tuple[str, str]] = {
    "HELLO": ("hello", "the `id` field is the id of the proxy's own connection to the server"),
    "CLIENT ID": ("type", "the id of the proxy's connection to the server"),
    "CLIENT LIST": ("type", "the proxy's connections to the server (address, port, id, age)"),
    "CLIENT INFO": ("type", "the proxy's connection to the server (address, port, id, age)"),
    "MONITOR": ("monitor", "each line names the client by the proxy's address and port"),
}

#: One line per documented difference, for the README.
DOCUMENTED_DIFFERENCES = [f"{name}: {why}" for name, (_, why) in PROXY_DIFFERENCES.items()]

_OPTION = re.compile(r"^(\w+)=(\S+)$")


@dataclass
class Step:
    conn: int
    args: Optional[List[bytes]]  # None: only read `frames` frames that arrive by themselves
    frames: int = 1
    compare: str = "exact"
    text: str = ""
    pipeline: bool = False
    protocols: Tuple[int, ...] = (2, 3)
    number: int = 0
    blocked: int = 0  # WAITBLOCKED n: wait until the server has n blocked clients


def command_key(args: Sequence[bytes]) -> str:
    name = args[0].decode("latin-1").upper()
    if len(args) > 1:
        pair = f"{name} {args[1].decode('latin-1').upper()}"
        if pair in NONDETERMINISTIC or pair in PROXY_DIFFERENCES:
            return pair
    return name


def default_frames(args: Sequence[bytes]) -> int:
    name = args[0].upper()
    if name in (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"UNSUBSCRIBE", b"PUNSUBSCRIBE",
                b"SUNSUBSCRIBE") and len(args) > 1:
        return len(args) - 1
    return 1


def default_compare(args: Sequence[bytes]) -> str:
    key = command_key(args)
    if key in PROXY_DIFFERENCES:
        return PROXY_DIFFERENCES[key][0]
    return NONDETERMINISTIC.get(key, "exact")


def make_step(conn: int, args: List[bytes], text: str = "", pipeline: bool = False,
              **options) -> Step:
    step = Step(conn, args, default_frames(args), default_compare(args), text or
                " ".join(a.decode("latin-1") for a in args)[:200], pipeline)
    for key, value in options.items():
        setattr(step, key, value)
    return step


def parse_script(text: str, source: str = "<script>") -> List[Step]:
    """Lines: `[@conn] [{2}|{3}] COMMAND arg... [ | frames=N compare=RULE]`, `READ n` (frames
    that arrive by themselves), `WAITBLOCKED n` (until the server has n blocked clients),
    `!pipeline on|off`, and # comments.

    Arguments are split like a shell would ("..." and '...'), then `\\xHH`, `\\r`, `\\n`
    escapes are decoded.
    """
    steps: List[Step] = []
    pipeline = False
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!pipeline"):
            pipeline = line.split()[1] == "on"
            continue
        options: Dict[str, str] = {}
        if " | " in line:
            head, _, tail = line.rpartition(" | ")
            pairs = [_OPTION.match(item) for item in tail.split()]
            if all(pairs):
                options = {m.group(1): m.group(2) for m in pairs}
                line = head.strip()
        conn = 0
        protocols = (2, 3)
        while line.startswith(("@", "{2}", "{3}")):  # connection and protocol, either order
            first, _, line = line.partition(" ")
            if first.startswith("@"):
                conn = int(first[1:])
            else:
                protocols = (int(first[1]),)
            line = line.strip()
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        lexer.escape = ""
        try:
            words = list(lexer)
        except ValueError as error:
            raise ValueError(f"{source}:{number}: {error}: {raw_line!r}") from None
        args = [codecs.escape_decode(word.encode())[0] if "\\" in word else word.encode()
                for word in words]
        where = f"{source}:{number}"
        if args[0].upper() == b"READ":
            step = Step(conn, None, int(args[1]) if len(args) > 1 else 1, "exact", line)
        elif args[0].upper() == b"WAITBLOCKED":
            step = Step(conn, None, 0, "skip", line, blocked=int(args[1]))
        else:
            step = make_step(conn, args, line, pipeline)
        step.protocols = protocols
        step.number = number
        if "frames" in options:
            step.frames = int(options["frames"])
        if "compare" in options:
            step.compare = options["compare"]
        step.text = f"{where}: {line}"
        steps.append(step)
    return steps


def load_script(name: str) -> List[Step]:
    path = SCRIPT_DIR / f"{name}.txt"
    return parse_script(path.read_text(), path.name)


# ---- running ------------------------------------------------------------------------------------


@dataclass
class Run:
    replies: List[bytes] = field(default_factory=list)
    steps: List[Step] = field(default_factory=list)
    leftovers: Dict[int, bytes] = field(default_factory=dict)


def run_script(port: int, steps: Sequence[Step], protocol: int, server_port: int,
               timeout: float = 10.0,
               connect: Optional[Callable[[int], ByteClient]] = None) -> Run:
    """Run `steps` against `port`; every connection first says HELLO 3 when `protocol` is 3.

    `server_port` is the server itself, asked directly how many clients are blocked.
    """
    connect = connect or (lambda p: ByteClient(p, timeout=timeout))
    steps = [s for s in steps if protocol in s.protocols]
    clients: Dict[int, ByteClient] = {}
    run = Run(steps=[])

    def client(index: int) -> ByteClient:
        if index not in clients:
            clients[index] = connect(port)
            if protocol == 3:
                hello = clients[index].call("HELLO", "3")
                run.steps.append(Step(index, [b"HELLO", b"3"], 1, "hello",
                                      f"(connection {index} opened) HELLO 3"))
                run.replies.append(hello)
        return clients[index]

    try:
        i = 0
        while i < len(steps):
            step = steps[i]
            if step.blocked:
                wait_blocked(server_port, step.blocked, timeout)
                run.steps.append(step)
                run.replies.append(b"")
                i += 1
                continue
            connection = client(step.conn)
            group = [step]
            if step.pipeline and step.args is not None:
                while (i + len(group) < len(steps) and len(group) < PIPELINE_DEPTH
                       and steps[i + len(group)].pipeline
                       and steps[i + len(group)].conn == step.conn
                       and steps[i + len(group)].args is not None):
                    group.append(steps[i + len(group)])
            if step.args is not None:
                connection.send_raw(b"".join(_encode(s.args) for s in group))
            for member in group:
                try:
                    reply = connection.read_frames(member.frames)
                except (AssertionError, EOFError) as error:
                    reply = f"<no reply: {error}>".encode()
                run.steps.append(member)
                run.replies.append(reply)
            i += len(group)
        for index, connection in clients.items():
            # Whatever arrives after the last step is a difference too.
            if not connection.quiet_for(0.05):
                run.leftovers[index] = bytes(connection.buffer) + (b"<EOF>" if connection.eof
                                                                  else b"")
    finally:
        for connection in clients.values():
            connection.close()
    return run


def wait_blocked(server_port: int, count: int, timeout: float) -> None:
    def blocked() -> bool:
        with ByteClient(server_port, timeout=timeout) as admin:
            info = admin.call("INFO", "clients")
        match = re.search(rb"blocked_clients:(\d+)", info)
        return match is not None and int(match.group(1)) >= count

    wait_for(blocked, timeout, f"{count} blocked client(s) on the server")


def _encode(args: Sequence[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


# ---- comparing --------------------------------------------------------------------------------------


def split_frames(data: bytes) -> List[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        end = frame_end(data, pos)
        if end < 0:
            frames.append(data[pos:])
            break
        frames.append(data[pos:end])
        pos = end
    return frames


def _elements(frame: bytes) -> Tuple[bytes, List[bytes]]:
    """Header line and element frames of an aggregate reply."""
    header_end = frame.index(b"\r\n") + 2
    return frame[:header_end], split_frames(frame[header_end:])


def normalise(rule: str, reply: bytes) -> bytes:
    if rule == "exact" or not reply or reply.startswith(b"<no reply"):
        return reply
    if rule == "skip":
        return b"<not compared>"
    if rule == "type":
        return b"<type " + reply[:1] + b">"
    if rule == "hello":
        return mask_hello_id(reply)
    if rule == "ttl":
        if reply[:1] == b":":
            value = int(reply[1:-2])
            return b":%d\r\n" % value if value < 0 else b":<positive>\r\n"
        return reply
    if rule == "monitor":
        return re.sub(rb"\+\d+\.\d+ \[(\d+) [^\]]+\]", rb"+<time> [\1 <client>]", reply)
    if rule == "unordered":
        if reply[:1] not in (b"*", b"~") or reply.startswith(b"*-1"):
            return reply
        header, items = _elements(reply)
        return header + b"".join(sorted(items))
    if rule == "scan":
        if reply[:1] != b"*":
            return reply
        header, (cursor, keys) = _elements(reply)
        keys_header, items = _elements(keys)
        return header + cursor + keys_header + b"".join(sorted(items))
    raise ValueError(f"unknown comparison rule {rule!r}")


def compare(direct: Run, proxied: Run) -> Optional[str]:
    """None when the runs match; else the first differing command with both replies."""
    for step, expected, got in zip(direct.steps, direct.replies, proxied.replies):
        if expected.startswith(b"<no reply") or got.startswith(b"<no reply"):
            return (f"no reply at {step.text} (connection {step.conn}):\n  redis: "
                    f"{expected[:600]!r}\n  proxy: {got[:600]!r}")
        if normalise(step.compare, expected) != normalise(step.compare, got):
            return (f"first difference at {step.text} (connection {step.conn}, rule "
                    f"{step.compare}):\n  redis: {expected[:600]!r}\n  proxy: {got[:600]!r}")
    if len(direct.replies) != len(proxied.replies):
        return f"{len(direct.replies)} replies directly, {len(proxied.replies)} through the proxy"
    for index in sorted(set(direct.leftovers) | set(proxied.leftovers)):
        expected = direct.leftovers.get(index, b"")
        got = proxied.leftovers.get(index, b"")
        if expected != got:
            return (f"after the last command, connection {index} received:\n  redis: "
                    f"{expected[:600]!r}\n  proxy: {got[:600]!r}")
    return None
