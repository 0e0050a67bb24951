"""The synchronous RL job end to end on real Ray actors (gloo): placements, algorithms, checkpoints."""

from __future__ import annotations

import gc
import json
import os
import urllib.request

import pytest
import torch
from ray import serve

from raylane.controllers import JobConfig, RLJob
from raylane.models import load_model, make_tiny_model
from raylane.runner import LLM, SamplingParams
from raylane.serving import ServingConfig, deploy, undeploy
from tests.conftest import free_port


def _config(tmp_path, name: str, **overrides) -> JobConfig:
    base = {
        "output_dir": str(tmp_path / name),
        "steps": 2,
        "prompts_per_step": 4,
        "eval_every": 0,
        "eval_prompts": 8,
        "task": {"name": "add2", "n_train": 64, "n_eval": 8},
        "rollout": {"n": 2, "max_tokens": 4},
        "actor": {"micro_batch_size": 4, "optim": {"lr": 1e-3}},
        "placement": {"trainer_ranks": 2, "cpus_per_bundle": 0.5},
        "sft": {"steps": 0},
        "model": {"tiny_shape": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            base.setdefault(section, {})[field] = value
        else:
            base[key] = value
    return JobConfig.model_validate(base)


def _read_metrics(config: JobConfig) -> list[dict]:
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_colocated_grpo_runs_and_exports(ray_cluster, tmp_path):
    config = _config(tmp_path, "colocated")
    history = RLJob(config).run()
    steps = [r["step"] for r in _read_metrics(config)]
    assert steps == [0, 1, 2] and history[-1]["step"] == 2
    assert "eval_reward_mean" in history[0] and "eval_reward_mean" in history[-1]
    for key in ("reward_mean", "actor/pg_loss", "timing/generate_s", "timing/sync_weights_s"):
        assert key in history[-1], key
    # The engine's share of the generate phase: most of it, never all of it (dispatch is not free).
    steps = [r for r in history if "timing/generate_s" in r]
    assert steps and all(0.2 < r["rollout/engine_busy_fraction"] < 1.0 for r in steps), steps
    assert os.path.isfile(os.path.join(config.output_dir, "reward_curve.png"))
    # After the first step the driver and both ranks froze their heaps (the count is in the next
    # step's record); the driver, which outlives the job, is unfrozen at its end.
    assert "gc/frozen_objects" not in history[1]
    assert history[2]["gc/frozen_objects"] > 3 * 10_000
    assert gc.get_freeze_count() == 0
    # The exported policy loads in raylane's runner and in transformers, with the same weights.
    exported = os.path.join(config.output_dir, "final_model")
    out = LLM(exported).generate(["1+2="], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert out[0].outputs[0].finish_reason in ("stop", "length")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    ours = load_model(exported)
    ids = torch.tensor([[49, 43, 50, 61]])
    assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)


def test_disaggregated_ppo_with_reference_runs(ray_cluster, tmp_path):
    config = _config(
        tmp_path,
        "ppo",
        **{
            "algorithm.name": "ppo",
            "algorithm.kl_coef": 0.01,
            "use_reference": True,
            "placement.mode": "disaggregated",
            "placement.trainer_ranks": 1,
            "placement.rollout_ranks": 2,
            "placement.rollout_tp": 2,
            "critic.micro_batch_size": 4,
            "freeze_gc_heap": False,
        },
    )
    history = RLJob(config).run()
    last = history[-1]
    assert last["step"] == 2 and "critic/value_loss" in last and "kl" in last
    assert not any("gc/frozen_objects" in r for r in history)
    assert last["rollout/staleness"] == 0.0


def _weighted_task(tmp_path, train_weights: list[float], eval_weights: list[float]) -> dict:
    """A JSONL task whose rows carry a ``weight`` field, scored by tests.user_code:row_weight
    inside the reward actors (which import it by path: nothing registered it there)."""
    for split, weights in (("train", train_weights), ("eval", eval_weights)):
        rows = [
            {"prompt": f"{i}+{i}=", "ground_truth": str(2 * i), "weight": w} for i, w in enumerate(weights)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "name": None,
        "train_file": str(tmp_path / "train.jsonl"),
        "eval_file": str(tmp_path / "eval.jsonl"),
        "reward_fn": "tests.user_code:row_weight",
    }


def test_reward_function_by_import_path_gets_the_row_fields(ray_cluster, tmp_path):
    task = _weighted_task(tmp_path, [0.5] * 16, [0.0, 0.25, 0.5])
    # Two reward ranks, one rollout rank: the 3 held-out prompts are padded to split over both.
    placement = {"mode": "disaggregated", "trainer_ranks": 2, "rollout_ranks": 1, "cpus_per_bundle": 0.5}
    history = RLJob(_config(tmp_path, "custom-reward", task=task, eval_prompts=3, placement=placement)).run()
    assert [r["reward_mean"] for r in history[1:]] == [0.5, 0.5]
    assert history[0]["eval_reward_mean"] == history[-1]["eval_reward_mean"] == 0.25


def test_ppo_epochs_and_mini_batches_move_the_ratio_and_clip(ray_cluster, tmp_path):
    # Rewards that differ between prompts give REINFORCE++ non-zero advantages from the first step.
    task = _weighted_task(tmp_path, [float(i % 2) for i in range(16)], [0.0, 1.0])
    common = {"task": task, "eval_prompts": 2, "steps": 1, "algorithm.name": "reinforce_plus_plus"}
    # One epoch, one mini-batch: the update's policy is the one that sampled, so the ratio is 1.
    single = RLJob(_config(tmp_path, "single", **common)).run()[-1]
    assert single["advantage_abs_mean"] > 0
    assert single["actor/ppo_kl"] == 0.0 and single["actor/pg_clipfrac"] == 0.0
    # 2 epochs x 2 mini-batches of 4 rows (2 per rank): optimizer steps 2-4 see a moved policy.
    several = RLJob(
        _config(
            tmp_path,
            "several",
            **common,
            **{"actor.ppo_epochs": 2, "actor.mini_batch_size": 4, "actor.optim": {"lr": 0.05}},
        )
    ).run()[-1]
    assert several["actor/ppo_kl"] != 0.0
    assert several["actor/pg_clipfrac"] > 0.0


def test_the_update_s_own_log_probs_train_as_a_separate_pass_does(ray_cluster, tmp_path):
    task = _weighted_task(tmp_path, [float(i % 2) for i in range(16)], [0.0, 1.0])
    common = {
        "task": task,
        "eval_prompts": 2,
        "algorithm.name": "reinforce_plus_plus",
        "actor.optim": {"lr": 0.05},
    }
    runs = {}
    for mode in ("always", "auto"):
        config = _config(tmp_path, mode, **common, **{"actor.recompute_log_probs": mode})
        history = RLJob(config).run()
        runs[mode] = (history[-1], load_model(os.path.join(config.output_dir, "final_model")).state_dict())
    (separate, separate_weights), (own, own_weights) = runs["always"], runs["auto"]
    # One forward pass fewer a step, and the same update: the weights had not moved when it ran.
    assert "timing/log_probs_s" in separate and "timing/log_probs_s" not in own
    assert separate["advantage_abs_mean"] > 0
    for name, value in separate_weights.items():
        assert torch.allclose(own_weights[name], value, atol=1e-6), name
    assert own["actor/pg_loss"] == pytest.approx(separate["actor/pg_loss"], abs=1e-6)
    assert own["rollout/log_prob_gap"] == pytest.approx(separate["rollout/log_prob_gap"], abs=1e-4)
    assert own["actor/ppo_kl"] == 0.0


def test_resume_continues_the_same_run_at_any_dp_size(ray_cluster, tmp_path):
    full = _config(tmp_path, "full", steps=3, checkpoint_every=2)
    reference = RLJob(full).run()[-1]

    checkpoint = os.path.join(full.output_dir, "checkpoints", "step_2")
    resumed = _config(tmp_path, "resumed", steps=3, resume_from=checkpoint)
    again = RLJob(resumed).run()
    assert [r["step"] for r in _read_metrics(resumed)] == [0, 1, 2, 3]
    assert again[-1]["actor/pg_loss"] == pytest.approx(reference["actor/pg_loss"], abs=1e-5)
    assert again[-1]["reward_mean"] == reference["reward_mean"]

    smaller = _config(tmp_path, "dp1", steps=3, resume_from=checkpoint, **{"placement.trainer_ranks": 1})
    resharded = RLJob(smaller).run()
    assert resharded[-1]["actor/pg_loss"] == pytest.approx(reference["actor/pg_loss"], abs=1e-4)


def test_job_publishes_each_policy_version_to_a_serving_app(ray_cluster, tmp_path):
    shape = JobConfig().model.tiny_shape
    model_dir = make_tiny_model(str(tmp_path / "policy"), **shape)
    serving = ServingConfig(
        app_name="rl-publish", models=[{"name": "policy", "engine": {"model": model_dir}}], port=free_port()
    )
    deploy(serving)
    try:
        config = _config(tmp_path, "publish", publish={"app_name": "rl-publish", "model": "policy"})
        config = config.model_copy(update={"model": config.model.model_copy(update={"path": model_dir})})
        RLJob(config).run()
        with urllib.request.urlopen(f"http://127.0.0.1:{serving.port}/v1/models", timeout=30) as response:
            listed = json.load(response)["data"]
        assert [m.get("weight_version") for m in listed if m["id"] == "policy"] == [2]
    finally:
        undeploy(serving)
        serve.shutdown()


def test_reward_model_scores_the_last_response_token(tmp_path):
    from raylane.batch import Batch
    from raylane.models import ValueModel, save_checkpoint, tiny_config
    from raylane.roles import RewardWorker

    config = tiny_config()
    model = ValueModel(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    save_checkpoint(dict(model.named_parameters()), config, str(tmp_path / "rm"))
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    responses = torch.tensor([[10, 11, 0], [12, 13, 14]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    batch = Batch.from_dict(
        {"prompts": prompts, "responses": responses, "attention_mask": attention,
         "response_mask": torch.tensor([[1.0, 1, 0], [1, 1, 1]])}
    )  # fmt: skip
    scores = RewardWorker(reward_model=str(tmp_path / "rm")).compute_rewards(batch)["scores"]
    with torch.no_grad():
        values = model(torch.cat([prompts, responses], 1), attention_mask=attention)
    assert torch.allclose(scores, torch.stack([values[0, 4], values[1, 5]]), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        RewardWorker(reward_fn="exact_match", reward_model=str(tmp_path / "rm"))


def test_reward_rows_pick_their_function_and_pass_their_fields():
    from raylane.batch import Batch
    from raylane.roles import RewardWorker

    batch = Batch.from_dict(
        {
            "response_text": ["12", "12", "13"],
            "ground_truth": ["12", "12", "12"],
            "reward_fn": [None, "exact_match", "exact_match"],
            "extra": [{"weight": 0.25}, {"weight": 0.75}, {}],
        }
    )
    worker = RewardWorker(reward_fn="tests.user_code:row_weight")
    assert worker.compute_rewards(batch)["scores"].tolist() == [0.25, 1.0, 0.0]
    with pytest.raises(ValueError, match="no 'nope'"):
        RewardWorker(reward_fn="tests.user_code:nope")
