"""The chart against a real Kubernetes API server: etcd and kube-apiserver (no nodes, no controllers)
with KubeRay's CRDs installed; each values case of tests/test_helm_chart.py is rendered as its own
release in its own namespace and created object by object. The server must accept every object and
keep every field it was sent (a server drops fields it does not know, silently), and must reject a
RayCluster that breaks its CRD's schema.

The server is Kubernetes 1.20, the version Debian packages, which builds offline here (see
``tests/kube/build_kube_apiserver.sh``). KubeRay v1.7's CRDs need three edits for it, made on the
fly (the CRD files stay as published): CEL rules (``x-kubernetes-validations``, 1.25+) are dropped,
so are empty-string defaults, and a list-map key left without a default becomes required. The
chart's own schemas are checked against 1.31 by tests/test_helm_chart.py.

Slow to start and needing binaries outside the project, it runs under ``make helm-apiserver``, which
builds the server once and sets ``RAYLANE_KUBE_APISERVER``; without it, it skips and says so.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.kube_apiserver import kube_apiserver, needs_apiserver
from tests.test_helm_chart import CASES, CHART, CRD_DIR, CRD_FILES, case_values, helm

kubernetes = pytest.importorskip("kubernetes")
from kubernetes.dynamic import DynamicClient  # noqa: E402
from kubernetes.dynamic.exceptions import UnprocessibleEntityError  # noqa: E402

pytestmark = [
    *needs_apiserver,
    pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay's CRDs are not in {CRD_DIR}"),
]


# ---------------------------------------------------------------- the CRDs, made acceptable to 1.20


def crd_for_old_server(crd: dict[str, Any]) -> dict[str, Any]:
    """``crd`` without what a 1.20 API server refuses: CEL rules and empty-string defaults (a list-map
    key that loses its default becomes required, as 1.20 wants every list-map key)."""
    crd = copy.deepcopy(crd)
    for version in crd["spec"]["versions"]:
        _edit_schema(version["schema"]["openAPIV3Schema"])
    return crd


def _edit_schema(schema: Any) -> None:
    if isinstance(schema, list):
        for item in schema:
            _edit_schema(item)
        return
    if not isinstance(schema, dict):
        return
    schema.pop("x-kubernetes-validations", None)
    items = schema.get("items")
    if isinstance(items, dict):
        for key in schema.get("x-kubernetes-list-map-keys", []):
            if items.get("properties", {}).get(key, {}).get("default") == "":
                items.setdefault("required", []).append(key)
    if schema.get("type") == "string" and schema.get("default") == "":
        del schema["default"]
    for value in schema.values():
        _edit_schema(value)


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[DynamicClient]:
    """A client of a fresh etcd + kube-apiserver pair, stopped at the end of the module."""
    with kube_apiserver(tmp_path_factory.mktemp("kube")) as configuration:
        client = DynamicClient(kubernetes.client.ApiClient(configuration()))
        _install_crds(client)
        # A fresh client: the first one's discovery cache predates the CRDs.
        yield DynamicClient(kubernetes.client.ApiClient(configuration()))


def _install_crds(client: DynamicClient) -> None:
    crds = client.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    names = []
    for file in CRD_FILES.values():
        crd = crd_for_old_server(yaml.safe_load((CRD_DIR / file).read_text()))
        crds.create(body=crd)
        names.append(crd["metadata"]["name"])
    deadline = time.monotonic() + 60
    for name in names:
        while not any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (crds.get(name=name).status.conditions or [])
        ):
            assert time.monotonic() < deadline, f"the CRD {name} was not established within 60 s"
            time.sleep(0.5)


# ---------------------------------------------------------------- the checks


def _missing(sent: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of what was ``sent`` but is not in ``kept`` (the server may add defaults)."""
    if isinstance(sent, dict):
        if not isinstance(kept, dict):
            return [path or "/"]
        return [p for key, value in sent.items() for p in _missing(value, kept.get(key), f"{path}/{key}")]
    if isinstance(sent, list):
        if not isinstance(kept, list) or len(kept) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, kept)) for p in _missing(a, b, f"{path}/{i}")]
    return [] if sent == kept else [f"{path}: sent {sent!r}, kept {kept!r}"]


def _render(values: dict[str, Any], release: str, namespace: str) -> list[dict[str, Any]]:
    """The objects the chart renders for an install of ``release`` into ``namespace``."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    manifests.pop(f"{CHART.name}/templates/NOTES.txt")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def _create(client: DynamicClient, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    resource = client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    kept = resource.create(body=obj, namespace=namespace if resource.namespaced else None)
    return kept.to_dict()


@pytest.mark.parametrize("case", CASES)
def test_the_server_accepts_every_object_of_the_chart_and_keeps_every_field(api, case):
    namespace = f"case-{case}"
    api.resources.get(api_version="v1", kind="Namespace").create(body={"metadata": {"name": namespace}})
    objects = _render(case_values(case), f"r-{case}", namespace)
    assert objects
    dropped = {}
    for obj in objects:
        kept = _create(api, obj, namespace)
        missing = _missing({k: v for k, v in obj.items() if k != "metadata"}, kept)
        if missing:
            dropped[f"{obj['kind']}/{obj['metadata']['name']}"] = missing
    assert not dropped, f"the API server dropped or changed fields it was sent: {dropped}"


def test_the_server_rejects_a_ray_cluster_that_breaks_its_schema(api):
    (cluster,) = [obj for obj in _render({}, "bad", "default") if obj["kind"] == "RayCluster"]
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(
        UnprocessibleEntityError, match=r"spec.workerGroupSpecs.replicas in body must be of type integer"
    ):
        _create(api, cluster, "default")
