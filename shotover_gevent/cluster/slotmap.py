"""The slot map (which master serves each of the 16384 slots, and its replicas), parsed from
CLUSTER SLOTS, and MOVED/ASK redirections."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

from .slots import SLOT_COUNT, routing_table

Address = Tuple[str, int]


class SlotMap:
    __slots__ = ("owners", "masters", "replicas", "first_slots", "_routing")

    def __init__(self, owners: List[Optional[Address]], replicas: Dict[Address, List[Address]]):
        self.owners = owners
        #: Each master's lowest slot: a fan-out part addressed by it follows a failover.
        self.first_slots: Dict[Address, int] = {}
        for slot, owner in enumerate(owners):
            if owner is not None and owner not in self.first_slots:
                self.first_slots[owner] = slot
        self.masters: List[Address] = list(self.first_slots)
        self.replicas = replicas
        self._routing: Optional[Tuple[bytes, List[Address]]] = None

    def routing(self) -> Tuple[bytes, List[Address]]:
        """(table, nodes): for each slot the index in `nodes` of its owner, as route_batch
        takes it (slots.py). Made once, when first asked for."""
        routing = self._routing
        if routing is None:
            nodes = list(self.masters)
            index: Dict[Optional[Address], Optional[int]] = {None: None}
            for position, address in enumerate(nodes):
                index[address] = position
            routing = self._routing = routing_table(list(map(index.__getitem__, self.owners))), \
                nodes
        return routing

    @classmethod
    def from_cluster_slots(cls, value, asked: Address) -> "SlotMap":
        """From the parsed reply of CLUSTER SLOTS sent to `asked` (whose host stands in for an
        empty one)."""
        if not isinstance(value, list):
            raise ValueError(f"CLUSTER SLOTS replied {value!r}")
        owners: List[Optional[Address]] = [None] * SLOT_COUNT
        replicas: Dict[Address, List[Address]] = {}
        for entry in value:
            if not isinstance(entry, list) or len(entry) < 3:
                raise ValueError(f"unexpected CLUSTER SLOTS entry {entry!r}")
            start, end = int(entry[0]), int(entry[1])
            if not 0 <= start <= end < SLOT_COUNT:
                raise ValueError(f"slot range {start}-{end} out of bounds")
            nodes = [_node_address(node, asked) for node in entry[2:]]
            master = nodes[0]
            if master is None:
                continue
            owners[start : end + 1] = [master] * (end - start + 1)
            known = replicas.setdefault(master, [])
            for replica in nodes[1:]:
                if replica is not None and replica not in known:
                    known.append(replica)
        return cls(owners, replicas)

    def master_for(self, slot: int) -> Optional[Address]:
        return self.owners[slot]

    def any_master(self) -> Optional[Address]:
        return random.choice(self.masters) if self.masters else None

    def uncovered(self) -> int:
        return sum(1 for owner in self.owners if owner is None)

    def nodes(self) -> List[Address]:
        out = list(self.masters)
        for master in self.masters:
            for replica in self.replicas.get(master, ()):
                if replica not in out:
                    out.append(replica)
        return out

    def moved(self, slot: int, address: Address) -> "SlotMap":
        """A copy in which `slot` belongs to `address` (after a MOVED redirection)."""
        owners = list(self.owners)
        owners[slot] = address
        return SlotMap(owners, self.replicas)


def _node_address(node, asked: Address) -> Optional[Address]:
    if not isinstance(node, list) or len(node) < 2:
        return None
    host = node[0].decode("utf-8", "replace") if isinstance(node[0], bytes) else str(node[0])
    if host == "?":
        return None  # the node does not know this endpoint yet
    return (host or asked[0], int(node[1]))


def parse_redirect(line: bytes, replied_by: Address) -> Optional[Tuple[str, int, Address]]:
    """('MOVED'|'ASK', slot, address) from an error line such as `-MOVED 3999 127.0.0.1:6381`."""
    parts = line[1:].strip().split(b" ")
    if len(parts) != 3 or parts[0] not in (b"MOVED", b"ASK"):
        return None
    try:
        slot = int(parts[1])
        host, _, port = parts[2].decode("utf-8", "replace").rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        address = (host or replied_by[0], int(port))
    except ValueError:
        return None
    if not 0 <= slot < SLOT_COUNT:
        return None
    return parts[0].decode(), slot, address
