"""SFT and reward-model training as Ray Train jobs (real TorchTrainer workers, CPU, gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import pytest
import torch

from raylane.config import ConfigError, load_config
from raylane.models import Tokenizer
from raylane.rlhf import DatasetError
from raylane.supervised import (
    RewardModelJobConfig,
    SFTJobConfig,
    completion_nll,
    load_sft_examples,
    packed_rows,
    padded_rows,
    run_reward_model_training,
    run_sft,
)
from tests.conftest import child_env

# A small decoder: big enough to learn the toy tasks within a few dozen steps on 2 cores.
_SHAPE = (
    "model.tiny_shape={hidden_size: 96, intermediate_size: 256, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}"
)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def _history(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- data ------------------------------------------------------------------------------------------


def test_chat_rows_train_on_the_last_assistant_message_only(tmp_path, tiny_model_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "abc>"}, {"role": "assistant", "content": "cba"}]
    path = _write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": messages}, {"prompt": "xy>", "completion": "yx"}]
    )
    chat, plain = load_sft_examples(path, tokenizer, max_length=64)
    assert chat.prompt_ids == tokenizer.encode(tokenizer.apply_chat_template(messages[:1]))
    assert chat.completion_ids == [*tokenizer.encode("cba", add_special_tokens=False), tokenizer.eos_token_id]
    rows = padded_rows([chat, plain], pad_id=0)
    # The loss covers exactly the completion tokens (answer + end of sequence) of each row.
    assert rows["loss_mask"].sum(1).tolist() == [4, 3]
    assert rows["input_ids"][1, rows["loss_mask"][1].bool()].tolist() == plain.completion_ids


def test_too_long_and_malformed_rows_name_their_line(tmp_path, tiny_model_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    path = _write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}, {"prompt": "x" * 40, "completion": "y"}]
    )
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: .*over max_length"):
        load_sft_examples(path, tokenizer, max_length=16)
    path = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "ab"}])
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: 'completion' must be a string"):
        load_sft_examples(path, tokenizer, max_length=16)


def test_packed_rows_give_each_example_the_loss_it_has_alone(tmp_path, tiny_model_dir):
    from raylane.models import load_model

    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": p, "completion": c} for p, c in (("abc>", "cba"), ("hello>", "olleh"), ("xy>", "yx"))]
    examples = load_sft_examples(_write_jsonl(tmp_path / "s.jsonl", rows), tokenizer, max_length=32)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        packed = packed_rows(examples, max_length=32, pad_id=0)
        assert len(packed) == 1  # all three share one row
        nll, mask = completion_nll(model, packed, torch.device("cpu"))
        alone = [completion_nll(model, padded_rows([e], 0), torch.device("cpu")) for e in examples]
    assert mask.sum() == sum(m.sum() for _, m in alone)
    expected = torch.cat([n[m.bool()] for n, m in alone])
    assert torch.allclose(nll[mask.bool()], expected, atol=1e-5)


def test_elastic_worker_counts_are_validated():
    config = load_config(SFTJobConfig, None, ["ray.num_workers=3", "ray.min_workers=2"])
    assert config.ray.worker_counts == (2, 3)
    with pytest.raises(ConfigError, match="min_workers"):
        load_config(SFTJobConfig, None, ["ray.num_workers=2", "ray.min_workers=3"])


# ---- Ray Train jobs --------------------------------------------------------------------------------


def test_sft_loss_falls_and_held_out_exact_match_rises(ray_cluster, tmp_path):
    out = str(tmp_path / "sft")
    config = load_config(
        SFTJobConfig,
        None,
        [
            _SHAPE,
            f"output_dir={out}",
            "steps=40",
            "eval_every=20",
            "checkpoint_every=20",
            "ray.num_workers=2",
        ],
    )
    history = run_sft(config)
    assert [r["step"] for r in history] == list(range(41))
    losses = [r["sft/loss"] for r in history[1:]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    exact = [r["eval_exact_match"] for r in history if "eval_exact_match" in r]
    assert exact[0] == 0.0 and exact[-1] >= 0.2, exact
    # The export is a Hugging Face checkpoint the runner and RL load; checkpoints are DCP step_N folders.
    assert os.path.isfile(os.path.join(config.final_model_dir, "config.json"))
    steps = sorted(os.listdir(os.path.join(config.storage_path, "sft")))
    assert {"step_20", "step_40"} <= set(steps), steps
    assert os.path.isfile(os.path.join(config.storage_path, "sft", "step_40", "dcp", ".metadata"))


def test_reward_model_ranks_held_out_pairs_and_plugs_into_rl(ray_cluster, tmp_path):
    from raylane.batch import Batch
    from raylane.roles import RewardWorker

    out = str(tmp_path / "rm")
    config = load_config(
        RewardModelJobConfig,
        None,
        [_SHAPE, f"output_dir={out}", "steps=80", "eval_every=40", "optim.lr=1e-3", "ray.num_workers=2"],
    )
    history = run_reward_model_training(config)
    accuracy = [r["eval_pair_accuracy"] for r in history if "eval_pair_accuracy" in r]
    assert accuracy[0] < 0.7 and accuracy[-1] > 0.9, accuracy
    # As task.reward_model: the RL reward role scores a right answer above a wrong one.
    tokenizer = Tokenizer.from_pretrained(config.final_model_dir)
    with open(os.path.join(out, "data", "pairs_eval.jsonl")) as f:
        pairs = [json.loads(line) for line in f][:20]
    prompts, responses = [], []
    for pair in pairs:
        for answer in (pair["chosen"], pair["rejected"]):
            prompts.append(tokenizer.encode(pair["prompt"]))
            responses.append([*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id])
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    batch = {
        "prompts": torch.zeros(len(prompts), p_len, dtype=torch.long),
        "responses": torch.zeros(len(prompts), r_len, dtype=torch.long),
        "attention_mask": torch.zeros(len(prompts), p_len + r_len, dtype=torch.long),
        "response_mask": torch.zeros(len(prompts), r_len),
    }
    for i, (p, r) in enumerate(zip(prompts, responses)):
        batch["prompts"][i, p_len - len(p) :] = torch.tensor(p)
        batch["responses"][i, : len(r)] = torch.tensor(r)
        batch["attention_mask"][i, p_len - len(p) : p_len + len(r)] = 1
        batch["response_mask"][i, : len(r)] = 1
    scores = RewardWorker(reward_model=config.final_model_dir).compute_rewards(Batch.from_dict(batch))[
        "scores"
    ]
    chosen, rejected = scores[0::2], scores[1::2]
    assert (chosen > rejected).float().mean() >= 0.9, (chosen, rejected)


def _descendant_train_workers() -> list[int]:
    """Pids of the Ray Train workers of this test session's Ray cluster (descendants of this process)."""
    parents, titles = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                titles[int(entry)] = f.read().decode(errors="replace")
        except OSError:
            continue

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, title in titles.items() if "RayTrainWorker" in title and mine(pid)]


