"""The rollout role: raylane's runner, tensor-parallel over the role's TP group, generating for RL.

Every rank of a TP group runs the same engine loop on the same prompts in lockstep: the logits
are identical after the row-parallel all-reduce, so every rank samples the same tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from raylane.actors.dispatch import Dispatch, register
from raylane.batch import Batch
from raylane.models import ModelConfig, TensorParallelGroup, load_model
from raylane.rlhf.trajectory import TrajectoryGroup, concat_samples, sample_tensors
from raylane.roles.config import RolloutConfig
from raylane.roles.partial_rollout import GroupRequest, PartialRolloutMode, PartialRollouts, request_seed
from raylane.runner import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from raylane.runner.engine import resolve_dtype
from raylane.streaming import RolloutStream
from raylane.weight_transfer import WeightSyncTarget

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamReport:
    """What one :meth:`Rollout.stream_generate` call did."""

    finished: tuple[tuple[str, int], ...]  # (group id, start version) of each group put in the stream
    engine_seconds: float  # inside engine steps
    samples_in_flight: int
    resumed_samples: int  # continuations started so far (abort_resume)


class Rollout(WeightSyncTarget):
    """Generates ``n`` responses per prompt row and returns them in the trainer's batch layout."""

    def __init__(self, model: str, config: RolloutConfig) -> None:
        self.config = config
        engine_config = EngineConfig(
            model=model, **{**config.engine.model_dump(), "device": str(self.device)}
        )
        checkpoint_dtype = ModelConfig.from_pretrained(model).dtype
        dtype = resolve_dtype(engine_config.dtype, checkpoint_dtype, self.device)
        tp = TensorParallelGroup(self.tp_size, self.tp_rank, self.tp_group if self.tp_size > 1 else None)
        self.engine = LLMEngine(engine_config, model=load_model(model, dtype, self.device, tp))
        self.pad_token_id = self.engine.tokenizer.pad_token_id or 0
        self.partial: PartialRollouts | None = None
        self._stream: RolloutStream | None = None
        self._yield_requested = threading.Event()

    def _encode(self, prompt: str | None, messages: list | None) -> list[int]:
        text = self.engine.tokenizer.apply_chat_template(messages) if messages else prompt
        return self.engine.tokenizer.encode(text)

    def _prompt_ids(self, batch: Batch, row: int) -> list[int]:
        if "prompt_token_ids" in batch:
            return list(batch["prompt_token_ids"][row])
        messages = batch["messages"][row] if "messages" in batch else None
        return self._encode(batch["prompt"][row] if "prompt" in batch else None, messages)

    def _step(self) -> list[RequestOutput]:
        """One engine step; the finished requests of streamed groups go to their tracker, the
        other finished ones are returned."""
        if self.partial is None:
            return self.engine.step(return_unfinished=False)
        self.partial.before_step()
        outputs = []
        for out in self.engine.step(return_unfinished=False):
            if self.partial.owns(out.request_id):
                self.partial.take(out)
            else:
                outputs.append(out)
        return outputs

    @register(Dispatch.DP_SHARD, merge=concat_samples)
    def generate(self, batch: Batch) -> Batch:
        """Rows hold ``prompt`` (or ``messages`` / ``prompt_token_ids``) and any other columns to carry.

        ``batch.meta`` may override ``temperature``, ``n``, ``max_tokens`` and give a ``seed``. Returns
        ``n`` rows per prompt (sample-major within a prompt) with ``prompts``, ``responses``,
        ``attention_mask``, ``response_mask``, ``rollout_log_probs``, ``weight_version``, ``response_text``
        and the input's non-tensor columns repeated; its meta adds ``engine_seconds``, the time spent
        in engine steps (the rest of the call is tokenizing, queueing and building the batch).
        """
        cfg, meta = self.config, batch.meta
        n = int(meta.get("n", cfg.n))
        seed = meta.get("seed")
        prompt_ids = [self._prompt_ids(batch, row) for row in range(len(batch))]
        for row, ids in enumerate(prompt_ids):
            params = SamplingParams(
                n=n,
                temperature=float(meta.get("temperature", cfg.temperature)),
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                max_tokens=int(meta.get("max_tokens", cfg.max_tokens)),
                seed=None if seed is None else request_seed(seed, batch["uid"][row]),
                logprobs=True,
            )
            self.engine.add_request(str(row), prompt_token_ids=ids, sampling_params=params)
        finished = {}
        started = time.perf_counter()
        # Groups generating for the stream, if any, progress meanwhile.
        while len(finished) < len(batch):
            for out in self._step():
                finished[int(out.request_id)] = out
        engine_seconds = time.perf_counter() - started
        samples = [(row, c) for row in range(len(batch)) for c in finished[row].outputs]
        return self._to_batch(batch, prompt_ids, samples, n, engine_seconds)

    def _to_batch(
        self, batch: Batch, prompt_ids: list[list[int]], samples: list, n: int, engine_seconds: float
    ) -> Batch:
        rows = [row for row, _ in samples]
        tensors = sample_tensors(
            [prompt_ids[row] for row in rows],
            [c.token_ids for _, c in samples],
            [c.logprobs for _, c in samples],
            self.pad_token_id,
        )
        carried = {key: [column[row] for row in rows] for key, column in batch.non_tensors.items()}
        return Batch.from_dict(
            {
                **carried,
                **tensors,
                "weight_version": torch.tensor(
                    [min(c.weight_versions, default=self.engine.weight_version) for _, c in samples]
                ),
                "response_text": [c.text for _, c in samples],
                "sample_index": [c.index for _, c in samples],
            },
            meta={**batch.meta, "n": n, "engine_seconds": engine_seconds, "pad_token_id": self.pad_token_id},
        )

    @register(Dispatch.ONE_TO_ALL)
    def open_stream(self, stream: RolloutStream, mode: PartialRolloutMode) -> None:
        """Generate groups for ``stream`` from now on, carrying samples across weight updates by ``mode``.
        Only the first rank of a tensor-parallel group puts (they all generate the same tokens)."""
        self.partial = PartialRollouts(self.engine, self.config, mode)
        self._stream = stream if self.tp_rank == 0 else None

    @register(Dispatch.ONE_TO_ALL)
    def stream_generate(self, requests: list[GroupRequest], max_steps: int) -> StreamReport:
        """Admit ``requests``, run up to ``max_steps`` engine steps (fewer once nothing is left to
        generate), put the groups that finished into the stream and report."""
        if self.partial is None:
            raise RuntimeError("call open_stream before stream_generate")
        for request in requests:
            self.partial.admit(request, self._encode(request.prompt, request.messages))
        started = time.perf_counter()
        finished: list[TrajectoryGroup] = []
        for step in range(max_steps):
            if not self.engine.has_unfinished_requests() or (step and self._yield()):
                break
            self._step()
            # Into the stream as soon as they finish: the trainer may be waiting for them.
            done = self.partial.pop_finished()
            if self._stream is not None:
                for group in done:
                    self._stream.put_nowait(group)
            finished += done
        engine_seconds = time.perf_counter() - started
        if self._stream is not None:
            self._stream.flush()
        return StreamReport(
            finished=tuple((group.group_id, group.start_version) for group in finished),
            engine_seconds=engine_seconds,
            samples_in_flight=self.partial.samples_in_flight,
            resumed_samples=self.partial.resumed_samples,
        )

    @register(Dispatch.ONE_TO_ALL, control=True)
    def yield_stream(self) -> None:
        """End the :meth:`stream_generate` call in progress after its current engine step, so that a
        weight sync queued behind it starts now instead of after ``max_steps``.

        Runs on the control thread, beside that call; a request that finds no call running ends the
        next one after its first step. Tensor-parallel engines ignore it (their ranks must stop at
        the same step) and yield at the end of each call.
        """
        self._yield_requested.set()

    def _yield(self) -> bool:
        if self.tp_size > 1 or not self._yield_requested.is_set():
            return False
        self._yield_requested.clear()
        return True

    @register(Dispatch.ONE_TO_ALL)
    def sleep(self) -> None:
        """Release the KV cache (and offload weights, if configured) while colocated trainers train."""
        self.engine.sleep(offload_weights=self.config.offload_weights_when_idle)

    @register(Dispatch.ONE_TO_ALL)
    def wake_up(self) -> None:
        self.engine.wake_up()

    def weight_sync_engine(self) -> LLMEngine:
        return self.engine

    @register(Dispatch.ONE_TO_ALL)
    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> int:
        """Load full Hugging Face tensors (each rank keeps its TP slice) as weight ``version``."""
        self.engine.update_weights(named_tensors, version)
        return self.engine.weight_version

    @register(Dispatch.ONE_TO_ALL)
    def weight_version(self) -> int:
        return self.engine.weight_version
