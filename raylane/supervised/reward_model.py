"""Reward-model training: the value-head model on preference pairs with a Bradley-Terry loss.

The reward of a sequence is the value head's output at its last token, the token
:class:`~raylane.roles.RewardWorker` reads when it scores an RL response, so the exported model
plugs into an RL job as ``task.reward_model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raylane.batch import Batch
from raylane.models import Tokenizer, ValueModel
from raylane.supervised.config import RewardModelJobConfig
from raylane.supervised.data import PreferencePair, load_preference_pairs, pair_rows
from raylane.supervised.loop import Ranks


def pair_rewards(model: nn.Module, rows: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` rewards ``[b]`` of rows built by :func:`~raylane.supervised.data.pair_rows`:
    both sequences of every pair in one forward, each read at its last token."""
    input_ids = torch.cat([rows["chosen_ids"], rows["rejected_ids"]]).to(device)
    attention_mask = torch.cat([rows["chosen_mask"], rows["rejected_mask"]]).to(device)
    values = model(input_ids, attention_mask=attention_mask).float()
    last = attention_mask.sum(1) - 1
    return values.gather(1, last[:, None]).squeeze(1).chunk(2)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(r_chosen - r_rejected)``, averaged over the pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


class RewardModelObjective:
    """The :class:`~raylane.supervised.loop.Objective` of ``raylane train-rm``."""

    prefix = "rm"

    def __init__(
        self, config: RewardModelJobConfig, model_dir: str, train_file: str, eval_file: str | None
    ) -> None:
        self.config = config
        self.model_dir = model_dir
        tokenizer = Tokenizer.from_pretrained(model_dir)
        self.pad_id = tokenizer.pad_token_id or 0
        self.train = load_preference_pairs(train_file, tokenizer, config.max_length)
        self.held_out = load_preference_pairs(eval_file, tokenizer, config.max_length) if eval_file else []

    def build_model(self, device: torch.device) -> nn.Module:
        return ValueModel.from_pretrained(self.model_dir, torch.float32).to(device)

    def train_examples(self) -> Sequence[PreferencePair]:
        return self.train

    def rows(self, pairs: Sequence[PreferencePair]) -> Batch:
        return pair_rows(pairs, self.pad_id)

    def tokens(self, rows: Batch) -> int:
        return int(rows["chosen_mask"].sum() + rows["rejected_mask"].sum())

    def loss(self, model: nn.Module, micro: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_rewards(model, micro, next(model.parameters()).device)
        loss = bradley_terry_loss(chosen, rejected)
        return loss, {"rm/loss": float(loss), "rm/pair_accuracy": float((chosen > rejected).float().mean())}

    def evaluate(self, model: nn.Module, ranks: Ranks) -> dict[str, float]:
        """``eval_pair_accuracy``: held-out pairs whose chosen completion gets the higher reward."""
        if not self.held_out:
            return {}
        mine, real = ranks.shard(self.held_out[: self.config.eval_examples])
        correct = 0
        with torch.no_grad():
            for start in range(0, len(mine), self.config.micro_batch_size):
                chunk = mine[start : start + self.config.micro_batch_size]
                chosen, rejected = pair_rewards(model, pair_rows(chunk, self.pad_id), ranks.device)
                wins = (chosen > rejected).tolist()
                correct += sum(win for i, win in enumerate(wins) if start + i < real)
        right, total = ranks.total(correct, real)
        return {"eval_pair_accuracy": right / total}
