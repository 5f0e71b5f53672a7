"""Sans-IO RESP2/RESP3 framing: bytes in, whole messages (with their exact raw bytes) out.

No sockets and no gevent here, so the exact bytes not yet consumed can always be reported.
"""

from __future__ import annotations

import re
from operator import itemgetter
from typing import Any, List, Optional, Sequence, Tuple

import hiredis

try:  # built with the package where a C compiler is at hand (setup.py)
    from ._scan import scan_replies as _scan_replies
    from ._scan import scan_requests as _scan_requests
except ImportError:  # pragma: no cover - the same framing in Python
    _scan_requests = _scan_replies = None

#: Redis's proto-max-bulk-len default: a longer bulk string is refused before any allocation.
DEFAULT_MAX_BULK_LEN = 512 * 1024 * 1024
#: A reply announcing more elements than this is refused as "invalid multibulk length".
MAX_MULTIBULK_LEN = 1024 * 1024 * 1024
#: Redis refuses a request whose element count does not fit a C int (INT_MAX).
MAX_REQUEST_MULTIBULK_LEN = 2**31 - 1
#: Redis's PROTO_INLINE_MAX_SIZE: a longer line without CRLF is a protocol error.
MAX_INLINE_LEN = 64 * 1024

# First bytes of RESP types whose payload ends at the first CRLF.
_LINE_TYPES = frozenset(b"+-:_,#(")
# Types followed by a byte length and a payload.
_BLOB_TYPES = frozenset(b"$!=")
# Aggregates: element count follows.
_AGGREGATE_TYPES = frozenset(b"*~>")
# Maps and attributes count pairs.
_PAIR_TYPES = frozenset(b"%|")

_CRLF = b"\r\n"


class ProtocolError(Exception):
    """The byte stream is not valid RESP; the text is what a client is told after 'Protocol error: '."""


def _parse_length(buf: bytearray, start: int, end: int, what: str) -> int:
    text = buf[start:end]
    if text.isdigit() or (text[:1] == b"-" and text[1:].isdigit()):
        return int(text)
    raise ProtocolError(f"invalid {what} length {bytes(text[:32])!r}")


class _Buffer:
    """One bytearray plus a consumed offset; compacted lazily so each message costs no copy."""

    __slots__ = ("data", "offset")

    def __init__(self) -> None:
        self.data = bytearray()
        self.offset = 0

    def feed(self, chunk: bytes) -> None:
        if self.offset and (self.offset > 65536 or self.offset * 2 > len(self.data)):
            del self.data[: self.offset]
            self.offset = 0
        self.data += chunk

    def pending(self) -> int:
        return len(self.data) - self.offset

    def unread(self) -> bytes:
        return bytes(self.data[self.offset :])


class _ScanState:
    """Where scanning an incomplete frame stopped, relative to the frame's start, so that a
    large aggregate arriving in many reads is scanned once rather than once per read."""

    __slots__ = ("offset", "owed", "stack")

    def __init__(self) -> None:
        self.offset = 0
        self.owed = 1
        self.stack: List[int] = []


def scan_frame(buf: bytearray, pos: int, max_bulk_len: int = DEFAULT_MAX_BULK_LEN,
               state: Optional[_ScanState] = None) -> int:
    """Return the end offset of the complete RESP frame starting at `pos`, or -1 if incomplete.

    Iterative (a count of frames still owed, and a list of the enclosing aggregates' counts),
    so nesting has no limit but the bytes buffered: Redis does send replies nested thousands
    deep, and a proxy must relay them. With `state`, an incomplete scan records where it
    stopped and a later call resumes there.
    """
    start = pos
    if state is not None:
        pos = start + state.offset
        owed = state.owed
        depth_stack = state.stack
    else:
        owed = 1
        depth_stack = []
    end = len(buf)
    while owed:
        if pos >= end:
            break
        kind = buf[pos]
        nl = buf.find(_CRLF, pos + 1)
        if nl < 0:
            if end - pos > MAX_INLINE_LEN:
                raise ProtocolError("too big line without CRLF")
            break
        if kind in _LINE_TYPES:
            next_pos = nl + 2
        elif kind in _BLOB_TYPES:
            length = _parse_length(buf, pos + 1, nl, "bulk")
            if length == -1 and kind == 0x24:  # $-1: RESP2 null bulk
                next_pos = nl + 2
            elif length < 0 or length > max_bulk_len:
                raise ProtocolError(f"invalid bulk length {length}")
            else:
                payload_end = nl + 2 + length
                if payload_end + 2 > end:
                    break
                if buf[payload_end : payload_end + 2] != _CRLF:
                    raise ProtocolError("bulk payload not followed by CRLF")
                next_pos = payload_end + 2
        elif kind in _AGGREGATE_TYPES or kind in _PAIR_TYPES:
            count = _parse_length(buf, pos + 1, nl, "multibulk")
            next_pos = nl + 2
            if count == -1 and kind == 0x2A:  # *-1: RESP2 null array
                count = 0
            elif count < 0 or count > MAX_MULTIBULK_LEN:
                raise ProtocolError(f"invalid multibulk length {count}")
            if kind in _PAIR_TYPES:
                count *= 2
            if kind == 0x7C:  # an attribute is followed by the value it annotates
                count += 1
            if count:
                owed -= 1
                depth_stack.append(owed)
                owed = count + 1  # the decrement below consumes the extra one
        else:
            raise ProtocolError(f"unexpected RESP type byte {bytes([kind])!r}")
        pos = next_pos
        owed -= 1
        while not owed and depth_stack:
            owed = depth_stack.pop()
    if owed:
        if state is not None:
            state.offset = pos - start
            state.owed = owed
            state.stack = depth_stack
        return -1
    return pos


