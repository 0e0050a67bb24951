"""Model config parsing, checkpoint round trips and the tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raylane.models import (
    CausalLM,
    ModelConfig,
    ModelConfigError,
    Tokenizer,
    TokenizerError,
    init_weights,
    load_model,
    make_tiny_tokenizer,
    save_model,
    tiny_config,
)
from raylane.models.checkpoint import INDEX_FILE


def test_sharded_checkpoint_round_trip(tmp_path):
    model = CausalLM(tiny_config("qwen2"))
    init_weights(model, seed=3, std=0.1)
    save_model(model, str(tmp_path), max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied
    loaded = load_model(str(tmp_path))
    for name, param in model.named_parameters():
        assert torch.equal(param, loaded.get_parameter(name)), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_config_reads_hf_rope_scaling_and_rejects_bad_configs():
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0},
        "eos_token_id": [1, 2],
    }
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 500000.0 and config.rope_scaling["rope_type"] == "llama3"
    assert config.eos_token_id == [1, 2] and config.head_dim == 8
    with pytest.raises(ModelConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_dict({**raw, "num_key_value_heads": 3})
    with pytest.raises(ModelConfigError, match="missing required keys"):
        ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ModelConfigError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.save(str(tmp_path))
    loaded = Tokenizer.from_pretrained(str(tmp_path))
    text = "12+35=47 héllo"
    ids = loaded.encode(text)
    assert ids[:6] == [ord(c) for c in "12+35="]
    assert loaded.decode(ids) == text
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert loaded.eos_token_id == 256
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        loaded.apply_chat_template([{"content": "no role"}])
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(os.path.dirname(str(tmp_path / "nothing" / "x")))


def test_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_tiny_tokenizer().save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == ours.apply_chat_template(messages)
    assert hf.encode("a b c") == ours.encode("a b c")
