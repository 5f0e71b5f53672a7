"""The same bytes sent to redis-server directly and through the proxy get the same bytes back:
replies nested deeper than any fixed limit, and requests Redis refuses (or accepts) as it does."""

from __future__ import annotations

from typing import List

import pytest

from feature_support import ByteClient
from helpers import encode

PING = encode("PING")
#: After the bytes under test: a reply that shows the connection still reads requests, then
#: QUIT, so that every exchange ends with the server closing the connection.
ECHO_END_QUIT = encode("ECHO", "end") + encode("QUIT")
END_QUIT_REPLIES = b"$3\r\nend\r\n+OK\r\n"

NESTING_SCRIPT = "local t = 1 for i = 1, tonumber(ARGV[1]) do t = {t} end return t"


def exchange(port: int, data: bytes) -> bytes:
    """Every byte the server sends back for `data` until it closes the connection."""
    with ByteClient(port) as client:
        client.send_raw(data)
        return client.wait_eof(15)


# ---- replies nested deeper than any fixed limit ------------------------------------------------

def nested_replies(port: int, depth: int, protocol: int) -> List[bytes]:
    """The replies to a nested EVAL reply, alone and inside MULTI/EXEC, then to PING."""
    with ByteClient(port) as client:
        if protocol == 3:
            client.call("HELLO", "3")  # the reply names the connection: not compared
        replies = [client.call("EVAL", NESTING_SCRIPT, "0", str(depth))]
        # SELECT makes the proxy read EXEC's reply element by element (it tracks the database).
        client.send_raw(encode("MULTI") + encode("SELECT", "0") +
                        encode("EVAL", NESTING_SCRIPT, "0", str(depth)) + encode("EXEC"))
        replies.append(client.read_frames(4))
        replies.append(client.call("PING"))
        return replies


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("depth", [65, 1000, 7000])
def test_deeply_nested_reply_is_relayed_byte_for_byte(redis_server, proxy, depth, protocol):
    direct = nested_replies(redis_server.port, depth, protocol)
    nested = b"*1\r\n" * depth + b":1\r\n"
    assert direct[0] == nested, direct[0][-200:]  # Redis did build the whole reply
    proxied = nested_replies(proxy.port, depth, protocol)
    assert proxied[0] == direct[0]
    assert proxied[1] == direct[1] == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n" + nested
    assert proxied[2] == direct[2]
    log = proxy.log_text()
    assert "invalid RESP" not in log and "Traceback" not in log, log[-4000:]


def test_deeply_nested_reply_through_redis_py(proxy):
    client = proxy.client(protocol=2)
    value = client.eval(NESTING_SCRIPT, 0, 65)
    for _ in range(65):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == 1
    assert client.ping() is True


# ---- requests refused, or accepted, where Redis refuses or accepts them -------------------------

def protocol_error(text: str) -> bytes:
    return b"-ERR Protocol error: " + text.encode("latin-1") + b"\r\n"


INVALID_BULK = protocol_error("invalid bulk length")
INVALID_MULTIBULK = protocol_error("invalid multibulk length")
#: Well past Redis's 64 KiB for an unfinished length line or inline command (Redis reads 16 KiB
#: at a time: with nothing after it, the limit is passed before the end whatever the reads).
OVER_64K = b"x" * (96 * 1024)

# (name, bytes after a PING, what Redis sends after +PONG)
CASES = [
    # Lengths are read as Redis reads integers: "0", or digits not starting with 0, optionally
    # after '-', fewer than 21 characters, within a signed 64-bit integer.
    ("bulk leading zero", b"*1\r\n$04\r\nPING\r\n", INVALID_BULK),
    ("bulk zero then zero", b"*1\r\n$00\r\n\r\n", INVALID_BULK),
    ("bulk plus sign", b"*1\r\n$+4\r\nPING\r\n", INVALID_BULK),
    ("bulk leading space", b"*1\r\n$ 4\r\nPING\r\n", INVALID_BULK),
    ("bulk trailing space", b"*1\r\n$4 \r\nPING\r\n", INVALID_BULK),
    ("bulk empty length", b"*1\r\n$\r\n", INVALID_BULK),
    ("bulk minus one", b"*1\r\n$-1\r\n", INVALID_BULK),
    ("bulk minus two", b"*1\r\n$-2\r\n", INVALID_BULK),
    ("bulk minus zero", b"*1\r\n$-0\r\n", INVALID_BULK),
    ("bulk 25 digits", b"*1\r\n$" + b"1" * 25 + b"\r\n", INVALID_BULK),
    ("bulk 20 digits overflowing", b"*1\r\n$" + b"9" * 20 + b"\r\n", INVALID_BULK),
    ("bulk above 512 MiB", b"*1\r\n$536870913\r\n", INVALID_BULK),
    ("count leading zero", b"*01\r\n$4\r\nPING\r\n", INVALID_MULTIBULK),
    ("count plus sign", b"*+1\r\n$4\r\nPING\r\n", INVALID_MULTIBULK),
    ("count leading space", b"* 1\r\n$4\r\nPING\r\n", INVALID_MULTIBULK),
    ("count empty", b"*\r\n", INVALID_MULTIBULK),
    ("count minus zero", b"*-0\r\n", INVALID_MULTIBULK),
    ("count minus leading zero", b"*-01\r\n", INVALID_MULTIBULK),
    ("count above INT_MAX", b"*3000000000\r\n", INVALID_MULTIBULK),
    ("count INT_MAX plus one", b"*2147483648\r\n", INVALID_MULTIBULK),
    ("count 25 digits", b"*" + b"1" * 25 + b"\r\n", INVALID_MULTIBULK),
    ("count below the 64-bit minimum", b"*-9223372036854775809\r\n", INVALID_MULTIBULK),
    # INT_MAX itself is a valid count: the request that follows is read as its first element.
    ("count INT_MAX", b"*2147483647\r\n", protocol_error("expected '$', got '*'")),
    # Redis reads the next element's '$' only once its whole line is there.
    ("element not a bulk", b"*1\r\n:1\r\n", protocol_error("expected '$', got ':'")),
    ("element is a bare CRLF", b"*1\r\n\r\n", protocol_error("expected '$', got ' '")),
    ("element starts with a high byte", b"*1\r\n\xff1\r\n", b"-ERR Protocol error: expected "
                                                             b"'$', got '\xff'\r\n"),
    ("unbalanced quotes", b"ECHO \"a\r\n", protocol_error("unbalanced quotes in request")),
]

