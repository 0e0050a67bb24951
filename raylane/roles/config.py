"""Typed configuration of the worker roles; every default works on a laptop CPU."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylane.config import StrictConfig
from raylane.rlhf.kl import KL_ESTIMATORS
from raylane.rlhf.losses import LOSS_AGGREGATIONS
from raylane.runner import EngineOptions

KLEstimatorName = KL_ESTIMATORS.name_field()
LossAggregationName = LOSS_AGGREGATIONS.name_field()


class OptimConfig(StrictConfig):
    """AdamW with linear warm-up, then constant or cosine decay to ``min_lr_ratio * lr``."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    total_steps: int = Field(1000, ge=1, description="optimizer steps the schedule spans")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None disables clipping")


class PolicyLossConfig(StrictConfig):
    """PPO-style policy loss (GRPO, RLOO and REINFORCE++ use it too, with their own advantages)."""

    clip_ratio_low: float = Field(0.2, ge=0)
    clip_ratio_high: float = Field(0.2, ge=0)
    clip_ratio_c: float | None = Field(None, gt=1, description="dual-clip bound; None disables")
    loss_agg_mode: LossAggregationName = "token-mean"
    entropy_coef: float = Field(0.0, ge=0)
    kl_loss_coef: float = Field(0.0, ge=0, description="KL-to-reference term in the loss (GRPO style)")
    kl_loss_type: KLEstimatorName = "k3"
    off_policy_correction: Literal["none", "decoupled"] = Field(
        "none",
        description="decoupled: PPO's ratio against the trainer's own (proximal) log-probs, each token "
        "weighted by min(pi_prox / pi_behaviour, importance_weight_cap) with the runner's sampled "
        "log-probs; for asynchronous RL, where the sampling policy is versions older",
    )
    importance_weight_cap: float = Field(2.0, gt=0, description="truncation of decoupled PPO's weights")


class TrainConfig(StrictConfig):
    """What every trained model (policy or critic) needs."""

    model: str = Field("", description="Hugging Face checkpoint folder to start from")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="compute dtype ('auto': bf16 on CUDA, fp32 on CPU); parameters, gradients and "
        "optimiser state stay fp32 (FSDP2 mixed precision)",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward: less memory, ~1/3 more compute"
    )
    micro_batch_size: int = Field(32, ge=1, description="rows per forward/backward on one rank")
    mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="rows per optimizer step, over all ranks; None: the whole batch in one step",
    )
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch, one optimizer step per mini-batch")
    group_by_length: bool = Field(
        False,
        description="micro-batches of rows of similar response length, each cut to its longest response "
        "(less padding when lengths are long-tailed); micro-batch losses then weigh by their tokens, so "
        "the loss must be a token mean",
    )
    optim: OptimConfig = OptimConfig()

    @property
    def one_optimizer_step(self) -> bool:
        """Whether each batch makes exactly one optimizer step (one epoch, the whole batch at once)."""
        return self.ppo_epochs == 1 and self.mini_batch_size is None


class ActorConfig(TrainConfig):
    loss: PolicyLossConfig = PolicyLossConfig()
    recompute_log_probs: Literal["auto", "always"] = Field(
        "auto",
        description="'always': a forward pass before the update computes the old (proximal) log-probs; "
        "'auto': where a batch makes one optimizer step (ppo_epochs 1, no mini_batch_size) and no "
        "reference model is used, the update's own forward gives them (detached: the weights have not "
        "moved yet), one forward pass fewer a step",
    )

    @property
    def old_log_probs_from_update(self) -> bool:
        """Whether, without a reference model, the update computes the old log-probs itself."""
        return self.recompute_log_probs == "auto" and self.one_optimizer_step

    @model_validator(mode="after")
    def _token_mean_when_grouped(self) -> ActorConfig:
        if self.group_by_length and self.loss.loss_agg_mode != "token-mean":
            raise ValueError(
                f"group_by_length weighs micro-batches by their tokens, which only a token-mean loss "
                f"allows; set loss.loss_agg_mode=token-mean or group_by_length=false (got "
                f"{self.loss.loss_agg_mode!r})"
            )
        return self


class CriticConfig(TrainConfig):
    value_clip: float | None = Field(0.5, gt=0, description="clip range of the value loss")


class RolloutConfig(StrictConfig):
    """Generation settings of the rollout role: sampling, plus every knob of the runner's engine."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_tokens: int = Field(16, ge=1)
    n: int = Field(8, ge=1, description="samples per prompt")
    engine: EngineOptions = Field(
        default_factory=EngineOptions,
        description="the engine's knobs (the role sets the device; 'auto' dtype is bf16 on CUDA)",
    )
    free_cache_when_idle: bool = Field(
        True, description="release the KV cache while colocated trainers train"
    )
    offload_weights_when_idle: bool = Field(
        False, description="also move the runner's weights to host memory"
    )
