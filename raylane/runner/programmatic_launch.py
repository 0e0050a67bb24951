"""Programmatic dependent launch (PDL) of the runner's Triton kernels, on Hopper and newer GPUs.

A batch-1 decode step is a chain of a few hundred short kernels, and each waits for the one before
it to finish and drain before it even starts. Launched with PDL, a kernel starts while the kernel
before it is still running and blocks (``gdc_wait``) only where it needs that kernel's results.
The runner's GEMV reads its weights before it waits, since no kernel of a step writes them.

Stream order still holds: every kernel launched this way waits before it reads or writes anything
that another kernel of the step touches, so each kernel finishes after the one before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import triton
import triton.language as tl

_enabled = False


@contextlib.contextmanager
def programmatic_launch(enabled: bool) -> Iterator[None]:
    """Within: raylane's kernels launch with PDL when ``enabled``, and so do the ones Inductor compiles."""
    import torch._inductor.config

    global _enabled
    before, _enabled = _enabled, enabled
    try:
        with torch._inductor.config.patch({"triton.enable_pdl": enabled}):
            yield
    finally:
        _enabled = before


def launch_options() -> dict:
    """Keyword arguments for a kernel launch: the ``USE_PDL`` flag and, when on, Triton's ``launch_pdl``."""
    return {"USE_PDL": True, "launch_pdl": True} if _enabled else {"USE_PDL": False}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """Block until the kernel before this one has finished, then let the next one start launching."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