def _length_alternatives(longest: int, payload) -> str:
    """A regular expression for every decimal length 0..`longest` as written canonically,
    each followed by `payload(length)`: the digits branch like a trie, so a match costs one
    step per digit."""
    def branch(spellings: List[str], depth: int) -> str:
        choices = [payload(int(text)) for text in spellings if len(text) == depth]
        following: dict = {}
        for text in spellings:
            if len(text) > depth:
                following.setdefault(text[depth], []).append(text)
        choices += [digit + branch(group, depth + 1) for digit, group in following.items()]
        return choices[0] if len(choices) == 1 else "(?:" + "|".join(choices) + ")"
    return branch([str(length) for length in range(longest + 1)], 0)


#: Bulk strings up to this long are framed by the run expressions below; longer ones, by
#: scan_frame (their bytes cost more than their framing).
_RUN_BULK_MAX = 999
# One reply frame of the kinds most commands get: a line (not holding a lone CR or LF), a null,
# an empty array, or a blob of a canonical length followed by CRLF. Each starts with the byte
# that decides its kind and ends where scan_frame ends it; anything else stops a run.
_RUN_FRAME = (r"[-+:_,#(][^\r\n]*\r\n|\$-1\r\n|\*(?:-1|0)\r\n|[$!=]"
              + _length_alternatives(_RUN_BULK_MAX,
                                     lambda n: r"\r\n" + (r".{%d}" % n if n else "") + r"\r\n"))
_REPLY_FRAME = re.compile(_RUN_FRAME.encode(), re.DOTALL)
_REPLY_RUN = re.compile(("(?:%s)*" % _RUN_FRAME).encode(), re.DOTALL)


