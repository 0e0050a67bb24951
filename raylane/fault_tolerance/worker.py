"""``ProbedWorker``: a role mixin whose ranks start collective probes and take armed faults on command."""

from __future__ import annotations

import os

import ray
from ray.actor import ActorHandle

from raylane.actors import Dispatch, Worker, register
from raylane.fault_tolerance.config import ProbeConfig
from raylane.fault_tolerance.faults import InRankFault
from raylane.fault_tolerance.probes import CollectiveProbe, RankIdentity, active_probe

__all__ = ["ProbedWorker"]


class ProbedWorker(Worker):
    """Mix into a role to give its group ``start_probes``, ``stop_probes`` and ``arm_fault``.

    One probe serves the whole process, so colocated roles need it started through one of them.
    """

    @register(Dispatch.ONE_TO_ALL)
    def start_probes(self, detector: ActorHandle, config: ProbeConfig | None = None) -> None:
        """Record this rank's collectives and ship them to ``detector`` (replaces an earlier probe)."""
        identity = RankIdentity(
            self.group_name,
            self.rank,
            self.role,
            self.node_id,
            self.node_ip,
            os.getpid(),
            _raylet_address(self.node_id),
        )
        CollectiveProbe(identity, detector, config).install()

    @register(Dispatch.ONE_TO_ALL)
    def stop_probes(self) -> None:
        probe = active_probe()
        if probe is not None:
            probe.close()

    @register(Dispatch.ONE_TO_ALL)
    def arm_fault(self, fault: InRankFault | None) -> None:
        """Inject ``fault`` at its collective (call on the target ranks only: ``group.on_ranks([r])``)."""
        probe = active_probe()
        if probe is None:
            raise RuntimeError(
                f"rank {self.rank} of {self.group_name!r} has no probe: call start_probes first"
            )
        probe.arm(fault)


def _raylet_address(node_id: str) -> str:
    """``host:port`` of the raylet of node ``node_id`` ("" if Ray does not list it)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    return ""
