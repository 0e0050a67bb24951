"""A real Kubernetes API server for tests: etcd and kube-apiserver on free loopback ports, no nodes,
no controllers, RBAC on, every identity a static bearer token.

The server is Kubernetes 1.20, the version Debian packages, which builds offline here (see
``tests/kube/build_kube_apiserver.sh``; ``make helm-apiserver`` builds it and sets
``RAYLANE_KUBE_APISERVER``). Tests that need it mark themselves with :data:`needs_apiserver`.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port

APISERVER = os.environ.get("RAYLANE_KUBE_APISERVER")
ETCD = os.environ.get("RAYLANE_ETCD") or shutil.which("etcd")

ADMIN_TOKEN = "raylane-test-token"

needs_apiserver = [
    pytest.mark.skipif(
        not APISERVER or not os.access(APISERVER, os.X_OK),
        reason="no kube-apiserver: run `make helm-apiserver` (builds one once, ~15 min on 2 cores) or set RAYLANE_KUBE_APISERVER",
    ),
    pytest.mark.skipif(ETCD is None, reason="no etcd: apt-get install etcd-server, or set RAYLANE_ETCD"),
]


def _wait_for(
    url: str, proc: subprocess.Popen, log: Path, ca_file: Path | None = None, timeout_s: float = 120
) -> None:
    """Wait until ``url`` answers 200. ``ca_file``: the certificate the API server makes for itself as it
    starts; the health checks are asked with the admin's token, as anonymous requests may be refused."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
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


@contextmanager
def kube_apiserver(root: Path, users: dict[str, tuple[str, ...]] | None = None) -> Iterator:
    """Start etcd and kube-apiserver keeping their files under ``root``; yield a function that makes a
    ``kubernetes.client.Configuration`` for a user name (``"admin"``, in ``system:masters``, by default).

    ``users``: other identities, name -> groups; each one's token is ``"<name>-token"``. The
    server authorizes with RBAC, so they may do only what a binding grants them.
    """
    kubernetes = pytest.importorskip("kubernetes")
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    subprocess.run(
        ["openssl", "genrsa", "-out", str(root / "sa.key"), "2048"], check=True, capture_output=True
    )
    tokens = {"admin": ADMIN_TOKEN, **{name: f"{name}-token" for name in users or {}}}
    groups = {"admin": ("system:masters",), **(users or {})}
    (root / "tokens.csv").write_text(
        "".join(f'{tokens[name]},{name},{name},"{",".join(groups[name])}"\n' for name in tokens)
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
        processes.append(
            subprocess.Popen(
                [APISERVER, f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                 "--bind-address=127.0.0.1", f"--secure-port={api_port}", f"--cert-dir={root / 'certs'}",
                 f"--token-auth-file={root / 'tokens.csv'}", "--authorization-mode=RBAC",
                 "--service-cluster-ip-range=10.0.0.0/24",
                 "--service-account-issuer=https://kubernetes.default.svc",
                 f"--service-account-key-file={root / 'sa.key'}",
                 f"--service-account-signing-key-file={root / 'sa.key'}"],
                stdout=api_log.open("w"), stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        ca_file = root / "certs" / "apiserver.crt"
        _wait_for(f"https://127.0.0.1:{api_port}/readyz", processes[-1], api_log, ca_file)

        def configuration(user: str = "admin"):
            config = kubernetes.client.Configuration(
                host=f"https://127.0.0.1:{api_port}", api_key={"authorization": f"Bearer {tokens[user]}"}
            )
            config.ssl_ca_cert = str(ca_file)
            return config

        yield configuration
    finally:
        for proc in reversed(processes):
            proc.terminate()
            proc.wait(timeout=30)
