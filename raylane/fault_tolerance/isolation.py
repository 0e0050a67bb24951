"""Isolating the node a fault event names, so that nothing new is scheduled on it.

In Ray the node is drained through the GCS, the call the autoscaler makes before it takes a node
away (``ray drain-node`` makes it too). Ray has no public API for it, and no other way fits:
node labels and custom resources are fixed when a node starts, and a placement group that
reserves the node's CPUs misses GPUs and custom resources. Draining is what the rest of Ray
understands as "this node is going away": its schedulers place no new task, actor or placement
group bundle there, Ray Serve migrates its replicas off, Ray Train v2 reports it as a preemption. What
already runs there keeps running; once the node is idle its raylet exits and the node is dead,
"Terminated due to preemption". A drain cannot be undone: isolation is final for that Ray node.

On Kubernetes the machine under the Ray pod is cordoned and tainted (:mod:`kube_nodes`), so
that no replacement pod lands on it either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.core.generated import autoscaler_pb2

from raylane.fault_tolerance.config import NodeIsolationConfig
from raylane.fault_tolerance.events import FaultEvent
from raylane.fault_tolerance.kube_nodes import KubeIsolationError, KubeNodeIsolator, in_kubernetes_pod

__all__ = ["IsolationRecord", "NodeIsolator", "drain_ray_node"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IsolationRecord:
    """What isolating one event's node did.

    ``node_id``/``node_ip``: the Ray node; ``fault_kind``: the event's class; ``ray_drained``:
    the GCS accepted the drain (False for a Ray node dead already, which takes nothing new);
    ``k8s_node``: the Kubernetes node cordoned and tainted ("" if none); ``skipped``: why nothing
    was tried (the event names no single node, or Ray does not know it); ``errors``: what failed,
    by backend; ``at``: ``time.time()`` when it was done.
    """

    node_id: str
    node_ip: str
    fault_kind: str
    ray_drained: bool = False
    k8s_node: str = ""
    skipped: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    at: float = 0.0

    @property
    def isolated(self) -> bool:
        """Every configured backend isolated the node."""
        return not self.skipped and not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drain_ray_node(node_id: str, reason: str) -> tuple[bool, str]:
    """Drain Ray node ``node_id`` (hex): ``(accepted, why not)``. Needs a connected driver or worker."""
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    # A preemption drain cannot be rejected for a busy node (an idle-termination one would be);
    # no deadline, since raylane does not kill the node after it.
    accepted, rejection = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), reason, 0
    )
    return accepted, rejection


class NodeIsolator:
    """Isolates the node of a :class:`FaultEvent` with the configured backends (:attr:`backends`,
    ``auto`` resolved).

        isolator = NodeIsolator(NodeIsolationConfig(backends=["ray", "kubernetes"]))
        record = isolator.isolate(event)      # IsolationRecord

    ``kube_client``: a ``kubernetes.client.ApiClient`` for the ``kubernetes`` backend (by default
    it is configured in-cluster, or from the kubeconfig); without the client library or credentials
    the constructor raises :class:`KubeIsolationError`, before any fault. ``isolate`` needs a
    connected Ray driver or worker.
    """

    def __init__(self, config: NodeIsolationConfig | None = None, kube_client: Any = None) -> None:
        self.config = config or NodeIsolationConfig()
        backends = self.config.backends
        if backends == "auto":
            backends = ["ray", "kubernetes"] if in_kubernetes_pod() else ["ray"]
        self.backends: tuple[str, ...] = tuple(backends)
        self._kube = KubeNodeIsolator(self.config, kube_client) if "kubernetes" in self.backends else None

    def isolate(self, event: FaultEvent) -> IsolationRecord:
        """Isolate ``event``'s node; errors are in the record (and logged), never raised, as the job
        goes on with the rest of its recovery either way."""
        record = {
            "node_id": event.node_id,
            "node_ip": event.node_ip,
            "fault_kind": event.kind,
            "at": time.time(),
        }
        if not event.node_id:
            skipped = f"the event names no single node (nodes {list(event.nodes)})"
            return self._done(IsolationRecord(**record, skipped=skipped))
        node = next((n for n in ray.nodes() if n["NodeID"] == event.node_id), None)
        if node is None:
            return self._done(IsolationRecord(**record, skipped=f"Ray knows no node {event.node_id}"))
        errors: dict[str, str] = {}
        k8s_node = ""
        if self._kube is not None:
            try:
                k8s_node = self._kube.node_of_pod(node["NodeManagerHostname"])
                self._kube.cordon_and_taint(k8s_node, event.kind)
            except KubeIsolationError as err:
                errors["kubernetes"] = str(err)
        drained = False
        # A dead Ray node takes nothing new already: only a live one is drained.
        if "ray" in self.backends and node["Alive"]:
            drained, rejection = drain_ray_node(event.node_id, f"raylane isolated it: {event.summary()}")
            if not drained:
                errors["ray"] = f"the GCS refused to drain the node: {rejection}"
        return self._done(IsolationRecord(**record, ray_drained=drained, k8s_node=k8s_node, errors=errors))

    @staticmethod
    def _done(record: IsolationRecord) -> IsolationRecord:
        if record.isolated:
            logger.warning(
                "node %s (%s) isolated after a %s", record.node_id, record.node_ip, record.fault_kind
            )
        else:
            logger.warning(
                "node %s (%s) not isolated: %s",
                record.node_id,
                record.node_ip,
                record.skipped or record.errors,
            )
        return record
