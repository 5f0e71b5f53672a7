"""Unit tests for RESP framing and encoding, and for client session tracking (no sockets)."""

from __future__ import annotations

import cbor2
import hiredis
import pytest

from shotover_gevent.message import Message
from shotover_gevent.protocol import resp
from shotover_gevent.protocol.resp import ProtocolError, ReplyFramer, RequestFramer
from shotover_gevent.session import Session


INCOMPLETE = object()


def bulk(payload: bytes) -> bytes:
    return b"$" + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n"


def multibulk(*args: bytes) -> bytes:
    return b"*" + str(len(args)).encode() + b"\r\n" + b"".join(bulk(a) for a in args)


# ---- replies ------------------------------------------------------------------------------------

REPLY_FRAMES = [
    b"+OK\r\n",
    b"-ERR something went wrong\r\n",
    b":12345\r\n",
    b":-7\r\n",
    b"$5\r\nhello\r\n",
    b"$-1\r\n",
    b"$0\r\n\r\n",
    b"$8\r\nab\r\ncd\r\n\r\n",  # payload with CRLF inside and at its end
    bulk(bytes(range(256))),
    b"*3\r\n:1\r\n$3\r\nfoo\r\n+bar\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"_\r\n",
    b",3.14\r\n",
    b",-inf\r\n",
    b"#t\r\n",
    b"#f\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n",
    b"%0\r\n",
    b"~3\r\n+a\r\n+b\r\n:3\r\n",
    b"~0\r\n",
    # an attribute travels with the reply it annotates
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
    b"*2\r\n:2039123\r\n:9543892\r\n",
    b">3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhello\r\n",
    # nested aggregates of every kind, with nulls and empties inside
    b"*2\r\n*2\r\n%1\r\n+k\r\n~1\r\n$1\r\nx\r\n*0\r\n>1\r\n*2\r\n$-1\r\n_\r\n",
    b"*3\r\n*-1\r\n$0\r\n\r\n%1\r\n$2\r\n\r\n\r\n*1\r\n$2\r\n\r\n\r\n",
    b"*1\r\n" * 30 + b":1\r\n",
]
REPLY_STREAM = b"".join(REPLY_FRAMES)


def drain_replies(framer: ReplyFramer) -> list:
    frames = []
    for _ in range(10_000):
        frame = framer.next_frame()
        if frame is None:
            return frames
        frames.append(frame)
    raise AssertionError("framer never ran dry")


def test_reply_stream_in_one_piece():
    framer = ReplyFramer()
    framer.feed(REPLY_STREAM)
    assert drain_replies(framer) == REPLY_FRAMES
    assert framer.pending() == 0
    assert framer.unread_bytes() == b""


def test_reply_stream_cut_at_every_offset():
    for cut in range(len(REPLY_STREAM) + 1):
        framer = ReplyFramer()
        framer.feed(REPLY_STREAM[:cut])
        frames = drain_replies(framer)
        # Only whole frames come out of the first piece, and nothing is consumed past them.
        assert b"".join(frames) + framer.unread_bytes() == REPLY_STREAM[:cut], cut
        framer.feed(REPLY_STREAM[cut:])
        frames += drain_replies(framer)
        assert frames == REPLY_FRAMES, f"cut at {cut}"
        assert framer.pending() == 0


def test_replies_read_in_pieces_come_whole_and_in_order():
    """take_fed(), how the callbacks take a read's replies without copying it first: every cut
    of the stream gives the same frames as feeding it; idle() only while nothing is buffered or
    half framed (when a read may be relayed as it is: test_ordering)."""
    framer = ReplyFramer()
    assert framer.idle()
    framer.feed(b"+O")
    assert not framer.idle() and framer.take(1) == []  # buffered
    framer.feed(b"K\r\n*2\r\n:1\r\n")
    assert framer.take(1) == [b"+OK\r\n"] and not framer.idle()  # half an aggregate
    framer.feed(b":2\r\n")
    assert framer.take(1) == [b"*2\r\n:1\r\n:2\r\n"] and framer.idle()
    for cut in range(len(REPLY_STREAM) + 1):
        framer = ReplyFramer()
        frames = framer.take_fed(memoryview(REPLY_STREAM[:cut]), 10_000)
        frames += framer.take_fed(REPLY_STREAM[cut:], 10_000)
        assert frames == REPLY_FRAMES, f"cut at {cut}"
        assert framer.pending() == 0 and framer.idle()