class ReplyFramer:
    """Splits a server's byte stream into whole RESP2/RESP3 frames (raw bytes each).

    A run of simple frames (lines, short blobs: what most commands answer) is split in two
    C calls for however many there are; the rest, one frame at a time by scan_frame.
    """

    __slots__ = ("_buf", "max_bulk_len", "_state", "_ready")

    def __init__(self, max_bulk_len: int = DEFAULT_MAX_BULK_LEN) -> None:
        self._buf = _Buffer()
        self.max_bulk_len = max_bulk_len
        self._state: Optional[_ScanState] = None
        # Frames split off the buffer and not returned yet, last first (a list once there are
        # some: an idle connection holds no list of its own).
        self._ready: Sequence[bytes] = ()

    def feed(self, data: bytes) -> None:
        # Scan state is relative to the frame start, so compaction inside feed() is harmless.
        self._buf.feed(data)

    def next_frame(self) -> Optional[bytes]:
        ready = self._ready
        if ready:
            return ready.pop()
        buf = self._buf
        data = buf.data
        start = buf.offset
        if start >= len(data):
            return None
        state = self._state
        if state is None:
            if data[start] in _LINE_TYPES:
                # One line, alone in the buffer: the commonest read without pipelining.
                nl = data.find(_CRLF, start + 1)
                if nl > 0 and nl + 2 == len(data):
                    buf.offset = nl + 2
                    return bytes(data[start:])
            if self.max_bulk_len >= _RUN_BULK_MAX:
                end = _REPLY_RUN.match(data, start).end()
                if end > start:
                    buf.offset = end
                    frames = _REPLY_FRAME.findall(data, start, end)
                    if len(frames) > 1:
                        frames.reverse()
                        frame = frames.pop()
                        self._ready = frames
                        return frame
                    return frames[0]
            # Fast path for the commonest replies: one line (+OK, :1, -ERR ...).
            if data[start] in _LINE_TYPES:
                nl = data.find(_CRLF, start + 1)
                if nl < 0:
                    if len(data) - start > MAX_INLINE_LEN:
                        raise ProtocolError("too big line without CRLF")
                    return None
                buf.offset = nl + 2
                return bytes(data[start : nl + 2])
            if data[start] in _AGGREGATE_TYPES or data[start] in _PAIR_TYPES:
                state = self._state = _ScanState()
        end = scan_frame(data, start, self.max_bulk_len, state)
        if end < 0:
            return None
        self._state = None
        buf.offset = end
        return bytes(data[start:end])

    def take(self, count: int) -> List[bytes]:
        """Up to `count` whole frames, in order (fewer: the rest has not arrived yet)."""
        out: List[bytes] = []
        if _scan_replies is not None and not self._ready and self._state is None:
            buf = self._buf
            out, buf.offset = _scan_replies(buf.data, buf.offset, count, self.max_bulk_len)
        while True:
            wanted = count - len(out)
            if wanted <= 0:
                return out
            ready = self._ready
            if ready:
                if wanted >= len(ready):
                    out += ready[::-1]
                    ready.clear()
                else:
                    out += ready[: -wanted - 1 : -1]
                    del ready[-wanted:]
                continue
            try:
                frame = self.next_frame()
            except ProtocolError:
                if out:
                    return out  # the frames before it; the next call raises
                raise
            if frame is None:
                return out
            out.append(frame)

    def next_type(self) -> bytes:
        """The type byte of the next frame (whole or not), b"" when nothing is buffered."""
        ready = self._ready
        if ready:
            return ready[-1][:1]
        buf = self._buf
        return bytes(buf.data[buf.offset:buf.offset + 1])

    def idle(self) -> bool:
        """Nothing buffered, nothing half framed: the next bytes read begin a frame."""
        buf = self._buf
        return not self._ready and self._state is None and buf.offset >= len(buf.data)

    def take_fed(self, data, count: int) -> List[bytes]:
        """feed(data), then take(count); when nothing was buffered and `data` is a run of
        simple frames (what a read usually holds), without copying it into the buffer."""
        buf = self._buf
        if _scan_replies is not None and not self._ready and self._state is None and \
                buf.offset >= len(buf.data):
            frames, stop = _scan_replies(data, 0, count, self.max_bulk_len)
            if stop == len(data):
                return frames
            buf.feed(data[stop:])
            if len(frames) < count:
                try:
                    frames += self.take(count - len(frames))
                except ProtocolError:
                    if not frames:
                        raise  # else, as take(): the frames before it; the next call raises
            return frames
        buf.feed(data)
        return self.take(count)

    def pending(self) -> int:
        ready = self._ready
        buf = self._buf
        if ready:
            return sum([len(frame) for frame in ready]) + len(buf.data) - buf.offset
        return len(buf.data) - buf.offset

    def unread_bytes(self) -> bytes:
        ready = self._ready
        if ready:
            return b"".join(ready[::-1]) + self._buf.unread()
        return self._buf.unread()


# How Redis reads a length in a request (string2ll): "0", or digits without a leading zero after
# an optional '-'; under 21 characters, and within a signed 64-bit integer.
_REDIS_INTEGER = re.compile(rb"0|-?[1-9][0-9]*")
_LONG_STR_SIZE = 21
_LLONG_MIN = -(2**63)
_LLONG_MAX = 2**63 - 1
# The lines well-behaved clients send, recognised in one call; anything else (including a line
# not complete yet) goes through the slower reading that follows Redis step by step.
_COUNT_LINE = re.compile(rb"\*([1-9][0-9]{0,9})\r\n")
_BULK_LINE = re.compile(rb"\$(0|[1-9][0-9]{0,19})\r\n")
#: _line_end: a NUL byte comes before the line's end, which Redis therefore never finds.
_HIDDEN = -2
#: How many bytes one attempt at framing well-formed requests in C looks at, at most: a request
#: longer than this is framed step by step (its bytes cost more than its framing).
_CANONICAL_WINDOW = 64 * 1024
_FIRST = itemgetter(0)
#: An aggregate of more elements than fit in _CANONICAL_WINDOW (or bytes that look like one),
#: once digits are made 0 and aggregate type bytes '*'.
_COUNT_SHAPE = bytes.maketrans(b"0123456789%~>|", b"0000000000****")
_LARGE_COUNT = b"*000000"


def _redis_integer(text: bytearray) -> Optional[int]:
    """A length from a request as Redis reads it, or None where Redis refuses it."""
    if len(text) >= _LONG_STR_SIZE or _REDIS_INTEGER.fullmatch(text) is None:
        return None
    value = int(text)
    return value if _LLONG_MIN <= value <= _LLONG_MAX else None


def _line_end(data: bytearray, start: int, terminator: bytes) -> int:
    """Index of the first `terminator` from `start` as Redis looks for it (C's strchr, which
    stops at a NUL byte): -1 while it has not arrived, _HIDDEN when a NUL byte comes first."""
    found = data.find(terminator, start)
    if data.find(b"\0", start, found if found >= 0 else len(data)) >= 0:
        return _HIDDEN
    return found


