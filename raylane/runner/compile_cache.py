"""A compile cache that outlives the process: what makes a later engine start-up fast.

``torch.compile`` (Inductor's FX-graph cache and AOTAutograd's cache) and Triton keep what they
compiled on disk, by default under ``/tmp``. Pointing both at one persistent folder lets every
later process on the machine (an autoscaled serving replica, an RL job restarted after a fault)
load the compiled decode step and kernels instead of compiling them again; the folder can also be
a volume shared by the machines of a deployment.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def use_compile_cache(directory: str) -> str:
    """Keep torch.compile's and Triton's compiled artifacts under ``directory`` from now on.

    Applies to the whole process and to the processes it starts (through ``TORCHINDUCTOR_CACHE_DIR``
    and ``TRITON_CACHE_DIR``). Returns the absolute path, created if missing.
    """
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(path, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    # On by default in recent PyTorch; stated so that an older default cannot silently turn them off.
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    logger.info("compile cache: %s", path)
    return path
