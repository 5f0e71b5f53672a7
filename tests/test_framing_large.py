"""Framing of requests and replies too large for one read: an incomplete multibulk or aggregate
is resumed where scanning stopped, and must give the same messages wherever the stream is cut."""

import random

import pytest

from shotover_gevent.protocol.resp import ReplyFramer, RequestFramer, encode_command


def frame_requests(chunks):
    framer = RequestFramer()
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        requests, error = framer.pop_requests()
        assert error is None
        out += requests
    return out, framer.unread_bytes()


def frame_replies(chunks):
    framer = ReplyFramer()
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        while True:
            frame = framer.next_frame()
            if frame is None:
                break
            out.append(frame)
    return out


def random_cuts(data: bytes, count: int, rng: random.Random):
    cuts = sorted(rng.sample(range(1, len(data)), count))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


# 100 arguments: past the point where the framer starts remembering its progress.
BIG_REQUEST = encode_command([b"MSET"] + [b"k%d\r\n" % i for i in range(100)])
STREAM = encode_command([b"GET", b"a"]) + BIG_REQUEST + b"PING\r\n" + BIG_REQUEST


def test_large_request_cut_at_every_offset_gives_the_same_requests():
    whole, rest = frame_requests([STREAM])
    assert [name for _, name in whole] == [b"GET", b"MSET", b"PING", b"MSET"]
    assert whole[1][0] == BIG_REQUEST and rest == b""
    for offset in range(len(STREAM) + 1):
        assert frame_requests([STREAM[:offset], STREAM[offset:]])[0] == whole, offset


def test_large_request_in_many_random_pieces():
    rng = random.Random(7)
    whole, _ = frame_requests([STREAM])
    for _ in range(200):
        assert frame_requests(random_cuts(STREAM, 25, rng))[0] == whole


def test_unread_bytes_of_a_partial_large_request_are_exactly_what_was_not_framed():
    cut = len(BIG_REQUEST) // 2
    requests, rest = frame_requests([BIG_REQUEST[:cut - 100], BIG_REQUEST[cut - 100:cut]])
    assert requests == [] and rest == BIG_REQUEST[:cut]
    # A successor fed those bytes and the remainder frames the request whole.
    successor = RequestFramer()
    successor.feed(rest)
    successor.feed(BIG_REQUEST[cut:])
    assert successor.pop_requests() == ([(BIG_REQUEST, b"MSET")], None)


NESTED_REPLY = (b"*3\r\n" + b"*100\r\n" + b"$3\r\nabc\r\n" * 100
                + b"%2\r\n+a\r\n:1\r\n+b\r\n*2\r\n_\r\n#t\r\n"
                + b">2\r\n$1\r\nx\r\n$1\r\ny\r\n")
REPLIES = b"+OK\r\n" + NESTED_REPLY + b":7\r\n" + NESTED_REPLY


def test_large_aggregate_reply_cut_at_every_offset_gives_the_same_frames():
    whole = frame_replies([REPLIES])
    assert whole == [b"+OK\r\n", NESTED_REPLY, b":7\r\n", NESTED_REPLY]
    for offset in range(len(REPLIES) + 1):
        assert frame_replies([REPLIES[:offset], REPLIES[offset:]]) == whole, offset


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_large_aggregate_reply_in_random_pieces(seed):
    rng = random.Random(seed)
    whole = frame_replies([REPLIES])
    for _ in range(100):
        assert frame_replies(random_cuts(REPLIES, 40, rng)) == whole