def _quoted_byte(value: int) -> str:
    """A client's byte for an error text; one above 0x7f travels as a surrogate escape so that
    error_reply() sends the byte itself, as Redis does."""
    return bytes([value]).decode("utf-8", "surrogateescape")


def _arguments(data: bytearray, start: int) -> List[bytes]:
    """Arguments of a complete request at `start`, already checked by RequestFramer, whatever
    bytes follow its CRs and payloads (Redis skips one after a CR, two after a payload, unread)."""
    cr = data.find(b"\r", start)
    count = int(data[start + 1 : cr])
    pos = cr + 2
    args: List[bytes] = []
    for _ in range(count):
        cr = data.find(b"\r", pos)
        length = int(data[pos + 1 : cr])
        pos = cr + 2
        args.append(bytes(data[pos : pos + length]))
        pos += length + 2
    return args


class _PartialRequest:
    """How far a multibulk request not yet complete has been read: what Redis keeps between two
    reads (elements still to come, the length of the bulk being read), so that the next read
    starts where this one stopped and nothing is kept per element."""

    __slots__ = ("offset", "remaining", "bulk_len", "name", "canonical")

    def __init__(self, offset: int, remaining: int, bulk_len: int, name: Optional[bytes],
                 canonical: bool) -> None:
        #: From the request's start: the next element's '$' line, or its payload once
        #: `bulk_len` is known.
        self.offset = offset
        self.remaining = remaining
        self.bulk_len = bulk_len
        self.name = name
        #: Every separator so far is CRLF, so the raw bytes can be passed on as they are.
        self.canonical = canonical


