"""The decoder-only transformer shared by the trainer and the runner.

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight`` ...), so a
checkpoint loads by name and weights travel between trainer and runner without renaming.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raylane.models.attention import AttentionContext, DenseAttention, segment_ids_from_positions
from raylane.models.config import ModelConfig
from raylane.models.layers import (
    ColumnParallelLinear,
    FusedLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SwiGLU,
    TensorParallelGroup,
    linear,
)


class WeightLoadError(ValueError):
    """Weights do not fit the model; the message names the tensors and what was expected."""


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp.size
        if config.num_key_value_heads % tp.size != 0:
            raise ValueError(
                f"num_key_value_heads ({config.num_key_value_heads}) must be divisible by "
                f"tensor_parallel_size ({tp.size})"
            )
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        q_out, kv_out = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(hidden, q_out, bias, tp, "num_attention_heads * head_dim")
        self.k_proj = ColumnParallelLinear(hidden, kv_out, bias, tp, "num_key_value_heads * head_dim")
        self.v_proj = ColumnParallelLinear(hidden, kv_out, bias, tp, "num_key_value_heads * head_dim")
        self.o_proj = RowParallelLinear(q_out, hidden, False, tp, "num_attention_heads * head_dim")
        self.qkv: FusedLinear | None = None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, attention: AttentionContext
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = attention.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, layer_idx, tp)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, attention: AttentionContext
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        # Training only: recompute each layer's activations in backward instead of keeping them.
        self.activation_checkpointing = False

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, positions, self.rotary_emb, attention, use_reentrant=False)
            else:
                x = layer(x, positions, self.rotary_emb, attention)
        return self.norm(x)


def dense_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, DenseAttention]:
    """Position ids and attention context of a padded (mask) or packed (restarting positions) batch."""
    segment_ids = None
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    elif bool((position_ids[:, 1:] == 0).any()):
        segment_ids = segment_ids_from_positions(position_ids)
    return position_ids, DenseAttention(attention_mask, segment_ids)


class CausalLM(nn.Module):
    """Decoder plus LM head.

    ``forward`` is the training path (logits of whole sequences; what FSDP wraps). The runner calls
    ``hidden_states`` with its paged attention context and projects only the rows it samples from
    with ``compute_logits``.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallelGroup()
        self.model = DecoderModel(config, self.tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionContext
    ) -> torch.Tensor:
        """Final-norm hidden states for any attention context (the runner passes its paged one)."""
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight)

    def fuse_projections(self) -> None:
        """Run q/k/v and gate/up as one matrix multiply each (the runner's layout; see :class:`FusedLinear`).

        Parameter names and shapes stay those of Hugging Face. Call it once the model is on its
        device in its dtype; :meth:`unfuse_projections` undoes it before the parameters move again.
        """
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
            mlp.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])

    def unfuse_projections(self) -> None:
        """Back to one matrix multiply per projection; the parameters stay views until they move."""
        for layer in self.model.layers:
            layer.self_attn.qkv = None
            layer.mlp.gate_up = None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training forward over ``[B, L]`` tokens, padded (``attention_mask``) or packed (``position_ids``).

        Returns logits ``[B, L, V]``. Packed rows hold several sequences back to back whose position
        ids restart at 0. Left padding is handled by deriving positions from the mask.
        """
        position_ids, attention = dense_inputs(input_ids, attention_mask, position_ids)
        return self.compute_logits(self.model(input_ids, position_ids, attention))

    # ---- weights by Hugging Face name -------------------------------------------------------------

    def weight_names(self) -> list[str]:
        """Names of the tensors a full checkpoint of this model holds (tied head omitted)."""
        return [name for name, _ in self.named_parameters() if not self._is_tied_head(name)]

    def _is_tied_head(self, name: str) -> bool:
        return self.config.tie_word_embeddings and name == "lm_head.weight"

    def tp_shard_dim(self, name: str) -> int | None:
        """The dimension tensor-parallel ranks split parameter ``name`` on (None: replicated)."""
        module_name, _, leaf = name.rpartition(".")
        return getattr(self.get_submodule(module_name), "TP_SHARD_DIMS", {}).get(leaf)

    def shard_for_rank(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's slice of the full (unsharded) tensor ``name``."""
        dim = self.tp_shard_dim(name)
        if dim is None or self.tp.size == 1:
            return full
        return full.chunk(self.tp.size, dim=dim)[self.tp.rank]

    @torch.no_grad()
    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], strict: bool = True
    ) -> list[str]:
        """Copy full Hugging Face tensors into the parameters in place, sharding them for TP.

        With ``strict`` every parameter must be given. Returns the names loaded. Raises
        :class:`WeightLoadError` naming unknown, missing or mis-shaped tensors.
        """
        params = dict(self.named_parameters())
        loaded, unknown, misshaped = [], [], []
        for name, tensor in named_tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if self._is_tied_head(name):
                # Some tied checkpoints store the head too; it must equal the embedding.
                continue
            if name not in params:
                unknown.append(name)
                continue
            shard = self.shard_for_rank(name, tensor)
            param = params[name]
            if shard.shape != param.shape:
                misshaped.append(f"{name}: got {tuple(tensor.shape)}, expected {self._full_shape(name)}")
                continue
            param.copy_(shard)
            loaded.append(name)
        problems = []
        if unknown:
            problems.append(f"unexpected tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        if misshaped:
            problems.append("mis-shaped tensors: " + "; ".join(misshaped[:8]))
        if strict:
            missing = sorted(set(self.weight_names()) - set(loaded))
            if missing:
                problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise WeightLoadError(
                f"weights do not match the {self.config.architecture} described by config.json: "
                + " | ".join(problems)
            )
        return loaded

    def _full_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.get_parameter(name).shape)
        dim = self.tp_shard_dim(name)
        if dim is not None:
            shape[dim] *= self.tp.size
        return tuple(shape)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Unsharded shape of every checkpoint tensor."""
        return {name: self._full_shape(name) for name in self.weight_names()}