def test_reply_stream_one_byte_at_a_time():
    framer = ReplyFramer()
    frames = []
    for index in range(len(REPLY_STREAM)):
        framer.feed(REPLY_STREAM[index:index + 1])
        frames += drain_replies(framer)
    assert frames == REPLY_FRAMES


def test_each_reply_frame_parses_as_one_value():
    # Cross-check the frame boundaries with an independent parser (attributes aside, which
    # hiredis returns as a value of their own, and blob errors, which it does not read).
    for frame in REPLY_FRAMES:
        if frame.startswith((b"|", b"!")):
            continue
        reader = hiredis.Reader(notEnoughData=INCOMPLETE)
        reader.feed(frame)
        assert reader.gets() is not INCOMPLETE, frame
        assert reader.gets() is INCOMPLETE, frame


@pytest.mark.parametrize("bad", [
    b"$abc\r\n",
    b"$-2\r\n",
    b"*x\r\n",
    b"*-2\r\n",
    b"%-1\r\n",
    b"?oops\r\n",
    b"$3\r\nabcXY",  # payload not followed by CRLF
])
def test_reply_framer_rejects(bad):
    framer = ReplyFramer()
    framer.feed(bad)
    with pytest.raises(ProtocolError):
        framer.next_frame()


def test_reply_bulk_above_limit_fails_before_the_payload():
    framer = ReplyFramer(max_bulk_len=16)
    framer.feed(b"$17\r\n")  # none of the payload has arrived
    with pytest.raises(ProtocolError):
        framer.next_frame()
    framer = ReplyFramer()
    framer.feed(b"$600000000\r\n")
    with pytest.raises(ProtocolError):
        framer.next_frame()
    framer = ReplyFramer(max_bulk_len=16)
    framer.feed(b"$16\r\n" + b"x" * 16 + b"\r\n")
    assert framer.next_frame() == b"$16\r\n" + b"x" * 16 + b"\r\n"


def nested(depth: int, kind: bytes = b"*") -> bytes:
    return kind + b"1\r\n" + b"*1\r\n" * (depth - 1) + b":1\r\n"


def depth_of(value) -> int:
    """How deep a nested single-element list goes (without recursion)."""
    depth = 0
    while isinstance(value, list):
        assert len(value) == 1
        value, depth = value[0], depth + 1
    assert value == 1
    return depth


@pytest.mark.parametrize("depth", [65, 1025, 100_000])
def test_deeply_nested_reply_frames_whole(depth):
    frame = nested(depth)
    stream = frame + b"+OK\r\n"
    framer = ReplyFramer()
    framer.feed(stream)
    assert framer.next_frame() == frame
    assert framer.next_frame() == b"+OK\r\n"
    # Cut into reads, the scan resumes: same frames, and nothing returned early.
    framer = ReplyFramer()
    frames = []
    for index in range(0, len(stream), 4093):
        framer.feed(stream[index:index + 4093])
        frames += drain_replies(framer)
    assert frames == [frame, b"+OK\r\n"]


@pytest.mark.parametrize("depth", [65, 1025, 100_000])
def test_deeply_nested_reply_parses_without_recursion(depth):
    assert depth_of(resp.parse_frame(nested(depth))) == depth
    push = resp.parse_frame(nested(depth, b">"))
    assert depth_of(push) == depth
    assert resp.parse_frame(b":7\r\n") == 7


def comparable(value):
    """A parsed value with errors (which do not compare equal) turned into tuples."""
    if isinstance(value, hiredis.ReplyError):
        return ("error", str(value))
    if isinstance(value, list):
        return [comparable(item) for item in value]
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    return value


def test_parse_frame_gives_what_hiredis_gives():
    # The step-by-step reader behind parse_frame must agree with hiredis where both read.
    for frame in REPLY_FRAMES + [b"*2\r\n-ERR inside\r\n$-1\r\n"]:
        if frame.startswith((b"|", b"!")):
            continue
        reader = hiredis.Reader()
        reader.feed(frame)
        expected = comparable(reader.gets())
        assert comparable(resp._parse_stepwise(frame)) == expected, frame
        assert comparable(resp.parse_frame(frame)) == expected, frame


