"""The policy roles: the trained actor and the frozen reference, both FSDP2-sharded over their DP ranks."""

from __future__ import annotations

import logging

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.worker import Worker
from raylane.batch import Batch
from raylane.fault_tolerance.checkpoint import save_hf_checkpoint
from raylane.fault_tolerance.worker import ProbedWorker
from raylane.models import load_model
from raylane.rlhf.kl import kl_loss
from raylane.rlhf.logprobs import entropy_from_logits, log_prob_gap_metrics
from raylane.rlhf.losses import aggregate_loss, ppo_policy_loss, truncated_importance_weights
from raylane.rlhf.masks import masked_mean
from raylane.roles.config import ActorConfig, TrainConfig
from raylane.roles.training import (
    CheckpointedTrainer,
    build_optimizer,
    forward_micro_batches,
    optimizer_steps,
    policy_log_probs,
    ppo_update,
    resolve_train_dtype,
    rows_metrics,
    shard_model,
)
from raylane.weight_transfer import WeightSyncSource

logger = logging.getLogger(__name__)


class _PolicyModel(Worker):
    """Loads the policy checkpoint and shards it over this role's DP mesh."""

    def __init__(self, config: TrainConfig) -> None:
        if not config.model:
            raise ValueError("the policy role needs config.model: a Hugging Face checkpoint folder")
        self.config = config
        self.model = shard_model(
            load_model(config.model, torch.float32, self.device),
            self.mesh["dp"],
            resolve_train_dtype(config.dtype, self.device),
            config.activation_checkpointing,
        )

    def _log_probs(self, batch: Batch) -> torch.Tensor:
        temperature = batch.meta.get("temperature", 1.0) or 1.0
        return forward_micro_batches(
            batch,
            self.config.micro_batch_size,
            lambda micro: policy_log_probs(self.model, micro, temperature, self.device)[0].float().cpu(),
            self.config.group_by_length,
        )


