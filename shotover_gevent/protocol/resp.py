"""Sans-IO RESP2/RESP3 framing: bytes in, whole messages (with their exact raw bytes) out.

No sockets and no gevent here, so the exact bytes not yet consumed can always be reported.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import hiredis

#: Redis's proto-max-bulk-len default: a longer bulk string is refused before any allocation.
DEFAULT_MAX_BULK_LEN = 512 * 1024 * 1024
#: Redis refuses multibulk counts above 1024*1024*1024 as "invalid multibulk length".
MAX_MULTIBULK_LEN = 1024 * 1024 * 1024
#: Redis's PROTO_INLINE_MAX_SIZE: a longer line without CRLF is a protocol error.
MAX_INLINE_LEN = 64 * 1024
#: Nesting deeper than this in a reply is refused rather than followed.
MAX_DEPTH = 64

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

    Iterative (a count of frames still owed), so deep nesting cannot exhaust the C stack. With
    `state`, an incomplete scan records where it stopped and a later call resumes there.
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
                if len(depth_stack) > MAX_DEPTH:
                    raise ProtocolError("reply nested too deeply")
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


class ReplyFramer:
    """Splits a server's byte stream into whole RESP2/RESP3 frames (raw bytes each)."""

    __slots__ = ("_buf", "max_bulk_len", "_state")

    def __init__(self, max_bulk_len: int = DEFAULT_MAX_BULK_LEN) -> None:
        self._buf = _Buffer()
        self.max_bulk_len = max_bulk_len
        self._state: Optional[_ScanState] = None

    def feed(self, data: bytes) -> None:
        # Scan state is relative to the frame start, so compaction inside feed() is harmless.
        self._buf.feed(data)

    def next_frame(self) -> Optional[bytes]:
        buf = self._buf
        data = buf.data
        start = buf.offset
        if start >= len(data):
            return None
        # Fast path for the commonest replies: one line (+OK, :1, -ERR ...).
        if self._state is None and data[start] in _LINE_TYPES:
            nl = data.find(_CRLF, start + 1)
            if nl < 0:
                if len(data) - start > MAX_INLINE_LEN:
                    raise ProtocolError("too big line without CRLF")
                return None
            buf.offset = nl + 2
            return bytes(data[start : nl + 2])
        state = self._state
        if state is None and (data[start] in _AGGREGATE_TYPES or data[start] in _PAIR_TYPES):
            state = self._state = _ScanState()
        end = scan_frame(data, start, self.max_bulk_len, state)
        if end < 0:
            return None
        self._state = None
        buf.offset = end
        return bytes(data[start:end])

    def pending(self) -> int:
        return self._buf.pending()

    def unread_bytes(self) -> bytes:
        return self._buf.unread()