def test_parse_frame_reads_false_attributes_and_blob_errors():
    assert resp.parse_frame(b"#f\r\n") is False
    # An attribute is left out; it must not leave bytes behind for the next frame parsed.
    assert resp.parse_frame(b"|1\r\n+ttl\r\n:3\r\n:5\r\n") == 5
    assert resp.parse_frame(b":7\r\n") == 7
    assert resp.parse_frame(b"*2\r\n|1\r\n+a\r\n:1\r\n:5\r\n:6\r\n") == [5, 6]
    assert resp.parse_frame(b":8\r\n") == 8
    error = resp.parse_frame(b"!21\r\nSYNTAX invalid syntax\r\n")
    assert isinstance(error, hiredis.ReplyError) and str(error) == "SYNTAX invalid syntax"


# ---- requests -----------------------------------------------------------------------------------

ALL_BYTES = bytes(range(256))

# (bytes on the wire, arguments the server must see)
REQUESTS = [
    (multibulk(b"PING"), [b"PING"]),
    (multibulk(b"SET", ALL_BYTES, b"v\r\nx\r\n"), [b"SET", ALL_BYTES, b"v\r\nx\r\n"]),
    (multibulk(b"SET", b"\r\n", b""), [b"SET", b"\r\n", b""]),
    (b"PING\r\n", [b"PING"]),
    (b"SET a \"b c\"\r\n", [b"SET", b"a", b"b c"]),
    (b"SET k \"x\\ny\\x41\\\"q\"\r\n", [b"SET", b"k", b"x\nyA\"q"]),
    (b"SET 'single quoted' \"\"\r\n", [b"SET", b"single quoted", b""]),
    (b"  ECHO   spaced\t\r\n", [b"ECHO", b"spaced"]),
    (b"ECHO lf-only\n", [b"ECHO", b"lf-only"]),
    (multibulk(b"HSET", b"h", *[bytes([i]) for i in range(256)]),
     [b"HSET", b"h", *[bytes([i]) for i in range(256)]]),
    (multibulk(b"get", b"lowercase"), [b"get", b"lowercase"]),
]
# Lines Redis skips without replying: they must produce no request.
IGNORED = [b"\r\n", b"*0\r\n", b"*-1\r\n"]
REQUEST_STREAM = b"".join(wire for wire, _ in REQUESTS[:4]) + IGNORED[0] + \
    b"".join(wire for wire, _ in REQUESTS[4:8]) + IGNORED[1] + IGNORED[2] + \
    b"".join(wire for wire, _ in REQUESTS[8:])
EXPECTED_REQUESTS = [(multibulk(*args), args[0]) for _, args in REQUESTS]


def drain_requests(framer: RequestFramer) -> list:
    requests, error = framer.pop_requests()
    assert error is None, error
    return requests


def test_request_stream_in_one_piece():
    framer = RequestFramer()
    framer.feed(REQUEST_STREAM)
    assert drain_requests(framer) == EXPECTED_REQUESTS
    assert framer.pending() == 0


def test_request_stream_cut_at_every_offset():
    for cut in range(len(REQUEST_STREAM) + 1):
        framer = RequestFramer()
        framer.feed(REQUEST_STREAM[:cut])
        requests = drain_requests(framer)
        # Whatever was not returned is kept exactly, ready to be handed on.
        assert REQUEST_STREAM[:cut].endswith(framer.unread_bytes()), cut
        framer.feed(REQUEST_STREAM[cut:])
        requests += drain_requests(framer)
        assert requests == EXPECTED_REQUESTS, f"cut at {cut}"
        assert framer.unread_bytes() == b""


def test_request_stream_one_byte_at_a_time():
    framer = RequestFramer()
    requests = []
    for index in range(len(REQUEST_STREAM)):
        framer.feed(REQUEST_STREAM[index:index + 1])
        requests += drain_requests(framer)
    assert requests == EXPECTED_REQUESTS


