"""The reward role: a rule-based verifier picked by name, or a reward model built on the shared decoder."""

from __future__ import annotations

import torch

from raylane.actors.dispatch import Dispatch, register
from raylane.actors.worker import Worker
from raylane.batch import Batch
from raylane.models import ValueModel
from raylane.rlhf.rewards import get_reward_fn
from raylane.roles.training import forward_micro_batches, sequence_inputs


class RewardWorker(Worker):
    """``scores`` [B] for each response.

    With ``reward_fn`` (a registered name or an import path ``"pkg.module:function"``) the score
    is ``fn(response_text, ground_truth, **extra)``, where a row's own ``reward_fn`` column, when
    set, picks the function for that row and its ``extra`` column (a dict: the dataset row's
    other fields) supplies the keyword arguments. With ``reward_model`` (a checkpoint with a
    ``score`` head, as :class:`~raylane.models.ValueModel` saves it) it is the model's output at
    the response's last token.
    """

    def __init__(
        self, reward_fn: str | None = None, reward_model: str | None = None, micro_batch_size: int = 32
    ):
        if (reward_fn is None) == (reward_model is None):
            raise ValueError(
                "a reward role needs exactly one of reward_fn (a verifier name) or reward_model (a path)"
            )
        self.reward_fn = reward_fn
        if reward_fn is not None:
            get_reward_fn(reward_fn)  # an unknown name fails when the role starts, not at the first step
        self.model = None
        if reward_model is not None:
            self.model = ValueModel.from_pretrained(reward_model, require_head=True).to(self.device).eval()
        self.micro_batch_size = micro_batch_size

    def _model_scores(self, batch: Batch) -> torch.Tensor:
        input_ids, attention_mask, prompt_len = sequence_inputs(batch, self.device)
        values = self.model(input_ids, attention_mask=attention_mask).float()
        last = prompt_len + batch["response_mask"].sum(dim=1).long().clamp(min=1) - 1
        return values.gather(1, last[:, None].to(self.device)).squeeze(1).cpu()[:, None]

    def _rule_score(self, batch: Batch, row: int) -> float:
        name = batch["reward_fn"][row] if "reward_fn" in batch else None
        extra = batch["extra"][row] if "extra" in batch else None
        fn = get_reward_fn(name or self.reward_fn)
        return float(fn(batch["response_text"][row], batch["ground_truth"][row], **(extra or {})))

    @register(Dispatch.DP_SHARD)
    def compute_rewards(self, batch: Batch) -> Batch:
        if self.model is not None:
            scores = forward_micro_batches(batch, self.micro_batch_size, self._model_scores).squeeze(1)
        else:
            scores = torch.tensor([self._rule_score(batch, row) for row in range(len(batch))])
        return Batch.from_dict({"scores": scores})
