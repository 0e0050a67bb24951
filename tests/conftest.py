"""Shared fixtures: one local Ray cluster per test session and a real redis-server on a free port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

# Tests run on 2 cores: keep intra-op threads low so Ray actors and the driver do not oversubscribe.
torch.set_num_threads(2)

# Without a GPU the Triton kernels still run, in Triton's interpreter: it must be on before any
# kernel is defined, so before raylane is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python process, with the repository first on its path
    (ahead of, not instead of, any PYTHONPATH already set, such as a folder of installed wheels)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
        **extra,
    }


def run_cluster_script(script: str, *args: str, timeout: float) -> dict:
    """Run ``script``, a test file that builds its own multi-node ``ray.cluster_utils.Cluster`` when run
    as a script, in a child Python; returns the JSON object its last line of output holds.

    A driver connects to one Ray cluster per process and the session's cluster is single-node, hence
    the child. A Cluster writes its address where ``ray.init()`` without one looks (<ray temp
    dir>/ray_current_cluster): a temp dir of its own keeps any other Ray session on this machine from
    joining it meanwhile.
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="rl-child-", ignore_cleanup_errors=True) as ray_tmp:
        env = child_env(RAY_TMPDIR=ray_tmp)
        done = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=repo,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 8 logical CPUs, shared by every test of the session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()


def start_redis_server(port: int, workdir: str, appendonly: bool) -> subprocess.Popen:
    """A redis-server on loopback ``port`` keeping its files in ``workdir``, once it accepts connections.

    With ``appendonly`` every write is fsynced to the append-only file before the reply, so a
    server killed with SIGKILL and restarted on the same ``workdir`` has lost nothing acknowledged.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run `make test` (it installs it) or `apt-get install redis-server`"
        )
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability, "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start within 10 s")


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server started on a free loopback port for this session, stopped at the end."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="raylane-redis-")
    proc = start_redis_server(port, workdir, appendonly=False)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


class DurableRedis:
    """A redis-server with an fsynced append-only file that a test can SIGKILL and restart in place."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc = start_redis_server(self.port, workdir, appendonly=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.proc = start_redis_server(self.port, self.workdir, appendonly=True)


@pytest.fixture
def durable_redis(tmp_path):
    """A :class:`DurableRedis` of this test alone, killed at its end."""
    server = DurableRedis(str(tmp_path))
    yield server
    server.kill()


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, and each ray.train.report (every
# checkpoint, every report_every steps) waits for the next poll: with checkpoints every few steps the
# supervised jobs spent most of their time there (40 steps, checkpoints every 5: 28 s, 4 s at 0.25 s).
# A poll that misses this interval is only an error after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S
# (10 min). Set here, before any TorchTrainer: the driver passes it to the controller, and child
# drivers (examples/pipeline.py) inherit it. test_killed_worker_resumes_from_the_last_checkpoint keeps
# the default: with 0.25 s it no longer notices a checkpoint the controller had not yet taken.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint with peaked outputs (large init), written once per session."""
    from raylane.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), arch="llama", seed=0, std=0.3)