def test_unread_bytes_are_exactly_the_unfinished_request():
    partial = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nval"
    framer = RequestFramer()
    framer.feed(multibulk(b"PING") + partial)
    assert drain_requests(framer) == [(multibulk(b"PING"), b"PING")]
    assert framer.unread_bytes() == partial
    assert framer.pending() == len(partial)


def test_parsed_arguments_match_the_wire():
    framer = RequestFramer()
    framer.feed(REQUEST_STREAM)
    for (raw, name), (_, args) in zip(drain_requests(framer), REQUESTS):
        assert resp.parse_command(raw) == args
        assert Message(raw, name).command == args[0].decode("latin-1").upper()
        assert Message(raw, name).args == args


def test_single_quotes_take_escaped_quote_like_redis():
    # Redis reads 'it\'s' inside single quotes as: it's
    framer = RequestFramer()
    framer.feed(b"SET k 'it\\'s'\r\n")
    assert drain_requests(framer) == [(multibulk(b"SET", b"k", b"it's"), b"SET")]


@pytest.mark.parametrize("bad, words", [
    (b"*1\r\n+PING\r\n", "expected '$'"),
    (b"*1\r\n$abc\r\n", "bulk"),
    (b"*2\r\n$3\r\nGET\r\n$-5\r\n", "bulk"),
    (b"*1\r\n$-1\r\n", "bulk"),
    (b"*abc\r\n", "multibulk"),
    (b"SET a \"b\r\n", "quotes"),
    (b"SET a \"b\"c\r\n", "quotes"),
])
def test_request_framer_rejects(bad, words):
    framer = RequestFramer()
    framer.feed(bad)
    requests, error = framer.pop_requests()
    assert requests == []
    assert isinstance(error, ProtocolError)
    assert words in str(error)


def test_request_bulk_above_limit_fails_before_the_payload():
    framer = RequestFramer(max_bulk_len=10)
    framer.feed(b"*2\r\n$3\r\nGET\r\n$11\r\n")
    requests, error = framer.pop_requests()
    assert requests == [] and isinstance(error, ProtocolError)

    framer = RequestFramer()
    framer.feed(b"*2\r\n$3\r\nSET\r\n$600000000\r\n")
    requests, error = framer.pop_requests()
    assert requests == [] and isinstance(error, ProtocolError)

    framer = RequestFramer(max_bulk_len=10)
    framer.feed(multibulk(b"GET", b"x" * 10))
    assert drain_requests(framer) == [(multibulk(b"GET", b"x" * 10), b"GET")]


def test_multibulk_count_above_int_max_is_refused():
    framer = RequestFramer()
    framer.feed(b"*2147483648\r\n")
    _, error = framer.pop_requests()
    assert str(error) == "invalid multibulk length"
    # Redis takes INT_MAX itself and waits for the elements.
    framer = RequestFramer()
    framer.feed(b"*2147483647\r\n$1\r\na\r\n")
    assert framer.pop_requests() == ([], None)
    assert framer.pending() == 20


# What Redis replies after "Protocol error: " (networking.c, util.c string2ll).
@pytest.mark.parametrize("bad, message", [
    (b"*1\r\n$04\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$+4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$ 4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$4 \r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$\r\n", "invalid bulk length"),
    (b"*1\r\n$-0\r\n", "invalid bulk length"),
    (b"*1\r\n$-2\r\n", "invalid bulk length"),
    (b"*1\r\n$" + b"1" * 25 + b"\r\n", "invalid bulk length"),
    (b"*01\r\n$4\r\nPING\r\n", "invalid multibulk length"),
    (b"*+1\r\n", "invalid multibulk length"),
    (b"*\r\n", "invalid multibulk length"),
    (b"*-0\r\n", "invalid multibulk length"),
    (b"*3000000000\r\n", "invalid multibulk length"),
    (b"*" + b"1" * 25 + b"\r\n", "invalid multibulk length"),
    (b"*-9223372036854775809\r\n", "invalid multibulk length"),
    (b"*1\r\n:1\r\n", "expected '$', got ':'"),
    (b"*1\r\n" + b"x" * (resp.MAX_INLINE_LEN + 1), "too big bulk count string"),
    (b"*1\x00\r\n" + b"x" * resp.MAX_INLINE_LEN, "too big mbulk count string"),
    (b"PI\x00NG\r\n" + b"x" * resp.MAX_INLINE_LEN, "too big inline request"),
], ids=lambda value: repr(value[:24]) if isinstance(value, bytes) else None)
def test_request_lengths_are_read_as_redis_reads_them(bad, message):
    stream = multibulk(b"PING") + bad
    framer = RequestFramer()
    framer.feed(stream)
    requests, error = framer.pop_requests()
    assert requests == [(multibulk(b"PING"), b"PING")]
    assert isinstance(error, ProtocolError) and str(error) == message
    # Byte by byte: the same request, then the same error once the line is whole.
    framer = RequestFramer()
    requests = []
    for index in range(len(stream)):
        framer.feed(stream[index:index + 1])
        framed, error = framer.pop_requests()
        requests += framed
        if error is not None:
            break
    assert requests == [(multibulk(b"PING"), b"PING")]
    assert str(error) == message and index >= len(stream) - len(bad) - 1


