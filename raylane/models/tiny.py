"""A tiny random model and byte-level tokenizer, for tests, toy tasks and laptops."""

from __future__ import annotations

from typing import Any

import torch

from raylane.models.checkpoint import save_model
from raylane.models.config import ModelConfig
from raylane.models.tokenizer import make_tiny_tokenizer
from raylane.models.transformer import CausalLM

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def tiny_config(arch: str = "llama", **overrides: Any) -> ModelConfig:
    """A ~0.2 M-parameter decoder over the tiny tokenizer's 259-token vocabulary."""
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(_ARCHITECTURES)}")
    tokenizer = make_tiny_tokenizer()
    fields: dict[str, Any] = {
        "architecture": _ARCHITECTURES[arch],
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": arch == "qwen2",
        "eos_token_id": [tokenizer.eos_token_id, tokenizer.backend.token_to_id("<|im_end|>")],
        "torch_dtype": "float32",
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def init_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Deterministic random initialisation: normal(0, std) matrices, unit norms, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_tiny_model(
    model_dir: str, arch: str = "llama", seed: int = 0, std: float = 0.02, **overrides: Any
) -> str:
    """Write a random tiny checkpoint (config.json, model.safetensors, tokenizer files) to ``model_dir``."""
    config = tiny_config(arch, **overrides)
    model = CausalLM(config)
    init_weights(model, seed, std)
    save_model(model, model_dir)
    make_tiny_tokenizer().save(model_dir)
    return model_dir