def _run_and_kill_a_worker(out: str, every: int, overrides: list[str]) -> None:
    """Run a 40-step SFT job, SIGKILL one of its two workers once a checkpoint is behind it, and check
    that the job restarts from that checkpoint and finishes."""
    config = load_config(
        SFTJobConfig,
        None,
        [_SHAPE, f"output_dir={out}", "steps=40", "eval_every=0", f"checkpoint_every={every}", *overrides],
    )
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(history=run_sft(config)), daemon=True)
    job.start()
    metrics_path = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + 300
    seen = 0
    while seen < every + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        if os.path.isfile(metrics_path):
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                seen = max([0, *(record["step"] for record in _history(out))])
    workers = _descendant_train_workers()
    assert seen >= every + 3 and len(workers) == 2, (seen, workers)
    os.kill(workers[-1], signal.SIGKILL)
    job.join(timeout=300)
    history = result["history"]
    assert [r["step"] for r in history] == list(range(41))
    resumed = [r["resumed_from_step"] for r in history if "resumed_from_step" in r]
    # One restart, from the last checkpoint before the kill: at most one interval of steps lost.
    assert len(resumed) == 1 and resumed[0] % every == 0, resumed
    assert every <= resumed[0] and seen - resumed[0] <= every, (resumed, seen)
    assert history[-1]["sft/loss"] < 0.5 * history[1]["sft/loss"]


def test_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, tmp_path, monkeypatch):
    # Ray Train's default poll (2 s; the suite's is 0.25 s, tests/conftest.py): a checkpoint report
    # waits longest for the controller then, which is what the loop's second report is there for.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    _run_and_kill_a_worker(str(tmp_path / "sft_kill"), 5, ["ray.num_workers=2", "ray.max_failures=1"])


def test_elastic_run_starts_with_the_workers_that_fit(ray_cluster, tmp_path):
    """(min, max) = (1, 2) workers of 5 CPUs on the 8-CPU cluster: one fits, and the run goes on with it
    (a fixed num_workers=2 would wait for resources that never come)."""
    out = str(tmp_path / "sft_elastic")
    config = load_config(
        SFTJobConfig,
        None,
        [
            _SHAPE,
            f"output_dir={out}",
            "steps=10",
            "eval_every=0",
            "checkpoint_every=5",
            "ray.num_workers=2",
            "ray.min_workers=1",
            "ray.cpus_per_worker=5",
        ],
    )
    history = run_sft(config)
    assert [r["step"] for r in history] == list(range(11))
    step = os.path.join(config.storage_path, "sft_elastic", "step_10")
    assert sorted(f for f in os.listdir(step) if f.startswith("rng_")) == ["rng_rank0.pt"]  # one worker


def test_pipeline_example_runs_end_to_end(tmp_path):
    """SFT -> reward model -> GRPO on it -> raylane serve, as the example driver runs it (own Ray cluster)."""
    import subprocess
    import sys

    from conftest import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "pipeline"
    command = [sys.executable, os.path.join(root, "examples", "pipeline.py"), "--output-dir", str(out)]
    command += ["--sft-steps", "20", "--rm-steps", "40", "--rl-steps", "3", "--port", str(free_port())]
    subprocess.run(command, check=True, env=child_env(), timeout=600, capture_output=True)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert set(summary) == {
        "sft_eval_exact_match",
        "rm_eval_pair_accuracy",
        "rl_reward_model_score_start",
        "rl_reward_model_score_end",
        "served_eval_exact_match",
    }
    assert summary["rm_eval_pair_accuracy"] > 0.8, summary
    # The served model is the GRPO one: its exported weights, answered over HTTP.
    assert os.path.isfile(out / "grpo" / "final_model" / "config.json")
    assert 0.0 <= summary["served_eval_exact_match"] <= 1.0
