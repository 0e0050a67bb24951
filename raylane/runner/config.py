"""Typed engine configuration; every knob has a default that works on a laptop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylane.config import StrictConfig
from raylane.runner.attention import ATTENTION_BACKENDS


class EngineOptions(StrictConfig):
    """Every knob of an :class:`~raylane.runner.LLMEngine` but the model: what a role that brings its
    own model (the RL rollout) exposes in its config."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    block_size: int = Field(16, ge=16, le=128, description="tokens per KV block")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks; default: sized from memory")
    kv_cache_memory_gib: float | None = Field(None, gt=0, description="KV budget on CPU (default 1 GiB)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1, description="sequences in one batch")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one step")
    max_model_len: int | None = Field(None, ge=2, description="context limit; default: the model's")
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    attention_backend: str = Field(
        "auto", description="'auto' (triton on CUDA, torch on CPU), 'torch' (the exact reference) or 'triton'"
    )
    enforce_eager: bool = Field(
        False, description="run every step eagerly: no CUDA graphs and no torch.compile (CUDA only matters)"
    )
    compile_decode: bool = Field(
        True, description="torch.compile the captured decode step on CUDA (fuses norms, rotary, activations)"
    )
    graph_capture: Literal["eager", "lazy"] = Field(
        "eager",
        description="'eager' captures every decode batch-size bucket at start-up; 'lazy' captures a "
        "bucket the first time a decode step of that size runs (faster start-up)",
    )
    programmatic_launch: bool | None = Field(
        None,
        description="launch the kernels of the batch-1 decode graph with programmatic dependent launch, "
        "each starting while the one before it finishes (Hopper or newer, triton attention backend); "
        "default: on where supported. Larger batches launch one kernel after another: on an H200 PDL "
        "made batch 256 slower",
    )
    compile_cache_dir: str | None = Field(
        "~/.cache/raylane/compile",
        description="where torch.compile and Triton keep compiled kernels across processes (a later "
        "start-up reuses them); None leaves PyTorch's defaults",
    )
    async_scheduling: bool | None = Field(
        None,
        description="launch each decode step before the previous one's tokens reach the host, hiding "
        "the host's per-step work behind the device's; default: on for CUDA, off on CPU (where the "
        "host is the device and nothing overlaps)",
    )
    seed: int = Field(0, description="seeds requests that do not bring their own")

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name != "auto" and name not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {name!r}; registered: {sorted(ATTENTION_BACKENDS)} (or 'auto')"
            )
        return name

    @model_validator(mode="after")
    def _check_budget(self) -> EngineOptions:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step"
            )
        if self.block_size % 16 != 0:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        return self


class EngineConfig(EngineOptions):
    """How to build an :class:`~raylane.runner.LLMEngine`."""

    model: str = Field(
        description="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)"
    )
