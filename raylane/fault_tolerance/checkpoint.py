"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP) and Hugging Face export.

DCP stores every rank's shards with their global layout, so a checkpoint written at one DP size
loads at another: each rank reads exactly the slices its new shards cover. Next to the DCP files:
the LR-schedule state and step (identical on every rank), each rank's RNG state, and a small
``extra`` dict from the controller (data position, metrics history).
"""

from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)

from raylane.models import ModelConfig, save_checkpoint

logger = logging.getLogger(__name__)

_DCP_DIR = "dcp"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    rank: int,
    extra: dict,
) -> None:
    """Collective: every rank of the model's process group calls it with the same ``path``."""
    os.makedirs(path, exist_ok=True)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=os.path.join(path, _DCP_DIR))
    torch.save({"rng": _rng_state()}, os.path.join(path, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(
            {"scheduler": scheduler.state_dict(), "step": step, "extra": extra},
            os.path.join(path, "train_state.pt"),
        )
        logger.info("saved checkpoint of step %d to %s", step, path)


def load_train_state(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int
) -> tuple[int, dict]:
    """Collective: restore model and optimizer shards (at any DP size), schedule, RNG; returns (step, extra)."""
    meta_path = os.path.join(path, "train_state.pt")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path!r} is not a raylane checkpoint (no train_state.pt); pick a step_* folder"
        )
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=os.path.join(path, _DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = torch.load(meta_path, weights_only=False)
    scheduler.load_state_dict(meta["scheduler"])
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_path):
        # Resuming on more ranks than were saved: new ranks continue from rank 0's stream.
        rng_path = os.path.join(path, "rng_rank0.pt")
    _set_rng_state(torch.load(rng_path, weights_only=False)["rng"])
    return meta["step"], meta["extra"]


def save_hf_checkpoint(path: str, model: nn.Module, source_dir: str, rank: int) -> None:
    """Collective: gather full weights and write them (rank 0) as a Hugging Face checkpoint with tokenizer."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    config = ModelConfig.from_pretrained(source_dir)
    save_checkpoint(state, config, path)
    for name in _TOKENIZER_FILES:
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(path, name))
    logger.info("exported Hugging Face checkpoint to %s", path)