def test_request_error_quotes_the_clients_byte():
    framer = RequestFramer()
    framer.feed(b"*1\r\n\xff1\r\n")
    _, error = framer.pop_requests()
    assert resp.error_reply(f"ERR Protocol error: {error}") == \
        b"-ERR Protocol error: expected '$', got '\xff'\r\n"
    assert resp.error_reply("ERR caf\u00e9 \ud800") == b"-ERR caf\xc3\xa9 ?\r\n"


@pytest.mark.parametrize("sent, args", [
    # Redis skips the two bytes after a payload, and the byte after a line's CR, unread.
    (b"*2\r\n$3\r\nGETxx$1\r\nk\r\n", [b"GET", b"k"]),
    (b"*2\rx$4\rxECHO\r\n$2\r\nhi\r\n", [b"ECHO", b"hi"]),
    (b"*1\r\n$4\r\nPING\n\n", [b"PING"]),
    (b"ECHO a\r\r\n", [b"ECHO", b"a"]),
])
def test_odd_separators_redis_accepts_are_passed_on_well_formed(sent, args):
    for pieces in ([sent], [sent[i:i + 1] for i in range(len(sent))]):
        framer = RequestFramer()
        requests = []
        for piece in pieces:
            framer.feed(piece)
            requests += drain_requests(framer)
        assert requests == [(multibulk(*args), args[0])]
        assert framer.pending() == 0


def test_nul_byte_hides_the_end_of_a_line_as_in_redis():
    # Redis looks for a line's end with strchr(), which stops at a NUL byte: it waits.
    for stream in (b"*1\x00\r\n$4\r\nPING\r\n", b"*1\r\n$4\x00\r\nPING\r\n", b"PI\x00NG\r\n"):
        framer = RequestFramer()
        framer.feed(stream)
        assert framer.pop_requests() == ([], None)
        framer.feed(b"PING\r\n")
        assert framer.pop_requests() == ([], None)
        assert framer.unread_bytes() == stream + b"PING\r\n"


class CountingBytearray(bytearray):
    """A buffer that adds up how many bytes find() looked at."""

    examined = 0

    def find(self, sub, start=0, end=None):
        stop = len(self) if end is None else end
        found = super().find(sub, start, stop)
        self.examined += (found + len(sub) if found >= 0 else stop) - start
        return found


@pytest.mark.parametrize("stream, piece", [
    (b"*1\r\n$" + b"1" * 60_000, 1),  # a length line whose end has not come
    (b"*2\r\n$3\r\nGET\r\n" + b"9" * 60_000, 1),
    (b"GET " + b"k" * 60_000, 1),  # an inline command
    (b"*1000000000\r\n" + b"$1\r\na\r\n" * 100_000, 997),  # a request with no end
], ids=["bulk length line", "bulk length line after an element", "inline", "endless request"])
def test_unfinished_request_is_not_scanned_again(stream, piece):
    framer = RequestFramer()
    framer._buf.data = counting = CountingBytearray()
    for index in range(0, len(stream), piece):
        framer.feed(stream[index:index + piece])
        assert framer.pop_requests() == ([], None)
    assert framer.unread_bytes() == stream
    assert counting.examined <= 3 * len(stream), counting.examined