# (name, bytes after a PING, what Redis sends after +PONG): lines that never end. Nothing may
# follow them: a CR arriving in the same read as the 64 KiB limit would end the line instead.
TOO_LONG = [
    # Without a CR in 64 KiB, the line is too long, whatever it starts with.
    ("count line without CR", b"*1" + OVER_64K, protocol_error("too big mbulk count string")),
    ("bulk line without CR", b"*1\r\n" + OVER_64K, protocol_error("too big bulk count string")),
    ("inline without LF", b"PING" + OVER_64K, protocol_error("too big inline request")),
    # A NUL byte hides the end of the line from Redis: it waits, then the line is too long.
    ("NUL in a count line", b"*1\x00\r\n" + OVER_64K, protocol_error("too big mbulk count string")),
    ("NUL in a bulk line", b"*1\r\n$4\x00\r\nPING\r\n" + OVER_64K,
     protocol_error("too big bulk count string")),
    ("NUL in an inline command", b"PI\x00NG\r\n" + OVER_64K, protocol_error("too big inline request")),
]

# (name, bytes after a PING, the replies Redis sends to them): requests Redis accepts.
ACCEPTED = [
    ("count zero is skipped", b"*0\r\n", b""),
    ("count minus one is skipped", b"*-1\r\n", b""),
    ("any negative count is skipped", b"*-5\r\n", b""),
    ("the 64-bit minimum is skipped", b"*-9223372036854775808\r\n", b""),
    ("empty lines are skipped", b"\r\n\n", b""),
    ("an empty bulk", b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n", b"$0\r\n\r\n"),
    # Redis skips the two bytes after a payload and after a length line's CR unread.
    ("payload followed by other bytes", b"*1\r\n$4\r\nPINGxx", b"+PONG\r\n"),
    ("CR followed by another byte", b"*2\rx$4\rxECHO\r\n$2\r\nhi\r\n", b"$2\r\nhi\r\n"),
    ("inline with CR CR LF", b"ECHO a\r\r\n", b"$1\r\na\r\n"),
]


def compare(redis_server, proxy, data: bytes) -> bytes:
    direct = exchange(redis_server.port, data)
    proxied = exchange(proxy.port, data)
    assert proxied == direct, f"\nredis: {direct[:300]!r}\nproxy: {proxied[:300]!r}"
    return direct


@pytest.mark.parametrize("name, data, expected", CASES, ids=[case[0] for case in CASES])
def test_malformed_request_gets_what_redis_sends(redis_server, proxy, name, data, expected):
    sent = PING + data + ECHO_END_QUIT
    direct = compare(redis_server, proxy, sent)
    # The PING framed before the bad bytes is served; nothing after them is.
    assert direct == b"+PONG\r\n" + expected, direct[:300]


@pytest.mark.parametrize("name, data, expected", TOO_LONG, ids=[case[0] for case in TOO_LONG])
def test_overlong_line_gets_what_redis_sends(redis_server, proxy, name, data, expected):
    direct = compare(redis_server, proxy, PING + data)
    assert direct == b"+PONG\r\n" + expected, direct[:300]


@pytest.mark.parametrize("name, data, expected", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_request_redis_accepts_is_accepted(redis_server, proxy, name, data, expected):
    sent = PING + data + ECHO_END_QUIT
    direct = compare(redis_server, proxy, sent)
    assert direct == b"+PONG\r\n" + expected + END_QUIT_REPLIES, direct[:300]

