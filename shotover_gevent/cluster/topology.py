"""The cluster as one source sees it: the current slot map, shared by all its client
connections, refreshed from any reachable node (one refresh at a time)."""

from __future__ import annotations

import logging
import time
from typing import List, Optional

from gevent.lock import Semaphore

from ..protocol import resp
from .node import Address, AuthError, Credentials, NodeError, NodePool, format_address
from .slotmap import SlotMap

log = logging.getLogger(__name__)

_CLUSTER_SLOTS = resp.encode_command([b"CLUSTER", b"SLOTS"])


class ClusterUnavailable(Exception):
    """No slot map could be had; `reply` is the error line to give clients (with '-')."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply[1:].strip().decode("utf-8", "replace"))
        self.reply = reply


class ClusterState:
    def __init__(self, pool: NodePool, contact_points: List[Address]) -> None:
        self.pool = pool
        self.contact_points = list(contact_points)
        self.map: Optional[SlotMap] = None
        #: Bumped by each successful refresh; a caller that saw an older one knows it is stale.
        self.version = 0
        self.refreshed_at = 0.0
        self.last_error = b"-ERR RedisSinkCluster has not reached the cluster yet\r\n"
        self._lock = Semaphore()

    def get(self, credentials: Credentials) -> SlotMap:
        current = self.map
        if current is None:
            self.refresh(credentials, self.version)
            current = self.map
            if current is None:
                raise ClusterUnavailable(self.last_error)
        return current

    def apply_moved(self, slot: int, address: Address) -> None:
        current = self.map
        if current is not None and current.owners[slot] != address:
            self.map = current.moved(slot, address)

    def candidates(self) -> List[Address]:
        out: List[Address] = []
        if self.map is not None:
            out.extend(self.map.nodes())
        for address in self.contact_points:
            if address not in out:
                out.append(address)
        return out

    def refresh(self, credentials: Credentials, seen_version: int,
                min_interval: float = 0.0) -> bool:
        """Fetch the slot map again unless another caller did since `seen_version`; True when
        a map is known afterwards."""
        with self._lock:
            if self.map is not None and (self.version != seen_version or
                                         time.monotonic() - self.refreshed_at < min_interval):
                return True
            problems = []
            server_error: Optional[bytes] = None
            for address in self.candidates():
                try:
                    connection = self.pool.connect(address, credentials)
                except AuthError as error:
                    server_error = server_error or b"-" + str(error).encode() + b"\r\n"
                    continue
                except NodeError as error:
                    problems.append(str(error))
                    continue
                try:
                    frame = connection.call([_CLUSTER_SLOTS])[0]
                except NodeError as error:
                    problems.append(str(error))
                    continue
                finally:
                    connection.close()
                if frame[:1] == b"-":
                    server_error = server_error or frame
                    continue
                try:
                    fresh = SlotMap.from_cluster_slots(resp.parse_frame(frame), address)
                except (ValueError, TypeError, resp.ProtocolError) as error:
                    problems.append(f"{format_address(address)}: {error}")
                    continue
                if not fresh.masters:
                    problems.append(f"{format_address(address)} serves no slots")
                    continue
                if self.map is None or fresh.owners != self.map.owners:
                    log.info("cluster slot map from %s: %d masters, %d slots uncovered",
                             format_address(address), len(fresh.masters), fresh.uncovered())
                self.map = fresh
                self.version += 1
                self.refreshed_at = time.monotonic()
                return True
            if server_error is not None:
                self.last_error = server_error
            else:
                detail = "; ".join(problems[-3:]) or "no contact points"
                self.last_error = resp.error_reply(
                    f"ERR RedisSinkCluster could not fetch the slot map from any node: {detail}")
            log.warning("slot map refresh failed: %s", self.last_error[1:].strip().decode(
                "utf-8", "replace"))
            return self.map is not None
