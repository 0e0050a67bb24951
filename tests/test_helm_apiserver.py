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
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.test_helm_chart import CASES, CHART, CRD_DIR, CRD_FILES, case_values, helm

kubernetes = pytest.importorskip("kubernetes")
from kubernetes.dynamic import DynamicClient  # noqa: E402
from kubernetes.dynamic.exceptions import UnprocessibleEntityError  # noqa: E402

APISERVER = os.environ.get("RAYLANE_KUBE_APISERVER")
ETCD = os.environ.get("RAYLANE_ETCD") or shutil.which("etcd")

_TOKEN = "raylane-test-token"

pytestmark = [
    pytest.mark.skipif(
        not APISERVER or not os.access(APISERVER, os.X_OK),
        reason="no kube-apiserver: run `make helm-apiserver` (builds one once, ~15 min on 2 cores) or set RAYLANE_KUBE_APISERVER",
    ),
    pytest.mark.skipif(ETCD is None, reason="no etcd: apt-get install etcd-server, or set RAYLANE_ETCD"),
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


def _wait_for(
    url: str, proc: subprocess.Popen, log: Path, ca_file: Path | None = None, timeout_s: float = 120
) -> None:
    """Wait until ``url`` answers 200. ``ca_file``: the certificate the API server makes for itself as it
    starts; with AlwaysAllow it refuses anonymous requests, health checks included, hence the token."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {_TOKEN}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            # Until the server has written its certificate, loading it fails like a refused connection.
            context = ssl.create_default_context(cafile=ca_file) if ca_file else None
            if urllib.request.urlopen(request, timeout=2, context=context).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[DynamicClient]:
    """A client of a fresh etcd + kube-apiserver pair, stopped at the end of the module."""
    root = tmp_path_factory.mktemp("kube")
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    subprocess.run(
        ["openssl", "genrsa", "-out", str(root / "sa.key"), "2048"], check=True, capture_output=True
    )
    processes = []
    try:
        etcd_log = root / "etcd.log"
        processes.append(
            subprocess.Popen(
                [ETCD, "--data-dir", str(root / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                 "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer_port}"],
                stdout=etcd_log.open("w"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        _wait_for(f"http://127.0.0.1:{etcd_port}/health", processes[-1], etcd_log)
        api_log = root / "apiserver.log"
        tokens = root / "tokens.csv"
        tokens.write_text(f'{_TOKEN},admin,admin,"system:masters"\n')
        processes.append(
            subprocess.Popen(
                [APISERVER, f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                 "--bind-address=127.0.0.1", f"--secure-port={api_port}", f"--cert-dir={root / 'certs'}",
                 f"--token-auth-file={tokens}", "--authorization-mode=AlwaysAllow", "--service-cluster-ip-range=10.0.0.0/24",
                 "--service-account-issuer=https://kubernetes.default.svc",
                 f"--service-account-key-file={root / 'sa.key'}",
                 f"--service-account-signing-key-file={root / 'sa.key'}"],
                stdout=api_log.open("w"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        ca_file = root / "certs" / "apiserver.crt"
        _wait_for(f"https://127.0.0.1:{api_port}/readyz", processes[-1], api_log, ca_file)
        configuration = kubernetes.client.Configuration(
            host=f"https://127.0.0.1:{api_port}", api_key={"authorization": f"Bearer {_TOKEN}"}
        )
        configuration.ssl_ca_cert = str(ca_file)
        client = DynamicClient(kubernetes.client.ApiClient(configuration))
        _install_crds(client)
        # A fresh client: the first one's discovery cache predates the CRDs.
        yield DynamicClient(kubernetes.client.ApiClient(configuration))
    finally:
        for proc in reversed(processes):
            proc.terminate()
            proc.wait(timeout=30)


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
