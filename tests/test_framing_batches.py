"""Framing many messages per call: requests and replies framed a run at a time must come out
exactly as the step-by-step reading frames them, however the bytes are cut, whatever follows.

The step-by-step reading (RequestFramer with its run framing switched off, ReplyFramer one
frame at a time with scan_frame) is the reference: every stream here is framed both ways,
fed whole, cut at every byte, fed a byte at a time and a random number of bytes at a time,
and the requests or frames, the protocol error and the unread bytes are compared at every
step.
"""

from __future__ import annotations

import random

import pytest

from shotover_gevent.protocol import resp
from shotover_gevent.protocol.resp import ProtocolError, ReplyFramer, RequestFramer


@pytest.fixture(autouse=True, params=["c", "python"])
def run_framing(request, monkeypatch):
    """Every test runs with the run framing in C (where it was built) and in Python."""
    if request.param == "c":
        if resp._scan_requests is None:
            pytest.skip("the C framing (shotover_gevent/protocol/_scan.c) is not built")
    else:
        monkeypatch.setattr(resp, "_scan_requests", None)
    return request.param


def bulk(payload: bytes) -> bytes:
    return b"$" + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n"


def multibulk(*args: bytes) -> bytes:
    return b"*" + str(len(args)).encode() + b"\r\n" + b"".join(bulk(a) for a in args)


class StepwiseRequestFramer(RequestFramer):
    """The reference: every request read the way Redis reads it, one byte decision at a time."""

    __slots__ = ()

    def _frame_canonical(self, data, pos):
        return 0, False

    def _skip_blank_lines(self, data, pos):
        return False


WELL_FORMED = [
    multibulk(b"SET", b"key:__rand_int__", b"xxx"),
    multibulk(b"GET", b"key:__rand_int__"),
    multibulk(b"PING"),
    multibulk(b"SET", b"k", b""),
    multibulk(b"SET", b"binary", bytes(range(256))),
    multibulk(b"SET", b"crlf", b"\r\n\r\n$3\r\n*1\r\n"),
    multibulk(b""),  # an empty command name
    multibulk(b"MSET", *[b"k%d" % i for i in range(40)]),
    multibulk(b"set", b"lower", b"case"),
    multibulk(b"ECHO", b"x" * 3000),
]

# Requests Redis reads differently from their bytes, refuses, or skips.
ODD = [
    b"*1\r\n$04\r\nPING\r\n",  # a length with a leading zero: refused
    b"*01\r\n$4\r\nPING\r\n",
    b"*1\r\n$4\r\nPINGxx",  # payload not followed by CRLF: read, then re-encoded
    b"*2\r\n$3\r\nGET\r\n$1\r\nkXY",
    b"*1\r\n+PING\r\n",  # not a bulk: refused
    b"*2\r\n$3\r\nGET\r\n:1\r\n",
    b"*1\r\n=8\r\ntxt:PING\r\n",
    b"*2\r\n$3\r\nGET\r\n*1\r\n$1\r\nk\r\n",  # nested
    b"*0\r\n",  # skipped
    b"*-1\r\n",
    b"~1\r\n$4\r\nPING\r\n",  # other aggregates are inline text to Redis
    b">1\r\n$4\r\nPING\r\n",
    b"%1\r\n$1\r\na\r\n$1\r\nb\r\n",
    b"PING\r\n",  # inline
    b"SET inline 'quoted value'\r\n",
    b"\r\n",
    b"\n\n\r\n  \r\n\t\x0b\x0c\n\r\r\n",  # blank lines: skipped
    b" \x0b \r\nPING\r\n",
    b"\r\n\r\n \x00\n",  # a NUL: not a blank line
    b"*1\n$4\nPING\n",  # LF-only separators
    b"*1\r\n$4\r\nPI\0G\r\n",  # a NUL byte inside a payload is data
    b"*1\r\n$\x004\r\nPING\r\n",  # inside a length line it hides the line's end
    b"*1\r\n$-1\r\n",
    b"*3000000000\r\n$1\r\na\r\n",  # more elements than Redis takes
    b"*2\r\n$3\r\nGET\r\n$99999999999999999999999\r\n",
]