class RequestFramer:
    """Splits a client's byte stream into commands, as Redis does: multibulk of bulks, or inline.

    Each request comes out as (raw, name): `name` is the command's first word as sent, `raw`
    the request as a well-formed multibulk. Redis's own reading decides what is accepted and
    what is a protocol error (with its wording), down to where it stops looking for a line's
    end and the bytes it skips without checking them.

    Well-formed multibulk requests, what clients send, are framed many at a time in C (see
    _frame_canonical); anything else, and a request split between reads, goes through the
    reading that follows Redis step by step.
    """

    __slots__ = ("_buf", "max_bulk_len", "_partial", "_line_mark", "_line_hidden", "_ready")

    def __init__(self, max_bulk_len: int = DEFAULT_MAX_BULK_LEN) -> None:
        self._buf = _Buffer()
        self.max_bulk_len = max_bulk_len
        self._partial: Optional[_PartialRequest] = None
        # For a line whose end has not arrived: how far from the unread data's start it has been
        # searched, and whether a NUL byte already hides its end for good.
        self._line_mark = 0
        self._line_hidden = False
        # Requests framed and not returned yet (a call asked for fewer than were buffered):
        # they come before the buffer's unread bytes. A list once there are some.
        self._ready: Sequence[Tuple[bytes, bytes]] = ()

    def feed(self, data: bytes) -> None:
        # Saved positions are relative to the first unread byte, so compaction is harmless.
        # (_Buffer.feed, without the call: once per read of every client.)
        buf = self._buf
        offset = buf.offset
        if offset and (offset > 65536 or offset * 2 > len(buf.data)):
            del buf.data[:offset]
            buf.offset = 0
        buf.data += data

    def pending(self) -> int:
        ready = self._ready
        buf = self._buf
        if ready:
            return sum([len(raw) for raw, _ in ready]) + len(buf.data) - buf.offset
        return len(buf.data) - buf.offset

    def unread_bytes(self) -> bytes:
        """Every byte received and not yet returned as a request: what a checkpoint must carry."""
        ready = self._ready
        if ready:  # framed as they arrived: their raw bytes are the bytes received
            return b"".join([raw for raw, _ in ready]) + self._buf.unread()
        return self._buf.unread()

    def _stop_in_line(self, request_start: int, searched_to: int, line_end: int) -> None:
        """Remember where the search for an unfinished line's end can resume."""
        if line_end == _HIDDEN:
            self._line_hidden = True
        self._line_mark = searched_to - request_start

    def pop_requests(self, limit: int = 0
                     ) -> Tuple[List[Tuple[bytes, bytes]], Optional[ProtocolError]]:
        """Every complete request buffered (the first `limit` of them, when given), and the
        protocol error that stopped framing, if any.

        Requests framed before an error are returned too: Redis serves them before it replies
        with the error and closes the connection. The work done is proportional to the bytes
        fed since the last call: an unfinished request or line is resumed, never rescanned.
        """
        buf = self._buf
        if _scan_requests is not None and not self._ready and self._partial is None and \
                not self._line_mark and not self._line_hidden:
            # The usual case in one step: everything buffered is a run of well-formed requests.
            data = buf.data
            pos = buf.offset
            if pos < len(data) and data[pos] == 0x2A:
                ready, stop, _well_formed = _scan_requests(
                    data, pos, pos + _CANONICAL_WINDOW, self.max_bulk_len,
                    MAX_REQUEST_MULTIBULK_LEN)
                if ready:
                    if stop == len(data) and (not limit or len(ready) <= limit):
                        data.clear()
                        buf.offset = 0
                        return ready, None
                    self._ready = ready  # the rest of the call takes it from there
                    buf.offset = stop
        out: List[Tuple[bytes, bytes]] = []
        # Whether runs of well-formed requests may still be framed in C during this call: not
        # once one attempt stopped at a request that is not, so that a stream of those costs
        # no more than one attempt per call.
        fast = True
        while True:
            ready = self._ready
            if ready:
                if limit and limit - len(out) <= len(ready):
                    wanted = limit - len(out)
                    out += ready[:wanted]
                    del ready[:wanted]
                    return out, None
                out += ready
                ready.clear()
            data = buf.data
            pos = buf.offset
            if pos >= len(data):
                return out, None
            if fast and self._partial is None and not self._line_mark and not self._line_hidden:
                if data[pos] == 0x2A:
                    framed, fast = self._frame_canonical(data, pos)
                    if framed:
                        continue
                elif data[pos] in _BLANK_BYTES and self._skip_blank_lines(data, pos):
                    continue
            # One request at least the step-by-step way; then, after a request that was not
            # well-formed, the rest of the call too.
            error, stopped_for_fast = self._pop_stepwise(out, limit, fast)
            if error is not None or not stopped_for_fast:
                return out, error

    def _frame_canonical(self, data: bytearray, pos: int) -> Tuple[int, bool]:
        """Frame the run of well-formed requests (a multibulk of bulks, nothing Redis would read
        differently) that starts at `pos`, into _ready; (how many, whether the run ended only
        because the data did). hiredis splits the run; re-encoding each request and comparing
        with the bytes received keeps exactly those that Redis reads as they are, the raw bytes
        of each being its encoding."""
        global _request_reader
        if _scan_requests is not None:
            ready, stop, well_formed = _scan_requests(
                data, pos, pos + _CANONICAL_WINDOW, self.max_bulk_len, MAX_REQUEST_MULTIBULK_LEN)
            if ready:
                self._ready = ready
                self._buf.offset = stop
                self._line_mark = 0
            return len(ready), well_formed
        window = len(data) - pos
        if window > _CANONICAL_WINDOW:
            window = _CANONICAL_WINDOW
        if window > self.max_bulk_len:
            # No request within the window can then hold a bulk over the limit.
            window = self.max_bulk_len
        if data[pos : pos + window].translate(_COUNT_SHAPE).find(_LARGE_COUNT) >= 0:
            # Something that may be read as an aggregate of more elements than fit in the
            # window: hiredis would make room for all of them before they arrive.
            return 0, False
        reader = _request_reader
        if reader is None:
            reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        reader.feed(data, pos, window)
        try:
            parsed = list(iter(reader.gets, _NOT_ENOUGH))
            if len(parsed) == 1:  # what a read without pipelining holds: fewer steps
                args = parsed[0]
                raw = hiredis.pack_command(tuple(args))
                if type(args) is not list or not args or not data.startswith(raw, pos):
                    raise ValueError("not well-formed")
                _request_reader = reader if len(raw) == window else None
                self._ready = [(raw, args[0])]
                self._buf.offset = pos + len(raw)
                self._line_mark = 0
                return 1, True
            raws = list(map(hiredis.pack_command, map(tuple, parsed)))
        except (hiredis.HiredisError, TypeError, ValueError):
            _request_reader = None
            return self._frame_canonical_prefix(data, pos, window)
        run = b"".join(raws)
        if not data.startswith(run, pos) or not all(parsed):
            _request_reader = None
            return self._frame_canonical_prefix(data, pos, window)
        # A reader that read every byte fed holds nothing: the next call can use it as it is.
        _request_reader = reader if len(run) == window else None
        if raws:
            self._ready = list(zip(raws, map(_FIRST, parsed)))
            self._buf.offset = pos + len(run)
            self._line_mark = 0
        return len(raws), True

    def _skip_blank_lines(self, data: bytearray, pos: int) -> bool:
        """Skip the run of blank lines at `pos` in one step (Redis reads each as an inline
        command of no words and skips it, as the step-by-step reading does one line at a
        time: a flood of empty lines cost 20 times Redis's CPU). Whether any was skipped."""
        match = _BLANK_LINES.match(data, pos)
        if match is None:
            return False
        self._buf.offset = match.end()
        return True

    def _frame_canonical_prefix(self, data: bytearray, pos: int, window: int) -> Tuple[int, bool]:
        """_frame_canonical() for a run that ends at a request that is not well-formed: the
        requests before it, one at a time."""
        reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        reader.feed(data, pos, window)
        ready = []
        start = pos
        try:
            while True:
                args = reader.gets()
                if args is _NOT_ENOUGH or type(args) is not list or not args:
                    break
                raw = hiredis.pack_command(tuple(args))
                if not data.startswith(raw, start):
                    break
                ready.append((raw, args[0]))
                start += len(raw)
        except (hiredis.HiredisError, TypeError, ValueError):
            pass
        if ready:
            self._ready = ready
            self._buf.offset = start
            self._line_mark = 0
        return len(ready), False

    def _pop_stepwise(self, out: List[Tuple[bytes, bytes]], limit: int, fast: bool
                      ) -> Tuple[Optional[ProtocolError], bool]:
        """Frame requests into `out` following Redis step by step, up to `limit` in all;
        (the protocol error that stopped framing, whether it stopped only to let a run of
        well-formed requests be framed in C: `fast`, and a request was framed before it)."""
        buf = self._buf
        data = buf.data
        end = len(data)
        pos = buf.offset
        max_bulk = self.max_bulk_len
        bulk_line = _BULK_LINE.match
        partial, self._partial = self._partial, None
        # Only the first line looked at can be the one a previous call stopped in.
        mark, hidden = pos + self._line_mark, self._line_hidden
        self._line_mark, self._line_hidden = 0, False
        first = pos
        try:
            while pos < end:
                if fast and pos != first and data[pos] == 0x2A and partial is None:
                    buf.offset = pos
                    self._partial = None
                    return None, True
                if data[pos] != 0x2A:  # not '*': an inline command, up to LF
                    if hidden:
                        nl = _HIDDEN
                    else:  # _line_end(), written out: this path can run once per command
                        start = pos if pos >= mark else mark
                        nl = data.find(b"\n", start)
                        if data.find(b"\0", start, nl if nl >= 0 else end) >= 0:
                            nl = _HIDDEN
                    hidden = False
                    if nl < 0:
                        if end - pos > MAX_INLINE_LEN:
                            raise ProtocolError("too big inline request")
                        self._stop_in_line(pos, end, nl)
                        break
                    # One CR before the LF belongs to the line ending; any other is a blank.
                    stop = nl - 1 if nl > pos and data[nl - 1] == 0x0D else nl
                    args = split_inline(bytes(data[pos:stop]))
                    pos = nl + 1
                    if args:
                        out.append((encode_command(args), args[0]))
                        if len(out) == limit:
                            break
                    continue
                if partial is not None:  # the request a previous call stopped in
                    p = pos + partial.offset
                    remaining, bulk_len = partial.remaining, partial.bulk_len
                    name, canonical = partial.name, partial.canonical
                    partial = None
                else:
                    match = _COUNT_LINE.match(data, pos)
                    if match is not None:
                        count = int(match.group(1))
                        p = match.end()
                        canonical = True
                    else:
                        # Redis takes the line up to the first CR and skips the byte after it.
                        cr = _HIDDEN if hidden else _line_end(data, max(pos, mark), b"\r")
                        hidden = False
                        if cr < 0:
                            if end - pos > MAX_INLINE_LEN:
                                raise ProtocolError("too big mbulk count string")
                            self._stop_in_line(pos, end, cr)
                            break
                        if cr + 1 >= end:
                            self._stop_in_line(pos, cr, cr)
                            break
                        count = _redis_integer(data[pos + 1 : cr])
                        if count is None:
                            raise ProtocolError("invalid multibulk length")
                        p = cr + 2
                        canonical = data[cr + 1] == 0x0A
                    if count > MAX_REQUEST_MULTIBULK_LEN:
                        raise ProtocolError("invalid multibulk length")
                    if count <= 0:  # Redis skips "*0", "*-1" and any other count below 1
                        pos = p
                        continue
                    remaining, bulk_len, name = count, -1, None
                while remaining:
                    if bulk_len < 0:
                        match = bulk_line(data, p)
                        if match is not None:
                            bulk_len = int(match[1])
                            if bulk_len > max_bulk:
                                raise ProtocolError("invalid bulk length")
                            p = match.end()
                        else:
                            cr = _HIDDEN if hidden else _line_end(data, max(p, mark), b"\r")
                            hidden = False
                            if cr < 0:
                                if end - p > MAX_INLINE_LEN:
                                    raise ProtocolError("too big bulk count string")
                                self._stop_in_line(pos, end, cr)
                                break
                            if cr + 1 >= end:
                                self._stop_in_line(pos, cr, cr)
                                break
                            # Redis looks at the '$' only once the whole line is there.
                            if data[p] != 0x24:
                                raise ProtocolError(
                                    f"expected '$', got '{_quoted_byte(data[p])}'")
                            length = _redis_integer(data[p + 1 : cr])
                            if length is None or length < 0 or length > max_bulk:
                                raise ProtocolError("invalid bulk length")
                            if data[cr + 1] != 0x0A:
                                canonical = False
                            bulk_len = length
                            p = cr + 2
                    payload_end = p + bulk_len
                    if payload_end + 2 > end:
                        break
                    # Redis skips the two bytes after a payload without checking them.
                    if data[payload_end] != 0x0D or data[payload_end + 1] != 0x0A:
                        canonical = False
                    if name is None:
                        name = bytes(data[p:payload_end])
                    p = payload_end + 2
                    bulk_len = -1
                    remaining -= 1
                if remaining:
                    partial = _PartialRequest(p - pos, remaining, bulk_len, name, canonical)
                    break
                if canonical:
                    out.append((bytes(data[pos:p]), name))
                else:  # passed on well-formed, as Redis understood it
                    out.append((encode_command(_arguments(data, pos)), name))
                pos = p
                if len(out) == limit:
                    break
        except ProtocolError as error:
            buf.offset = pos
            return error, False
        buf.offset = pos
        self._partial = partial
        return None, False