class Reference(_PolicyModel):
    """The frozen initial policy, for the KL penalty."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.model.eval().requires_grad_(False)

    @register(Dispatch.DP_SHARD, pad=True)
    def compute_ref_log_probs(self, batch: Batch) -> Batch:
        """``ref_log_probs`` [B, T] of the responses under the reference policy."""
        return Batch.from_dict({"ref_log_probs": self._log_probs(batch)})


class PolicyTrainer(_PolicyModel, CheckpointedTrainer, WeightSyncSource, ProbedWorker):
    """The policy being trained: log-probs, PPO-style updates, SFT warm-start, checkpoints, HF export;
    its ranks take collective probes (one per process: colocated roles are watched through it)."""

    def __init__(self, config: ActorConfig) -> None:
        super().__init__(config)
        self.config: ActorConfig = config
        self.optimizer, self.scheduler = build_optimizer(self.model, config.optim)
        self.global_step = 0
        self._sft_optimizer: torch.optim.Optimizer | None = None

    @register(Dispatch.DP_SHARD, pad=True)
    def compute_log_probs(self, batch: Batch) -> Batch:
        """``old_log_probs`` [B, T] under the current policy (the behaviour policy of this batch)."""
        self.model.eval()
        return Batch.from_dict({"old_log_probs": self._log_probs(batch)})

    @register(Dispatch.DP_SHARD, pad=True)
    def update_actor(self, batch: Batch) -> Batch:
        """A PPO/GRPO update from ``old_log_probs``, ``advantages`` (and ``ref_log_probs`` for a KL loss;
        ``rollout_log_probs``, the behaviour policy's, for decoupled PPO).

        ``config.ppo_epochs`` passes over the batch, one optimizer step per ``config.mini_batch_size`` rows.
        Without ``old_log_probs`` (``config.old_log_probs_from_update``) the batch must make one optimizer
        step: the log-probs of its own forward, detached, are the old ones, and the rows' gap to
        ``rollout_log_probs`` is reported as ``rollout/log_prob_gap`` and ``rollout/ratio_outside_10pct``
        (means over the micro-batches).
        """
        loss_cfg = self.config.loss
        temperature = batch.meta.get("temperature", 1.0) or 1.0
        from_update = "old_log_probs" not in batch
        if from_update and not self.config.one_optimizer_step:
            raise ValueError(
                "update_actor got no old_log_probs, and with ppo_epochs > 1 or a mini_batch_size the "
                "weights move before the last rows are trained: call compute_log_probs first"
            )

        def loss_fn(micro: Batch):
            mask = micro["response_mask"].to(self.device)
            log_probs, logits = policy_log_probs(self.model, micro, temperature, self.device)
            metrics = {}
            if from_update:
                old_log_probs = log_probs.detach()
                metrics.update(
                    log_prob_gap_metrics(micro["rollout_log_probs"].to(self.device), old_log_probs, mask)
                )
            else:
                old_log_probs = micro["old_log_probs"].to(self.device)
            weights = None
            if loss_cfg.off_policy_correction == "decoupled":
                weights = truncated_importance_weights(
                    old_log_probs, micro["rollout_log_probs"].to(self.device), loss_cfg.importance_weight_cap
                )
            loss, stats = ppo_policy_loss(
                log_probs,
                old_log_probs,
                micro["advantages"].to(self.device),
                mask,
                clip_ratio_low=loss_cfg.clip_ratio_low,
                clip_ratio_high=loss_cfg.clip_ratio_high,
                clip_ratio_c=loss_cfg.clip_ratio_c,
                loss_agg_mode=loss_cfg.loss_agg_mode,
                importance_weights=weights,
            )
            metrics.update({f"actor/{k}": float(v) for k, v in stats.items()})
            if weights is not None:
                metrics["actor/importance_weight_mean"] = float(masked_mean(weights, mask))
                metrics["actor/importance_weight_max"] = float((weights * mask).max())
                capped = (weights >= loss_cfg.importance_weight_cap).float()
                metrics["actor/importance_weight_capped"] = float(masked_mean(capped, mask))
            metrics["actor/pg_loss"] = float(loss)
            if loss_cfg.entropy_coef > 0:
                entropy = aggregate_loss(
                    entropy_from_logits(logits, temperature), mask, loss_cfg.loss_agg_mode
                )
                loss = loss - loss_cfg.entropy_coef * entropy
                metrics["actor/entropy"] = float(entropy)
            if loss_cfg.kl_loss_coef > 0:
                kl = kl_loss(
                    log_probs,
                    micro["ref_log_probs"].to(self.device),
                    mask,
                    estimator=loss_cfg.kl_loss_type,
                    loss_agg_mode=loss_cfg.loss_agg_mode,
                )
                loss = loss + loss_cfg.kl_loss_coef * kl
                metrics["actor/kl_loss"] = float(kl)
            return loss, metrics

        return ppo_update(self, batch, loss_fn, "actor")

    @register(Dispatch.DP_SHARD, pad=True)
    def sft_step(self, batch: Batch) -> Batch:
        """Supervised warm-start: token-mean cross-entropy of the responses, at ``batch.meta["lr"]``.

        Uses its own constant-LR AdamW so the RL optimizer's state and schedule start fresh.
        """
        lr = float(batch.meta.get("lr", self.config.optim.lr))
        if self._sft_optimizer is None:
            self._sft_optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        for group in self._sft_optimizer.param_groups:
            group["lr"] = lr

        def loss_fn(micro: Batch):
            mask = micro["response_mask"].to(self.device)
            log_probs, _ = policy_log_probs(self.model, micro, 1.0, self.device)
            loss = -aggregate_loss(log_probs, mask, "token-mean")
            return loss, {"sft/loss": float(loss)}

        return rows_metrics(optimizer_steps(self, batch, loss_fn, "sft", optimizer=self._sft_optimizer))

    @register(Dispatch.ONE_TO_ALL)
    def end_warm_start(self) -> None:
        """Drop the warm-start optimizer's state."""
        self._sft_optimizer = None

    def weight_sync_module(self) -> torch.nn.Module:
        return self.model

    @register(Dispatch.ONE_TO_ALL)
    def full_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights by Hugging Face name on rank 0 (an empty list elsewhere), e.g. for serving. Collective."""
        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return list(state.items()) if self.rank == 0 else []

    @register(Dispatch.ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        """Write the current policy as a Hugging Face checkpoint (rank 0 writes). Collective."""
        save_hf_checkpoint(path, self.model, self.config.model, self.rank)
