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
    use_matvec_kernel,
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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_projections_match_and_keep_writing_through_names(family):
    """The runner's fused q/k/v and gate/up compute what the separate layers do; writes by name land in them."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config(family))
    init_weights(model, seed=0, std=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases: fused too
                param.normal_(0, 0.1)
    names = [name for name, _ in model.named_parameters()]
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        separate = model(ids)
        model.fuse_projections()
        assert [name for name, _ in model.named_parameters()] == names
        torch.testing.assert_close(model(ids), separate, rtol=1e-5, atol=1e-5)

        # A weight update by Hugging Face name (as update_weights and weight sync do) reaches the fused GEMM.
        replacement = {
            name: torch.randn_like(param)
            for name, param in model.named_parameters()
            if name.startswith("model.layers.0.") and name.endswith(("k_proj.weight", "up_proj.weight"))
        }
        model.load_weights(replacement.items(), strict=False)
        fused_out = model(ids)
        model.unfuse_projections()
        torch.testing.assert_close(model(ids), fused_out, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused_out, separate)


def test_single_row_linear_layers_route_to_the_installed_matvec_kernel():
    """The runner's GEMV hook sees exactly the single-row projections (decode at batch 1), lm_head
    included, and only under no_grad / inference: a forward that records gradients keeps F.linear."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config("qwen2"))
    init_weights(model, seed=0, std=0.1)
    model.fuse_projections()
    calls = []

    def recording_kernel(x, weight, bias):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return torch.nn.functional.linear(x, weight, bias) + 1.0  # visibly not F.linear

    one_token = torch.tensor([[5]])
    with torch.no_grad():
        expected = model(one_token)
        use_matvec_kernel("cpu", recording_kernel)
        try:
            routed = model(one_token)
            many = len(calls)
            model(torch.tensor([[5, 6, 7]]))
            with torch.enable_grad():  # a trainer's forward: the kernel has no backward
                model(one_token).sum().backward()
        finally:
            use_matvec_kernel("cpu", None)
        restored = model(one_token)
    layers = model.config.num_hidden_layers
    # Per layer: fused q/k/v, o, fused gate/up, down; then the head.
    assert many == 4 * layers + 1 and len(calls) == many
    assert calls[-1] == ((1, model.config.hidden_size), (model.config.vocab_size, model.config.hidden_size))
    assert not torch.allclose(routed, expected)
    torch.testing.assert_close(restored, expected)