class RequestFramer:
    """Splits a client's byte stream into commands, as Redis does: multibulk of bulks, or inline.

    Each request comes out as (raw, name): `name` is the command's first word as sent.
    """

    __slots__ = ("_buf", "max_bulk_len", "_resume")

    def __init__(self, max_bulk_len: int = DEFAULT_MAX_BULK_LEN) -> None:
        self._buf = _Buffer()
        self.max_bulk_len = max_bulk_len
        # (offset from the request's start, arguments already scanned, count, name) of an
        # incomplete multibulk, so a huge request is not rescanned on every read.
        self._resume: Optional[Tuple[int, int, int, bytes]] = None

    def feed(self, data: bytes) -> None:
        self._buf.feed(data)

    def pending(self) -> int:
        return self._buf.pending()

    def unread_bytes(self) -> bytes:
        """Every byte received and not yet returned as a request: what a checkpoint must carry."""
        return self._buf.unread()

    def pop_requests(self) -> Tuple[List[Tuple[bytes, bytes]], Optional[ProtocolError]]:
        """Every complete request buffered, and the protocol error that stopped framing, if any.

        Requests framed before an error are returned too: Redis serves them before it replies
        with the error and closes the connection.
        """
        out: List[Tuple[bytes, bytes]] = []
        buf = self._buf
        data = buf.data
        end = len(data)
        pos = buf.offset
        max_bulk = self.max_bulk_len
        try:
            while pos < end:
                if data[pos] != 0x2A:  # not '*': an inline command
                    nl = data.find(b"\n", pos)
                    if nl < 0:
                        if end - pos > MAX_INLINE_LEN:
                            raise ProtocolError("too big inline request")
                        break
                    line = bytes(data[pos:nl]).rstrip(b"\r")
                    args = split_inline(line)
                    pos = nl + 1
                    if args:
                        out.append((encode_command(args), args[0]))
                    continue
                resume = self._resume
                if resume is not None:
                    self._resume = None
                    p, first, count, name = pos + resume[0], resume[1], resume[2], resume[3]
                else:
                    nl = data.find(_CRLF, pos + 1)
                    if nl < 0:
                        if end - pos > MAX_INLINE_LEN:
                            raise ProtocolError("too big mbulk count string")
                        break
                    text = data[pos + 1 : nl]
                    # Strict digits, as Redis parses them (int() would take " 1", "+1", "1_0").
                    if not text.isdigit() and not (text[:1] == b"-" and text[1:].isdigit()):
                        raise ProtocolError("invalid multibulk length")
                    count = int(text)
                    if count > MAX_MULTIBULK_LEN:
                        raise ProtocolError("invalid multibulk length")
                    p = nl + 2
                    if count <= 0:  # Redis ignores "*0" and "*-1" requests
                        pos = p
                        continue
                    first, name = 0, b""
                complete = True
                for index in range(first, count):
                    item_start = p
                    if p >= end:
                        complete = False
                        break
                    if data[p] != 0x24:
                        raise ProtocolError(f"expected '$', got '{chr(data[p])}'")
                    nl = data.find(_CRLF, p + 1)
                    if nl < 0:
                        if end - p > MAX_INLINE_LEN:
                            raise ProtocolError("too big bulk count string")
                        complete = False
                        break
                    text = data[p + 1 : nl]
                    if not text.isdigit():
                        raise ProtocolError("invalid bulk length")
                    length = int(text)
                    if length > max_bulk:
                        raise ProtocolError("invalid bulk length")
                    payload = nl + 2
                    p = payload + length + 2
                    if p > end:
                        p = item_start
                        complete = False
                        break
                    if data[p - 2 : p] != _CRLF:
                        raise ProtocolError("bulk payload not followed by CRLF")
                    if index == 0:
                        name = bytes(data[payload : payload + length])
                if not complete:
                    if index >= 64:
                        self._resume = (p - pos, index, count, name)
                    break
                out.append((bytes(data[pos:p]), name))
                pos = p
        except ProtocolError as error:
            buf.offset = pos
            return out, error
        buf.offset = pos
        return out, None


_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"a": b"\a"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def split_inline(line: bytes) -> List[bytes]:
    """Split an inline command as Redis does: words separated by blanks; "..." with backslash
    escapes (\\n, \\xHH, ...), '...' with only \\' escaped; a quote may open mid-word and a
    closing quote must be followed by a blank or the end of the line."""
    if b'"' not in line and b"'" not in line:
        return line.split()
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
            elif ch.isspace():
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
    """A RESP error line; CR and LF in the text would end the frame early, so they become spaces."""
    text = message.replace("\r", " ").replace("\n", " ")
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


_reader = hiredis.Reader()


def parse_frame(raw: bytes) -> Any:
    """Parse one complete frame into Python values (hiredis; errors come back as ReplyError)."""
    global _reader
    # One shared reader is safe: this C call never yields to another greenlet.
    _reader.feed(raw)
    try:
        value = _reader.gets()
    except Exception:
        _reader = hiredis.Reader()
        raise
    if value is False:
        _reader = hiredis.Reader()
        raise ProtocolError("incomplete frame")
    return value
