"""Where each command goes in a cluster: the table of key positions and the routing kinds
(keyed, split per slot, every master, any node, answered locally, refused)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..protocol.state import BLOCKING_COMMANDS as MAY_BLOCK
from ..protocol.state import SUBSCRIBE_KINDS, TRANSACTION_COMMANDS, may_block

KEYED = "keyed"
SPLIT = "split"
FANOUT = "fanout"
ANY = "any"
LOCAL = "local"
AUTH = "auth"
HELLO = "hello"
BLOCKING = "blocking"
REFUSED = "refused"


class Route:
    """Where one request goes; `keys` are its keys in order (for split: all of them)."""

    __slots__ = ("kind", "keys", "combine", "slot", "reason", "step")

    def __init__(self, kind: str, keys: Sequence[bytes] = (), combine: str = "",
                 slot: Optional[int] = None, reason: str = "", step: int = 1) -> None:
        self.kind = kind
        self.keys = list(keys)
        self.combine = combine
        self.slot = slot
        self.reason = reason
        self.step = step

    def __repr__(self) -> str:
        return f"Route({self.kind}, keys={self.keys!r}, combine={self.combine!r})"


def _words(text: str) -> frozenset:
    return frozenset(text.split())


# Commands whose only (or first) key is argument 1.
FIRST_KEY = _words("""
APPEND DECR DECRBY GET GETDEL GETEX GETRANGE GETSET INCR INCRBY INCRBYFLOAT PSETEX SET SETEX
SETNX SETRANGE STRLEN SUBSTR GETBIT SETBIT BITCOUNT BITPOS BITFIELD BITFIELD_RO
DUMP EXPIRE EXPIREAT EXPIRETIME PERSIST PEXPIRE PEXPIREAT PEXPIRETIME PTTL RESTORE TTL TYPE
SORT SORT_RO
HDEL HEXISTS HGET HGETALL HINCRBY HINCRBYFLOAT HKEYS HLEN HMGET HMSET HRANDFIELD HSCAN HSET
HSETNX HSTRLEN HVALS HEXPIRE HPEXPIRE HEXPIREAT HPEXPIREAT HTTL HPTTL HEXPIRETIME HPEXPIRETIME
HPERSIST HGETDEL HGETEX HSETEX
LINDEX LINSERT LLEN LPOP LPOS LPUSH LPUSHX LRANGE LREM LSET LTRIM RPOP RPUSH RPUSHX
SADD SCARD SISMEMBER SMEMBERS SMISMEMBER SPOP SRANDMEMBER SREM SSCAN
ZADD ZCARD ZCOUNT ZINCRBY ZLEXCOUNT ZMSCORE ZPOPMAX ZPOPMIN ZRANDMEMBER ZRANGE ZRANGEBYLEX
ZRANGEBYSCORE ZRANK ZREM ZREMRANGEBYLEX ZREMRANGEBYRANK ZREMRANGEBYSCORE ZREVRANGE
ZREVRANGEBYLEX ZREVRANGEBYSCORE ZREVRANK ZSCAN ZSCORE
PFADD GEOADD GEODIST GEOHASH GEOPOS GEORADIUS GEORADIUSBYMEMBER GEORADIUS_RO
GEORADIUSBYMEMBER_RO GEOSEARCH
XACK XADD XAUTOCLAIM XCLAIM XDEL XLEN XPENDING XRANGE XREVRANGE XSETID XTRIM
SPUBLISH
""")

# Commands whose arguments from 1 on are all keys (they must share a slot).
ALL_KEYS = _words("""
SDIFF SDIFFSTORE SINTER SINTERSTORE SUNION SUNIONSTORE PFCOUNT PFMERGE
""")

# Commands with exactly two keys at arguments 1 and 2.
TWO_KEYS = _words("""
RENAME RENAMENX COPY SMOVE LMOVE RPOPLPUSH ZRANGESTORE GEOSEARCHSTORE LCS
""")

# numkeys at argument 1, keys after it.
NUMKEYS_AT_1 = _words("ZDIFF ZINTER ZUNION SINTERCARD ZINTERCARD LMPOP ZMPOP")
# numkeys at argument 2, keys after it (no key before it).
NUMKEYS_AT_2 = _words("EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO")
# destination at argument 1, numkeys at argument 2, keys after it.
DEST_NUMKEYS = _words("ZDIFFSTORE ZINTERSTORE ZUNIONSTORE")

# Commands that may block the connection until data arrives.
#: Blocking commands that run on a connection of the client's own (WAIT and WAITAOF are refused;
#: XREAD and XREADGROUP block only with BLOCK, see may_block).
BLOCKING_COMMANDS = MAY_BLOCK - {"WAIT", "WAITAOF", "XREAD", "XREADGROUP"}

SPLITTABLE = {"MGET": "mget", "DEL": "sum", "EXISTS": "sum", "UNLINK": "sum", "TOUCH": "sum",
              "MSET": "all_ok"}

FANOUT_COMMANDS = {"DBSIZE": "sum", "KEYS": "join", "FLUSHALL": "same", "FLUSHDB": "same",
                   "SAVE": "same", "BGSAVE": "same", "BGREWRITEAOF": "same",
                   "RANDOMKEY": "first_value"}
FANOUT_SUBCOMMANDS = {("SCRIPT", "LOAD"): "same", ("SCRIPT", "FLUSH"): "same",
                      ("SCRIPT", "EXISTS"): "all_true", ("FUNCTION", "LOAD"): "same",
                      ("FUNCTION", "DELETE"): "same", ("FUNCTION", "FLUSH"): "same",
                      ("FUNCTION", "RESTORE"): "same"}

# Keyless commands any node can answer.
ANY_NODE = _words("""
INFO TIME LASTSAVE COMMAND CLUSTER LOLWUT PUBLISH PUBSUB SLOWLOG LATENCY MEMORY ROLE
ACL FUNCTION SCRIPT OBJECT CONFIG
""")

REFUSED_ALWAYS = {
    **{name: "transactions need every command on one connection"
       for name in TRANSACTION_COMMANDS},
    **{name: "subscriptions are not supported by the cluster sink" for name in SUBSCRIBE_KINDS},
    "MONITOR": "it would need a connection of its own to every node",
    "WAIT": "upstream connections are shared, so there is no connection of the client's own "
            "to wait for",
    "WAITAOF": "upstream connections are shared, so there is no connection of the client's "
               "own to wait for",
    "RESET": "upstream connections are shared",
    "SYNC": "replication is not proxied",
    "PSYNC": "replication is not proxied",
}
REFUSED_HIDING = {
    "SCAN": "a scan cannot span the cluster's nodes; use SCAN on each node directly",
    "MOVE": "a cluster has only database 0",
    "SWAPDB": "a cluster has only database 0",
    "MIGRATE": "the proxy hides the cluster's nodes",
    "SHUTDOWN": "the proxy hides the cluster's nodes",
    "REPLICAOF": "the proxy hides the cluster's nodes",
    "SLAVEOF": "the proxy hides the cluster's nodes",
    "FAILOVER": "the proxy hides the cluster's nodes",
    "DEBUG": "the proxy hides the cluster's nodes",
    "CLIENT": "upstream connections are shared",
}
LOCAL_CLIENT_SUBCOMMANDS = _words("SETNAME GETNAME SETINFO")
ANY_CLIENT_SUBCOMMANDS = _words("ID INFO LIST")  # handling mode only: answered by the node
REFUSED_SUBCOMMANDS = {("SCRIPT", "KILL"): "a script runs on one node of several",
                       ("FUNCTION", "KILL"): "a function runs on one node of several",
                       ("CONFIG", "SET"): "it would change one node of several",
                       ("CONFIG", "RESETSTAT"): "it would change one node of several",
                       ("CONFIG", "REWRITE"): "it would change one node of several"}
LOCAL_COMMANDS = _words("PING ECHO SELECT QUIT READONLY READWRITE")

# Commands that change no data: safe to send again when a node failed before answering.
READ_ONLY = _words("""
GET MGET EXISTS STRLEN GETRANGE SUBSTR GETBIT BITCOUNT BITPOS BITFIELD_RO DUMP TTL PTTL
EXPIRETIME PEXPIRETIME TYPE SORT_RO HEXISTS HGET HGETALL HKEYS HLEN HMGET HRANDFIELD HSCAN
HSTRLEN HVALS LINDEX LLEN LPOS LRANGE SCARD SISMEMBER SMEMBERS SMISMEMBER SRANDMEMBER SSCAN
SDIFF SINTER SUNION SINTERCARD ZCARD ZCOUNT ZLEXCOUNT ZMSCORE ZRANDMEMBER ZRANGE ZRANGEBYLEX
ZRANGEBYSCORE ZRANK ZREVRANGE ZREVRANGEBYLEX ZREVRANGEBYSCORE ZREVRANK ZSCAN ZSCORE ZDIFF
ZINTER ZUNION ZINTERCARD PFCOUNT GEODIST GEOHASH GEOPOS GEORADIUS_RO GEORADIUSBYMEMBER_RO
GEOSEARCH XLEN XRANGE XREVRANGE XPENDING XINFO LCS DBSIZE KEYS RANDOMKEY INFO TIME
LASTSAVE COMMAND CLUSTER EVAL_RO EVALSHA_RO FCALL_RO OBJECT MEMORY PUBSUB
""")


def _upper(arg: bytes) -> str:
    return arg.decode("latin-1").upper()


def _numkeys(args: List[bytes], at: int) -> Optional[List[bytes]]:
    if len(args) <= at:
        return None
    try:
        count = int(args[at])
    except ValueError:
        return None
    if count < 0 or len(args) < at + 1 + count:
        return None
    return args[at + 1 : at + 1 + count]


def _stream_keys(args: List[bytes]) -> Optional[List[bytes]]:
    for index in range(1, len(args)):
        if args[index].upper() == b"STREAMS":
            rest = args[index + 1 :]
            if not rest or len(rest) % 2:
                return None
            return rest[: len(rest) // 2]
    return None


def command_keys(command: str, args: List[bytes]) -> Optional[List[bytes]]:
    """The keys of a request (in order), [] for a keyless one, None when it is malformed or not
    a known keyed command."""
    if command in FIRST_KEY:
        return args[1:2] if len(args) > 1 else None
    if command in ALL_KEYS or command in SPLITTABLE:
        if command == "MSET" or command == "MSETNX":
            return args[1::2] if len(args) > 1 and len(args) % 2 == 1 else None
        return args[1:] if len(args) > 1 else None
    if command == "MSETNX":
        return args[1::2] if len(args) > 1 and len(args) % 2 == 1 else None
    if command in TWO_KEYS:
        return args[1:3] if len(args) > 2 else None
    if command in NUMKEYS_AT_1:
        return _numkeys(args, 1)
    if command in NUMKEYS_AT_2:
        return _numkeys(args, 2)
    if command in DEST_NUMKEYS:
        keys = _numkeys(args, 2)
        return None if keys is None else args[1:2] + keys
    if command in ("BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"):
        return args[1:-1] if len(args) > 2 else None
    if command in ("BRPOPLPUSH", "BLMOVE"):
        return args[1:3] if len(args) > 3 else None
    if command in ("BLMPOP", "BZMPOP"):
        return _numkeys(args, 2)
    if command in ("XREAD", "XREADGROUP"):
        return _stream_keys(args)
    if command in ("XGROUP", "XINFO"):
        return args[2:3] if len(args) > 2 else None
    if command == "BITOP":
        return args[2:] if len(args) > 3 else None
    return None


def route(args: List[bytes], handling: bool = False) -> Route:
    """Classify one request. In handling mode (a direct destination), split and fan-out
    commands are not cut up: keyed ones go by their first key, the rest to the destination.

    How commands are routed in hiding mode:

    * keyed: sent to the master owning the slot of its first key. Commands with several keys
      (RENAME, SMOVE, SUNIONSTORE, EVAL with keys, ...) go by the first key and the server itself
      refuses keys in different slots (CROSSSLOT), as it would for any cluster client.
      Key positions: argument 1 for most commands; every argument for SDIFF, SINTER, SUNION,
      PFCOUNT, ...; `numkeys` counted for EVAL/EVALSHA/FCALL (keys after argument 2),
      ZUNION/ZINTER/ZDIFF/SINTERCARD/ZINTERCARD/LMPOP/ZMPOP (after argument 1),
      ZUNIONSTORE/ZINTERSTORE/ZDIFFSTORE (destination plus keys after argument 2), BLMPOP/BZMPOP
      (after argument 2); after STREAMS for XREAD/XREADGROUP; argument 2 for XGROUP/XINFO/OBJECT/
      MEMORY USAGE; from argument 2 for BITOP. EVAL-style commands without keys go to any
      master. A command not in the table is routed by argument 1 when it has one (module
      commands usually put their key there).
    * split: MGET, DEL, EXISTS, UNLINK, TOUCH and MSET are cut into one command per slot and the
      replies put back together (MGET in key order, counts summed, MSET +OK when every part is).
    * fan-out: DBSIZE (summed), KEYS (joined), FLUSHALL, FLUSHDB, SCRIPT LOAD/FLUSH, FUNCTION
      LOAD/DELETE/FLUSH/RESTORE, SAVE, BGSAVE, BGREWRITEAOF (the first error, else the common
      reply), SCRIPT EXISTS (a script exists when every master has it), RANDOMKEY (a key from
      the first master that has one) go to every master.
    * any: keyless commands that read server-wide facts (INFO, TIME, COMMAND, CLUSTER ..., CONFIG
      GET, PUBLISH, PUBSUB, FUNCTION LIST, ...) go to one master. CLUSTER COUNTKEYSINSLOT and
      GETKEYSINSLOT go to the owner of the slot they name.
    * local: PING, ECHO, SELECT 0, QUIT, READONLY, READWRITE, CLIENT SETNAME/GETNAME/SETINFO
      are answered by the proxy.
    * blocking: BLPOP, BRPOP, BLMOVE, BRPOPLPUSH, BZPOPMIN, BZPOPMAX, BLMPOP, BZMPOP and XREAD/
      XREADGROUP with BLOCK are keyed, but run on a connection of their own, never a shared one.
    * refused with an error naming the command: transactions (MULTI, EXEC, DISCARD, WATCH,
      UNWATCH), subscriptions (SUBSCRIBE family) and MONITOR, SCAN, MOVE, SWAPDB, SELECT of a
      database other than 0, WAIT/WAITAOF, MIGRATE, replication and shutdown commands, and
      CLIENT subcommands that change a connection's state.

    In handling mode the same keyed and blocking routing applies; everything else that is not
    refused (including SCAN, MOVE, fan-out commands and CLIENT ID/INFO/LIST) goes to the direct
    destination, and transactions, subscriptions, MONITOR and WAIT are still refused because
    upstream connections are shared.
    """
    if not args:
        return Route(REFUSED, reason="empty command")
    command = _upper(args[0])
    sub = _upper(args[1]) if len(args) > 1 else ""
    if command == "AUTH":
        return Route(AUTH)
    if command == "HELLO":
        return Route(HELLO)
    if command in REFUSED_ALWAYS:
        return Route(REFUSED, reason=REFUSED_ALWAYS[command])
    if command in LOCAL_COMMANDS:
        if command == "SELECT" and len(args) == 2 and args[1] not in (b"0",):
            return Route(REFUSED, reason="a cluster has only database 0")
        return Route(LOCAL)
    if command == "CLIENT":
        if sub in LOCAL_CLIENT_SUBCOMMANDS:
            return Route(LOCAL)
        if handling and sub in ANY_CLIENT_SUBCOMMANDS:
            return Route(ANY)
        return Route(REFUSED, reason="upstream connections are shared")
    refused = REFUSED_SUBCOMMANDS.get((command, sub))
    if refused is not None and not handling:
        return Route(REFUSED, reason=refused)
    if may_block(command, args):
        keys = command_keys(command, args)
        if not keys:
            return Route(REFUSED, reason="its keys could not be found in its arguments")
        return Route(BLOCKING, keys)
    if not handling and command in REFUSED_HIDING:
        return Route(REFUSED, reason=REFUSED_HIDING[command])
    combine = SPLITTABLE.get(command)
    if combine is not None:
        keys = command_keys(command, args)
        if keys is None:
            return Route(ANY)  # malformed: let a node reply with its own error
        if handling:
            return Route(KEYED, keys)
        return Route(SPLIT, keys, combine, step=2 if command == "MSET" else 1)
    combine = FANOUT_COMMANDS.get(command) or FANOUT_SUBCOMMANDS.get((command, sub))
    if combine is not None:
        return Route(ANY) if handling else Route(FANOUT, combine=combine)
    if command in NUMKEYS_AT_2 and len(args) > 2 and args[2] == b"0":
        return Route(ANY)
    if command == "CLUSTER" and sub in ("COUNTKEYSINSLOT", "GETKEYSINSLOT") and len(args) > 2:
        try:
            slot = int(args[2])
        except ValueError:
            slot = -1
        if 0 <= slot < 16384:
            return Route(KEYED, slot=slot)
    if command == "OBJECT" or (command == "MEMORY" and sub == "USAGE"):
        return Route(KEYED, args[2:3]) if len(args) > 2 else Route(ANY)
    if command in ANY_NODE:
        return Route(ANY)
    keys = command_keys(command, args)
    if keys:
        return Route(KEYED, keys)
    if keys is None and len(args) > 1 and command not in TABLE and not _known_keyed(command):
        # Not in the table (a module's command, say): its first argument is taken as the key.
        return Route(KEYED, args[1:2])
    # Keyless, or a known command with its keys missing: any node replies (with its own error).
    return Route(ANY)


def _known_keyed(command: str) -> bool:
    return command in ("XREAD", "XREADGROUP", "XGROUP", "XINFO", "BITOP", "MSETNX")


#: Commands routed one way or another: handy for documentation and tests.
TABLE: Dict[str, str] = {}
for _name in FIRST_KEY | ALL_KEYS | TWO_KEYS | NUMKEYS_AT_1 | NUMKEYS_AT_2 | DEST_NUMKEYS:
    TABLE[_name] = KEYED
for _name in SPLITTABLE:
    TABLE[_name] = SPLIT
for _name in FANOUT_COMMANDS:
    TABLE[_name] = FANOUT
for _name in BLOCKING_COMMANDS:
    TABLE[_name] = BLOCKING