def frame_all(framer, pieces, limit):
    """Feed `pieces` one after the other, popping after each; everything observed."""
    seen = []
    for piece in pieces:
        framer.feed(piece)
        while True:
            requests, error = framer.pop_requests(limit)
            seen.append((requests, None if error is None else str(error),
                         framer.unread_bytes(), framer.pending()))
            if error is not None:
                return seen
            if not limit or len(requests) < limit:
                break
    return seen


def assert_same_framing(stream: bytes, pieces, limit: int = 0, max_bulk_len=None) -> None:
    options = {} if max_bulk_len is None else {"max_bulk_len": max_bulk_len}
    expected = frame_all(StepwiseRequestFramer(**options), pieces, limit)
    actual = frame_all(RequestFramer(**options), pieces, limit)
    assert actual == expected, stream


def cuts_at_every_byte(stream: bytes):
    for index in range(len(stream) + 1):
        yield [stream[:index], stream[index:]]


STREAMS = {
    "well-formed run": b"".join(WELL_FORMED),
    "one request": WELL_FORMED[0],
    **{f"odd {index}": WELL_FORMED[0] + odd + WELL_FORMED[1] for index, odd in enumerate(ODD)},
    "odd first": ODD[2] + b"".join(WELL_FORMED[:3]),
    "inline between": WELL_FORMED[0] + b"PING\r\n" + WELL_FORMED[1] + b"GET k\r\n" + WELL_FORMED[2],
    "partial at the end": b"".join(WELL_FORMED[:3]) + WELL_FORMED[4][:20],
    # Bytes that look like a huge element count keep a run from being framed in C.
    "count-like payload": WELL_FORMED[0] + multibulk(b"SET", b"k", b"*1234567\r\n") + WELL_FORMED[1],
}


@pytest.mark.parametrize("stream", STREAMS.values(), ids=STREAMS.keys())
@pytest.mark.parametrize("limit", [0, 1, 2, 128])
def test_requests_framed_as_the_stepwise_reading_frames_them_cut_anywhere(stream, limit):
    assert_same_framing(stream, [stream], limit)
    for pieces in cuts_at_every_byte(stream):
        assert_same_framing(stream, pieces, limit)


@pytest.mark.parametrize("stream", STREAMS.values(), ids=STREAMS.keys())
def test_requests_fed_a_byte_at_a_time(stream):
    assert_same_framing(stream, [stream[i:i + 1] for i in range(len(stream))], 3)


def test_many_requests_per_call_come_out_whole_and_in_order():
    requests = [multibulk(b"SET", b"k%d" % i, b"v" * (i % 50)) for i in range(5000)]
    framer = RequestFramer()
    framer.feed(b"".join(requests))
    framed, error = framer.pop_requests()
    assert error is None
    assert framed == [(raw, b"SET") for raw in requests]
    assert framer.unread_bytes() == b"" and framer.pending() == 0


def test_a_limit_leaves_the_rest_unread_exactly():
    requests = [multibulk(b"GET", b"k%d" % i) for i in range(300)]
    stream = b"".join(requests) + b"*2\r\n$3\r\nGET"
    framer = RequestFramer()
    framer.feed(stream)
    framed, error = framer.pop_requests(128)
    assert error is None and [raw for raw, _ in framed] == requests[:128]
    assert framer.unread_bytes() == stream[len(b"".join(requests[:128])):]
    assert framer.pending() == len(framer.unread_bytes())
    framer.feed(b"\r\n$1\r\nz\r\n")
    framed, error = framer.pop_requests(128)
    assert [raw for raw, _ in framed] == requests[128:256]
    framed, error = framer.pop_requests(128)
    assert [raw for raw, _ in framed] == requests[256:] + [multibulk(b"GET", b"z")]
    assert framer.unread_bytes() == b""


@pytest.mark.parametrize("max_bulk_len", [1, 3, 4, 16, 100])
def test_bulk_length_limit_holds_for_runs(max_bulk_len):
    stream = b"".join(WELL_FORMED[:4]) + multibulk(b"ECHO", b"y" * 40) + WELL_FORMED[0]
    assert_same_framing(stream, [stream], 0, max_bulk_len)
    for pieces in cuts_at_every_byte(stream):
        assert_same_framing(stream, pieces, 0, max_bulk_len)


