"""The typed configuration of an RL job, loaded from YAML with ``key=value`` overrides.

Every default runs on a laptop CPU: a tiny model learning the ``reverse`` toy task with GRPO
(the job ``examples/grpo_reverse.yaml`` spells out, about 4 minutes on 2 cores).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylane.actors.roles import ActorConfig, CriticConfig, OptimConfig, RolloutConfig, TrainConfig
from raylane.runner import EngineOptions
from raylane.serving.weights import WeightPublishConfig

# A colocated engine shares its GPU with trainers whose parameters, gradients and optimiser state stay
# there while it generates (its KV cache is released only while they train): it takes less than the
# engine's own default share unless the job sets rollout.engine.gpu_memory_utilization.
COLOCATED_GPU_MEMORY_UTILIZATION = 0.4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """The starting policy: a checkpoint folder, or a fresh tiny random model of the given shape."""

    path: str | None = Field(None, description="Hugging Face checkpoint folder; None builds a tiny model")
    tiny_arch: Literal["llama", "qwen2", "mistral"] = "llama"
    tiny_shape: dict[str, Any] = Field(
        default_factory=lambda: {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 64,
        }
    )
    tiny_seed: int = 0


class TaskConfig(_Strict):
    """A built-in toy task by name, or JSONL files (``prompt``/``messages``, ``ground_truth``)."""

    name: str | None = Field("reverse", description="built-in toy task; None to use train_file/eval_file")
    train_file: str | None = None
    eval_file: str | None = None
    sft_file: str | None = None
    reward_fn: str = "exact_match"
    reward_model: str | None = Field(
        None, description="score with this reward-model checkpoint instead of reward_fn"
    )
    n_train: int = 2000
    n_eval: int = 200

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        if self.name is None and self.train_file is None:
            raise ValueError("task: set task.name (a built-in toy task) or task.train_file (a JSONL dataset)")
        return self


class AlgorithmConfig(_Strict):
    """Which RL algorithm: the advantage estimator and where the KL to the reference goes."""

    name: Literal["grpo", "ppo", "rloo", "reinforce_plus_plus"] = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    norm_by_std: bool = True
    kl_coef: float = Field(0.0, ge=0, description="KL penalty folded into the token rewards (PPO style)")
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"

    @property
    def estimator(self) -> str:
        return "gae" if self.name == "ppo" else self.name

    @property
    def uses_critic(self) -> bool:
        return self.name == "ppo"


class PlacementConfig(_Strict):
    """Where the roles run: all on the same bundles, or trainers and rollout on disjoint pools."""

    mode: Literal["colocated", "disaggregated"] = "colocated"
    trainer_ranks: int = Field(1, ge=1, description="data-parallel trainer ranks")
    rollout_ranks: int = Field(
        1, ge=1, description="rollout ranks (disaggregated); colocated uses trainer_ranks"
    )
    rollout_tp: int = Field(1, ge=1, description="tensor-parallel size of each rollout replica")
    cpus_per_bundle: float = Field(1.0, gt=0)
    gpus_per_bundle: float = Field(0.0, ge=0)


class SFTConfig(_Strict):
    """Supervised warm-start before RL (for toy tasks a tiny model cannot yet solve)."""

    steps: int = Field(25, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)


class JobConfig(_Strict):
    """An RL job: ``raylane train CONFIG.yaml key=value ...``."""

    model: ModelSpec = ModelSpec()
    task: TaskConfig = TaskConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    actor: ActorConfig = ActorConfig(micro_batch_size=64, optim=OptimConfig(lr=6e-4))
    critic: CriticConfig = CriticConfig(micro_batch_size=64, optim=OptimConfig(lr=1e-3))
    reference: TrainConfig = TrainConfig()
    rollout: RolloutConfig = RolloutConfig(
        max_tokens=4, engine=EngineOptions(max_num_seqs=256, max_num_batched_tokens=4096)
    )
    placement: PlacementConfig = PlacementConfig()
    sft: SFTConfig = SFTConfig()
    steps: int = Field(200, ge=0, description="RL steps")
    prompts_per_step: int = Field(64, ge=1)
    eval_every: int = Field(
        10, ge=0, description="evaluate held-out prompts every N steps (0: only at the end)"
    )
    eval_prompts: int = Field(200, ge=1)
    use_reference: bool = Field(False, description="keep a frozen reference for a KL term")
    checkpoint_every: int = Field(0, ge=0, description="save a checkpoint every N steps (0: only at the end)")
    resume_from: str | None = Field(None, description="checkpoint folder (a step_* folder) to resume from")
    output_dir: str = "outputs/run"
    seed: int = 0
    profile_memory: bool = Field(
        False, description="record each phase's peak device memory (memory/<phase>_peak_gib; GPU)"
    )
    ray_address: str | None = Field(None, description="join this Ray cluster; None starts a local one")
    publish: WeightPublishConfig | None = Field(
        None, description="also publish each new policy version to a running `raylane serve` app"
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        needs_ref = self.algorithm.kl_coef > 0 or self.actor.loss.kl_loss_coef > 0
        if needs_ref and not self.use_reference:
            raise ValueError(
                "a KL term (algorithm.kl_coef or actor.loss.kl_loss_coef) needs use_reference=true"
            )
        ranks = (
            self.placement.trainer_ranks
            if self.placement.mode == "colocated"
            else self.placement.rollout_ranks
        )
        engine = self.rollout.engine
        if self.placement.mode == "colocated" and "gpu_memory_utilization" not in engine.model_fields_set:
            engine = engine.model_copy(update={"gpu_memory_utilization": COLOCATED_GPU_MEMORY_UTILIZATION})
            self.rollout = self.rollout.model_copy(update={"engine": engine})
        if ranks % self.placement.rollout_tp:
            raise ValueError(
                f"placement.rollout_tp ({self.placement.rollout_tp}) must divide the rollout ranks ({ranks})"
            )
        return self