def test_requests_before_an_error_are_still_returned():
    framer = RequestFramer()
    framer.feed(multibulk(b"SET", b"a", b"1") + b"PING\r\n" + b"*1\r\n+PING\r\n" +
                multibulk(b"GET", b"a"))
    requests, error = framer.pop_requests()
    assert requests == [(multibulk(b"SET", b"a", b"1"), b"SET"), (multibulk(b"PING"), b"PING")]
    assert isinstance(error, ProtocolError) and "expected '$'" in str(error)


def test_overlong_inline_line_is_refused():
    framer = RequestFramer()
    framer.feed(b"A" * (resp.MAX_INLINE_LEN + 10))
    _, error = framer.pop_requests()
    assert isinstance(error, ProtocolError)


# ---- encoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [b"PING"],
    [b"SET", ALL_BYTES, b"\r\n"],
    [b"SET", b"", b""],
    [b"MSET"] + [b"k%d" % i for i in range(100)],
])
def test_encode_then_parse_command(args):
    raw = resp.encode_command(args)
    assert raw == multibulk(*args)
    assert resp.parse_command(raw) == args


def test_encode_command_accepts_text_and_numbers():
    assert resp.encode_command(["SET", "k", 5]) == multibulk(b"SET", b"k", b"5")


def parse_with_hiredis(data: bytes):
    reader = hiredis.Reader(notEnoughData=INCOMPLETE)
    reader.feed(data)
    value = reader.gets()
    assert value is not INCOMPLETE, "incomplete encoding"
    assert reader.gets() is INCOMPLETE, "more than one value encoded"
    return value


@pytest.mark.parametrize("value, resp2, resp3", [
    (None, None, None),
    (True, 1, True),
    (False, 0, False),
    (0, 0, 0),
    (-123456789012, -123456789012, -123456789012),
    (2.5, b"2.5", 2.5),
    (b"", b"", b""),
    (ALL_BYTES, ALL_BYTES, ALL_BYTES),
    (b"a\r\nb", b"a\r\nb", b"a\r\nb"),
    ("text", b"text", b"text"),
    ([1, b"x", None, [b"y", []]], [1, b"x", None, [b"y", []]], [1, b"x", None, [b"y", []]]),
    ({b"k": 1, b"m": [b"v"]}, [b"k", 1, b"m", [b"v"]], {b"k": 1, b"m": [b"v"]}),
])
def test_encode_value_round_trip(value, resp2, resp3):
    assert parse_with_hiredis(resp.encode_value(value)) == resp2
    assert parse_with_hiredis(resp.encode_value(value, resp3=True)) == resp3


def test_encode_value_sets_and_errors():
    assert sorted(parse_with_hiredis(resp.encode_value({b"a", b"b"}, resp3=True))) == [b"a", b"b"]
    assert resp.encode_value({b"a"}, resp3=True).startswith(b"~1\r\n")
    assert resp.encode_value({b"a"}).startswith(b"*1\r\n")
    error = parse_with_hiredis(resp.encode_value(ValueError("ERR broken\r\nline")))
    assert isinstance(error, hiredis.ReplyError)
    assert str(error) == "ERR broken  line"
    with pytest.raises(TypeError):
        resp.encode_value(object())


def test_encoded_values_frame_as_one_reply():
    values = [None, 1, 2.5, b"x\r\ny", [1, [2, {b"k": b"v"}]], {b"s"}]
    for resp3 in (False, True):
        stream = [resp.encode_value(v, resp3=resp3) for v in values]
        framer = ReplyFramer()
        framer.feed(b"".join(stream))
        assert drain_replies(framer) == stream


def test_error_reply_cannot_break_framing():
    raw = resp.error_reply("ERR a\r\nb\nc")
    assert raw == b"-ERR a  b c\r\n"
    framer = ReplyFramer()
    framer.feed(raw)
    assert framer.next_frame() == raw


# ---- session tracking ----------------------------------------------------------------------------

OK = Message(b"+OK\r\n")


def req(*args) -> Message:
    return Message.request(list(args))


