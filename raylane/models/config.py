"""Model configuration read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfigError(ValueError):
    """A checkpoint's config.json cannot be used; the message says what to change."""


@dataclass
class ModelConfig:
    """The decoder shape shared by the trainer and the runner (Llama / Qwen2 / Mistral family)."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()
        if self.family == "qwen2":
            # Qwen2 always has q/k/v biases; its config.json does not declare them.
            self.attention_bias = True

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {self.architecture!r} in config.json; raylane runs "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (decoder-only Llama/Qwen2/Mistral-style models)"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ModelConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ModelConfigError(
                f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ModelConfigError(
                    f"config.json: rope_scaling type {kind!r} is not supported; use 'llama3', 'linear' or none"
                )
        if self.torch_dtype not in _DTYPES:
            raise ModelConfigError(
                f"config.json: torch_dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ModelConfigError(
                "config.json has no 'architectures' entry; expected e.g. ['LlamaForCausalLM']"
            )
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {architecture!r} in config.json; raylane runs "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (decoder-only Llama/Qwen2/Mistral-style models)"
            )
        family = SUPPORTED_ARCHITECTURES[architecture]
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [key for key in required if key not in raw]
        if missing:
            raise ModelConfigError(f"config.json is missing required keys: {missing}")
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_theta = raw.get("rope_theta")
        rope_scaling = raw.get("rope_scaling")
        # transformers >= 5 nests rope settings under rope_parameters.
        params = raw.get("rope_parameters")
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        use_sliding = raw.get("use_sliding_window", family == "mistral")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=raw.get("head_dim"),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            mlp_bias=raw.get("mlp_bias", False),
            sliding_window=raw.get("sliding_window") if use_sliding else None,
            torch_dtype=dtype,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ModelConfigError(
                f"no config.json in {model_dir!r}; point --model at a Hugging Face checkpoint folder"
            )
        with open(path) as f:
            try:
                raw = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ModelConfigError(f"{path} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(raw)
        except ModelConfigError as err:
            raise ModelConfigError(f"{path}: {err}") from err
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ModelConfigError(
                f"{path} does not describe a supported model ({err!r}): it must be a Hugging Face "
                "config.json object; re-download or re-export the checkpoint"
            ) from err

    def to_hf_dict(self) -> dict[str, Any]:
        """The config in Hugging Face's config.json form."""
        raw = asdict(self)
        raw.pop("architecture")
        eos = raw.pop("eos_token_id")
        raw["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        raw["architectures"] = [self.architecture]
        raw["model_type"] = self.family
        if self.family == "qwen2":
            raw.pop("attention_bias")
            raw["use_sliding_window"] = self.sliding_window is not None
        if self.sliding_window is None:
            raw.pop("sliding_window")
        return raw

    def save(self, model_dir: str) -> None:
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
