"""Fault tolerance: checkpoints now; telemetry probes, detector, isolation and recovery build on them."""

from raylane.fault_tolerance.checkpoint import load_train_state, save_hf_checkpoint, save_train_state

__all__ = ["load_train_state", "save_hf_checkpoint", "save_train_state"]
