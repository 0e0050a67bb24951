"""`raylane generate` end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from raylane.runner import LLM, SamplingParams


def _raylane(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylane.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_generate_jsonl_in_input_order_with_samples_and_logprobs(tiny_model_dir, tmp_path):
    prompts = [
        {"prompt": "first prompt"},
        {"prompt_token_ids": [5, 6, 7]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    result = _raylane(
        "generate", "--model", tiny_model_dir, "--input", str(src), "--output", str(dst),
        "--max-tokens", "5", "--n", "2", "--seed", "11", "--logprobs", "--ignore-eos", "--temperature", "0.9",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1] * 3
    assert all(len(line["token_ids"]) == 5 == len(line["logprobs"]) for line in lines)
    assert all(line["finish_reason"] == "length" for line in lines)
    # Same outputs as the Python API with the same seed, in input order.
    llm = LLM(tiny_model_dir)
    chat = llm.tokenizer.apply_chat_template(prompts[2]["messages"])
    params = SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=5, ignore_eos=True)
    expected = llm.generate(["first prompt", [5, 6, 7], chat], params, use_tqdm=False)
    assert [line["token_ids"] for line in lines] == [c.token_ids for o in expected for c in o.outputs]


def test_generate_single_prompt_to_stdout(tiny_model_dir):
    result = _raylane(
        "generate", "--model", tiny_model_dir, "--prompt", "hello", "--max-tokens", "4", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert len(record["token_ids"]) <= 4 and "index" not in record and "logprobs" not in record


def test_generate_reports_user_errors(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    result = _raylane("generate", "--model", tiny_model_dir, "--input", str(bad))
    assert result.returncode == 2 and "bad.jsonl:2: not valid JSON" in result.stderr
    result = _raylane("generate", "--model", tiny_model_dir, "--prompt", "x", "--top-p", "2")
    assert result.returncode == 2 and "top_p must be in (0, 1]" in result.stderr
    result = _raylane("generate", "--model", os.path.join(str(tmp_path), "nowhere"), "--prompt", "x")
    assert result.returncode == 2 and "no config.json" in result.stderr
    result = _raylane("generate", "--model", tiny_model_dir, "--prompt", "x" * 600)
    assert result.returncode == 2 and "maximum context length" in result.stderr
