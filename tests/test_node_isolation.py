"""Node isolation on a real multi-node Ray cluster: after the isolator drains node B, new tasks and
actors land only elsewhere, an actor pinned to B cannot start, and the actor already on B keeps
answering until it ends; then B, idle, leaves the cluster.

A driver connects to one Ray cluster per process and the session's cluster (tests/conftest.py) is
single-node, so the scenario runs its own ``ray.cluster_utils.Cluster`` in a child Python: this
file run as a script, which prints what it saw as JSON.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_cluster_script


def _event(node_id: str, node_ip: str, kind: str = "crash", rank: int = 0):
    from raylane.fault_tolerance import FaultEvent

    return FaultEvent(
        kind=kind,
        worker_group="trainer",
        rank=rank,
        role="trainer",
        node_ip=node_ip,
        node_id=node_id,
        collective_group="",
        nodes=(node_ip,),
    )


def scenario() -> dict:
    """Head (no CPUs), nodes A and B (2 CPUs each); an actor on B; B isolated; what lands where."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.exceptions import ActorUnschedulableError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raylane.fault_tolerance import NodeIsolationConfig, NodeIsolator

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node_a = cluster.add_node(num_cpus=2)
    node_b = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Sitter:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=1)
        def busy_node() -> str:
            time.sleep(0.3)
            return ray.get_runtime_context().get_node_id()

        on_b = NodeAffinitySchedulingStrategy(node_b.node_id, soft=False)
        resident = Sitter.options(scheduling_strategy=on_b).remote()
        seen: dict = {"resident_started_on_b": ray.get(resident.node.remote()) == node_b.node_id}

        # Ray only, whatever machine the test runs on (``auto`` would add Kubernetes inside a pod).
        isolator = NodeIsolator(NodeIsolationConfig(backends=["ray"]))
        record = isolator.isolate(_event(node_b.node_id, node_b.node_ip_address))
        seen["record"] = record.to_dict()
        seen["isolated"] = record.isolated

        # Three free CPUs (two on A, one on B) and eight tasks at once: without isolation B takes some.
        places = ray.get([busy_node.remote() for _ in range(8)])
        seen["tasks_on_a"] = places.count(node_a.node_id)
        seen["tasks_on_b"] = places.count(node_b.node_id)
        preferring_b = Sitter.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_b.node_id, soft=True)
        )
        newcomer = preferring_b.remote()
        seen["soft_affinity_actor_on"] = "b" if ray.get(newcomer.node.remote()) == node_b.node_id else "a"
        ray.kill(newcomer)
        pinned = Sitter.options(scheduling_strategy=on_b).remote()
        try:
            ray.get(pinned.node.remote(), timeout=30)
            seen["pinned_actor"] = "started"
        except ActorUnschedulableError:
            seen["pinned_actor"] = "unschedulable"
        seen["resident_still_answers"] = ray.get(resident.node.remote(), timeout=30) == node_b.node_id

        ray.kill(resident)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (info,) = [n for n in ray.nodes() if n["NodeID"] == node_b.node_id]
            if not info["Alive"]:
                break
            time.sleep(0.2)
        seen["b_alive_once_idle"] = info["Alive"]
        seen["a_alive"] = any(n["NodeID"] == node_a.node_id and n["Alive"] for n in ray.nodes())
        seen["no_single_node"] = isolator.isolate(_event("", "", kind="comm_hang", rank=-1)).skipped
        return seen
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_kubernetes_backend_without_credentials_fails_at_construction(tmp_path, monkeypatch):
    pytest.importorskip("kubernetes")
    from raylane.fault_tolerance import KubeIsolationError, NodeIsolationConfig, NodeIsolator

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = NodeIsolationConfig(backends=["ray", "kubernetes"], kubeconfig=str(tmp_path / "none"))
    with pytest.raises(
        KubeIsolationError, match=r"no Kubernetes credentials .*set the node isolation config's kubeconfig"
    ):
        NodeIsolator(config)
    # In a pod whose account has no token mounted, the same.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeIsolationError, match="no Kubernetes credentials"):
        NodeIsolator(NodeIsolationConfig(namespace="raylane"))


def test_auto_backends_add_kubernetes_inside_a_pod_only(monkeypatch):
    kubernetes = pytest.importorskip("kubernetes")
    from raylane.fault_tolerance import NodeIsolationConfig, NodeIsolator

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert NodeIsolator().backends == ("ray",)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    inside = NodeIsolator(NodeIsolationConfig(namespace="raylane"), kube_client=kubernetes.client.ApiClient())
    assert inside.backends == ("ray", "kubernetes")
    assert NodeIsolator(NodeIsolationConfig(backends=["ray"])).backends == ("ray",)


def test_isolated_ray_node_takes_nothing_new_and_leaves_once_idle():
    pytest.importorskip("ray")
    seen = run_cluster_script(__file__, timeout=240)
    assert seen["resident_started_on_b"]
    assert seen["isolated"] and seen["record"]["ray_drained"], seen["record"]
    assert seen["tasks_on_b"] == 0 and seen["tasks_on_a"] == 8, seen
    assert seen["soft_affinity_actor_on"] == "a"
    assert seen["pinned_actor"] == "unschedulable"
    assert seen["resident_still_answers"]
    assert seen["a_alive"] and not seen["b_alive_once_idle"], seen
    assert "names no single node" in seen["no_single_node"]


if __name__ == "__main__":
    print(json.dumps(scenario()))


def test_fault_policies_build_node_isolation_only_when_a_class_asks_for_it():
    from raylane.fault_tolerance import (
        FaultPolicies,
        FaultToleranceConfig,
        NodeIsolationConfig,
        NodeIsolator,
        node_isolation,
    )

    assert node_isolation(FaultToleranceConfig()) is None
    config = FaultToleranceConfig(
        policies=FaultPolicies(comm_hang="isolate_and_replace"),
        isolation=NodeIsolationConfig(backends=["ray"], taint_key="example.com/bad"),
    )
    isolate = node_isolation(config)
    assert isinstance(isolate.__self__, NodeIsolator)
    assert isolate.__self__.backends == ("ray",)
    assert isolate.__self__.config.taint_key == "example.com/bad"
