"""Supervised fine-tuning: cross-entropy on the completion tokens only; held-out greedy exact match."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raylane.batch import Batch
from raylane.models import Tokenizer, load_model
from raylane.rlhf import log_probs_from_logits, masked_mean
from raylane.supervised.config import SFTJobConfig
from raylane.supervised.data import SFTExample, load_sft_examples, packed_rows, padded_rows
from raylane.supervised.loop import Ranks


def completion_nll(model: nn.Module, rows: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood ``[B, L-1]`` of each next token, and the mask of the ones that
    are completion tokens (padded or packed rows as :mod:`raylane.supervised.data` builds them)."""
    input_ids = rows["input_ids"].to(device)
    position_ids = rows["position_ids"].to(device) if "position_ids" in rows else None
    logits = model(input_ids, attention_mask=rows["attention_mask"].to(device), position_ids=position_ids)
    log_probs = log_probs_from_logits(logits[:, :-1], input_ids[:, 1:])
    return -log_probs, rows["loss_mask"][:, 1:].to(device)


@torch.no_grad()
def greedy_completions(
    model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int, device: torch.device
) -> list[list[int]]:
    """Greedy continuations of left-padded ``prompts`` by full forwards (no KV cache: exact, and cheap
    for a held-out check). Always runs ``max_new_tokens`` forwards, so sharded ranks stay in step."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, device=device)
        attention_mask[row, width - len(ids) :] = 1
    for _ in range(max_new_tokens):
        next_ids = model(input_ids, attention_mask=attention_mask)[:, -1].argmax(-1)
        input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)[:, None]], dim=1)
    return input_ids[:, width:].tolist()


class SFTObjective:
    """The :class:`~raylane.supervised.loop.Objective` of ``raylane sft``."""

    prefix = "sft"

    def __init__(self, config: SFTJobConfig, model_dir: str, train_file: str, eval_file: str | None) -> None:
        self.config = config
        self.model_dir = model_dir
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.train = load_sft_examples(train_file, self.tokenizer, config.max_length)
        self.held_out = load_sft_examples(eval_file, self.tokenizer, config.max_length) if eval_file else []

    def build_model(self, device: torch.device) -> nn.Module:
        return load_model(self.model_dir, torch.float32, device)

    def train_examples(self) -> Sequence[SFTExample]:
        return self.train

    def rows(self, examples: Sequence[SFTExample]) -> Batch:
        if self.config.data.packing:
            return packed_rows(examples, self.config.max_length, self.pad_id)
        return padded_rows(examples, self.pad_id)

    def tokens(self, rows: Batch) -> int:
        return int(rows["attention_mask"].sum())

    def loss(self, model: nn.Module, micro: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        nll, mask = completion_nll(model, micro, next(model.parameters()).device)
        loss = masked_mean(nll, mask)
        return loss, {"sft/loss": float(loss)}

    def evaluate(self, model: nn.Module, ranks: Ranks) -> dict[str, float]:
        """``eval_exact_match``: held-out prompts whose greedy completion is exactly the target."""
        if not self.held_out:
            return {}
        mine, real = ranks.shard(self.held_out[: self.config.eval_examples])
        eos = self.tokenizer.eos_token_id
        correct = 0
        for start in range(0, len(mine), self.config.micro_batch_size):
            chunk = mine[start : start + self.config.micro_batch_size]
            outputs = greedy_completions(
                model,
                [e.prompt_ids for e in chunk],
                self.config.data.eval_max_new_tokens,
                self.pad_id,
                ranks.device,
            )
            for offset, (example, ids) in enumerate(zip(chunk, outputs)):
                ended = ids[: ids.index(eos) + 1] if eos in ids else ids
                correct += int(start + offset < real and ended == example.completion_ids)
        right, total = ranks.total(correct, real)
        return {"eval_exact_match": right / total}
