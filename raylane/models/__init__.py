"""The transformer shared by the trainer and the runner, and Hugging Face checkpoint/tokenizer I/O."""

from raylane.models.attention import AttentionContext, DenseAttention, expand_kv_heads
from raylane.models.checkpoint import (
    check_checkpoint,
    iter_checkpoint_tensors,
    load_model,
    save_checkpoint,
    save_model,
)
from raylane.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError
from raylane.models.layers import TensorParallelGroup, use_matvec_kernel
from raylane.models.tiny import init_weights, make_tiny_model, tiny_config
from raylane.models.tokenizer import Tokenizer, TokenizerError, make_tiny_tokenizer
from raylane.models.transformer import CausalLM, WeightLoadError, dense_inputs
from raylane.models.value_model import ValueModel

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionContext",
    "CausalLM",
    "DenseAttention",
    "ModelConfig",
    "ModelConfigError",
    "TensorParallelGroup",
    "Tokenizer",
    "TokenizerError",
    "ValueModel",
    "WeightLoadError",
    "check_checkpoint",
    "dense_inputs",
    "expand_kv_heads",
    "init_weights",
    "iter_checkpoint_tensors",
    "load_model",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "save_checkpoint",
    "save_model",
    "tiny_config",
    "use_matvec_kernel",
]