def sub_frames(kind: bytes, names, push: bool = False, start: int = 1) -> Message:
    head = b">3\r\n" if push else b"*3\r\n"
    frames = []
    count = start
    for name in names:
        frames.append(head + bulk(kind) + bulk(name) + b":%d\r\n" % count)
        count += 1 if not kind.startswith(b"un") and not kind.startswith(b"pun") else -1
    return Message(b"".join(frames))


def test_select_only_counts_when_it_succeeds():
    session = Session()
    session.observe(req("SELECT", "3"), OK)
    assert session.selected_db == 3
    session.observe(req("SELECT", "99"), Message(b"-ERR DB index is out of range\r\n"))
    assert session.selected_db == 3
    session.observe(req("select", "0"), OK)
    assert session.selected_db == 0


def test_hello_auth_and_setname():
    session = Session()
    session.observe(req("HELLO", "3", "AUTH", "alice", "secret", "SETNAME", "app"),
                    Message(b"%1\r\n+proto\r\n:3\r\n"))
    assert session.resp_version == 3
    assert (session.auth_username, session.auth_password) == (b"alice", b"secret")
    assert session.client_name == b"app"

    session = Session()
    session.observe(req("AUTH", "pw"), OK)
    assert (session.auth_username, session.auth_password) == (None, b"pw")
    session.observe(req("AUTH", "bob", "pw2"), OK)
    assert (session.auth_username, session.auth_password) == (b"bob", b"pw2")
    session.observe(req("AUTH", "eve", "wrong"), Message(b"-WRONGPASS invalid\r\n"))
    assert (session.auth_username, session.auth_password) == (b"bob", b"pw2")

    session.observe(req("CLIENT", "SETNAME", "worker-1"), OK)
    assert session.client_name == b"worker-1"
    session.observe(req("client", "setname", ""), OK)
    assert session.client_name is None


def test_subscriptions_follow_confirmations():
    session = Session()
    session.observe(req("SUBSCRIBE", "a", "b"), sub_frames(b"subscribe", [b"a", b"b"]))
    assert session.channels == {b"a", b"b"}
    assert session.subscribed
    session.observe(req("PSUBSCRIBE", "news.*"),
                    sub_frames(b"psubscribe", [b"news.*"], push=True, start=3))
    assert session.patterns == {b"news.*"}
    session.observe(req("UNSUBSCRIBE", "a"), sub_frames(b"unsubscribe", [b"a"], start=2))
    assert session.channels == {b"b"}
    session.observe(req("UNSUBSCRIBE"), sub_frames(b"unsubscribe", [b"b"], start=1))
    session.observe(req("PUNSUBSCRIBE"), sub_frames(b"punsubscribe", [b"news.*"], start=0))
    assert not session.subscribed


def test_replay_commands_rebuild_the_session_in_order():
    session = Session()
    session.observe(req("AUTH", "bob", "pw"), OK)
    session.observe(req("HELLO", "3"), Message(b"%1\r\n+proto\r\n:3\r\n"))
    session.observe(req("SELECT", "5"), OK)
    session.observe(req("CLIENT", "SETNAME", "n"), OK)
    session.observe(req("READONLY"), OK)
    session.observe(req("SUBSCRIBE", "z", "a"), sub_frames(b"subscribe", [b"z", b"a"], push=True))
    assert session.replay_commands() == [
        [b"AUTH", b"bob", b"pw"],
        [b"HELLO", b"3"],
        [b"SELECT", b"5"],
        [b"CLIENT", b"SETNAME", b"n"],
        [b"READONLY"],
        [b"SUBSCRIBE", b"a", b"z"],
    ]
    assert Session().replay_commands() == []


def test_session_dict_round_trip():
    session = Session()
    session.observe(req("AUTH", "pw"), OK)
    session.observe(req("SELECT", "2"), OK)
    session.observe(req("CLIENT", "SETNAME", "x"), OK)
    session.observe(req("SUBSCRIBE", "c\r\n"), sub_frames(b"subscribe", [b"c\r\n"]))
    session.observe(req("PSUBSCRIBE", "p*"), sub_frames(b"psubscribe", [b"p*"], start=2))
    data = session.to_dict()
    # The dict must survive the checkpoint encoding.
    restored = Session.from_dict(cbor2.loads(cbor2.dumps(data)))
    assert restored.to_dict() == data
    assert restored.replay_commands() == session.replay_commands()
    assert restored.selected_db == 2 and restored.channels == {b"c\r\n"}
    assert Session.from_dict({}).to_dict() == Session().to_dict()