def test_a_request_cut_by_one_framer_does_not_reach_another():
    # Framers share the C reader: bytes one of them left in it must not show up elsewhere.
    first, second = RequestFramer(), RequestFramer()
    first.feed(WELL_FORMED[0] + WELL_FORMED[1][:7])
    assert first.pop_requests() == ([(WELL_FORMED[0], b"SET")], None)
    second.feed(WELL_FORMED[2])
    assert second.pop_requests() == ([(WELL_FORMED[2], b"PING")], None)
    first.feed(WELL_FORMED[1][7:])
    assert first.pop_requests() == ([(WELL_FORMED[1], b"GET")], None)


def test_seeded_random_streams_and_cuts():
    rng = random.Random(20261202)
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.75:
                parts.append(rng.choice(WELL_FORMED))
            else:
                odd = bytearray(rng.choice(WELL_FORMED + ODD))
                if odd and rng.random() < 0.5:
                    odd[rng.randrange(len(odd))] = rng.choice(b"*$:+-\r\n0123456789\0x")
                parts.append(bytes(odd))
        stream = b"".join(parts)
        pieces, index = [], 0
        while index < len(stream):
            size = rng.choice([1, 2, 5, 17, 64, 1000, 100000])
            pieces.append(stream[index:index + size])
            index += size
        assert_same_framing(stream, pieces, rng.choice([0, 1, 3, 128]))


# ---- replies ------------------------------------------------------------------------------------

REPLIES = [
    b"+OK\r\n", b"-ERR wrong\r\n", b":1\r\n", b":-12\r\n", b"$3\r\nxxx\r\n", b"$0\r\n\r\n",
    b"$-1\r\n", b"*-1\r\n", b"*0\r\n", b"_\r\n", b",1.5\r\n", b"#t\r\n", b"(12345678901234567890\r\n",
    bulk(bytes(range(256))), bulk(b"\r\n" * 10), bulk(b"y" * 999), bulk(b"y" * 1000),
    b"!5\r\nERR x\r\n", b"=8\r\ntxt:abcd\r\n", b"*2\r\n$1\r\na\r\n:2\r\n",
    b"%1\r\n+k\r\n+v\r\n", b">2\r\n$7\r\nmessage\r\n$1\r\nc\r\n",
]
ODD_REPLIES = [
    b"$03\r\nabc\r\n",  # read by scan_frame, not by the run
    b"$3\r\nabcXY",  # refused
    b"+a\nb\r\n",  # a lone LF inside a line
    b"+a\rb\r\n",
    b"?\r\n",
    b"$-2\r\n",
    b"!-1\r\n",
]


def reference_frames(pieces, max_bulk_len=resp.DEFAULT_MAX_BULK_LEN):
    """Frames, error and unread bytes after each piece, one frame at a time by scan_frame."""
    data = bytearray()
    start = 0
    seen = []
    for piece in pieces:
        data += piece
        frames = []
        error = None
        while start < len(data):
            try:
                end = resp.scan_frame(data, start, max_bulk_len)
            except ProtocolError as exc:
                error = str(exc)
                break
            if end < 0:
                break
            frames.append(bytes(data[start:end]))
            start = end
        seen.append((frames, error, bytes(data[start:])))
        if error is not None:
            break
    return seen


def framed_replies(pieces, max_bulk_len=resp.DEFAULT_MAX_BULK_LEN):
    framer = ReplyFramer(max_bulk_len)
    seen = []
    for piece in pieces:
        framer.feed(piece)
        frames = []
        error = None
        while True:
            try:
                frame = framer.next_frame()
            except ProtocolError as exc:
                error = str(exc)
                break
            if frame is None:
                break
            frames.append(frame)
        unread = framer.unread_bytes()
        assert framer.pending() == len(unread)
        seen.append((frames, error, unread))
        if error is not None:
            break
    return seen


REPLY_STREAMS = {
    "run": b"".join(REPLIES),
    **{f"odd {index}": REPLIES[4] + odd + REPLIES[0] for index, odd in enumerate(ODD_REPLIES)},
}


@pytest.mark.parametrize("stream", REPLY_STREAMS.values(), ids=REPLY_STREAMS.keys())
def test_replies_framed_as_scan_frame_frames_them_cut_anywhere(stream):
    for pieces in [[stream]] + list(cuts_at_every_byte(stream)):
        assert framed_replies(pieces) == reference_frames(pieces), pieces
    pieces = [stream[i:i + 1] for i in range(len(stream))]
    assert framed_replies(pieces) == reference_frames(pieces)


