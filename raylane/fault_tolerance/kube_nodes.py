"""Cordon and taint the Kubernetes node under a Ray pod, with the official ``kubernetes`` client.

The Ray node's host name is its pod's name (Kubernetes sets a container's host name so), and the
pod's ``spec.nodeName`` is the machine. The identity needs ``get`` on pods of the Ray pods'
namespace and ``get``/``patch`` on nodes, nothing more: the Helm chart's RBAC (``rbac.create``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from raylane.fault_tolerance.config import NodeIsolationConfig

__all__ = ["KubeIsolationError", "KubeNodeIsolator", "in_kubernetes_pod"]

logger = logging.getLogger(__name__)

_POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A node patched by someone else between our read and our write: read it again, a few times.
_CONFLICT_RETRIES = 3


def in_kubernetes_pod() -> bool:
    """This process runs in a Kubernetes pod (the kubelet gives every container this variable)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class KubeIsolationError(RuntimeError):
    """The Kubernetes node could not be found or changed; the message says what to change."""


def _kubernetes():
    try:
        import kubernetes
    except ImportError as err:
        raise KubeIsolationError(
            "node isolation on Kubernetes needs the kubernetes client: pip install 'raylane[cluster]'"
        ) from err
    return kubernetes


class KubeNodeIsolator:
    """Finds the Kubernetes node of a Ray pod and cordons and taints it.

    ``api_client``: a ``kubernetes.client.ApiClient`` to use; by default the in-cluster
    configuration inside a pod, else ``config.kubeconfig`` (or the default kubeconfig).
    """

    def __init__(self, config: NodeIsolationConfig, api_client: Any = None) -> None:
        kubernetes = _kubernetes()
        self.config = config
        self._api_exception = kubernetes.client.ApiException
        if api_client is None:
            api_client = self._load_client(kubernetes)
        self._api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = config.namespace or self._default_namespace(kubernetes)

    def _load_client(self, kubernetes) -> Any:
        try:
            if in_kubernetes_pod():
                kubernetes.config.load_incluster_config()
            else:
                kubernetes.config.load_kube_config(config_file=self.config.kubeconfig or None)
        except kubernetes.config.ConfigException as err:
            raise KubeIsolationError(
                f"no Kubernetes credentials for node isolation ({err}): run inside a pod of the Helm "
                "chart, or set the node isolation config's kubeconfig to a kubeconfig file"
            ) from err
        return kubernetes.client.ApiClient()

    def _default_namespace(self, kubernetes) -> str:
        if _POD_NAMESPACE_FILE.is_file():
            return _POD_NAMESPACE_FILE.read_text().strip()
        try:
            _, current = kubernetes.config.list_kube_config_contexts(
                config_file=self.config.kubeconfig or None
            )
        except kubernetes.config.ConfigException:
            return "default"
        return current["context"].get("namespace", "default")

    def node_of_pod(self, pod_name: str) -> str:
        """The Kubernetes node that pod ``pod_name`` (in :attr:`namespace`) is scheduled on."""
        try:
            pod = self._core.read_namespaced_pod(pod_name, self.namespace)
        except self._api_exception as err:
            raise self._error(err, f"get pod {self.namespace}/{pod_name}") from err
        if not pod.spec.node_name:
            raise KubeIsolationError(f"pod {self.namespace}/{pod_name} is not scheduled on any node")
        return pod.spec.node_name

    def cordon_and_taint(self, node_name: str, value: str) -> None:
        """Mark ``node_name`` unschedulable and add the taint ``<taint_key>=<value>`` with each
        configured effect, replacing an older taint of the same key and effect."""
        key, effects = self.config.taint_key, self.config.taint_effects
        for _ in range(_CONFLICT_RETRIES):
            try:
                node = self._core.read_node(node_name)
            except self._api_exception as err:
                raise self._error(err, f"get node {node_name}") from err
            kept = [
                taint
                for taint in self._api_client.sanitize_for_serialization(node.spec.taints or [])
                if not (taint["key"] == key and taint["effect"] in effects)
            ]
            taints = kept + [{"key": key, "value": value, "effect": effect} for effect in effects]
            # The resourceVersion makes the write conditional: a concurrent change of the taints is
            # a conflict to retry, not lost.
            body = {
                "metadata": {"resourceVersion": node.metadata.resource_version},
                "spec": {"unschedulable": True, "taints": taints},
            }
            try:
                self._core.patch_node(node_name, body)
            except self._api_exception as err:
                if err.status == 409:
                    continue
                raise self._error(err, f"patch node {node_name}") from err
            logger.warning("Kubernetes node %s cordoned and tainted %s=%s:%s", node_name, key, value, effects)
            return
        raise KubeIsolationError(
            f"node {node_name} kept changing under {_CONFLICT_RETRIES} patches; try again"
        )

    @staticmethod
    def _error(err, action: str) -> KubeIsolationError:
        if err.status == 403:
            return KubeIsolationError(
                f"Kubernetes forbids this identity to {action}: install the Helm chart with rbac.create=true "
                "(get/patch on nodes, get on the release's pods) or grant the same to the pods' ServiceAccount"
            )
        return KubeIsolationError(f"could not {action}: {err.status} {err.reason}")
