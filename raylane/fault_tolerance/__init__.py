"""Fault tolerance: distributed training checkpoints that a job resumes from at any DP size, and the
Hugging Face export of a trained model. The trained roles call these verbs; nothing else lives here yet.
"""

from raylane.fault_tolerance.checkpoint import (
    CheckpointLoadError,
    load_train_state,
    save_hf_checkpoint,
    save_train_state,
)

__all__ = ["CheckpointLoadError", "load_train_state", "save_hf_checkpoint", "save_train_state"]