_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"a": b"\a"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


#: Lines of nothing but blanks (C's isspace()) up to their LF: inline commands of no words.
_BLANK_LINES = re.compile(rb"(?:[ \t\r\x0b\x0c]*\n)+")
_BLANK_BYTES = frozenset(b" \t\r\n\x0b\x0c")

#: What ends an unquoted word of an inline command (sdssplitargs).
_WORD_ENDS = (b" ", b"\t", b"\r", b"\n")


def split_inline(line: bytes) -> List[bytes]:
    """Split an inline command as Redis does: words separated by blanks; "..." with backslash
    escapes (\\n, \\xHH, ...), '...' with only \\' escaped; a quote may open mid-word and a
    closing quote must be followed by a blank or the end of the line.

    Blanks between words are all six of C's isspace(); a word itself ends only at a space, a
    tab, CR or LF (a vertical tab or form feed inside a word belongs to it)."""
    if b'"' not in line and b"'" not in line and b"\x0b" not in line and b"\x0c" not in line:
        return line.split()  # splits at exactly space, tab, CR and LF here
    args: List[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i : i + 1].isspace():
            i += 1
        if i >= n:
            return args
        current = bytearray()
        quote = b""
        while True:
            if i >= n:
                if quote:
                    raise ProtocolError("unbalanced quotes in request")
                break
            ch = line[i : i + 1]
            if quote == b'"':
                if ch == b"\\" and i + 3 < n and line[i + 1 : i + 2] == b"x" \
                        and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                    continue
                if ch == b"\\" and i + 1 < n:
                    nxt = line[i + 1 : i + 2]
                    current += _ESCAPES.get(nxt, nxt)
                    i += 2
                    continue
            elif quote == b"'":
                if ch == b"\\" and line[i + 1 : i + 2] == b"'":
                    current += b"'"
                    i += 2
                    continue
            if quote:
                if ch == quote:
                    i += 1
                    if i < n and not line[i : i + 1].isspace():
                        raise ProtocolError("unbalanced quotes in request")
                    break
                current += ch
            elif ch in _WORD_ENDS:
                break
            elif ch in (b'"', b"'"):
                quote = ch
            else:
                current += ch
            i += 1
        args.append(bytes(current))


