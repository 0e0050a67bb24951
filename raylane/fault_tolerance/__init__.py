"""Fault tolerance: checkpoints now; telemetry probes, detector, isolation and recovery build on them.

The checkpoint format belongs to the trained roles (:mod:`raylane.actors.roles.checkpoint`), which
this layer builds on; it is re-exported here as the fault-tolerance API.
"""

from raylane.actors.roles.checkpoint import load_train_state, save_hf_checkpoint, save_train_state

__all__ = ["load_train_state", "save_hf_checkpoint", "save_train_state"]
