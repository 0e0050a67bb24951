"""Fault injection: kill, stop or slow a rank (inside a collective or outside), remove a node, kill Redis.

Two kinds of injection. An :class:`InRankFault` is armed on a rank's probe and fires at a given
collective, which is how a fault lands exactly inside or just before collective k, or slows every
collective of a rank (a straggler) or only its sends (a slow link). The functions below act from
outside, the way real failures do: a signal to a rank's process (sent by a task on the rank's own
node, so it works on any node of the cluster), a node removed from a local multi-node cluster, a
``redis-server`` killed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raylane.actors import NodeInfo

__all__ = [
    "SIGNALS",
    "InRankFault",
    "find_rank",
    "kill_process",
    "remove_node",
    "signal_process",
    "signal_rank",
]

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InRankFault:
    """A fault a rank's probe injects into its own process.

    ``action``: ``"kill"`` (SIGKILL) or ``"stop"`` (SIGSTOP) at the ``at_seq``-th op of a group,
    or ``"delay"`` of ``delay_s`` seconds at every op from the ``at_seq``-th on. ``inside``: after
    the op's entry is recorded (the rank is in the collective) rather than before it (the rank
    never arrives). ``ops`` limits it to those ops (``("send",)`` for a slow link), any op if empty.
    """

    action: Literal["kill", "stop", "delay"]
    at_seq: int = 0
    inside: bool = False
    delay_s: float = 0.0
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in ("kill", "stop", "delay"):
            raise ValueError(f"action must be 'kill', 'stop' or 'delay', got {self.action!r}")
        if self.action == "delay" and self.delay_s <= 0:
            raise ValueError("a 'delay' fault needs delay_s > 0")
        if self.at_seq < 0:
            raise ValueError(f"at_seq must be >= 0, got {self.at_seq}")

    def applies(self, op: str, seq: int) -> bool:
        if self.ops and op not in self.ops:
            return False
        return seq >= self.at_seq if self.action == "delay" else seq == self.at_seq


@ray.remote(num_cpus=0)
def _send_signal(pid: int, signum: int) -> float:
    os.kill(pid, signum)
    return time.time()


def signal_process(node_id: str, pid: int, signum: int, timeout_s: float = 30.0) -> float:
    """Send ``signum`` to process ``pid`` on Ray node ``node_id`` (from a task placed on that node).

    Returns when the signal was sent (``time.time()`` on that node).
    """
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    sent_at = ray.get(
        _send_signal.options(scheduling_strategy=strategy).remote(pid, signum), timeout=timeout_s
    )
    logger.warning(
        "fault injected: signal %s to pid %d on node %s", signal.Signals(signum).name, pid, node_id
    )
    return sent_at


def find_rank(group: str, rank: int) -> NodeInfo:
    """Where rank ``rank`` of the running worker group ``group`` lives, from Ray's actor table.

    A group's rank actors are named ``<group>-<id>-rank<r>`` (``.<generation>`` once replaced); the
    newest live one is taken. ``group`` is the group's name, or ``<group>-<id>`` when several groups
    of that name run. The actor itself is not asked, so a stopped rank is found too.
    """
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        tenant, _, tail = entry["name"].rpartition(f"-rank{rank}")
        name, _, _ = tenant.rpartition("-")
        if group in (name, tenant) and tail[:1] in ("", "."):
            found.append((int(tail[1:]) if tail else 0, entry["name"], entry["namespace"], tenant))
    tenants = sorted({tenant for *_, tenant in found})
    if len(tenants) > 1:
        raise ValueError(f"several worker groups named {group!r} are running ({tenants}); name one of these")
    for _, name, namespace, _ in sorted(found, reverse=True):
        try:
            actor_id = ray.get_actor(name, namespace=namespace)._actor_id.hex()
        except ValueError:
            continue  # gone since it was listed
        # The GCS actor table (Ray's public state API needs the dashboard, which may be off).
        info = ray._private.state.actors(actor_id)
        if info.get("State") == "ALIVE":
            address = info["Address"]
            return NodeInfo(address["NodeID"], address["IPAddress"], "", info["Pid"], ())
    raise ValueError(
        f"no live rank {rank} of a worker group {group!r} in this Ray cluster; "
        "check the group name (the WorkerGroup's name) and the rank"
    )


def signal_rank(group: str, rank: int, action: str) -> NodeInfo:
    """``kill``, ``stop`` or ``cont`` (continue) the process of a running group's rank; returns where it ran."""
    if action not in SIGNALS:
        raise ValueError(f"action must be one of {sorted(SIGNALS)}, got {action!r}")
    node = find_rank(group, rank)
    signal_process(node.node_id, node.pid, SIGNALS[action])
    return node


def kill_process(pid: int) -> None:
    """SIGKILL a local process (e.g. ``redis-server``)."""
    os.kill(pid, signal.SIGKILL)
    logger.warning("fault injected: SIGKILL to local pid %d", pid)


def remove_node(cluster, node) -> None:
    """Take ``node`` out of a local ``ray.cluster_utils.Cluster`` abruptly (its raylet and workers die)."""
    cluster.remove_node(node, allow_graceful=False)
    logger.warning("fault injected: node %s removed", node.node_id)
