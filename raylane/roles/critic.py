"""The PPO critic: a value head on the policy's decoder, FSDP2-sharded over its DP ranks."""

from __future__ import annotations

import torch

from raylane.actors.dispatch import Dispatch, register
from raylane.batch import Batch
from raylane.models import ValueModel
from raylane.rlhf.losses import value_loss
from raylane.roles.config import CriticConfig
from raylane.roles.training import (
    CheckpointedTrainer,
    build_optimizer,
    forward_micro_batches,
    ppo_update,
    resolve_train_dtype,
    response_slice,
    sequence_inputs,
    shard_model,
)


class Critic(CheckpointedTrainer):
    """Values ``[B, T]``: the value of the state before each response token."""

    def __init__(self, config: CriticConfig) -> None:
        if not config.model:
            raise ValueError("the critic needs config.model: a checkpoint folder (usually the policy's)")
        self.config = config
        model = ValueModel.from_pretrained(config.model, torch.float32).to(self.device)
        self.model = shard_model(
            model,
            self.mesh["dp"],
            resolve_train_dtype(config.dtype, self.device),
            config.activation_checkpointing,
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, config.optim)
        self.global_step = 0

    def _values(self, batch: Batch) -> torch.Tensor:
        input_ids, attention_mask, prompt_len = sequence_inputs(batch, self.device)
        values = self.model(input_ids, attention_mask=attention_mask)
        return response_slice(values, prompt_len, batch["responses"].shape[1]).float()

    @register(Dispatch.DP_SHARD, pad=True)
    def compute_values(self, batch: Batch) -> Batch:
        self.model.eval()
        values = forward_micro_batches(
            batch, self.config.micro_batch_size, lambda m: self._values(m).cpu(), self.config.group_by_length
        )
        return Batch.from_dict({"values": values})

    @register(Dispatch.DP_SHARD, pad=True)
    def update_critic(self, batch: Batch) -> Batch:
        """Clipped value regression onto ``returns`` from the rollout-time ``values``."""

        def loss_fn(micro: Batch):
            mask = micro["response_mask"].to(self.device)
            loss, stats = value_loss(
                self._values(micro),
                micro["values"].to(self.device),
                micro["returns"].to(self.device),
                mask,
                clip_range=self.config.value_clip,
            )
            return loss, {
                "critic/value_loss": float(loss),
                **{f"critic/{k}": float(v) for k, v in stats.items()},
            }

        return ppo_update(self, batch, loss_fn, "critic")
