"""The synchronous RL dataflow (PPO, GRPO, RLOO, REINFORCE++) on worker groups.

The controller is plain Python on the driver. Each step:

    generate -> reward -> old (and reference) log-probs -> values -> advantages
             -> critic update -> actor update -> weight sync

Worker groups do the heavy work; this file only moves batches between them.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager

import ray
import torch
from tqdm.auto import tqdm

from raylane.actors import DeadRankError, ResourcePool, Role, WorkerGroup, WorkerGroupError
from raylane.batch import Batch
from raylane.controllers.config import JobConfig
from raylane.controllers.loggers import make_loggers
from raylane.controllers.metrics import MetricsTracker, progress_line
from raylane.controllers.rollout_pool import RolloutPool, RolloutPoolError, start_control
from raylane.controllers.weight_sync import WeightSync
from raylane.fault_tolerance import FaultSupervisor, RanksReplaced
from raylane.fault_tolerance.checkpoint import CheckpointLoadError
from raylane.fault_tolerance.checkpoint_store import COMPLETE_MARKER, CheckpointStore, is_complete
from raylane.fault_tolerance.checkpoint_tiers import (
    HOST_BUFFERS_DIR,
    DiskPersister,
    memory_tier_dir,
    newest_checkpoint,
    persist_to_disk,
)
from raylane.models import Tokenizer
from raylane.rlhf import (
    AdvantageConfig,
    PromptDataset,
    PromptLoader,
    apply_kl_penalty,
    compute_advantages,
    log_prob_gap_metrics,
    make_toy_task,
    masked_mean,
    scores_to_token_rewards,
)
from raylane.roles import Critic, PolicyTrainer, Reference, RewardWorker, Rollout

logger = logging.getLogger(__name__)

# gc.collect + gc.freeze took ~0.5 s on a colocated GPU rank; a rank that does not answer in this long
# is stopped or gone, which the fault handling takes up.
_FREEZE_TIMEOUT_S = 10.0


class PhaseTimer:
    """Wall time of each named phase of a step and, given worker handles to probe, the peak device
    memory of any of their ranks during it (one reset and one read per handle and phase)."""

    def __init__(self, memory_probes: Sequence = ()) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._probes = memory_probes

    @contextmanager
    def __call__(self, phase: str):
        for probe in self._probes:
            probe.reset_peak_memory()
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        if self._probes:
            peak = max(info.peak_bytes for probe in self._probes for info in probe.device_info())
            self.peak_bytes[phase] = max(peak, self.peak_bytes.get(phase, 0))


def compute_batch_advantages(batch: Batch, config: JobConfig) -> dict[str, float]:
    """Token rewards (score at the last response token, minus any KL penalty), advantages and returns."""
    algo = config.algorithm
    mask = batch["response_mask"]
    token_rewards = scores_to_token_rewards(batch["scores"], mask)
    metrics = {}
    if "ref_log_probs" in batch:
        kl = batch["old_log_probs"] - batch["ref_log_probs"]
        metrics["kl"] = float(masked_mean(kl, mask))
        if algo.kl_coef > 0:
            token_rewards, _ = apply_kl_penalty(
                token_rewards,
                batch["old_log_probs"],
                batch["ref_log_probs"],
                mask,
                algo.kl_coef,
                algo.kl_estimator,
            )
    advantages, returns = compute_advantages(
        algo.name,
        token_rewards,
        mask,
        values=batch.tensors.get("values"),
        group_index=list(batch["uid"]),
        config=AdvantageConfig(gamma=algo.gamma, lam=algo.lam, norm_by_std=algo.norm_by_std),
    )
    batch["advantages"] = advantages
    batch["returns"] = returns
    metrics["advantage_abs_mean"] = float(masked_mean(advantages.abs(), mask))
    return metrics


class RLJob:
    """Builds the worker groups of a job from its config and runs the synchronous dataflow."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        os.makedirs(config.output_dir, exist_ok=True)
        self.model_dir = config.model.materialize(config.output_dir)
        self.tokenizer = Tokenizer.from_pretrained(self.model_dir)
        self.train_data, self.eval_data, self.sft_data = self._prepare_data()
        self.loader = PromptLoader(self.train_data, config.prompts_per_step, seed=config.seed)
        self.name = os.path.basename(os.path.abspath(config.output_dir))
        self.metrics = MetricsTracker(
            config.output_dir,
            self.name,
            make_loggers(config.loggers, config.output_dir, self.name, config.model_dump(mode="json")),
        )
        self.version = 0
        self.start_step = 0
        self._pools: list[ResourcePool] = []
        self._groups: list[WorkerGroup] = []
        self.weight_sync: WeightSync | None = None
        self._memory_probes: list = []
        self.checkpoints = CheckpointStore(
            os.path.join(config.output_dir, "checkpoints"), config.checkpoint_keep_last
        )
        # Lazy mode's memory tier on tmpfs, and the thread that copies it to ``checkpoints``.
        self.memory_checkpoints = CheckpointStore(
            config.checkpoint_memory_dir or memory_tier_dir(config.output_dir)
        )
        self.persister: DiskPersister | None = None
        self._acknowledged = -1  # the newest step checkpoint_committed was called for
        # The step whose checkpoint is being written, and the store it is committed to.
        self._persisting: tuple[int, CheckpointStore] | None = None
        self.last_checkpoint: str | None = None  # the newest committed checkpoint, what recovery reloads
        self.supervisor: FaultSupervisor | None = None
        self._carried_metrics: dict[str, float] = {}  # into the next step's record (recoveries, heap freeze)
        self.rollout_pool: RolloutPool | None = None  # disaggregated synchronous jobs only
        self.rollout_group: WorkerGroup | None = None  # the engines' group, without a rollout pool
        self._control = None  # the rollout pool's mailbox for `raylane rollout scale`

    # ---- set-up -----------------------------------------------------------------------------------

    def _prepare_data(self) -> tuple[PromptDataset, PromptDataset, PromptDataset | None]:
        task = self.config.task
        if task.name is not None:
            files = make_toy_task(
                task.name, os.path.join(self.config.output_dir, "data"), task.n_train, task.n_eval
            )
            train_file, eval_file, sft_file = files.train, files.eval, files.sft
        else:
            train_file, eval_file, sft_file = task.train_file, task.eval_file, task.sft_file
        train = PromptDataset.from_jsonl(train_file)
        evaluation = PromptDataset.from_jsonl(eval_file) if eval_file else PromptDataset([])
        sft = PromptDataset.from_jsonl(sft_file, require_completion=True) if sft_file else None
        return train, evaluation, sft

    def _role_configs(self):
        cfg = self.config
        actor = cfg.actor.model_copy(update={"model": self.model_dir})
        critic = cfg.critic.model_copy(update={"model": cfg.critic.model or self.model_dir})
        reference = cfg.reference.model_copy(update={"model": self.model_dir})
        return actor, critic, reference

    def build_groups(self) -> None:
        """Reserve the pools and start the worker groups the placement asks for."""
        cfg, placement = self.config, self.config.placement
        actor, critic, reference = self._role_configs()
        trainer_roles: dict[str, Role] = {
            "actor": Role(PolicyTrainer, (actor,)),
            "reward": Role(
                RewardWorker,
                kwargs={
                    "reward_fn": None if cfg.task.reward_model else cfg.task.reward_fn,
                    "reward_model": cfg.task.reward_model,
                },
            ),
        }
        if cfg.use_reference:
            trainer_roles["ref"] = Role(Reference, (reference,))
        if cfg.algorithm.uses_critic:
            trainer_roles["critic"] = Role(Critic, (critic,))
        rollout_role = Role(Rollout, (self.model_dir, cfg.rollout), tp_size=placement.rollout_tp)
        bundle = {
            "num_cpus_per_bundle": placement.cpus_per_bundle,
            "num_gpus_per_bundle": placement.gpus_per_bundle,
        }
        if placement.mode == "colocated":
            pool = ResourcePool([placement.trainer_ranks], name="rl", **bundle)
            self._pools.append(pool)
            group = WorkerGroup(pool, {**trainer_roles, "rollout": rollout_role}, name="rl")
            self._groups.append(group)
            trainers = rollouts = group
        else:
            train_pool = ResourcePool([placement.trainer_ranks], name="trainer", **bundle)
            self._pools.append(train_pool)
            trainers = WorkerGroup(train_pool, trainer_roles, name="trainer")
            self._groups.append(trainers)
            if cfg.uses_rollout_pool:
                self._build_rollout_pool(rollout_role, bundle)
            else:
                rollout_pool = ResourcePool([placement.rollout_ranks], name="rollout", **bundle)
                self._pools.append(rollout_pool)
                rollouts = WorkerGroup(rollout_pool, {"rollout": rollout_role}, name="rollout")
                self._groups.append(rollouts)
        self.actor, self.reward = trainers.actor, trainers.reward
        self.rollout = rollouts.rollout if self.rollout_pool is None else self.rollout_pool
        self.rollout_group = rollouts if self.rollout_pool is None else None
        self.trainer_group = trainers
        self._connect_weight_sync()
        self.ref = trainers.ref if cfg.use_reference else None
        self.critic = trainers.critic if cfg.algorithm.uses_critic else None
        # Held-out batches are padded to split evenly over the rollout and the reward ranks (a
        # rollout pool takes any number of rows).
        rollout_dp = rollouts.layout("rollout").dp if self.rollout_pool is None else 1
        self.eval_divisor = math.lcm(rollout_dp, trainers.layout("reward").dp)
        # Colocated trainers share the rollout's device: free its cache while they work.
        self._sleeps = placement.mode == "colocated" and cfg.rollout.free_cache_when_idle
        self._memory_probes = [self.actor, self.rollout] if cfg.profile_memory else []

    def _build_rollout_pool(self, role: Role, bundle: dict[str, float]) -> None:
        placement = self.config.placement
        if self.config.rollout_pool.control:
            self._control = start_control(self.name)
        self.rollout_pool = RolloutPool(
            role,
            placement.rollout_ranks // placement.rollout_tp,
            bundle=bundle,
            config=self.config.rollout_pool,
            rejoin=self._rejoin_rollouts,
        )

    def _connect_weight_sync(self) -> None:
        if self.config.placement.mode == "colocated":
            self.weight_sync = WeightSync.colocated(
                self.trainer_group, source_role="actor", target_role="rollout"
            )
        elif self.rollout_pool is not None:
            self.weight_sync = WeightSync.disaggregated(self.actor, self.rollout_pool.handles)
        else:
            self.weight_sync = WeightSync.disaggregated(self.actor, self.rollout)

    def _rejoin_rollouts(self) -> None:
        """The rollout pool's replicas changed: connect the weight sync to the new set (every rank
        leaves its old sync group as it joins) and push the current policy version to all of them."""
        self._connect_weight_sync()
        self.weight_sync.sync(self.version)

    # ---- the elastic rollout pool -------------------------------------------------------------------

    def scale_rollout(self, replicas: int) -> None:
        """Grow or shrink the rollout pool to ``replicas`` engine replicas; call it between steps (a
        running job applies `raylane rollout scale` requests at the start of each step). New
        replicas get the current policy version before they take work."""
        if self.rollout_pool is None:
            raise ValueError(
                "scale_rollout needs the elastic rollout pool: placement.mode=disaggregated with the "
                "synchronous loop (no async_rl), and build_groups() called"
            )
        self.rollout_pool.scale(replicas)

    def _apply_rollout_requests(self) -> None:
        """Apply the scale requests posted to the job's mailbox since the last step, reporting each."""
        if self._control is None:
            return
        requests = ray.get(self._control.drain.remote())
        for request_id, replicas in requests:
            try:
                self.scale_rollout(replicas)
            except (ValueError, RolloutPoolError) as error:
                self._control.report.remote(request_id, False, str(error))
                logger.warning("rollout scale to %s refused: %s", replicas, error)
            else:
                message = f"rollout pool of job {self.name!r} now has {self.rollout_pool.size} replicas"
                self._control.report.remote(request_id, True, message)
        if requests:  # the status is also posted after every step
            self._control.set_status.remote(self._rollout_pool_metrics())

    def _rollout_pool_metrics(self) -> dict[str, float]:
        return {
            "rollout/replicas": float(self.rollout_pool.size),
            "rollout/replacements": float(self.rollout_pool.replacements),
        }

    def shutdown(self) -> None:
        if self.persister is not None:
            # What it had not copied yet stays in the memory tier, where resume_from=latest finds it.
            self.persister.close()
            self.persister = None
        if self.supervisor is not None:
            self.supervisor.close()
            self.supervisor = None
        if self.weight_sync is not None:
            try:
                self.weight_sync.close()
            except DeadRankError as exc:  # the job is failing on that rank: its error is the one to raise
                logger.info("weight sync not closed: %s", exc)
            self.weight_sync = None
        if self.rollout_pool is not None:
            self.rollout_pool.shutdown()
            self.rollout_pool = None
        if self._control is not None:
            ray.kill(self._control)
            self._control = None
        for group in reversed(self._groups):
            group.shutdown()
        for pool in reversed(self._pools):
            pool.release()
        self._groups, self._pools = [], []

    # ---- batches ----------------------------------------------------------------------------------

    def prompt_batch(self, examples, **meta) -> Batch:
        rows = {
            "uid": [example.index for example in examples],
            "prompt": [example.prompt or "" for example in examples],
            "messages": [example.messages for example in examples],
            "ground_truth": [example.ground_truth for example in examples],
            "reward_fn": [example.reward_fn for example in examples],
            "extra": [example.extra for example in examples],
        }
        return Batch.from_dict(rows, meta=meta)

    def _sft_batch(self, examples) -> Batch:
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(e.messages) if e.messages else e.prompt)
            for e in examples
        ]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        targets = [self.tokenizer.encode(e.completion, add_special_tokens=False) + eos for e in examples]
        prompt_len, target_len = max(map(len, prompts)), max(map(len, targets))
        pad = self.tokenizer.pad_token_id or 0
        rows = len(examples)
        batch = {
            "prompts": torch.full((rows, prompt_len), pad, dtype=torch.long),
            "responses": torch.full((rows, target_len), pad, dtype=torch.long),
            "attention_mask": torch.zeros(rows, prompt_len + target_len, dtype=torch.long),
            "response_mask": torch.zeros(rows, target_len),
        }
        for i, (p, t) in enumerate(zip(prompts, targets)):
            batch["prompts"][i, prompt_len - len(p) :] = torch.tensor(p)
            batch["responses"][i, : len(t)] = torch.tensor(t)
            batch["attention_mask"][i, prompt_len - len(p) : prompt_len + len(t)] = 1
            batch["response_mask"][i, : len(t)] = 1
        return Batch.from_dict(batch)

    # ---- the dataflow -----------------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Reshard the actor's weights into the rollout engines as the next version."""
        if self.rollout_pool is not None:
            self.rollout_pool.replace_failed()
        self.version += 1
        self.weight_sync.sync(self.version)
        if self.config.publish is not None:
            self.config.publish.publish(self.actor.full_weights()[0], self.version)

    def train_batch(self, batch: Batch, phase: PhaseTimer) -> dict[str, float]:
        """Train on a generated and scored batch (old and reference log-probs, values, advantages,
        the updates), then sync the new weights to the engines; returns the step's metrics."""
        cfg = self.config
        if self.ref is not None or not cfg.actor.old_log_probs_from_update:
            with phase("log_probs"):
                batch = batch.union(self.actor.compute_log_probs(batch))
                if self.ref is not None:
                    batch = batch.union(self.ref.compute_ref_log_probs(batch))
        if self.critic is not None:
            with phase("values"):
                batch = batch.union(self.critic.compute_values(batch))
        with phase("advantages"):
            metrics = compute_batch_advantages(batch, cfg)
        if self.critic is not None:
            with phase("update_critic"):
                metrics.update(mean_rows(self.critic.update_critic(batch)))
        with phase("update_actor"):
            metrics.update(mean_rows(self.actor.update_actor(batch)))
        if self._sleeps:
            with phase("wake_up"):
                self.rollout.wake_up()
        with phase("sync_weights"):
            self.sync_weights()
        mask = batch["response_mask"]
        response_tokens = int(mask.sum())
        # Without the separate pass the update reported the gap itself (over its micro-batches).
        if "old_log_probs" in batch:
            metrics.update(log_prob_gap_metrics(batch["rollout_log_probs"], batch["old_log_probs"], mask))
        metrics.update(
            {
                "reward_mean": float(batch["scores"].mean()),
                "response_length": response_tokens / len(batch),
                "rollout/staleness": float(self.version - 1 - int(batch["weight_version"].min())),
                "throughput/train_tokens": float(batch["attention_mask"].sum()),
            }
        )
        # Each PPO epoch trains on every token of the batch once more.
        metrics["throughput/train_tokens_per_s"] = (
            metrics["throughput/train_tokens"]
            * cfg.actor.ppo_epochs
            / max(phase.seconds["update_actor"], 1e-9)
        )
        return metrics

    def rl_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        self._apply_rollout_requests()
        phase = PhaseTimer(self._memory_probes)
        start = time.perf_counter()
        prompts = self.prompt_batch(self.loader.next_batch(), seed=cfg.seed * 100_003 + step)
        with phase("generate"):
            batch = self.rollout.generate(prompts)
        if self._sleeps:
            with phase("sleep"):
                self.rollout.sleep()
        with phase("reward"):
            batch = batch.union(self.reward.compute_rewards(batch))
        metrics = self.train_batch(batch, phase)
        response_tokens = int(batch["response_mask"].sum())
        metrics["throughput/tokens_per_s"] = response_tokens / max(phase.seconds["generate"], 1e-9)
        # The first rollout rank's time in engine steps: the rest of the phase is dispatch, tokenizing
        # and building the batch, the in-job cost the standalone runner does not pay.
        metrics["rollout/engine_busy_fraction"] = min(
            1.0, batch.meta["engine_seconds"] / max(phase.seconds["generate"], 1e-9)
        )
        metrics.update({f"timing/{name}_s": seconds for name, seconds in phase.seconds.items()})
        metrics.update({f"memory/{name}_peak_gib": peak / 2**30 for name, peak in phase.peak_bytes.items()})
        metrics["timing/step_s"] = time.perf_counter() - start
        if self.rollout_pool is not None:
            pool_metrics = self._rollout_pool_metrics()
            metrics.update(pool_metrics)
            if self._control is not None:
                self._control.set_status.remote(pool_metrics)
        return metrics

    def evaluate(self) -> float:
        """Held-out reward with greedy decoding, one sample per prompt."""
        examples = list(self.eval_data)[: self.config.eval_prompts]
        if not examples:
            return float("nan")
        padded = examples + examples[: (-len(examples)) % self.eval_divisor]
        batch = self.rollout.generate(self.prompt_batch(padded, n=1, temperature=0.0))
        scores = self.reward.compute_rewards(batch)["scores"][: len(examples)]
        return float(scores.mean())

    def warm_start(self) -> None:
        """Supervised steps on the task's completions before RL."""
        cfg = self.config.sft
        if cfg.steps == 0:
            return
        if self.sft_data is None:
            raise ValueError("sft.steps > 0 needs completions: a toy task or task.sft_file")
        loader = PromptLoader(self.sft_data, cfg.batch_size, seed=self.config.seed + 1)
        with tqdm(range(cfg.steps), desc="sft warm-start", unit="step") as bar:
            for _ in bar:
                batch = self._sft_batch(loader.next_batch())
                batch.meta["lr"] = cfg.lr
                bar.set_postfix(loss=f"{mean_rows(self.actor.sft_step(batch))['sft/loss']:.3f}")
        self.actor.end_warm_start()
        self.sync_weights()

    def driver_state(self) -> dict:
        """What the driver saves with a checkpoint besides step, version and metrics: the data position."""
        return {"loader": self.loader.state_dict()}

    def load_driver_state(self, extra: dict, in_place: bool = False) -> None:
        """Restore what :meth:`driver_state` saved; ``in_place``: the job rolls back to the checkpoint
        after a fault, in the driver that wrote it (the data position rolls back with the steps)."""
        self.loader.load_state_dict(extra["loader"])

    def checkpoint(self, step: int) -> str:
        """Checkpoint the trainers and the driver state after ``step``; returns the folder it commits to.
        In async mode this returns once the trainers have snapshotted their state, in lazy mode at once
        (each trainer rank snapshots it before its next optimizer step); the write goes on in the
        background and :meth:`wait_for_checkpoint` commits it."""
        self.wait_for_checkpoint()
        extra = {
            "step": step,
            "version": self.version,
            "history": self.metrics.history,
            **self.driver_state(),
        }
        mode = self.config.checkpoint_mode
        if self.config.fault_tolerance.enabled:
            # A background write runs collectives on a process group of all trainer ranks, which a dead
            # rank would hang; with fault tolerance on, checkpoints are written before the loop goes on.
            mode = "sync"
        store = self._memory_tier() if mode == "lazy" else self.checkpoints
        staging = store.staging(step)
        for name, role in self._checkpointed_roles():
            role.save_checkpoint(
                os.path.join(staging, name),
                extra if name == "actor" else {},
                mode,
                self.config.checkpoint_writer_threads,
                os.path.join(store.root, HOST_BUFFERS_DIR, name) if mode == "lazy" else None,
            )
        self._persisting = (step, store)
        if mode == "sync":
            self.wait_for_checkpoint()
        return store.path(step)

    def _memory_tier(self) -> CheckpointStore:
        """Lazy mode's memory store, its disk persister started at the first lazy checkpoint."""
        if self.persister is None:
            here = ray.get_runtime_context().get_node_id()
            away = sorted({node.node_ip for node in self.trainer_group.nodes if node.node_id != here})
            if away:
                raise ValueError(
                    f"checkpoint_mode=lazy commits its memory tier ({self.memory_checkpoints.root}) on the "
                    f"driver's node, but trainer ranks run on {away}: use checkpoint_mode=async on "
                    "several nodes"
                )
            # What an earlier run left, except the checkpoint this one resumed from, would pass for newer.
            for step in self.memory_checkpoints.complete_steps():
                if self.memory_checkpoints.path(step) != self.last_checkpoint:
                    shutil.rmtree(self.memory_checkpoints.path(step))
            self.persister = DiskPersister(
                self.memory_checkpoints,
                self.checkpoints,
                self.config.checkpoint_writer_threads,
                self.config.checkpoint_disk_interval_s,
            )
        return self.memory_checkpoints

    def _checkpointed_roles(self) -> list[tuple[str, WorkerGroup]]:
        return [("actor", self.actor)] + ([("critic", self.critic)] if self.critic is not None else [])

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint in flight (if any) is written, then commit it (lazy mode: to the
        memory tier, handing it to the disk persister)."""
        if self._persisting is None:
            return
        for _, role in self._checkpointed_roles():
            role.wait_checkpoint()
        (step, store), self._persisting = self._persisting, None
        self.last_checkpoint = store.commit(step)
        if store is self.checkpoints:
            self._acknowledged = step
            self.checkpoint_committed(step)
        else:
            self.persister.offer(step)
        self._acknowledge_persisted()

    def _acknowledge_persisted(self) -> None:
        if self.persister is not None and (self.persister.persisted or -1) > self._acknowledged:
            self._acknowledged = self.persister.persisted
            self.checkpoint_committed(self._acknowledged)

    def drain_checkpoints(self) -> None:
        """Block until the checkpoint in flight is committed and (lazy mode) the disk has caught up."""
        self.wait_for_checkpoint()
        if self.persister is not None:
            self.persister.drain()
            self._acknowledge_persisted()

    def checkpoint_committed(self, step: int) -> None:
        """Called once the checkpoint of ``step`` is complete on disk (lazy mode: that of a step at
        least as new as every step acknowledged before); a subclass acts on it."""

    def _persist_before_resuming(self, memory_path: str) -> str:
        """Copy a memory-tier checkpoint to the disk store (unless there already) and return its path
        there. Resuming acknowledges what it trained (the asynchronous job's stream entries): were the
        node lost before the disk caught up, a resume from the disk's older checkpoint would lack them."""
        step = int(os.path.basename(memory_path).removeprefix("step_"))
        if not is_complete(self.checkpoints.path(step)):
            persist_to_disk(memory_path, self.checkpoints, step, self.config.checkpoint_writer_threads)
            logger.info("copied the memory-tier checkpoint %s to disk before resuming from it", memory_path)
        return self.checkpoints.path(step)

    def resume(self, path: str, in_place: bool = False) -> None:
        """Load checkpoint ``path`` (or ``"latest"``): trainers, driver state, metrics, step and
        version, and sync the engines; ``in_place`` as in :meth:`load_driver_state`."""
        if path == "latest":
            path = newest_checkpoint(self.checkpoints, self.memory_checkpoints)
            if path is None:
                raise FileNotFoundError(
                    f"resume_from=latest: no complete checkpoint under {self.checkpoints.root} (or "
                    f"{self.memory_checkpoints.root}); start without resume_from"
                )
        elif not is_complete(path):
            raise CheckpointLoadError(
                f"{path!r} is not a complete checkpoint (no {COMPLETE_MARKER} marker: its save was "
                "interrupted, or it is not a step_* folder); resume from a complete step_* folder or "
                "resume_from=latest"
            )
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.memory_checkpoints.root):
            path = self._persist_before_resuming(path)
        self.last_checkpoint = path
        extra = self.actor.load_checkpoint(os.path.join(path, "actor"))[0]
        if self.critic is not None:
            self.critic.load_checkpoint(os.path.join(path, "critic"))
        self.load_driver_state(extra, in_place)
        self.metrics.restore(extra["history"])
        self.start_step = extra["step"]
        self.version = extra["version"] - 1
        self.sync_weights()
        logger.info("resumed from %s at step %d", path, self.start_step)

    def train_step(self, step: int, bar: tqdm) -> None:
        """RL step ``step`` with its evaluation, metrics and checkpoint."""
        cfg = self.config
        metrics = self.rl_step(step)
        # The previous checkpoint persisted while this step ran: committing it before the step is
        # logged means a crash at any point loses at most the step in flight.
        self.wait_for_checkpoint()
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            metrics["eval_reward_mean"] = self.evaluate()
        metrics.update(self._carried_metrics)
        self._carried_metrics = {}
        self.metrics.log(done, metrics)
        bar.write(progress_line(done, cfg.steps, metrics))
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            self.checkpoint(done)

    # ---- fault tolerance --------------------------------------------------------------------------

    def _start_fault_tolerance(self) -> None:
        """Probes on the trainer ranks and the detector; a checkpoint to reload if there is none yet."""
        self.supervisor = FaultSupervisor(
            self.config.fault_tolerance,
            self.trainer_group,
            role="actor",
            output_dir=self.config.output_dir,
        )
        if self.last_checkpoint is None:
            self.checkpoint(self.start_step)

    def _supervised(self, work, step: int) -> None:
        if self.supervisor is None:
            work()
        else:
            self.supervisor.run(work, step)

    def freeze_heaps(self) -> None:
        """``gc.freeze`` in the driver and on every rank of the job's worker groups, once the first
        step built what lives for the run (optimizer state, compiled graphs): full collections then
        scan only what is newer. The next step's record has ``gc/frozen_objects`` (all processes)."""
        gc.collect()
        gc.freeze()
        frozen = gc.get_freeze_count()
        for group in self._groups:
            try:
                frozen += sum(group.freeze_heaps(timeout_s=_FREEZE_TIMEOUT_S))
            except WorkerGroupError as error:
                # A rank that died or stopped is the fault handling's (an engine replaced, a rank
                # named and replaced); its group only collects as before.
                logger.warning("heaps of group %r not frozen: %s", group.name, error)
        self._carried_metrics["gc/frozen_objects"] = float(frozen)

    def _recover(self, step_in_flight: int) -> None:
        """After ranks were replaced: rebuild the survivors' roles on the new process group, reconnect
        the weight sync and reload the last checkpoint (weights, optimizer, data position, version,
        metrics); the steps since it are redone."""
        start = time.monotonic()
        replaced = self.supervisor.replacer.history[-1].ranks
        survivors = [r for r in range(self.trainer_group.world_size) if r not in replaced]
        if survivors:
            self.trainer_group.rebuild_roles(survivors)
        # The old sync's ranks are gone or rebuilt: nothing is left to close on the trainer side.
        self._connect_weight_sync()
        # A checkpoint the fault interrupted is not waited on (its writers are gone) nor committed.
        self._persisting = None
        self.resume(self.last_checkpoint, in_place=True)
        self._carried_metrics = {
            "fault_tolerance/replacements": float(len(self.supervisor.replacer.history)),
            "fault_tolerance/steps_lost": float(step_in_flight + 1 - self.start_step),
            "fault_tolerance/recovery_s": self.supervisor.replacer.history[-1].seconds
            + time.monotonic()
            - start,
        }
        logger.warning(
            "recovered from a fault at step %d: ranks %s replaced, %s reloaded, %d step(s) to redo",
            step_in_flight + 1,
            list(replaced),
            self.last_checkpoint,
            step_in_flight + 1 - self.start_step,
        )

    def run(self) -> list[dict[str, float]]:
        """Run the whole job; returns the metrics history."""
        cfg = self.config
        self.build_groups()
        try:
            if cfg.resume_from:
                self.resume(cfg.resume_from)
            if self.start_step == 0:
                initial = {"eval_reward_before_sft": self.evaluate()} if self.config.sft.steps else {}
                self.warm_start()
                self.metrics.log(0, {**initial, "eval_reward_mean": self.evaluate()})
            if cfg.fault_tolerance.enabled:
                self._start_fault_tolerance()
            with tqdm(total=cfg.steps, initial=self.start_step, desc="rl", unit="step") as bar:
                step = self.start_step
                while step < cfg.steps:
                    try:
                        self._supervised(functools.partial(self.train_step, step, bar), step)
                    except RanksReplaced:
                        self._recover(step)
                        bar.n = step = self.start_step
                        continue
                    step += 1
                    bar.update()
                    # The first step of the run, or since a recovery reloaded the last checkpoint.
                    if cfg.freeze_gc_heap and step == self.start_step + 1:
                        self.freeze_heaps()
            self.drain_checkpoints()
            if self.persister is not None:
                # Every checkpoint is on disk: the memory tier's copy of the last one is no longer needed.
                self.persister.close()
                self.persister = None
                shutil.rmtree(self.memory_checkpoints.root, ignore_errors=True)
            self.actor.export_hf(os.path.join(cfg.output_dir, "final_model"))
            self.metrics.plot(
                os.path.join(cfg.output_dir, "reward_curve.png"), f"{cfg.algorithm.name} on {cfg.task.name}"
            )
            return self.metrics.history
        finally:
            if cfg.freeze_gc_heap:
                # The driver outlives the job (a notebook, a test session): what the job leaves is
                # collectable again.
                gc.unfreeze()
            self.metrics.close()
            self.shutdown()


def mean_rows(batch: Batch) -> dict[str, float]:
    """Average per-DP-group metric rows into one value each."""
    return {name: float(batch[name].float().mean()) for name in batch}


def run_job(config: JobConfig) -> list[dict[str, float]]:
    """Connect to (or start) Ray and run the job described by ``config``."""
    if not ray.is_initialized():
        ray.init(
            address=config.ray_address, include_dashboard=_include_dashboard(config), log_to_driver=False
        )
    # Imported here: the asynchronous job builds on this module.
    from raylane.controllers.async_rl import AsyncRLJob

    return (RLJob if config.async_rl is None else AsyncRLJob)(config).run()


def _include_dashboard(config: JobConfig) -> bool | None:
    """Start the dashboard with a local cluster when its packages are installed; go on without it if not."""
    if config.ray_address is not None:
        return None
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing:
        logger.warning(
            "starting Ray without its dashboard (%s): install ray[default] to watch the job and its "
            "raylane_ metrics there",
            missing,
        )
        return False
    return True
