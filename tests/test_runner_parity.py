"""Parity with Hugging Face transformers on the same weights, in float32.

Checkpoints are made and saved by transformers itself (random tiny Llama with llama3 RoPE scaling,
random tiny Qwen2 with tied embeddings and q/k/v biases), then loaded by raylane.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raylane.models import load_model, make_tiny_tokenizer  # noqa: E402
from raylane.runner import LLM, SamplingParams  # noqa: E402

NUM_PROMPTS = 16
NEW_TOKENS = 32
VOCAB = 320


def _hf_config(arch: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        # Large init so the next-token distribution is peaked and argmax is not a near-tie.
        initializer_range=0.3,
        eos_token_id=0,
        bos_token_id=1,
    )
    if arch == "llama":
        return transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_theta=50000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    return transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(
        _hf_config(request.param), dtype=torch.float32
    ).eval()
    path = str(tmp_path_factory.mktemp(f"hf-{request.param}"))
    model.save_pretrained(path)
    make_tiny_tokenizer().save(path)
    return request.param, path, model


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 2, 3, 5, 8, 13, 16, 17, 21, 31, 32, 33, 48, 64, 77, 100]
    assert len(lengths) == NUM_PROMPTS
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    for _ in range(NEW_TOKENS):
        logp = model(ids).logits[0, -1].float().log_softmax(-1)
        token = int(logp.argmax())
        tokens.append(token)
        logprobs.append(float(logp[token]))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


def test_greedy_tokens_and_logprobs_match_transformers(hf_checkpoint):
    arch, path, hf_model = hf_checkpoint
    prompts = _prompts()
    llm = LLM(path, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    worst = 0.0
    for prompt, output in zip(prompts, outputs):
        ref_tokens, ref_logprobs = _hf_greedy(hf_model, prompt)
        sample = output.outputs[0]
        assert sample.token_ids == ref_tokens, f"{arch}: prompt of {len(prompt)} tokens diverged"
        diff = (torch.tensor(sample.logprobs) - torch.tensor(ref_logprobs)).abs().max().item()
        worst = max(worst, diff)
    assert worst < 1e-4, f"{arch}: log-prob differs from transformers by {worst:.2e}"


def test_training_forward_reproduces_runner_logprobs(hf_checkpoint):
    """The trainer's forward (padded batch, and packed rows) recomputes the sampled log-probs."""
    arch, path, _ = hf_checkpoint
    prompts = _prompts()
    llm = LLM(path, dtype="float32", device="cpu")
    params = SamplingParams(
        temperature=0.7, top_p=0.9, seed=3, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = load_model(path, torch.float32)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outputs)]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    with torch.no_grad():
        padded_logits = model(input_ids, attention_mask=mask)
        packed_ids = torch.tensor([[t for seq in seqs[:4] for t in seq]])
        packed_pos = torch.tensor([[i for seq in seqs[:4] for i in range(len(seq))]])
        packed_logits = model(packed_ids, position_ids=packed_pos)[0]
    offset = 0
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        n = len(prompt)
        targets = torch.tensor(output.outputs[0].token_ids)
        rows = padded_logits[i, n - 1 : n - 1 + NEW_TOKENS] / 0.7
        recomputed = rows.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        runner = torch.tensor(output.outputs[0].logprobs)
        assert torch.allclose(recomputed, runner, atol=1e-4), (
            f"{arch}: padded recompute of prompt {i} differs"
        )
        if i < 4:
            rows = packed_logits[offset + n - 1 : offset + n - 1 + NEW_TOKENS] / 0.7
            packed = rows.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
            assert torch.allclose(packed, runner, atol=1e-4), (
                f"{arch}: packed recompute of prompt {i} differs"
            )
            offset += len(seqs[i])


def test_prompt_logprobs_match_training_forward(hf_checkpoint):
    _, path, hf_model = hf_checkpoint
    prompt = _prompts()[13]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    ref = ref.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert len(out.prompt_logprobs) == len(prompt) - 1
    assert torch.allclose(torch.tensor(out.prompt_logprobs), ref, atol=1e-4)
