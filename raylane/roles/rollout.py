"""The rollout role: raylane's runner, tensor-parallel over the role's TP group, generating for RL.

Every rank of a TP group runs the same engine loop on the same prompts in lockstep: the logits
are identical after the row-parallel all-reduce, so every rank samples the same tokens.
"""

from __future__ import annotations

import logging

import torch

from raylane.actors.dispatch import Dispatch, register
from raylane.batch import Batch
from raylane.models import ModelConfig, TensorParallelGroup, load_model
from raylane.roles.config import RolloutConfig
from raylane.runner import EngineConfig, LLMEngine, SamplingParams
from raylane.runner.engine import resolve_dtype
from raylane.weight_transfer import WeightSyncTarget

logger = logging.getLogger(__name__)


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

    def _prompt_ids(self, batch: Batch, row: int) -> list[int]:
        if "prompt_token_ids" in batch:
            return list(batch["prompt_token_ids"][row])
        if "messages" in batch and batch["messages"][row]:
            text = self.engine.tokenizer.apply_chat_template(batch["messages"][row])
        else:
            text = batch["prompt"][row]
        return self.engine.tokenizer.encode(text)

    @register(Dispatch.DP_SHARD)
    def generate(self, batch: Batch) -> Batch:
        """Rows hold ``prompt`` (or ``messages`` / ``prompt_token_ids``) and any other columns to carry.

        ``batch.meta`` may override ``temperature``, ``n``, ``max_tokens`` and give a ``seed``. Returns
        ``n`` rows per prompt (sample-major within a prompt) with ``prompts``, ``responses``,
        ``attention_mask``, ``response_mask``, ``rollout_log_probs``, ``weight_version``, ``response_text``
        and the input's non-tensor columns repeated.
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
                seed=None if seed is None else (int(seed) * 1_000_003 + int(batch["uid"][row])) % 2**62,
                logprobs=True,
            )
            self.engine.add_request(str(row), prompt_token_ids=ids, sampling_params=params)
        finished = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[int(out.request_id)] = out
        samples = [(row, c) for row in range(len(batch)) for c in finished[row].outputs]
        return self._to_batch(batch, prompt_ids, samples, n)

    def _to_batch(self, batch: Batch, prompt_ids: list[list[int]], samples: list, n: int) -> Batch:
        prompt_len = max(len(prompt_ids[row]) for row, _ in samples)
        response_len = max(1, max(len(c.token_ids) for _, c in samples))
        pad = self.pad_token_id
        # Rows are built as lists and turned into tensors once: a thousand small tensor writes per
        # batch cost more than the engine's own work on short responses.
        prompts, responses, attention, response_mask, log_probs = [], [], [], [], []
        for row, completion in samples:
            ids, out = prompt_ids[row], completion.token_ids
            left, right = prompt_len - len(ids), response_len - len(out)
            prompts.append([pad] * left + ids)
            responses.append(out + [pad] * right)
            attention.append([0] * left + [1] * (len(ids) + len(out)) + [0] * right)
            response_mask.append([1.0] * len(out) + [0.0] * right)
            log_probs.append(list(completion.logprobs) + [0.0] * right)
        rows = [row for row, _ in samples]
        carried = {key: [column[row] for row in rows] for key, column in batch.non_tensors.items()}
        return Batch.from_dict(
            {
                **carried,
                "prompts": torch.tensor(prompts, dtype=torch.long),
                "responses": torch.tensor(responses, dtype=torch.long),
                "attention_mask": torch.tensor(attention, dtype=torch.long),
                "response_mask": torch.tensor(response_mask),
                "rollout_log_probs": torch.tensor(log_probs),
                "weight_version": torch.tensor(
                    [min(c.weight_versions, default=self.engine.weight_version) for _, c in samples]
                ),
                "response_text": [c.text for _, c in samples],
                "sample_index": [c.index for _, c in samples],
            },
            meta={**batch.meta, "n": n},
        )

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
