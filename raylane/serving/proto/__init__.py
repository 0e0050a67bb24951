"""Protobuf/gRPC stubs of the `raylane.serving.v1` API, generated from `llm.proto` on first import.

The stubs are built by grpcio-tools into a per-user cache folder keyed by the hash of the
`.proto` and of the grpcio-tools/protobuf versions, and that folder is appended to this
package's `__path__`, so `raylane.serving.proto.llm_pb2` and `...llm_pb2_grpc` import like
ordinary submodules (Ray Serve's gRPC proxy imports the servicer function by that dotted path).
Generating at import keeps a clean clone working without a build step and never leaves
generated code in the source tree, where it could be hand-edited or go stale.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PROTO_FILE = Path(__file__).with_name("llm.proto")
# protoc resolves the proto's import path relative to this root, which makes the generated
# `_pb2_grpc` module import its messages as `raylane.serving.proto.llm_pb2`.
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]
_PROTO_RELPATH = PROTO_FILE.resolve().relative_to(_PACKAGE_ROOT)
_GENERATED = ("llm_pb2.py", "llm_pb2_grpc.py")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "raylane" / "proto"


def _digest() -> str:
    h = hashlib.sha256(PROTO_FILE.read_bytes())
    for dist in ("grpcio-tools", "protobuf"):
        h.update(importlib.metadata.version(dist).encode())
    return h.hexdigest()[:16]


def _compile(out_root: Path) -> None:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{_PACKAGE_ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(_PROTO_RELPATH),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpcio-tools failed to compile {PROTO_FILE}; run `{' '.join(args)}` to see why")


def ensure_stubs() -> Path:
    """Generate the stubs if this proto/toolchain combination has none yet; return their folder.

    Safe under concurrency (many Ray workers importing at once): each process compiles into a
    private temporary folder and publishes it with an atomic rename; losers discard theirs.
    """
    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        # A read-only home (some containers): fall back to the machine's temp folder.
        root = Path(tempfile.gettempdir()) / "raylane-proto"
        root.mkdir(parents=True, exist_ok=True)
    final = root / _digest()
    stub_dir = final / _PROTO_RELPATH.parent
    if all((stub_dir / name).exists() for name in _GENERATED):
        return stub_dir
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=root))
    try:
        _compile(staging)
        os.rename(staging, final)
        logger.info("generated gRPC stubs for %s in %s", PROTO_FILE.name, stub_dir)
    except OSError:
        if not all((stub_dir / name).exists() for name in _GENERATED):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stub_dir


# The package's own module search path: the generated modules import as its submodules.
__path__.append(str(ensure_stubs()))
