"""The streaming asynchronous RL dataflow: generation and training overlap through a rollout stream.

Two loops share the driver:

    rollout thread:  admit groups (staleness bound) -> rollout.stream_generate -> groups put in the stream
    trainer (main):  stream.get -> select a batch (deadlines) -> train_batch -> weight sync -> checkpoint,
                     then commit the batch's entries

The rollout engine waits for the trainer only when the bound admits nothing more: a weight sync
lands between two of its calls and the samples in flight carry on (``async_rl.partial_rollout``).
The trainer waits for groups still generating only as long as the deadlines require (see
``StalenessBound.select_batch``). Training is exactly-once by trajectory uid through the stream
(``raylane.streaming``); a checkpoint saves the receipts of the batches not yet acknowledged and
commits them once it is complete on disk, and a resumed job commits them again. A rollout engine
that dies is replaced while the trainer goes on: the new one joins with the current weights and
generates again the groups the dead one held.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter, deque

from raylane.actors import WorkerGroupError
from raylane.controllers.config import JobConfig
from raylane.controllers.rl import PhaseTimer, RLJob
from raylane.rlhf import PromptExample, PromptLoader, StalenessBound, groups_to_batch
from raylane.roles.partial_rollout import GroupRequest, request_seed
from raylane.streaming import Receipt, StreamEntry, open_rollout_stream

logger = logging.getLogger(__name__)

# Entries to read from the stream per call, in batches, and how long a read waits for one.
_READ_BATCHES = 4
_READ_BLOCK_S = 0.05


class GroupAdmission:
    """Hands out the job's groups in order: the prompts of the loader's batches, each with the seed
    the synchronous loop would sample it with, and group ids ``g0, g1, ...``; resumable."""

    def __init__(self, loader: PromptLoader, seed: int) -> None:
        self.loader = loader
        self.seed = seed
        self.started = 0
        self._batches = 0  # loader batches drawn
        self._pending: deque[PromptExample] = deque()
        self._loader_before_pending = loader.state_dict()

    def next(self) -> tuple[str, PromptExample, int]:
        """The next group: its id, prompt and sampling seed."""
        if not self._pending:
            self._loader_before_pending = self.loader.state_dict()
            self._pending.extend(self.loader.next_batch())
            self._batches += 1
        example = self._pending.popleft()
        group_id = f"g{self.started}"
        self.started += 1
        batch_seed = self.seed * 100_003 + self._batches - 1
        return group_id, example, request_seed(batch_seed, example.index)

    def state_dict(self) -> dict:
        return {
            "started": self.started,
            "batches": self._batches,
            "loader": self._loader_before_pending,
            "consumed": self.loader.batch_size - len(self._pending) if self._pending else 0,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._loader_before_pending = self.loader.state_dict()
        self.started, self._batches, self._pending = int(state["started"]), int(state["batches"]), deque()
        if state["consumed"]:
            self._pending.extend(self.loader.next_batch()[state["consumed"] :])


class RolloutEngineDiedError(RuntimeError):
    """The asynchronous job's rollout engine died once more than ``rollout_pool.max_replacements``
    allow: the job stops; the message names its ranks and says how to resume."""


def _group_number(group_id: str) -> int:
    return int(group_id[1:])


class AsyncRLJob(RLJob):
    """An RL job whose rollout engine streams groups to the trainer, within ``async_rl.max_staleness``."""

    def __init__(self, config: JobConfig) -> None:
        if config.async_rl is None:
            raise ValueError("AsyncRLJob needs the async_rl section; RLJob runs the synchronous loop")
        super().__init__(config)
        self.async_config = acfg = config.async_rl
        batch_groups = config.prompts_per_step
        self.bound = StalenessBound(
            batch_groups, acfg.max_staleness, math.ceil(acfg.oversample * batch_groups)
        )
        self.admission = GroupAdmission(self.loader, config.seed)
        self.stream = open_rollout_stream(acfg.stream, acfg.consumer)
        self.trained_log = os.path.join(config.output_dir, "trained.jsonl")
        self._base_version = 0  # the policy version RL started from (after any warm-start)
        self._state = threading.Condition()
        # Guarded by _state: shared with the rollout thread.
        self._admission_version = 0  # the version the engine holds; admission reasons about it
        self._generating: dict[str, int] = {}  # admitted, not yet read back from the stream -> start version
        self._requests: dict[str, GroupRequest] = {}  # the same groups' requests, to generate again
        self._requeued: list[GroupRequest] = []  # held by an engine that died: admitted first
        self._seen: set[str] = set()  # groups read from the stream by this run
        self._engine_seconds = 0.0
        self._samples_in_flight = 0
        self._resumed_samples = 0
        self._rollout_error: BaseException | None = None
        self._syncing = False  # a weight sync is under way: the engine takes no new call
        self._in_call = False  # the rollout thread has a stream_generate call under way
        self._stop = False
        self._thread: threading.Thread | None = None
        # The trainer's own.
        self._ready: list[StreamEntry] = []
        self._uncommitted: list[Receipt] = []
        self._persisting_receipts: dict[int, list[Receipt]] = {}  # by step, until its checkpoint commits
        self._last_step_end = 0.0
        self._engine_seconds_seen = 0.0
        self._engine_replacements = 0

    # ---- set-up and state --------------------------------------------------------------------------

    def build_groups(self) -> None:
        super().build_groups()
        self.rollout.open_stream(self.stream, self.async_config.partial_rollout)

    def driver_state(self) -> dict:
        return {
            "admission": self.admission.state_dict(),
            "base_version": self._base_version,
            # Every batch not yet acknowledged, not only those since the last checkpoint: in lazy mode
            # a resume may start from a memory-tier checkpoint newer than the last one on disk.
            "receipts": [
                r.to_dict()
                for step in sorted(self._persisting_receipts)
                for r in self._persisting_receipts[step]
            ],
        }

    def load_driver_state(self, extra: dict, in_place: bool = False) -> None:
        # In place, the driver's own view of admission (groups started, generating, read) is newer
        # than the checkpoint's and still true: the groups it admitted since are in the stream or
        # generating, and are trained, not admitted again.
        if not in_place:
            self.admission.load_state_dict(extra["admission"])
        self._base_version = int(extra["base_version"])
        # The crash may have come between the checkpoint and its commit: committing again is harmless.
        self.stream.commit(Receipt.from_dict(raw) for raw in extra["receipts"])

    def resume(self, path: str, in_place: bool = False) -> None:
        super().resume(path, in_place)
        # The trained-samples log continues the checkpoint's lineage, as metrics.jsonl does.
        if os.path.exists(self.trained_log):
            with open(self.trained_log) as f:
                kept = [line for line in f if json.loads(line)["step"] <= self.start_step]
            with open(self.trained_log, "w") as f:
                f.writelines(kept)

    def checkpoint(self, step: int) -> str:
        # The receipts saved with this checkpoint are acknowledged once it is committed, not before:
        # a crash mid-persist then has the stream deliver the batches again to the resumed run.
        self._persisting_receipts[step] = self._uncommitted
        path = super().checkpoint(step)
        self._uncommitted = []
        return path

    def checkpoint_committed(self, step: int) -> None:
        # Lazy mode's disk tier skips checkpoints for newer ones: ``step`` covers every one before it.
        for covered in [s for s in self._persisting_receipts if s <= step]:
            self.stream.commit(self._persisting_receipts.pop(covered))

    def warm_start(self) -> None:
        super().warm_start()
        # RL starts here: the first checkpoint (fault tolerance writes one before any step) records it.
        self._base_version = self.version

    def shutdown(self) -> None:
        self._stop_rollout()
        super().shutdown()

    # ---- fault tolerance ---------------------------------------------------------------------------

    def _recover(self, step_in_flight: int) -> None:
        """Trainer ranks were replaced: roll the trainer back to the last checkpoint while the
        rollout engine goes on generating.

        The batches trained since the checkpoint (and the one in flight) were never committed, so
        the stream holds them for this trainer: it delivers them again, with the groups that were
        ready, and the redone steps train them once more; nothing accepted is lost and each
        trajectory is trained once in the run's lineage. Admission carries on from where it was
        (``load_driver_state`` in place). The engine gets the checkpoint's weights as version
        ``v`` again, and the versions after it are numbered again as the redone steps make them;
        groups sampled by the discarded versions keep their numbers, so the staleness bound still
        holds for them as counted, and their behaviour log-probs are the ones they were sampled with.
        """
        with self._state:
            self._ready = []
        self._uncommitted, self._persisting_receipts = [], {}
        self.stream.redeliver()
        super()._recover(step_in_flight)
        with self._state:
            self._admission_version = self.version
            self._state.notify_all()
        self._last_step_end = time.perf_counter()

    # ---- the rollout thread ------------------------------------------------------------------------

    def _start_rollout(self) -> None:
        """Take back what an earlier run of this job left in the stream, then start generating."""
        self._take_all()
        self._admission_version = self.version
        self._last_step_end = time.perf_counter()
        self._start_thread()

    def _start_thread(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._rollout_loop, name="raylane-rollout", daemon=True)
        self._thread.start()

    def _take_all(self) -> None:
        """Read everything the stream holds now into the ready groups."""
        while True:
            entries = self.stream.get(self.bound.batch_groups * _READ_BATCHES)
            if not entries:
                break
            self._take(entries)

    def _admissible(self) -> int:
        """How many groups may start now (called with _state held)."""
        version = self._admission_version - self._base_version
        limit = self.config.steps * self.bound.batch_groups - self.admission.started
        return min(self.bound.admission_capacity(version, self.admission.started), limit)

    def _admit(self) -> list[GroupRequest]:
        """The groups the bound lets start now, after any a dead engine held (called with _state held)."""
        requests, self._requeued = self._requeued, []
        for _ in range(self._admissible()):
            group_id, example, seed = self.admission.next()
            if group_id in self._seen:
                continue  # an earlier run of the job generated it; it is in the stream already
            self._generating[group_id] = self._admission_version
            self._requests[group_id] = GroupRequest(
                group_id=group_id,
                prompt_index=example.index,
                prompt=example.prompt,
                messages=example.messages,
                ground_truth=example.ground_truth,
                reward_fn=example.reward_fn or self.config.task.reward_fn,
                extra=example.extra,
                seed=seed,
            )
            requests.append(self._requests[group_id])
        return requests

    def _rollout_loop(self) -> None:
        try:
            while True:
                with self._state:
                    if self._stop:
                        return
                    if self._syncing:
                        self._state.wait(_READ_BLOCK_S)
                        continue
                    requests = self._admit()
                    if not requests and not self._samples_in_flight:
                        self._state.wait(_READ_BLOCK_S)
                        continue
                    self._in_call = True
                report = self.rollout.stream_generate(requests, self.async_config.engine_steps_per_call)[0]
                with self._state:
                    self._in_call = False
                    self._engine_seconds += report.engine_seconds
                    self._samples_in_flight = report.samples_in_flight
                    self._resumed_samples = report.resumed_samples
                    self._state.notify_all()
        except BaseException as err:  # handed to the trainer loop, which raises it
            with self._state:
                self._in_call = False
                self._rollout_error = err
                self._state.notify_all()

    def _stop_rollout(self) -> None:
        with self._state:
            self._stop = True
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _drain(self) -> None:
        """Let the samples in flight finish into the stream: admitted work is never thrown away."""
        self._stop_rollout()
        while self.rollout.stream_generate([], self.async_config.engine_steps_per_call)[0].samples_in_flight:
            pass

    # ---- the trainer -------------------------------------------------------------------------------

    def _take(self, entries: list[StreamEntry]) -> None:
        skipped, self.stream.skipped_group_ids = self.stream.skipped_group_ids, []
        with self._state:
            for entry in entries:
                self._generating.pop(entry.group.group_id, None)
                self._requests.pop(entry.group.group_id, None)
                self._seen.add(entry.group.group_id)
                self._ready.append(entry)
            lost = sorted(set(skipped) & self._generating.keys(), key=_group_number)
        if lost:
            # Skipped with no copy read by this run: their uids were committed as trained by a step
            # that is not in the checkpoint this run resumed from, so the stream and the job disagree.
            raise RuntimeError(
                f"groups {lost} were generated again but the stream records them as trained already: the "
                "stream holds commits from a later point than this job resumed from; resume from the latest "
                "checkpoint, or give the job a fresh async_rl.stream.stream_key"
            )

    def _replace_engine(self, error: BaseException) -> None:
        """A failed call that involved the rollout engine (the rollout loop's, a weight sync's): if a
        rank of it is dead, start a new engine on its bundles with the current weights and generate
        again the groups the dead one held, while training goes on; else re-raise ``error``.

        The failure may surface on a trainer rank (its weight send finds the connection closed), so
        the engine's ranks are checked, not the reporter blamed. Groups the dead engine finished are
        in the stream already; the ones it was still generating are admitted first to the new engine,
        from their prompts, with the current policy version as their start (their staleness can only
        be lower than it would have been). Past ``rollout_pool.max_replacements`` the job stops with
        :class:`RolloutEngineDiedError`."""
        dead = self.rollout_group.check_alive()
        if not dead:
            raise error
        ranks = ", ".join(f"rank {r} (pid {self.rollout_group.nodes[r].pid})" for r in dead)
        limit = self.config.rollout_pool.max_replacements
        if self._engine_replacements >= limit:
            raise RolloutEngineDiedError(
                f"the rollout engine died: {ranks} of worker group {self.rollout_group.name!r}, after "
                f"{self._engine_replacements} engine replacement(s) this run (rollout_pool.max_replacements="
                f"{limit}), so the job stops here. Look for the cause on its node, then resume from the last "
                f"checkpoint (resume_from={self.last_checkpoint or 'latest'}): with the Redis stream nothing "
                "accepted is lost"
            ) from error
        started = time.monotonic()
        logger.warning("rollout engine died (%s): replacing it; training goes on", ranks)
        with self._state:
            self._stop = True
        # Killing the old ranks first ends a call the rollout thread may still wait on (a hung engine).
        self.rollout_group.replace_ranks(range(self.rollout_group.world_size))
        self._stop_rollout()
        self.rollout.open_stream(self.stream, self.async_config.partial_rollout)
        self._connect_weight_sync()
        self.weight_sync.sync(self.version)
        self._take_all()
        with self._state:
            lost = sorted(self._generating, key=_group_number)
            self._admission_version = self.version
            for group_id in lost:
                self._generating[group_id] = self.version
            self._requeued = [self._requests[group_id] for group_id in lost]
            self._rollout_error, self._samples_in_flight = None, 0
        self._engine_replacements += 1
        self._start_thread()
        self._carried_metrics.update(
            {
                "rollout/engine_replacements": float(self._engine_replacements),
                "rollout/requeued_groups": float(len(lost)),
                "rollout/engine_recovery_s": time.monotonic() - started,
            }
        )
        logger.warning(
            "rollout engine replaced in %.1f s; %d group(s) it held generate again: %s",
            time.monotonic() - started,
            len(lost),
            lost,
        )

    def sync_weights(self) -> None:
        # The engine's call in progress ends at its next step and no new one starts before the sync:
        # the weights land within a step instead of waiting out engine_steps_per_call.
        with self._state:
            self._syncing = True
            in_call = self._in_call
        try:
            if in_call:
                self.rollout.yield_stream()
            super().sync_weights()
            with self._state:
                # The engine's next call admits the groups the new version allows.
                self._admission_version = self.version
        except WorkerGroupError as error:
            # A new engine gets the current weights as it joins.
            self._replace_engine(error)
        finally:
            with self._state:
                self._syncing = False
                self._state.notify_all()

    def _next_batch(self) -> list[StreamEntry]:
        """Wait for the batch the bound allows at the current version; returns its entries in
        admission order (with max_staleness 0, the synchronous loop's batch row for row)."""
        version = self.version - self._base_version
        while True:
            with self._state:
                failed = self._rollout_error
            if failed is not None:
                self._replace_engine(failed)
            with self._state:
                chosen = self.bound.select_batch(
                    version,
                    [entry.group.start_version - self._base_version for entry in self._ready],
                    [start - self._base_version for start in self._generating.values()],
                )
                # Every admitted group read back and none may start: a batch is ready unless some were lost.
                stalled = chosen is None and not self._generating and self._admissible() <= 0
            if chosen is not None:
                break
            entries = self.stream.get(self.bound.batch_groups * _READ_BATCHES, block_s=_READ_BLOCK_S)
            # Stalled only once the stream has nothing more: after a rollback in place every group was
            # read back once already, and the stream delivers again the ones not trained.
            if stalled and not entries:
                raise RuntimeError(
                    f"{len(self._ready)} groups are ready, none is generating and none may start, but a "
                    f"batch needs {self.bound.batch_groups}: the rest were committed as trained by a step "
                    "that is not in the checkpoint this run resumed from; resume from the latest checkpoint"
                )
            self._take(entries)
        batch = [self._ready[i] for i in chosen]
        self._ready = [entry for i, entry in enumerate(self._ready) if i not in set(chosen)]
        return sorted(batch, key=lambda entry: _group_number(entry.group.group_id))

    def rl_step(self, step: int) -> dict[str, float]:
        if self._thread is None:
            self._start_rollout()
        phase = PhaseTimer(self._memory_probes)
        start = self._last_step_end
        with phase("wait"):
            entries = self._next_batch()
        groups = [entry.group for entry in entries]
        policy_version = self.version
        batch = groups_to_batch(groups, self.tokenizer.pad_token_id or 0)
        batch.meta["n"] = self.config.rollout.n
        metrics = self.train_batch(batch, phase)
        self._uncommitted += [entry.receipt for entry in entries]
        with self._state:
            engine_seconds = self._engine_seconds - self._engine_seconds_seen
            self._engine_seconds_seen = self._engine_seconds
            samples_in_flight, resumed = self._samples_in_flight, self._resumed_samples
        self._log_trained(step + 1, policy_version, groups)
        if step + 1 == self.config.steps:
            self._drain()
        end = time.perf_counter()
        self._last_step_end = end
        wall = max(end - start, 1e-9)
        metrics.update(staleness_metrics(groups, policy_version, self.bound.bound))
        metrics.update(
            {
                "stream/depth": float(self.stream.depth()),
                "rollout/samples_in_flight": float(samples_in_flight),
                "rollout/resumed_samples": float(resumed),
                "rollout/engine_busy_fraction": min(1.0, engine_seconds / wall),
                "trainer/idle_fraction": phase.seconds["wait"] / wall,
                "throughput/samples_per_s": len(batch) / wall,
            }
        )
        metrics.update({f"timing/{name}_s": seconds for name, seconds in phase.seconds.items()})
        metrics["timing/step_s"] = wall
        return metrics

    def _log_trained(self, step: int, policy_version: int, groups) -> None:
        """One line per step: the policy version that trained, and each trajectory's token versions."""
        record = {
            "step": step,
            "policy_version": policy_version,
            "trajectories": {t.uid: list(t.weight_versions) for g in groups for t in g.trajectories},
        }
        with open(self.trained_log, "a") as f:
            f.write(json.dumps(record) + "\n")


def staleness_metrics(groups, policy_version: int, bound: int) -> dict[str, float]:
    """Token staleness (versions between the token's policy and the training one): max and mean;
    and how many groups started each number of versions before, up to the bound."""
    tokens = [policy_version - v for g in groups for t in g.trajectories for v in t.weight_versions]
    by_group = Counter(policy_version - g.start_version for g in groups)
    return {
        "rollout/staleness_max": float(max(tokens, default=0)),
        "rollout/staleness_mean": sum(tokens) / max(len(tokens), 1),
        **{f"rollout/staleness_groups_{s}": float(by_group.get(s, 0)) for s in range(bound + 1)},
    }
