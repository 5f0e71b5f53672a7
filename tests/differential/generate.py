"""Random command sequences per data type from a seeded RNG: valid commands, wrong types, bad
arguments, edge values. The same seed gives the same sequence."""

from __future__ import annotations

import random
from typing import Callable, Dict, List

Args = List[bytes]

_VALUES = [b"", b"0", b"1", b"-1", b"42", b"9223372036854775807", b"-9223372036854775808",
           b"3.14", b"-0.5", b"1e5", b"nan", b"inf", b"abc", b"a b", b" 5", b"x\x00y",
           b"\xff\xfe", b"\r\n", b"0x10", b"007"]


class Gen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.stream_ids: Dict[bytes, int] = {}

    def value(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            return rng.choice(_VALUES)
        if roll < 0.75:
            return str(rng.randint(-1000, 1000)).encode()
        if roll < 0.85:
            return bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
        return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 30))).encode()

    def int_arg(self, low: int = -5, high: int = 20) -> bytes:
        if self.rng.random() < 0.05:
            return self.rng.choice([b"x", b"1.5", b"", b"99999999999999999999"])
        return str(self.rng.randint(low, high)).encode()

    def float_arg(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.05:
            return rng.choice([b"nan", b"x", b"", b"1e400"])
        return rng.choice([str(rng.randint(-50, 50)).encode(),
                           f"{rng.uniform(-100, 100):.3f}".encode(), b"inf", b"-inf", b"0.1"])

    def key(self, prefix: str, count: int = 4) -> bytes:
        if self.rng.random() < 0.04:
            return b"str"  # a string key: wrong type for every other family
        return f"{prefix}{self.rng.randrange(count)}".encode()

    def pick(self, *options: bytes) -> bytes:
        return self.rng.choice(options)

    def members(self, pool: str, low: int = 1, high: int = 4) -> List[bytes]:
        return [f"{pool}{self.rng.randrange(12)}".encode()
                for _ in range(self.rng.randint(low, high))]


def strings(g: Gen) -> Args:
    k = g.key("s")
    return g.rng.choice([
        lambda: [b"SET", k, g.value()],
        lambda: [b"SET", k, g.value(), g.pick(b"NX", b"XX", b"GET", b"KEEPTTL")],
        lambda: [b"GET", k],
        lambda: [b"APPEND", k, g.value()],
        lambda: [b"INCR", k],
        lambda: [b"INCRBY", k, g.int_arg(-100, 100)],
        lambda: [b"DECRBY", k, g.int_arg(-100, 100)],
        lambda: [b"INCRBYFLOAT", k, g.float_arg()],
        lambda: [b"GETRANGE", k, g.int_arg(-10, 10), g.int_arg(-10, 10)],
        lambda: [b"SETRANGE", k, g.int_arg(0, 20), g.value()],
        lambda: [b"STRLEN", k],
        lambda: [b"MSET", k, g.value(), g.key("s"), g.value()],
        lambda: [b"MGET", k, g.key("s"), g.key("s")],
        lambda: [b"GETDEL", k],
        lambda: [b"GETEX", k, b"PERSIST"],
        lambda: [b"SETNX", k, g.value()],
        lambda: [b"LCS", k, g.key("s")],
        lambda: [b"GETSET", k, g.value()],
    ])()


def lists(g: Gen) -> Args:
    k = g.key("l")
    return g.rng.choice([
        lambda: [g.pick(b"LPUSH", b"RPUSH"), k, *[g.value() for _ in range(g.rng.randint(1, 4))]],
        lambda: [g.pick(b"LPOP", b"RPOP"), k],
        lambda: [g.pick(b"LPOP", b"RPOP"), k, g.int_arg(0, 5)],
        lambda: [b"LRANGE", k, g.int_arg(-5, 5), g.int_arg(-5, 10)],
        lambda: [b"LINDEX", k, g.int_arg(-5, 5)],
        lambda: [b"LSET", k, g.int_arg(-3, 5), g.value()],
        lambda: [b"LREM", k, g.int_arg(-2, 2), g.value()],
        lambda: [b"LINSERT", k, g.pick(b"BEFORE", b"AFTER", b"MIDDLE"), g.value(), g.value()],
        lambda: [b"LTRIM", k, g.int_arg(-5, 5), g.int_arg(-5, 10)],
        lambda: [b"LLEN", k],
        lambda: [b"LPOS", k, g.value(), b"COUNT", g.int_arg(0, 3)],
        lambda: [b"LMOVE", k, g.key("l"), g.pick(b"LEFT", b"RIGHT"), g.pick(b"LEFT", b"RIGHT")],
        lambda: [b"LPUSHX", k, g.value()],
    ])()


def hashes(g: Gen) -> Args:
    k = g.key("h")
    field = g.members("f", 1, 1)[0]
    return g.rng.choice([
        lambda: [b"HSET", k, field, g.value(), *g.members("f", 0, 0)],
        lambda: [b"HSET", k, field, g.value(), g.members("f", 1, 1)[0], g.value()],
        lambda: [b"HGET", k, field],
        lambda: [b"HDEL", k, field, *g.members("f")],
        lambda: [b"HGETALL", k],
        lambda: [b"HINCRBY", k, field, g.int_arg(-10, 10)],
        lambda: [b"HINCRBYFLOAT", k, field, g.float_arg()],
        lambda: [b"HKEYS", k],
        lambda: [b"HVALS", k],
        lambda: [b"HLEN", k],
        lambda: [b"HEXISTS", k, field],
        lambda: [b"HMGET", k, *g.members("f")],
        lambda: [b"HSTRLEN", k, field],
        lambda: [b"HSETNX", k, field, g.value()],
    ])()


def sets(g: Gen) -> Args:
    k = g.key("set")
    return g.rng.choice([
        lambda: [b"SADD", k, *g.members("m")],
        lambda: [b"SADD", k, *[str(g.rng.randint(0, 20)).encode() for _ in range(3)]],
        lambda: [b"SREM", k, *g.members("m")],
        lambda: [b"SMEMBERS", k],
        lambda: [b"SISMEMBER", k, g.members("m", 1, 1)[0]],
        lambda: [b"SMISMEMBER", k, *g.members("m")],
        lambda: [b"SCARD", k],
        lambda: [g.pick(b"SINTER", b"SUNION", b"SDIFF"), k, g.key("set")],
        lambda: [g.pick(b"SINTERSTORE", b"SUNIONSTORE", b"SDIFFSTORE"), g.key("set"), k,
                 g.key("set")],
        lambda: [b"SMOVE", k, g.key("set"), g.members("m", 1, 1)[0]],
        lambda: [b"SINTERCARD", b"2", k, g.key("set")],
    ])()


def zsets(g: Gen) -> Args:
    k = g.key("z")
    member = g.members("m", 1, 1)[0]
    return g.rng.choice([
        lambda: [b"ZADD", k, g.float_arg(), member],
        lambda: [b"ZADD", k, g.pick(b"NX", b"XX", b"GT", b"LT", b"CH"), g.float_arg(), member],
        lambda: [b"ZADD", k, b"INCR", g.float_arg(), member],
        lambda: [b"ZREM", k, *g.members("m")],
        lambda: [b"ZRANGE", k, g.int_arg(-3, 3), g.int_arg(-3, 5), b"WITHSCORES"],
        lambda: [b"ZRANGE", k, b"-inf", b"+inf", b"BYSCORE", b"LIMIT", g.int_arg(0, 2),
                 g.int_arg(-1, 3)],
        lambda: [b"ZRANGE", k, b"+", b"-", b"BYLEX", b"REV"],
        lambda: [b"ZSCORE", k, member],
        lambda: [b"ZINCRBY", k, g.float_arg(), member],
        lambda: [g.pick(b"ZRANK", b"ZREVRANK"), k, member],
        lambda: [b"ZCOUNT", k, g.float_arg(), g.float_arg()],
        lambda: [g.pick(b"ZPOPMIN", b"ZPOPMAX"), k, g.int_arg(0, 3)],
        lambda: [b"ZUNIONSTORE", g.key("z"), b"2", k, g.key("z"), b"AGGREGATE",
                 g.pick(b"SUM", b"MIN", b"MAX")],
        lambda: [b"ZINTER", b"2", k, g.key("z"), b"WITHSCORES"],
        lambda: [b"ZMSCORE", k, *g.members("m")],
        lambda: [b"ZCARD", k],
    ])()


def streams(g: Gen) -> Args:
    k = g.key("x", 2)
    rng = g.rng

    def xadd() -> Args:
        last = g.stream_ids.get(k, 0)
        step = rng.choice([1, 1, 2, 0, -1])  # 0 and -1: an id not above the last one
        g.stream_ids[k] = max(last, last + step)
        return [b"XADD", k, f"{last + step}-1".encode(), b"f", g.value()]

    return rng.choice([
        xadd, xadd,
        lambda: [b"XRANGE", k, b"-", b"+"],
        lambda: [b"XREVRANGE", k, b"+", b"-", b"COUNT", g.int_arg(0, 3)],
        lambda: [b"XLEN", k],
        lambda: [b"XDEL", k, f"{rng.randint(0, 10)}-1".encode()],
        lambda: [b"XTRIM", k, b"MAXLEN", g.int_arg(0, 10)],
        lambda: [b"XREAD", b"COUNT", b"3", b"STREAMS", k, f"{rng.randint(0, 10)}-0".encode()],
        lambda: [b"XGROUP", b"CREATE", k, b"g", b"0", b"MKSTREAM"],
        lambda: [b"XREADGROUP", b"GROUP", b"g", g.pick(b"c1", b"c2"), b"COUNT", b"2",
                 b"STREAMS", k, b">"],
        lambda: [b"XACK", k, b"g", f"{rng.randint(0, 10)}-1".encode()],
        lambda: [b"XPENDING", k, b"g"],
        lambda: [b"XINFO", b"STREAM", k],
    ])()


def bitmaps(g: Gen) -> Args:
    k = g.key("b")
    return g.rng.choice([
        lambda: [b"SETBIT", k, g.int_arg(0, 64), g.pick(b"0", b"1")],
        lambda: [b"GETBIT", k, g.int_arg(0, 80)],
        lambda: [b"BITCOUNT", k],
        lambda: [b"BITCOUNT", k, g.int_arg(-3, 3), g.int_arg(-3, 10), g.pick(b"BYTE", b"BIT")],
        lambda: [b"BITPOS", k, g.pick(b"0", b"1")],
        lambda: [b"BITOP", g.pick(b"AND", b"OR", b"XOR"), g.key("b"), k, g.key("b")],
        lambda: [b"BITOP", b"NOT", g.key("b"), k],
        lambda: [b"BITFIELD", k, b"INCRBY", g.pick(b"u4", b"i8", b"u16"), g.int_arg(0, 16),
                 g.int_arg(-300, 300)],
        lambda: [b"BITFIELD", k, b"GET", g.pick(b"u8", b"i5"), g.int_arg(0, 20)],
        lambda: [b"GET", k],
    ])()


def hyperloglog(g: Gen) -> Args:
    k = g.key("hll", 3)
    return g.rng.choice([
        lambda: [b"PFADD", k, *g.members("e", 1, 6)],
        lambda: [b"PFCOUNT", k],
        lambda: [b"PFCOUNT", k, g.key("hll", 3)],
        lambda: [b"PFMERGE", g.key("hll", 3), k, g.key("hll", 3)],
    ])()


def geo(g: Gen) -> Args:
    k = g.key("geo", 2)
    rng = g.rng
    place = g.members("p", 1, 1)[0]
    return rng.choice([
        lambda: [b"GEOADD", k, f"{rng.uniform(-180, 180):.6f}".encode(),
                 f"{rng.uniform(-85, 85):.6f}".encode(), place],
        lambda: [b"GEOADD", k, b"500", b"0", place],
        lambda: [b"GEODIST", k, place, g.members("p", 1, 1)[0], g.pick(b"m", b"km", b"mi")],
        lambda: [b"GEOPOS", k, place, g.members("p", 1, 1)[0]],
        lambda: [b"GEOHASH", k, place],
        lambda: [b"GEOSEARCH", k, b"FROMLONLAT", b"0", b"0", b"BYRADIUS", b"20000", b"km",
                 b"ASC", b"WITHDIST"],
        lambda: [b"GEOSEARCH", k, b"FROMMEMBER", place, b"BYBOX", b"5000", b"5000", b"km",
                 b"DESC", b"COUNT", b"3"],
    ])()


def keys(g: Gen) -> Args:
    rng = g.rng
    k = rng.choice([b"s0", b"l0", b"h0", b"set0", b"z0", b"str", b"none"])
    return rng.choice([
        lambda: [b"SET", k, g.value()],
        lambda: [b"RPUSH", k, g.value()],
        lambda: [b"EXISTS", k, rng.choice([b"s0", b"l0", b"none"])],
        lambda: [b"TYPE", k],
        lambda: [b"DEL", k],
        lambda: [b"RENAME", k, rng.choice([b"s0", b"l0", b"renamed"])],
        lambda: [b"RENAMENX", k, rng.choice([b"s0", b"renamed"])],
        lambda: [b"COPY", k, b"copy", b"REPLACE"],
        lambda: [b"EXPIREAT", k, str(4102444800 + rng.randint(0, 1000)).encode(),
                 *rng.choice([[], [b"NX"], [b"XX"], [b"GT"], [b"LT"]])],
        lambda: [b"PERSIST", k],
        lambda: [b"EXPIRETIME", k],
        lambda: [b"TTL", k],
        lambda: [b"OBJECT", b"ENCODING", k],
        lambda: [b"DUMP", k],
        lambda: [b"TOUCH", k, b"none"],
        lambda: [b"DBSIZE"],
    ])()


def scripting(g: Gen) -> Args:
    rng = g.rng
    body = rng.choice([
        b"return redis.call('incrby', KEYS[1], ARGV[1])",
        b"return redis.pcall('incrby', KEYS[1], ARGV[1])",
        b"redis.call('rpush', KEYS[1], ARGV[1]); return redis.call('lrange', KEYS[1], 0, -1)",
        b"return {KEYS[1], ARGV[1], tonumber(ARGV[1]), #ARGV}",
        b"return redis.call('get', KEYS[1])",
        b"return tonumber(ARGV[1])",
        b"redis.setresp(3); return redis.call('hgetall', KEYS[1])",
        b"return redis.call('type', KEYS[1])",
        b"return redis.status_reply(ARGV[1])",
        b"return redis.error_reply(ARGV[1])",
    ])
    key = rng.choice([b"s0", b"l0", b"h0", b"str"])
    return [b"EVAL", body, b"1", key, g.value()]


FAMILIES: Dict[str, Callable[[Gen], Args]] = {
    "strings": strings, "lists": lists, "hashes": hashes, "sets": sets, "zsets": zsets,
    "streams": streams, "bitmaps": bitmaps, "hyperloglog": hyperloglog, "geo": geo,
    "keys": keys, "scripting": scripting,
}


def transactions(g: Gen) -> List[Args]:
    """MULTI, a few commands of any family, then EXEC (or DISCARD), sometimes with a bad one."""
    rng = g.rng
    out: List[Args] = []
    while len(out) < 40:
        out.append([b"MULTI"])
        for _ in range(rng.randint(0, 5)):
            family = rng.choice(list(FAMILIES.values()))
            out.append(family(g) if rng.random() > 0.05 else [b"SET", b"only-key"])
        out.append([b"EXEC"] if rng.random() < 0.85 else [b"DISCARD"])
    return out


def generate(family: str, seed: int, count: int) -> List[Args]:
    """`count` commands, after one that makes the key `str` a string (for wrong-type errors)."""
    rng = random.Random(f"{family}/{seed}")
    g = Gen(rng)
    commands: List[Args] = [[b"SET", b"str", b"x"]]
    if family == "transactions":
        while len(commands) <= count:
            commands.extend(transactions(g))
        return commands
    make = FAMILIES[family]
    return commands + [make(g) for _ in range(count)]