@pytest.mark.parametrize("max_bulk_len", [0, 2, 3, 500])
def test_reply_bulk_length_limit_holds_for_runs(max_bulk_len):
    stream = b"$3\r\nabc\r\n" + bulk(b"z" * 600) + b"+OK\r\n"
    assert framed_replies([stream], max_bulk_len) == reference_frames([stream], max_bulk_len)


def test_thousands_of_replies_per_read():
    replies = [b"+OK\r\n" if i % 3 else bulk(b"v%d" % i) for i in range(4000)]
    framer = ReplyFramer()
    framer.feed(b"".join(replies) + b"$5\r\nab")
    assert [framer.next_frame() for _ in replies] == replies
    assert framer.next_frame() is None
    assert framer.unread_bytes() == b"$5\r\nab"


def test_well_formed_pipelines_are_framed_as_runs(monkeypatch):
    # The stepwise reading is for what is not well-formed, and for requests cut by a read.
    calls = []
    stepwise = RequestFramer._pop_stepwise

    def counted(self, *args):
        calls.append(self.unread_bytes())
        return stepwise(self, *args)

    monkeypatch.setattr(RequestFramer, "_pop_stepwise", counted)
    framer = RequestFramer()
    stream = b"".join(WELL_FORMED) * 3
    framer.feed(stream)
    framed, error = framer.pop_requests()
    assert error is None and b"".join(raw for raw, _ in framed) == stream
    assert calls == []
    framer.feed(WELL_FORMED[0][:9])
    assert framer.pop_requests() == ([], None)
    assert calls == [WELL_FORMED[0][:9]]  # the cut request: stepwise, resumed next time


def test_replies_split_and_not_taken_stay_unread_exactly():
    stream = b"".join(REPLIES)
    framer = ReplyFramer()
    framer.feed(stream + b"$7\r\npart")
    taken = [framer.next_frame() for _ in range(3)]
    assert b"".join(taken) == stream[:len(b"".join(taken))]
    assert framer.unread_bytes() == stream[len(b"".join(taken)):] + b"$7\r\npart"
    assert framer.pending() == len(framer.unread_bytes())
    framer.feed(b"ial\r\n")  # more bytes while split frames wait: they stay in order
    rest = []
    while True:
        frame = framer.next_frame()
        if frame is None:
            break
        rest.append(frame)
    assert b"".join(taken + rest) == stream + b"$7\r\npartial\r\n"


@pytest.mark.parametrize("kind", [b"*", b"%", b"~", b">", b"|"])
def test_a_huge_element_count_is_never_handed_to_hiredis(kind, run_framing):
    # hiredis makes room for every element announced as soon as it reads the count (the C
    # framing makes room for nothing: it takes the request before and stops).
    framer = RequestFramer()
    framer.feed(WELL_FORMED[0] + b"*2\r\n$3\r\nGET\r\n" + kind + b"2000000000\r\n")
    assert framer._frame_canonical(framer._buf.data, 0) == (
        (1, False) if run_framing == "c" else (0, False))
    if run_framing == "c":
        framer = RequestFramer()
        framer.feed(WELL_FORMED[0] + b"*2\r\n$3\r\nGET\r\n" + kind + b"2000000000\r\n")
    requests, error = framer.pop_requests()
    assert requests == [(WELL_FORMED[0], b"SET")] and error is not None


def test_one_name_says_whether_a_batch_is_one_command_spelled_one_way(run_framing):
    """What the chain's screens go by (Chain.screen_framed): the name every request of a batch
    has, as sent, or None."""
    from shotover_gevent import message

    one_name = message.one_name if run_framing == "c" else message.one_name_py
    framer = RequestFramer()
    framer.feed(multibulk(b"GET", b"a") * 3 + multibulk(b"get", b"a") + multibulk(b"GeT"))
    framed, error = framer.pop_requests()
    assert error is None and len(framed) == 5
    assert one_name(framed[:3]) == b"GET" and one_name(framed[:1]) == b"GET"
    assert one_name(framed[:4]) is None  # spelled two ways: screened by upper-cased names
    assert one_name(framed[3:4]) == b"get" and one_name(framed[2:4]) is None
    assert one_name([(b"x", b"GET"), (b"y", bytes(b"GET"))]) == b"GET"  # equal, not the same
    assert one_name([]) is None and one_name([(b"PING\r\n", None)]) is None
    assert one_name([(b"x", b"GET"), (b"PING\r\n", None)]) is None
