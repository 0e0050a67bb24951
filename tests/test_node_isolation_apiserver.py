"""Node isolation on Kubernetes against a real API server (etcd + kube-apiserver, RBAC on): the Helm
chart's RBAC objects are created as rendered, and the isolator acts as the chart's ServiceAccount. It
finds the node under a Ray pod, cordons and taints it; the same identity is forbidden everything else
it might be tempted to do (delete the node, list nodes, patch pods, read pods of another namespace).

The ServiceAccount is authenticated by a static token for its user name
(``system:serviceaccount:<namespace>:<name>``), which is what RBAC's ServiceAccount subjects match.
Without a kube-apiserver binary and etcd (CI has neither) these tests skip and say why; ``make
helm-apiserver`` builds the server and runs them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kube_apiserver import kube_apiserver, needs_apiserver
from tests.test_helm_chart import NAMESPACE, one

kubernetes = pytest.importorskip("kubernetes")
from kubernetes.client import ApiClient, ApiException, CoreV1Api  # noqa: E402
from kubernetes.dynamic import DynamicClient  # noqa: E402

from raylane.fault_tolerance import (  # noqa: E402
    FaultEvent,
    KubeIsolationError,
    KubeNodeIsolator,
    NodeIsolationConfig,
    NodeIsolator,
)

pytestmark = needs_apiserver

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
ACCOUNT = one("default", "ServiceAccount")["metadata"]["name"]
ACCOUNT_USER = f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"
STRANGER = "stranger"
OTHER_TAINT = {"key": "gpu", "value": "a100", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    """A fresh API server with the chart's RBAC objects in its namespace; yields a function that makes
    a ``CoreV1Api`` for a user: the admin, the chart's ServiceAccount, or a stranger bound to nothing."""
    users = {
        ACCOUNT_USER: (
            "system:serviceaccounts",
            f"system:serviceaccounts:{NAMESPACE}",
            "system:authenticated",
        ),
        STRANGER: ("system:authenticated",),
    }
    with kube_apiserver(tmp_path_factory.mktemp("kube"), users) as configuration:
        admin = ApiClient(configuration())
        for namespace in (NAMESPACE, "elsewhere"):
            CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
            # What the absent controller manager would make: a pod without an account runs as this one.
            CoreV1Api(admin).create_namespaced_service_account(namespace, {"metadata": {"name": "default"}})
        dynamic = DynamicClient(admin)
        for kind in RBAC_KINDS:
            obj = one("default", kind)
            resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=kind)
            resource.create(body=obj, namespace=NAMESPACE if resource.namespaced else None)

        def core(user: str = "admin") -> CoreV1Api:
            return CoreV1Api(ApiClient(configuration(user)))

        yield core


def _pod(name: str, node: str = "") -> dict:
    # No token controller runs here to make the account's token: the pod mounts none.
    spec = {"automountServiceAccountToken": False, "containers": [{"name": "ray", "image": "rayproject/ray"}]}
    return {"metadata": {"name": name}, "spec": {**spec, "nodeName": node} if node else spec}


def _node_with_pod(core: CoreV1Api, node: str, pod: str) -> list[dict]:
    """As admin: a Node with a taint of its own, and a pod in the chart's namespace bound to it (no
    scheduler or kubelet here, the pod stays pending on that node). Returns the node's taints: the
    server adds its own (``node.kubernetes.io/not-ready``) to a new node."""
    core().create_node({"metadata": {"name": node}, "spec": {"taints": [OTHER_TAINT]}})
    core().create_namespaced_pod(NAMESPACE, _pod(pod, node))
    taints = _taints(core, node)
    assert OTHER_TAINT in taints
    return taints


def _taints(core: CoreV1Api, node: str) -> list[dict]:
    taints = core().read_node(node).spec.taints or []
    return [{"key": t.key, "value": t.value, "effect": t.effect} for t in taints]


