"""Fault tolerance: the checkpoint verbs a job resumes from (at any DP size) and the Hugging Face export.

The checkpoint format belongs to the trained roles (:mod:`raylane.actors.roles.checkpoint`); this
package re-exports it and holds nothing else yet.
"""

from raylane.actors.roles.checkpoint import load_train_state, save_hf_checkpoint, save_train_state

__all__ = ["load_train_state", "save_hf_checkpoint", "save_train_state"]
