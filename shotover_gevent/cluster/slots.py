"""Key to hash slot, as Redis Cluster computes it: CRC16 (XMODEM variant) of the key, or of
the first non-empty `{...}` hash tag in it, modulo 16384."""

from __future__ import annotations

from typing import List

SLOT_COUNT = 16384


def _make_table() -> List[int]:
    table = []
    for byte in range(256):
        value = byte << 8
        for _ in range(8):
            value = ((value << 1) ^ 0x1021) if value & 0x8000 else (value << 1)
        table.append(value & 0xFFFF)
    return table


_TABLE = _make_table()


def crc16(data: bytes) -> int:
    """CRC16/XMODEM: polynomial 0x1021, initial value 0, no reflection, no final xor."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


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
    return crc16(hash_tag(key)) & (SLOT_COUNT - 1)