def test_the_charts_account_cordons_and_taints_the_node_under_a_ray_pod(server, ray_cluster):
    # The Ray node of this session runs in a "pod" named as its host, as a container's host name is
    # its pod's name: the isolator goes from the event's Ray node to the pod to the Kubernetes node.
    (ray_node,) = ray_cluster.nodes()
    before = _node_with_pod(server, "machine-1", ray_node["NodeManagerHostname"])
    config = NodeIsolationConfig(
        backends=["kubernetes"], namespace=NAMESPACE, taint_effects=["NoSchedule", "NoExecute"]
    )
    isolator = NodeIsolator(config, kube_client=server(ACCOUNT_USER).api_client)
    event = FaultEvent(
        kind="noncomm_hang",
        worker_group="trainer",
        rank=1,
        role="trainer",
        node_ip=ray_node["NodeManagerAddress"],
        node_id=ray_node["NodeID"],
        collective_group="dp",
        nodes=(ray_node["NodeManagerAddress"],),
    )

    record = isolator.isolate(event)

    assert record.isolated, record
    assert record.k8s_node == "machine-1" and not record.ray_drained
    assert server().read_node("machine-1").spec.unschedulable is True
    faulty = [
        {"key": "raylane.io/faulty", "value": "noncomm_hang", "effect": e} for e in config.taint_effects
    ]
    assert _taints(server, "machine-1") == [*before, *faulty]


def test_isolating_again_replaces_the_taint_and_keeps_the_others(server):
    before = _node_with_pod(server, "machine-2", "ray-worker-2")
    isolator = KubeNodeIsolator(
        NodeIsolationConfig(backends=["kubernetes"], namespace=NAMESPACE), server(ACCOUNT_USER).api_client
    )
    assert isolator.node_of_pod("ray-worker-2") == "machine-2"
    isolator.cordon_and_taint("machine-2", "crash")
    isolator.cordon_and_taint("machine-2", "comm_slow")
    assert _taints(server, "machine-2") == [
        *before,
        {"key": "raylane.io/faulty", "value": "comm_slow", "effect": "NoSchedule"},
    ]
    assert server().read_node("machine-2").spec.unschedulable is True


@pytest.mark.parametrize(
    "action",
    [
        "delete the node",
        "list nodes",
        "create a node",
        "patch a pod",
        "delete a pod",
        "read a pod of another namespace",
    ],
)
def test_the_charts_account_may_do_nothing_else(server, action):
    node = pod = action.replace(" ", "-")
    _node_with_pod(server, node, pod)
    server().create_namespaced_pod("elsewhere", _pod(pod))
    account = server(ACCOUNT_USER)
    attempts = {
        "delete the node": lambda: account.delete_node(node),
        "list nodes": lambda: account.list_node(),
        "create a node": lambda: account.create_node({"metadata": {"name": "another"}}),
        "patch a pod": lambda: account.patch_namespaced_pod(pod, NAMESPACE, {"spec": {"nodeName": "x"}}),
        "delete a pod": lambda: account.delete_namespaced_pod(pod, NAMESPACE),
        "read a pod of another namespace": lambda: account.read_namespaced_pod(pod, "elsewhere"),
    }
    with pytest.raises(ApiException) as denied:
        attempts[action]()
    assert denied.value.status == 403
    assert server().read_node(node).metadata.name == node


def test_an_identity_without_the_charts_rbac_is_told_what_to_grant(server):
    _node_with_pod(server, "machine-3", "ray-worker-3")
    isolator = KubeNodeIsolator(
        NodeIsolationConfig(backends=["kubernetes"], namespace=NAMESPACE), server(STRANGER).api_client
    )
    with pytest.raises(KubeIsolationError, match=r"forbids this identity to get pod .*rbac.create=true"):
        isolator.node_of_pod("ray-worker-3")
    with pytest.raises(KubeIsolationError, match=r"forbids this identity to get node machine-3"):
        isolator.cordon_and_taint("machine-3", "crash")
    assert not server().read_node("machine-3").spec.unschedulable