def encode_command(args: List[bytes]) -> bytes:
    """A command as a RESP multibulk of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse_command(raw: bytes) -> List[bytes]:
    """Arguments of a request framed by RequestFramer (always a multibulk of bulks)."""
    args: List[bytes] = []
    nl = raw.find(_CRLF)
    count = int(raw[1:nl])
    pos = nl + 2
    for _ in range(count):
        nl = raw.find(_CRLF, pos)
        length = int(raw[pos + 1 : nl])
        start = nl + 2
        args.append(raw[start : start + length])
        pos = start + length + 2
    return args


def error_reply(message: str) -> bytes:
    """A RESP error line; CR and LF in the text would end the frame early, so they become spaces.

    Bytes carried as surrogate escapes (a client's bytes quoted back to it) go out unchanged.
    """
    text = message.replace("\r", " ").replace("\n", " ")
    try:
        return b"-" + text.encode("utf-8", "surrogateescape") + b"\r\n"
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return b"-" + text.encode("utf-8", "replace") + b"\r\n"


def simple_reply(text: str) -> bytes:
    return b"+" + text.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def bulk_reply(value: Optional[bytes]) -> bytes:
    if value is None:
        return b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode_value(value: Any, resp3: bool = False) -> bytes:
    """Encode a Python value as RESP (RESP3 types used only when `resp3`)."""
    if value is None:
        return b"_\r\n" if resp3 else b"$-1\r\n"
    if isinstance(value, bool):
        if resp3:
            return b"#t\r\n" if value else b"#f\r\n"
        return b":1\r\n" if value else b":0\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, float):
        if resp3:
            return b"," + repr(value).encode() + b"\r\n"
        return bulk_reply(repr(value).encode())
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bulk_reply(bytes(value))
    if isinstance(value, hiredis.ReplyError) or isinstance(value, Exception):
        return error_reply(str(value))
    if isinstance(value, dict):
        if resp3:
            head = b"%%%d\r\n" % len(value)
            return head + b"".join(encode_value(k, True) + encode_value(v, True) for k, v in value.items())
        items = [x for kv in value.items() for x in kv]
        return b"*%d\r\n" % len(items) + b"".join(encode_value(x) for x in items)
    if isinstance(value, (set, frozenset)) and resp3:
        return b"~%d\r\n" % len(value) + b"".join(encode_value(x, True) for x in value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return b"*%d\r\n" % len(value) + b"".join(encode_value(x, resp3) for x in value)
    raise TypeError(f"cannot encode {type(value).__name__} as RESP")


#: What a hiredis reader returns while a frame is incomplete (its default, False, is also #f).
_NOT_ENOUGH = object()
_reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
#: The reader RequestFramer frames well-formed requests with, kept while it holds nothing
#: (None: make a new one). One for all framers: framing never yields to another greenlet.
_request_reader: Optional[hiredis.Reader] = None


def parse_frame(raw: bytes) -> Any:
    """Parse one complete frame into Python values (errors come back as ReplyError).

    hiredis does the work. What it refuses (nesting deeper than its limit of 1024 levels, blob
    errors) or stops short in (an attribute, which it returns in place of the value it
    annotates) is read by _parse_stepwise(), which gives the values hiredis would.
    """
    global _reader
    reader = _reader
    # One shared reader is safe: this C call never yields to another greenlet.
    reader.feed(raw)
    try:
        value = reader.gets()
    except hiredis.ProtocolError:
        _reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        return _parse_stepwise(raw)
    except Exception:
        _reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        raise
    if value is _NOT_ENOUGH:
        _reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        raise ProtocolError("incomplete frame")
    if reader.has_data():
        # Bytes left over mean an attribute was taken for a value: they must not be read as
        # the start of the next frame parsed.
        _reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        return _parse_stepwise(raw)
    return value


def _parse_stepwise(raw: bytes) -> Any:
    """The value of the first frame in `raw`, built with an explicit stack (no recursion, so no
    depth limit but memory). Attributes are left out: the value they annotate takes their place.
    Single values are still read by hiredis, so that they come out exactly as it makes them."""
    data = bytes(raw)
    end = len(data)
    single = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
    # One entry per aggregate still open: [type byte, values so far, values still owed].
    stack: List[list] = []
    pos = 0
    while True:
        nl = data.find(_CRLF, pos + 1)
        if pos >= end or nl < 0:
            raise ProtocolError("incomplete frame")
        kind = data[pos]
        if kind in _AGGREGATE_TYPES or kind in _PAIR_TYPES:
            count = _parse_length(data, pos + 1, nl, "multibulk")
            pos = nl + 2
            if count < 0:
                value = None
            else:
                owed = count * 2 if kind in _PAIR_TYPES else count
                if kind == 0x7C:  # an attribute, then the value it annotates
                    owed += 1
                if owed:
                    stack.append([kind, [], owed])
                    continue
                value = {} if kind == 0x25 else []
        elif kind in _BLOB_TYPES or kind in _LINE_TYPES:
            stop = nl + 2
            if kind in _BLOB_TYPES:
                length = _parse_length(data, pos + 1, nl, "bulk")
                if length >= 0:
                    stop += length + 2
            if stop > end:
                raise ProtocolError("incomplete frame")
            if kind == 0x21:  # '!': a blob error, which hiredis does not read
                value = hiredis.ReplyError(data[nl + 2 : stop - 2].decode("utf-8", "replace"))
            else:
                single.feed(data[pos:stop])
                value = single.gets()
            pos = stop
        else:
            raise ProtocolError(f"unexpected RESP type byte {bytes([kind])!r}")
        # Give the value to its aggregate, and each aggregate it completes to the one outside.
        while stack:
            top = stack[-1]
            top[1].append(value)
            top[2] -= 1
            if top[2]:
                break
            stack.pop()
            kind, items = top[0], top[1]
            if kind == 0x25:  # '%'
                value = dict(zip(items[0::2], items[1::2]))
            elif kind == 0x7C:  # '|'
                value = items[-1]
            else:
                value = items
        else:
            return value