def test_handover_blocked_during_transaction_and_watch():
    session = Session()
    assert session.handover_blocker() is None
    session.observe(req("MULTI"), OK)
    assert session.handover_blocker() == "transaction"
    session.observe(req("EXEC"), Message(b"*0\r\n"))
    assert session.handover_blocker() is None
    session.observe(req("WATCH", "k"), OK)
    assert session.handover_blocker() == "watch"
    session.observe(req("MULTI"), OK)
    session.observe(req("EXEC"), Message(b"-EXECABORT Transaction discarded\r\n"))
    assert session.handover_blocker() is None
    session.observe(req("MULTI"), OK)
    session.observe(req("DISCARD"), OK)
    assert session.handover_blocker() is None


def test_reset_forgets_everything():
    session = Session()
    session.observe(req("SELECT", "4"), OK)
    session.observe(req("MULTI"), OK)
    session.observe(req("RESET"), Message(b"+RESET\r\n"))
    assert session.to_dict() == Session().to_dict()
    assert session.handover_blocker() is None


@pytest.mark.parametrize("framing", ["c", "python"])
def test_reply_framer_take_returns_the_frames_next_frame_would(framing, monkeypatch):
    """take(n), what a shared upstream connection reads with, gives the same frames in the same
    order as next_frame(), whatever the reads and counts (framing simple frames in C where it
    was built, in Python otherwise)."""
    import random

    if framing == "python":
        monkeypatch.setattr(resp, "_scan_replies", None)
    elif resp._scan_replies is None:
        pytest.skip("the C framing is not built")
    rng = random.Random(7)
    kinds = [b"+OK\r\n", b":12\r\n", b"$3\r\nabc\r\n", b"*2\r\n$1\r\na\r\n:1\r\n", b"$-1\r\n",
             b"-ERR x\r\n", b"%1\r\n+k\r\n+v\r\n", b"*0\r\n", b"*-1\r\n", b"!3\r\nerr\r\n",
             b"=7\r\ntxt:abc\r\n", b"$0\r\n\r\n", b"$2000\r\n" + b"x" * 2000 + b"\r\n",
             b"+a\rb\r\n", b"_\r\n", b",1.5\r\n", b"$5\r\na\r\nbc\r\n"]
    for _ in range(300):
        frames = [rng.choice(kinds) for _ in range(rng.randint(1, 60))]
        data = b"".join(frames)
        taker, stepper = resp.ReplyFramer(), resp.ReplyFramer()
        taken, stepped = [], []
        for start in range(0, len(data), 17):
            chunk = data[start:start + 17]
            taker.feed(chunk)
            stepper.feed(chunk)
            while True:
                wanted = rng.randint(1, 7)
                got = taker.take(wanted)
                taken += got
                if len(got) < wanted:
                    break
            frame = stepper.next_frame()
            while frame is not None:
                stepped.append(frame)
                frame = stepper.next_frame()
        assert taken == stepped == frames


@pytest.mark.parametrize("framing", ["c", "python"])
@pytest.mark.parametrize("stream", [b"+OK\r\n$03\r\nabc\r\n", b":1\r\n?x\r\n",
                                    b"$3\r\nabcXY+OK\r\n", b"+OK\r\n+a\nb\r\n"])
def test_reply_framer_take_stops_where_next_frame_would(stream, framing, monkeypatch):
    """What is not a simple frame is left to the step-by-step reading, with its verdict."""
    if framing == "python":
        monkeypatch.setattr(resp, "_scan_replies", None)
    elif resp._scan_replies is None:
        pytest.skip("the C framing is not built")

    def outcome(read):
        framer = resp.ReplyFramer()
        framer.feed(stream)
        frames = []
        try:
            while True:
                got = read(framer)
                if not got:
                    return frames, framer.unread_bytes(), None
                frames += got
        except ProtocolError as error:
            return frames, None, str(error)

    def stepwise(framer):
        frame = framer.next_frame()
        return [frame] if frame is not None else []

    assert outcome(lambda framer: framer.take(5)) == outcome(stepwise)
