"""Key to hash slot, as Redis Cluster computes it: CRC16 (XMODEM variant) of the key, or of
the first non-empty `{...}` hash tag in it, modulo 16384."""

from __future__ import annotations

from binascii import crc_hqx
from typing import List, Optional

try:
    from ..protocol._scan import key_slots as _key_slots
except ImportError:  # the compiled part could not be built: the same in Python
    _key_slots = None

SLOT_COUNT = 16384


def hash_tag(key: bytes) -> bytes:
    """The part of `key` that is hashed: the text between the first `{` and the next `}` when
    that text is not empty, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: bytes) -> int:
    if isinstance(key, str):
        key = key.encode()
    if b"{" in key:
        key = hash_tag(key)
    # CRC16/XMODEM (polynomial 0x1021, start 0, no reflection): binascii's CRC-CCITT.
    return crc_hqx(key, 0) & (SLOT_COUNT - 1)


def request_key_slots(framed: List[tuple], max_length: int = 1 << 62) -> List[int]:
    """For requests as the framer gives them, (raw bytes, name) pairs, the hash slot of each
    one's argument 1 (-1: it has none, is not an array of bulk strings, or is longer than
    `max_length` bytes)."""
    if _key_slots is not None:
        return _key_slots(framed, max_length)
    slots = []
    for raw, _name in framed:
        key = _first_key(raw) if len(raw) <= max_length else None
        slots.append(-1 if key is None else key_slot(key))
    return slots


def _first_key(raw: bytes) -> Optional[bytes]:
    """Argument 1 of a request framed as an array of bulk strings (None: it has none)."""
    try:
        if raw[:1] != b"*":
            return None
        end = raw.index(b"\r\n")
        if int(raw[1:end]) < 2 or raw[end + 2 : end + 3] != b"$":
            return None
        end_name = raw.index(b"\r\n", end + 2)
        start = end_name + 2 + int(raw[end + 3 : end_name]) + 2
        if raw[start : start + 1] != b"$":
            return None
        end_length = raw.index(b"\r\n", start)
        length = int(raw[start + 1 : end_length])
    except ValueError:
        return None
    key = raw[end_length + 2 : end_length + 2 + length]
    return key if len(key) == length and length >= 0 else None


#: request_key_slots(framed, max_length), straight to the compiled part where it is there (one
#: call less on the way of every batch served from the event loop's callbacks).
batch_key_slots = _key_slots if _key_slots is not None else request_key_slots
