"""A real Redis Cluster for the tests: redis-server processes on free loopback ports made into
3 masters with one replica each by `redis-cli --cluster create`, plus helpers to inspect it."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import redis
import redis.cluster

from helpers import HOST, RedisServer, free_ports, redis_client, wait_for

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 2000


class ClusterNode(RedisServer):
    """A cluster-enabled redis-server; its cluster bus listens on `bus_port`."""

    def __init__(self, directory: Path, ports: Optional[List[int]] = None) -> None:
        # The two ports from one call: chosen one after the other, the second could be the
        # first again (its probe closed), and the node would fail to bind its bus.
        port, self.bus_port = ports or free_ports(2)
        super().__init__(directory, port, extra_args=[
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(Path(directory) / f"nodes-{port}.conf"),
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--appendonly", "no", "--save", ""])

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def node_id(self) -> str:
        with self.client() as client:
            return client.execute_command("CLUSTER", "MYID").decode()

    def info(self) -> Dict[str, str]:
        with self.client(socket_timeout=2) as client:
            text = client.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else text
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def role(self) -> str:
        with self.client(socket_timeout=2) as client:
            return client.execute_command("ROLE")[0].decode()


class Cluster:
    """Six nodes: three masters and three replicas, every slot covered."""

    def __init__(self, directory: Path, size: int = 6) -> None:
        self.directory = Path(directory)
        # Every node's two ports from one call, all distinct.
        ports = free_ports(2 * size)
        self.nodes: List[ClusterNode] = [ClusterNode(self.directory / f"node-{i}",
                                                     ports[2 * i:2 * i + 2])
                                         for i in range(size)]

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "Cluster":
        for node in self.nodes:
            node.start()
        command = [REDIS_CLI, "--cluster", "create", *[n.address for n in self.nodes],
                   "--cluster-replicas", "1", "--cluster-yes"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            self.stop()
            raise AssertionError(f"redis-cli --cluster create failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 60.0, size: Optional[int] = None) -> None:
        """Every running node says cluster_state:ok, knows every node and sees all slots."""
        expected = size or len(self.nodes)

        def healthy() -> bool:
            for node in self.running_nodes():
                info = node.info()
                if (info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384"
                        or int(info.get("cluster_known_nodes", 0)) < expected):
                    return False
            masters = self.masters()
            return len(masters) == 3 and all(self.replicas_of(m) for m in masters)

        wait_for(healthy, timeout, "the cluster to be healthy with a replica per master",
                 interval=0.1)

    def running_nodes(self) -> List[ClusterNode]:
        return [node for node in self.nodes if node.running]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    # ---- topology -----------------------------------------------------------------------------

    def slots(self) -> List[Tuple[int, int, str, List[str]]]:
        """(start, end, master address, replica addresses) from a running node."""
        for node in self.running_nodes():
            try:
                with node.client(socket_timeout=2) as client:
                    reply = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            out = []
            for entry in reply:
                start, end = int(entry[0]), int(entry[1])
                addresses = [f"{n[0].decode() or HOST}:{int(n[1])}" for n in entry[2:]]
                out.append((start, end, addresses[0], addresses[1:]))
            return out
        raise AssertionError("no cluster node answered CLUSTER SLOTS")

    def node(self, address: str) -> ClusterNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(address)

    def masters(self) -> List[ClusterNode]:
        seen: List[str] = []
        for _start, _end, master, _replicas in self.slots():
            if master not in seen:
                seen.append(master)
        return [self.node(address) for address in seen]

    def replicas_of(self, master: ClusterNode) -> List[ClusterNode]:
        out = []
        for _start, _end, address, replicas in self.slots():
            if address == master.address:
                out = [self.node(r) for r in replicas if self.node(r).running]
        return out

    def master_for_slot(self, slot: int) -> ClusterNode:
        for start, end, master, _replicas in self.slots():
            if start <= slot <= end:
                return self.node(master)
        raise AssertionError(f"no master serves slot {slot}")

    def contact_points(self) -> List[str]:
        return [node.address for node in self.nodes]

    def client(self, **kwargs) -> redis.cluster.RedisCluster:
        """A cluster-aware client talking to the nodes directly."""
        kwargs.setdefault("socket_timeout", 10)
        return redis.cluster.RedisCluster(host=HOST, port=self.running_nodes()[0].port,
                                          **kwargs)

    def flushall(self) -> None:
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def dbsize(self) -> int:
        total = 0
        for node in self.masters():
            with node.client() as client:
                total += client.dbsize()
        return total

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Each master's replicas have caught up with its replication offset."""
        def caught_up() -> bool:
            for master in self.masters():
                with master.client() as client:
                    info = client.info("replication")
                offset = info["master_repl_offset"]
                replicas = [v for k, v in info.items() if k.startswith("slave")]
                if not replicas or any(int(r["offset"]) < offset for r in replicas):
                    return False
            return True

        wait_for(caught_up, timeout, "replicas to catch up", interval=0.05)

    # ---- resharding ---------------------------------------------------------------------------

    def migrate_slot(self, slot: int, target: ClusterNode, batch: int = 50,
                     between_batches=None) -> int:
        """Move `slot` to `target` the way redis-cli --cluster reshard does; returns the number
        of keys moved. `between_batches()` runs after each MIGRATE (to let traffic interleave)."""
        source = self.master_for_slot(slot)
        assert source.address != target.address, "the slot is already on the target"
        source_id, target_id = source.node_id(), target.node_id()
        with target.client() as t, source.client() as s:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            moved = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                s.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if between_batches is not None:
                    between_batches()
            else:
                raise AssertionError(f"slot {slot} still had keys after 60 s of migration")
            t.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self.masters():
            if node.address not in (source.address, target.address):
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(lambda: self.master_for_slot(slot).address == target.address, 10,
                 f"every node to agree that slot {slot} moved")
        return moved


def start_cluster(directory: Path) -> Cluster:
    return Cluster(directory).start()


def cluster_sink(cluster: Cluster, **options) -> dict:
    settings = {"first_contact_points": cluster.contact_points(), "connect_timeout_ms": 3000}
    settings.update(options)
    return {"RedisSinkCluster": settings}


__all__ = ["Cluster", "ClusterNode", "cluster_sink", "redis_client", "start_cluster"]
