"""The typed configuration of an RL job, loaded from YAML with ``key=value`` overrides.

Every default runs on a laptop CPU: a tiny model learning the ``reverse`` toy task with GRPO
(the job ``examples/grpo_reverse.yaml`` spells out, about 4 minutes on 2 cores).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

from pydantic import Field, model_validator

from raylane.config import StrictConfig
from raylane.fault_tolerance.config import FaultToleranceConfig
from raylane.models import make_tiny_model
from raylane.rlhf import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, REWARD_FUNCTIONS, TOY_TASKS, needs_critic
from raylane.roles import ActorConfig, CriticConfig, OptimConfig, RolloutConfig, TrainConfig
from raylane.runner import EngineOptions
from raylane.serving.weights import WeightPublishConfig
from raylane.streaming import StreamConfig

logger = logging.getLogger(__name__)

AlgorithmName = ADVANTAGE_ESTIMATORS.name_field()
KLEstimatorName = KL_ESTIMATORS.name_field()
RewardFunctionName = REWARD_FUNCTIONS.name_field()
ToyTaskName = TOY_TASKS.name_field()

# A colocated engine shares its GPU with trainers whose parameters, gradients and optimiser state stay
# there while it generates (its KV cache is released only while they train): it takes less than the
# engine's own default share unless the job sets rollout.engine.gpu_memory_utilization.
COLOCATED_GPU_MEMORY_UTILIZATION = 0.4


class ModelSpec(StrictConfig):
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

    def materialize(self, output_dir: str) -> str:
        """The checkpoint folder: ``path``, or a tiny model written once to ``output_dir/initial_model``."""
        if self.path:
            return self.path
        path = os.path.join(output_dir, "initial_model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            make_tiny_model(path, arch=self.tiny_arch, seed=self.tiny_seed, **self.tiny_shape)
        return path


class TaskConfig(StrictConfig):
    """A built-in toy task by name, or JSONL files (``prompt``/``messages``, ``ground_truth``)."""

    name: ToyTaskName | None = Field(
        "reverse", description="toy task (registered name or 'pkg.module:TASK'); None to use train_file"
    )
    train_file: str | None = None
    eval_file: str | None = None
    sft_file: str | None = None
    reward_fn: RewardFunctionName = Field(
        "exact_match",
        description="reward function (registered name or 'pkg.module:function'); a row's own reward_fn wins",
    )
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


class AlgorithmConfig(StrictConfig):
    """Which RL algorithm: the advantage estimator and where the KL to the reference goes."""

    name: AlgorithmName = Field(
        "grpo",
        description="advantage estimator: grpo, rloo, reinforce_plus_plus, ppo (GAE with a critic), "
        "or any registered one",
    )
    gamma: float = 1.0
    lam: float = 1.0
    norm_by_std: bool = True
    kl_coef: float = Field(0.0, ge=0, description="KL penalty folded into the token rewards (PPO style)")
    kl_estimator: KLEstimatorName = "k1"

    @property
    def uses_critic(self) -> bool:
        return needs_critic(self.name)


class PlacementConfig(StrictConfig):
    """Where the roles run: all on the same bundles, or trainers and rollout on disjoint pools."""

    mode: Literal["colocated", "disaggregated"] = "colocated"
    trainer_ranks: int = Field(1, ge=1, description="data-parallel trainer ranks")
    rollout_ranks: int = Field(
        1, ge=1, description="rollout ranks (disaggregated); colocated uses trainer_ranks"
    )
    rollout_tp: int = Field(1, ge=1, description="tensor-parallel size of each rollout replica")
    cpus_per_bundle: float = Field(
        1.0,
        gt=0,
        description="CPUs of each bundle; Ray sets the torch threads of the actors in it to this share",
    )
    gpus_per_bundle: float = Field(0.0, ge=0)


class RolloutPoolConfig(StrictConfig):
    """The disaggregated synchronous job's rollout engines: a pool of independent replicas (one
    worker group of ``placement.rollout_tp`` ranks each) that is replaced replica by replica when
    one fails and grows or shrinks at run time (``RLJob.scale_rollout``, ``raylane rollout scale``)."""

    max_replacements: int = Field(
        3,
        ge=0,
        description="failed replicas replaced over the whole run (the asynchronous job's one engine: "
        "its replacements); the next failure stops the job with a report naming the replica",
    )
    max_replicas: int = Field(
        8, ge=1, description="the most replicas the pool may be scaled to (each takes rollout_tp bundles)"
    )
    control: bool = Field(
        True,
        description="register the job's control mailbox (a named Ray actor) so that `raylane rollout "
        "scale` can reach it; the job applies requests between steps",
    )
    hang_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a replica with prompts in flight whose ranks answer no ping (on their control "
        "thread, which a busy rank still serves) for this long is taken as hung: it is killed, its "
        "prompts go to the healthy replicas and it is replaced, as if it had died",
    )


class SFTConfig(StrictConfig):
    """Supervised warm-start before RL (for toy tasks a tiny model cannot yet solve)."""

    steps: int = Field(25, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)


class LoggersConfig(StrictConfig):
    """Where step metrics go besides ``metrics.jsonl`` and the Ray dashboard, under the same names."""

    tensorboard: bool = Field(False, description="write TensorBoard event files to OUTPUT_DIR/tensorboard")
    wandb: bool = Field(False, description="log to Weights & Biases; its run folder is OUTPUT_DIR/wandb")
    wandb_project: str = "raylane"
    wandb_entity: str | None = Field(None, description="W&B team or user; None: the account's default")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline needs no account or network; `wandb sync` uploads the run later"
    )


class AsyncRLConfig(StrictConfig):
    """Streaming asynchronous RL: the engines generate without pause into a rollout stream and the
    trainer takes each batch as soon as one is complete (see ``raylane.rlhf.staleness``)."""

    max_staleness: int = Field(
        1,
        ge=0,
        description="η: no sample is trained more than this many policy versions after its generation "
        "started (0: the synchronous loop's curve)",
    )
    partial_rollout: Literal["abort_resume", "keep"] = Field(
        "abort_resume",
        description="samples in flight at a weight update: abort_resume continues them from their tokens "
        "with the prefix recomputed by the new weights; keep continues on the old weights' KV cache",
    )
    oversample: float = Field(
        0.0,
        ge=0,
        description="APRIL: generate this fraction of a batch more groups than the bound alone admits; "
        "a batch closes when enough groups finish and the rest continue into later ones. Each started "
        "batch of them adds one version of staleness",
    )
    engine_steps_per_call: int = Field(
        64,
        ge=1,
        description="engine steps per rollout call at most; a weight sync ends the call in progress "
        "after its current step (tensor-parallel engines: at the call's end), and new groups join at calls",
    )
    stream: StreamConfig = StreamConfig()
    consumer: str = Field(
        "trainer", min_length=1, description="the trainer's consumer name in the stream; keep it to resume"
    )


class JobConfig(StrictConfig):
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
    checkpoint_mode: Literal["async", "sync", "lazy"] = Field(
        "async",
        description="async: snapshot the trainer state to host memory at the step boundary and persist it "
        "while the next step runs (at most one persist in flight); sync: the loop waits for the write; "
        "lazy: the snapshot overlaps the next step (only its optimizer step waits for it), is committed to "
        "a memory tier on tmpfs within that step and copied to disk as fast as the disk allows, newest "
        "first (trainer ranks and driver on one node)",
    )
    checkpoint_memory_dir: str | None = Field(
        None,
        description="lazy mode's memory tier, a tmpfs folder with room for 3 checkpoints (None: a folder "
        "under /dev/shm named after output_dir)",
    )
    checkpoint_disk_interval_s: float = Field(
        0.0,
        ge=0,
        description="lazy mode: at least this long between the starts of two copies to disk, newer memory "
        "checkpoints replacing the one waiting (0: back to back). Where disk writes slow the training step, "
        "a longer interval costs a lost node about the interval plus one copy's time",
    )
    checkpoint_keep_last: int | None = Field(
        None, ge=1, description="keep only the newest K complete checkpoints (None: keep all)"
    )
    checkpoint_writer_threads: int = Field(
        4, ge=1, le=64, description="threads per trainer rank writing its checkpoint shards (one file each)"
    )
    resume_from: str | None = Field(
        None,
        description="checkpoint folder (a complete step_* folder) to resume from; 'latest': the newest "
        "complete one under output_dir/checkpoints",
    )
    output_dir: str = "outputs/run"
    seed: int = 0
    profile_memory: bool = Field(
        False, description="record each phase's peak device memory (memory/<phase>_peak_gib; GPU)"
    )
    freeze_gc_heap: bool = Field(
        True,
        description="after the first step of a run (and of a recovery) move the driver's and every "
        "worker's live Python objects to the garbage collector's permanent generation (gc.freeze), so "
        "its full collections scan only newer ones (a colocated GPU worker: ~870k objects, 0.36-0.44 s a "
        "full collection)",
    )
    ray_address: str | None = Field(None, description="join this Ray cluster; None starts a local one")
    publish: WeightPublishConfig | None = Field(
        None, description="also publish each new policy version to a running `raylane serve` app"
    )
    loggers: LoggersConfig = LoggersConfig()
    async_rl: AsyncRLConfig | None = Field(
        None, description="stream rollouts to the trainer asynchronously; None: the synchronous loop"
    )
    fault_tolerance: FaultToleranceConfig = FaultToleranceConfig()
    rollout_pool: RolloutPoolConfig = RolloutPoolConfig()

    @property
    def uses_rollout_pool(self) -> bool:
        """Whether the rollout engines form an elastic pool of replicas: disaggregated and synchronous
        (the asynchronous loop streams from one engine group)."""
        return self.placement.mode == "disaggregated" and self.async_rl is None

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
        replicas = ranks // self.placement.rollout_tp
        # A rollout pool shares prompts out unevenly if need be; one engine group splits them by DP rank.
        self._check_batch_split(1 if self.uses_rollout_pool else replicas)
        if self.uses_rollout_pool and replicas > self.rollout_pool.max_replicas:
            raise ValueError(
                f"placement.rollout_ranks={ranks} make {replicas} rollout replicas of rollout_tp="
                f"{self.placement.rollout_tp}, more than rollout_pool.max_replicas="
                f"{self.rollout_pool.max_replicas}; raise rollout_pool.max_replicas or use fewer ranks"
            )
        if self.async_rl is not None:
            self._check_async(ranks // self.placement.rollout_tp)
        return self

    def _check_async(self, rollout_replicas: int) -> None:
        if self.placement.mode != "disaggregated" or rollout_replicas != 1:
            raise ValueError(
                "async_rl generates while the trainer trains: set placement.mode=disaggregated with one "
                f"rollout replica (placement.rollout_ranks = placement.rollout_tp); got mode "
                f"{self.placement.mode!r} and {rollout_replicas} replicas"
            )
        if self.task.reward_model is not None:
            raise ValueError(
                "async_rl scores each group on the rollout worker with a verifier: use task.reward_fn, "
                "not task.reward_model"
            )
        if self.async_rl.max_staleness > 0 and self.actor.loss.off_policy_correction == "none":
            logger.warning(
                "async_rl.max_staleness=%d trains on samples of older policies without correction: set "
                "actor.loss.off_policy_correction=decoupled",
                self.async_rl.max_staleness,
            )

    def _check_batch_split(self, rollout_replicas: int) -> None:
        """Every step's batch must split evenly over the ranks and into mini-batches: reject it here
        rather than fail mid-run (padding rows would enter the loss as duplicated samples)."""
        prompts, n, ranks = self.prompts_per_step, self.rollout.n, self.placement.trainer_ranks
        if prompts % rollout_replicas:
            raise ValueError(
                f"prompts_per_step ({prompts}) must be a multiple of the {rollout_replicas} rollout "
                f"replicas; e.g. prompts_per_step={_next_multiple(prompts, rollout_replicas)}"
            )
        rows = prompts * n
        if rows % ranks:
            step = ranks // math.gcd(n, ranks)
            raise ValueError(
                f"prompts_per_step x rollout.n = {prompts} x {n} = {rows} rows do not split over "
                f"placement.trainer_ranks={ranks}; make the product a multiple of {ranks}, e.g. "
                f"prompts_per_step={_next_multiple(prompts, math.lcm(step, rollout_replicas))}"
            )
        trained = {"actor": self.actor, **({"critic": self.critic} if self.algorithm.uses_critic else {})}
        for role, config in trained.items():
            mini = config.mini_batch_size
            if mini is not None and (rows % mini or mini % ranks):
                fits = [m for m in range(ranks, rows + 1, ranks) if rows % m == 0]
                raise ValueError(
                    f"{role}.mini_batch_size ({mini}) must divide the {rows} rows of a step "
                    f"(prompts_per_step x rollout.n = {prompts} x {n}) and be a multiple of "
                    f"placement.trainer_ranks={ranks}; valid sizes: {', '.join(map(str, fits))}"
                )


def _next_multiple(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor
