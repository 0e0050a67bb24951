"""The RL job's config reaches every engine knob; what a GPU job needs to start on a machine as it is."""

from __future__ import annotations

import logging
import sys

import pytest
from ray._private.utils import get_dashboard_dependency_error

from raylane.config import ConfigError, load_config
from raylane.controllers.config import COLOCATED_GPU_MEMORY_UTILIZATION, JobConfig
from raylane.controllers.rl import _include_dashboard
from raylane.roles import RolloutConfig
from raylane.runner import EngineConfig, EngineOptions

MAIN_JOB = "examples/grpo_reverse.yaml"


def test_every_engine_knob_is_settable_from_the_job():
    overrides = {
        "gpu_memory_utilization": 0.7,
        "enforce_eager": True,
        "async_scheduling": False,
        "compile_decode": False,
        "graph_capture": "lazy",
        "compile_cache_dir": "/var/cache/raylane",
        "attention_backend": "triton",
        "dtype": "float32",
        "max_model_len": 48,
    }
    config = load_config(JobConfig, MAIN_JOB, [f"rollout.engine.{k}={v}" for k, v in overrides.items()])
    for key, value in overrides.items():
        assert getattr(config.rollout.engine, key) == value, key
    # The engine takes the whole section as it is (plus the model and device the role gives it).
    assert set(EngineOptions.model_fields) == set(EngineConfig.model_fields) - {"model"}


def test_attention_backend_is_checked_against_its_registry():
    with pytest.raises(ConfigError, match=r"unknown attention backend 'flash'; registered: \['torch'"):
        load_config(JobConfig, MAIN_JOB, ["rollout.engine.attention_backend=flash"])


def test_rollout_engine_defaults_are_the_engines_own():
    assert RolloutConfig().engine == EngineOptions()


def test_a_knob_outside_its_section_is_an_error_listing_the_section():
    with pytest.raises(ConfigError, match=r"unknown key 'rollout\.gpu_memory_utilization'.*engine"):
        load_config(JobConfig, MAIN_JOB, ["rollout.gpu_memory_utilization=0.7"])


def test_colocated_engine_leaves_the_gpu_to_its_trainers_unless_told():
    colocated = load_config(JobConfig, MAIN_JOB, [])
    assert colocated.rollout.engine.gpu_memory_utilization == COLOCATED_GPU_MEMORY_UTILIZATION < 0.5
    told = load_config(JobConfig, MAIN_JOB, ["rollout.engine.gpu_memory_utilization=0.6"])
    assert told.rollout.engine.gpu_memory_utilization == 0.6
    alone = load_config(JobConfig, MAIN_JOB, ["placement.mode=disaggregated"])
    assert alone.rollout.engine.gpu_memory_utilization == EngineOptions().gpu_memory_utilization


def test_a_local_cluster_goes_on_without_missing_dashboard_packages(monkeypatch, caplog):
    config = JobConfig()
    if get_dashboard_dependency_error() is None:
        assert _include_dashboard(config) is True
    # What a Ray install without its dashboard extras looks like to Ray's own check.
    monkeypatch.setitem(sys.modules, "ray.dashboard.optional_deps", None)
    with caplog.at_level(logging.WARNING, logger="raylane.controllers.rl"):
        assert _include_dashboard(config) is False
    assert "without its dashboard" in caplog.text
    assert _include_dashboard(config.model_copy(update={"ray_address": "ray://elsewhere:10001"})) is None


def test_async_job_loads_and_says_what_it_needs(caplog):
    config = load_config(JobConfig, "examples/grpo_async.yaml", ["async_rl.max_staleness=4"])
    assert config.async_rl.max_staleness == 4 and config.async_rl.partial_rollout == "abort_resume"
    assert config.actor.loss.off_policy_correction == "decoupled"
    with pytest.raises(ConfigError, match=r"placement\.mode=disaggregated with one rollout replica"):
        load_config(JobConfig, "examples/grpo_async.yaml", ["placement.mode=colocated"])
    assert (
        load_config(JobConfig, "examples/grpo_async.yaml", ["checkpoint_mode=lazy"]).checkpoint_mode == "lazy"
    )
    with pytest.raises(ConfigError, match=r"not task\.reward_model"):
        load_config(JobConfig, "examples/grpo_async.yaml", ["task.reward_model=/some/model"])
    with caplog.at_level(logging.WARNING):
        load_config(JobConfig, "examples/grpo_async.yaml", ["actor.loss.off_policy_correction=none"])
    assert "set actor.loss.off_policy_correction=decoupled" in caplog.text


def test_length_grouped_micro_batches_need_a_token_mean_loss():
    config = load_config(JobConfig, "examples/grpo_async.yaml", ["actor.group_by_length=true"])
    assert config.actor.group_by_length
    with pytest.raises(ConfigError, match=r"set loss\.loss_agg_mode=token-mean or group_by_length=false"):
        load_config(
            JobConfig,
            "examples/grpo_async.yaml",
            ["actor.group_by_length=true", "actor.loss.loss_agg_mode=seq-mean-token-mean"],
        )
