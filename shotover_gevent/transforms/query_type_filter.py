"""QueryTypeFilter: drops requests by kind (Read, Write, ReadWrite, SchemaChange,
PubSubMessage) with an AllowList or a DenyList; each dropped request gets an error reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, FrozenSet, List, Optional

from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Problems
from ..message import Message
from . import TransformType, register

QUERY_TYPES = ("Read", "Write", "ReadWrite", "SchemaChange", "PubSubMessage")

# Commands that only read data (Redis flags them "readonly"), plus connection-level commands
# that change no data.
READ_COMMANDS = frozenset("""
BITCOUNT BITFIELD_RO BITPOS DBSIZE DUMP EXISTS EXPIRETIME GEODIST GEOHASH GEOPOS
GEORADIUS_RO GEORADIUSBYMEMBER_RO GEOSEARCH GET GETBIT GETRANGE HEXISTS HGET HGETALL HKEYS HLEN
HMGET HRANDFIELD HSCAN HSTRLEN HVALS KEYS LCS LINDEX LLEN LPOS LRANGE MGET OBJECT PEXPIRETIME
PFCOUNT PTTL RANDOMKEY SCAN SCARD SDIFF SINTER SINTERCARD SISMEMBER SMEMBERS SMISMEMBER
SRANDMEMBER SSCAN STRLEN SUBSTR SUNION TOUCH TTL TYPE XINFO XLEN XPENDING XRANGE XREAD XREVRANGE
ZCARD ZCOUNT ZDIFF ZINTER ZINTERCARD ZLEXCOUNT ZMSCORE ZRANDMEMBER ZRANGE ZRANGEBYLEX
ZRANGEBYSCORE ZRANK ZREVRANGE ZREVRANGEBYLEX ZREVRANGEBYSCORE ZREVRANK ZSCAN ZSCORE ZUNION
EVAL_RO EVALSHA_RO FCALL_RO SORT_RO PING ECHO TIME LASTSAVE INFO
""".split()) | frozenset("""
HELLO AUTH SELECT CLIENT RESET QUIT READONLY READWRITE COMMAND
""".split())
# The last line above: commands that set up or describe a connection change no data, so they
# count as reads; otherwise a `DenyList: [Write]` proxy would refuse every client's handshake
# (HELLO, AUTH, SELECT, CLIENT SETINFO).
PUBSUB_COMMANDS = frozenset("""
PUBLISH SPUBLISH SUBSCRIBE PSUBSCRIBE SSUBSCRIBE UNSUBSCRIBE PUNSUBSCRIBE SUNSUBSCRIBE PUBSUB
""".split())
# Commands that both read and write in one step.
READ_WRITE_COMMANDS = frozenset("""
GETSET GETDEL GETEX INCR INCRBY INCRBYFLOAT DECR DECRBY HINCRBY HINCRBYFLOAT LPOP RPOP SPOP
ZPOPMIN ZPOPMAX BLPOP BRPOP BLMOVE BRPOPLPUSH LMOVE RPOPLPUSH ZINCRBY SMOVE BZPOPMIN BZPOPMAX
LMPOP BLMPOP ZMPOP BZMPOP
""".split())
SCHEMA_COMMANDS = frozenset("FLUSHALL FLUSHDB SWAPDB SCRIPT FUNCTION CONFIG".split())


def query_type(command: str) -> str:
    if command in READ_COMMANDS:
        return "Read"
    if command in PUBSUB_COMMANDS:
        return "PubSubMessage"
    if command in READ_WRITE_COMMANDS:
        return "ReadWrite"
    if command in SCHEMA_COMMANDS:
        return "SchemaChange"
    return "Write"


@dataclass
class QueryTypeFilterConfig:
    blocked: FrozenSet[str]
    description: str


def parse(settings: Any, where: str, problems: Problems) -> Optional[QueryTypeFilterConfig]:
    if not isinstance(settings, dict) or len(settings) != 1 or \
            next(iter(settings)) not in ("AllowList", "DenyList"):
        problems.add(where, "expected exactly one of `AllowList: [...]` or `DenyList: [...]` "
                            f"with types from {', '.join(QUERY_TYPES)}")
        return None
    key, listed = next(iter(settings.items()))
    if not isinstance(listed, list):
        problems.add(f"{where}.{key}", f"expected a list of types from {', '.join(QUERY_TYPES)}")
        return None
    unknown = [t for t in listed if t not in QUERY_TYPES]
    if unknown:
        problems.add(f"{where}.{key}", f"unknown query type(s) {unknown}; valid: "
                                       f"{', '.join(QUERY_TYPES)}")
        return None
    if key == "AllowList":
        blocked = frozenset(QUERY_TYPES) - set(listed)
    else:
        blocked = frozenset(listed)
    return QueryTypeFilterConfig(blocked, f"{key}: {listed}")


class QueryTypeFilterBuilder(TransformBuilder):
    terminating = False

    def __init__(self, config: QueryTypeFilterConfig, name: str, chain_name: str) -> None:
        self.name = name
        self.config = config
        self.blocked_commands: dict = {}
        #: The commands of blocked_commands that pass.
        self.allowed_commands: set = set()

    def build(self, context: ConnectionContext) -> Transform:
        return QueryTypeFilter(self)

    def is_blocked(self, command: str) -> bool:
        blocked = self.blocked_commands.get(command)
        if blocked is None:
            blocked = query_type(command) in self.config.blocked
            if len(self.blocked_commands) < 4096:
                self.blocked_commands[command] = blocked
                if not blocked:
                    self.allowed_commands.add(command)
        return blocked


class QueryTypeFilter(Transform):
    __slots__ = ("builder",)
    inflight_handover = True

    def __init__(self, builder: QueryTypeFilterBuilder) -> None:
        self.builder = builder

    def screen(self, commands: List[str]) -> bool:
        """True when the builder's memo says no request of the batch is to be refused (a
        command refused or not judged yet: transform() judges the batch)."""
        return self.builder.allowed_commands.issuperset(commands)

    def screen_counts(self, command: str) -> Optional[tuple]:
        """Nothing to count; None when the command is refused (transform() answers it)."""
        return None if self.builder.is_blocked(command) else ()

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        is_blocked = self.builder.is_blocked
        verdicts = [is_blocked(request.command) for request in requests]
        if not any(verdicts):
            return call_next(requests)
        allowed = [r for r, blocked in zip(requests, verdicts) if not blocked]
        passed = iter(call_next(allowed) if allowed else [])
        replies = []
        for request, blocked in zip(requests, verdicts):
            if blocked:
                replies.append(Message.error(
                    f"ERR {request.command} ({query_type(request.command)}) was filtered out "
                    f"by QueryTypeFilter"))
            else:
                replies.append(next(passed))
        return replies


KIND = register(TransformType(("QueryTypeFilter",), False, parse, QueryTypeFilterBuilder))
