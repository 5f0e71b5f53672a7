"""Key to hash slot, as Redis Cluster computes it: CRC16 (XMODEM variant) of the key, or of
the first non-empty `{...}` hash tag in it, modulo 16384."""

from __future__ import annotations

from array import array
from binascii import crc_hqx
from typing import List, Optional, Sequence, Union

try:
    from ..protocol._scan import key_slots as _key_slots
    from ..protocol._scan import merge_replies as _merge_replies
    from ..protocol._scan import route_batch as _route_batch
except ImportError:  # the compiled part could not be built: the same in Python
    _key_slots = _merge_replies = _route_batch = None

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


#: In a routing table (see route_requests), a slot no node serves.
NO_NODE = 65535
#: The most nodes one batch is cut for by route_requests.
MAX_GROUPS = 255

#: Replies that send their request again (a redirection, a node not ready).
RETRIED = (b"-MOVED ", b"-ASK ", b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING")


def route_requests(framed: List[tuple], table: bytes, max_length: int
                   ) -> Union[None, int, tuple]:
    """Which node each request goes to, from `table` (per slot the index of the node that
    serves it, NO_NODE: none, as native unsigned 16-bit integers: see routing_table) and its
    argument 1's slot (see request_key_slots, `max_length` included). One node for every
    request: its index. Else, per node in the order the batch first names it (a group),
    (nodes: tuple of their indices, payloads: the group's requests' bytes joined, order:
    bytes, each request's group). None when a request has no slot, its slot no node, or the
    batch names more than MAX_GROUPS nodes."""
    if not framed:
        return None
    owners = memoryview(table).cast("H")
    nodes = [-1 if slot < 0 else owners[slot] for slot in request_key_slots(framed, max_length)]
    if -1 in nodes or NO_NODE in nodes:
        return None
    first = nodes[0]
    if nodes.count(first) == len(nodes):
        return first
    groups: dict = {}
    order = bytearray()
    shares: List[List[bytes]] = []
    for (raw, *_name), node in zip(framed, nodes):
        group = groups.get(node)
        if group is None:
            if len(shares) == MAX_GROUPS:
                return None
            group = groups[node] = len(shares)
            shares.append([])
        order.append(group)
        shares[group].append(raw)
    return tuple(groups), [b"".join(share) for share in shares], bytes(order)


def routing_table(owners: Sequence[Optional[int]]) -> bytes:
    """A table for route_requests from each slot's node index (None: no node)."""
    return array("H", [NO_NODE if owner is None else owner for owner in owners]).tobytes()


def merge_frames(order: bytes, results: Sequence[List[bytes]]) -> Optional[bytes]:
    """The frames each group's node sent (`results`), put back in request order (`order`, as
    route_requests gives it) and joined; None when a group has too few or one of them sends
    its request again (RETRIED)."""
    taken = [0] * len(results)
    replies = []
    for group in order:
        if group >= len(results):
            return None
        frames = results[group]
        if taken[group] >= len(frames):
            return None
        frame = frames[taken[group]]
        if frame[:1] == b"-" and frame.startswith(RETRIED):
            return None
        taken[group] += 1
        replies.append(frame)
    return b"".join(replies)


#: The same, in C where it is built.
route_batch = _route_batch if _route_batch is not None else route_requests
merge_replies = _merge_replies if _merge_replies is not None else merge_frames
