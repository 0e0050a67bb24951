"""A decoder with a scalar head: the critic of PPO and the reward model.

The backbone keeps the policy's parameter names (``model.*``), so a critic starts from the policy
checkpoint; the head is Hugging Face's ``score`` (as in ``LlamaForSequenceClassification``).
"""

from __future__ import annotations

import torch
from torch import nn

from raylane.models.checkpoint import iter_checkpoint_tensors
from raylane.models.config import ModelConfig
from raylane.models.layers import TensorParallelGroup
from raylane.models.transformer import DecoderModel, WeightLoadError, dense_inputs


class ValueModel(nn.Module):
    """``forward`` returns one value per token, ``[B, L]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, TensorParallelGroup())
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        position_ids, attention = dense_inputs(input_ids, attention_mask, position_ids)
        return self.score(self.model(input_ids, position_ids, attention)).squeeze(-1)

    @classmethod
    def from_pretrained(
        cls, model_dir: str, dtype: torch.dtype = torch.float32, require_head: bool = False
    ) -> ValueModel:
        """Backbone from a causal-LM or value checkpoint; a missing ``score`` head starts at zero
        (a critic) or, with ``require_head`` (a reward model), is an error."""
        config = ModelConfig.from_pretrained(model_dir)
        model = cls(config).to(dtype)
        params = dict(model.named_parameters())
        seen = set()
        with torch.no_grad():
            for name, tensor in iter_checkpoint_tensors(model_dir):
                if name in params:
                    if params[name].shape != tensor.shape:
                        raise WeightLoadError(
                            f"{name}: got {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                        )
                    params[name].copy_(tensor)
                    seen.add(name)
            if "score.weight" not in seen:
                if require_head:
                    raise WeightLoadError(
                        f"{model_dir!r} has no 'score.weight': a reward model needs a trained score head"
                    )
                model.score.weight.zero_()
                seen.add("score.weight")
        missing = sorted(set(params) - seen)
        if missing:
            raise WeightLoadError(f"value model checkpoint {model_dir!r} lacks tensors {missing[:8]}")
        return model
