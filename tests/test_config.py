"""Typed config loading: YAML + dotted overrides, error messages, dump/load round trip."""

from typing import Literal

import pytest
from pydantic import Field

from raylane.config import ConfigError, StrictConfig, dump_config, load_config, parse_value


class Optim(StrictConfig):
    lr: float = 1e-3
    warmup_steps: int = 0
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])


class Trainer(StrictConfig):
    optim: Optim = Field(default_factory=Optim)
    micro_batch_size: int = 4
    use_bf16: bool = False


class Algorithm(StrictConfig):
    name: Literal["grpo", "ppo"] = "grpo"
    kl_coef: float | None = None


class Job(StrictConfig):
    output_dir: str = "outputs/run"
    seed: int = 0
    trainer: Trainer = Field(default_factory=Trainer)
    algorithm: Algorithm = Field(default_factory=Algorithm)
    critic: Trainer | None = None
    stages: dict[str, Optim] = Field(default_factory=dict)
    reward_weights: dict[str, float] = Field(default_factory=dict)
    # Defaults that differ from their classes' defaults: overrides must keep them.
    reference: Trainer = Field(default_factory=lambda: Trainer(micro_batch_size=16, optim=Optim(lr=0.0)))
    shape: dict[str, int] = Field(default_factory=lambda: {"hidden": 64, "layers": 2})


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_file_or_overrides():
    assert load_config(Job) == Job()


def test_yaml_file_with_overrides(tmp_path):
    path = write(tmp_path, "seed: 3\ntrainer:\n  optim:\n    lr: 1e-5\n  micro_batch_size: 2\n")
    cfg = load_config(
        Job,
        path,
        [
            "trainer.micro_batch_size=8",
            "algorithm.name=ppo",
            "algorithm.kl_coef=0.05",
            "trainer.use_bf16=true",
            "trainer.optim.betas=[0.8, 0.9]",
            "output_dir=/tmp/run1",
            "reward_weights.gsm8k=0.5",
        ],
    )
    assert cfg.seed == 3
    assert cfg.trainer.optim.lr == 1e-5 and isinstance(cfg.trainer.optim.lr, float)
    assert cfg.trainer.optim.warmup_steps == 0
    assert cfg.trainer.micro_batch_size == 8
    assert cfg.trainer.use_bf16 is True
    assert cfg.trainer.optim.betas == [0.8, 0.9]
    assert (cfg.algorithm.name, cfg.algorithm.kl_coef) == ("ppo", 0.05)
    assert cfg.output_dir == "/tmp/run1"
    assert cfg.reward_weights == {"gsm8k": 0.5}


def test_later_overrides_win_and_null_clears():
    cfg = load_config(Job, None, ["algorithm.kl_coef=0.1", "algorithm.kl_coef=null", "seed=1", "seed=2"])
    assert cfg.algorithm.kl_coef is None and cfg.seed == 2


def test_optional_section_and_dict_of_sections_are_created_from_overrides():
    cfg = load_config(Job, None, ["critic.optim.lr=0.1", "stages.warmup.lr=0.5"])
    assert cfg.critic == Trainer(optim=Optim(lr=0.1))
    assert cfg.stages == {"warmup": Optim(lr=0.5)}


def test_overrides_keep_the_rest_of_a_customised_default(tmp_path):
    cfg = load_config(
        Job, None, ["reference.use_bf16=true", "reference.optim.warmup_steps=3", "shape.layers=4"]
    )
    assert cfg.reference == Trainer(micro_batch_size=16, use_bf16=True, optim=Optim(lr=0.0, warmup_steps=3))
    assert cfg.shape == {"hidden": 64, "layers": 4}
    from_file = load_config(Job, write(tmp_path, "reference:\n  optim:\n    warmup_steps: 5\n"))
    assert from_file.reference == Trainer(micro_batch_size=16, optim=Optim(lr=0.0, warmup_steps=5))
    assert load_config(Job, None, ["shape={hidden: 8}"]).shape == {"hidden": 8, "layers": 2}


def test_section_mapping_override_merges_into_the_section(tmp_path):
    path = write(tmp_path, "trainer:\n  micro_batch_size: 2\n")
    cfg = load_config(Job, path, ["trainer={use_bf16: true}"])
    assert (cfg.trainer.micro_batch_size, cfg.trainer.use_bf16) == (2, True)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-5", 1e-5),
        ("3", 3),
        ("0.5", 0.5),
        ("-2E3", -2000.0),
        ("true", True),
        ("False", False),
        ("on", "on"),
        ("no", "no"),
        ("null", None),
        ("", None),
        ("[1, 2]", [1, 2]),
        ("ppo", "ppo"),
        ("/tmp/x", "/tmp/x"),
    ],
)
def test_parse_value_follows_yaml_1_2_scalars(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_unknown_override_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(Job, None, ["trainer.micro_batch=8"])
    message = str(err.value)
    assert "unknown key 'trainer.micro_batch' (did you mean 'micro_batch_size'?)" in message
    assert "valid keys under 'trainer': optim, micro_batch_size, use_bf16" in message


def test_unknown_keys_in_the_file_are_caught_at_any_depth(tmp_path):
    path = write(tmp_path, "trainer:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer\.optim\.lrr' \(did you mean 'lr'\?\)"):
        load_config(Job, path)
    with pytest.raises(ConfigError, match="valid keys at the top level: output_dir, seed, trainer"):
        load_config(Job, None, ["outptu_dir=x"])
    with pytest.raises(
        ConfigError, match=r"unknown key 'stages\.warm\.lrr' .*; valid keys under 'stages\.warm': lr,"
    ):
        load_config(Job, None, ["stages.warm.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'critic\.optim\.beta'"):
        load_config(Job, None, ["critic.optim.beta=1"])


def test_wrong_types_name_the_key_and_value():
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch_size: .*integer.*'abc'"):
        load_config(Job, None, ["trainer.micro_batch_size=abc"])
    with pytest.raises(ConfigError, match=r"algorithm\.name: Input should be 'grpo' or 'ppo'"):
        load_config(Job, None, ["algorithm.name=dpo"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.lr", "is not of the form key=value"),
        ("=3", "is not of the form key=value"),
        ("trainer..lr=1", "has an empty part"),
        ("seed=[1", "cannot parse value"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, [override])


def test_override_into_a_value_is_a_type_error(tmp_path):
    with pytest.raises(ConfigError, match=r"seed: Input should be a valid integer \(got \{'x': 1\}\)"):
        load_config(Job, write(tmp_path, "seed: 3\n"), ["seed.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Job, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, write(tmp_path, "trainer: [1\n"))
    assert load_config(Job, write(tmp_path, "")) == Job()


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(Job, None, ["trainer.optim.lr=3e-6", "critic.use_bf16=true", "stages.a.warmup_steps=5"])
    path = str(tmp_path / "out" / "config.yaml")
    dump_config(cfg, path)
    assert load_config(Job, path) == cfg
    with open(path) as f:
        assert "lr: 3.0e-06" in f.read()


def test_strict_config_validates_assignment():
    cfg = Job()
    with pytest.raises(ValueError, match="micro_batch_size"):
        cfg.trainer.micro_batch_size = "many"


# ---- the RL job's config: registered names and batch splits are checked when it loads ----------


def test_job_names_are_checked_against_their_registries(monkeypatch):
    from raylane.controllers import JobConfig
    from raylane.rlhf import KL_ESTIMATORS

    with pytest.raises(
        ConfigError, match=r"algorithm.name: .*unknown advantage estimator 'rlo'; valid names: .*rloo"
    ):
        load_config(JobConfig, None, ["algorithm.name=rlo"])
    with pytest.raises(ConfigError, match=r"kl_loss_type: .*'k4'; valid names: abs, k1, k2, k3"):
        load_config(JobConfig, None, ["actor.loss.kl_loss_type=k4"])
    with pytest.raises(ConfigError, match="unknown loss aggregation mode 'mean'"):
        load_config(JobConfig, None, ["actor.loss.loss_agg_mode=mean"])
    with pytest.raises(ConfigError, match="unknown toy task 'revers'"):
        load_config(JobConfig, None, ["task.name=revers"])
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_config(JobConfig, None, ["task.reward_fn=no_such_module:score"])
    # A user's own entries: registered by their code before the config loads, or named by import path.
    monkeypatch.setitem(KL_ESTIMATORS._entries, "my_kl", lambda log_probs, ref: log_probs - ref)
    cfg = load_config(
        JobConfig,
        None,
        [
            "algorithm.kl_estimator=my_kl",
            "task.reward_fn=tests.user_code:row_weight",
            "task.name=tests.user_code:COUNT_UP",
            "algorithm.name=ppo",
        ],
    )
    assert cfg.algorithm.kl_estimator == "my_kl" and cfg.task.reward_fn == "tests.user_code:row_weight"
    assert cfg.task.name == "tests.user_code:COUNT_UP"
    assert cfg.algorithm.uses_critic and not load_config(JobConfig).algorithm.uses_critic


def test_job_batches_that_do_not_split_are_rejected_with_the_numbers():
    from raylane.controllers import JobConfig

    two_pools = ["placement.mode=disaggregated", "placement.trainer_ranks=3", "placement.rollout_ranks=2"]
    with pytest.raises(
        ConfigError,
        match=r"64 x 8 = 512 rows do not split over placement.trainer_ranks=3.*prompts_per_step=66",
    ):
        load_config(JobConfig, None, two_pools)
    assert load_config(JobConfig, None, [*two_pools, "prompts_per_step=66"]).prompts_per_step == 66
    with pytest.raises(
        ConfigError, match=r"prompts_per_step \(63\) must be a multiple of the 2 rollout replicas.*=64"
    ):
        load_config(JobConfig, None, ["placement.trainer_ranks=2", "prompts_per_step=63"])
    with pytest.raises(
        ConfigError, match=r"actor.mini_batch_size \(96\) must divide the 512 rows.*: 2, 4, 8, 16"
    ):
        load_config(JobConfig, None, ["placement.trainer_ranks=2", "actor.mini_batch_size=96"])
    # The critic's mini-batches are checked only when there is a critic.
    assert load_config(JobConfig, None, ["critic.mini_batch_size=96"]).critic.mini_batch_size == 96
    with pytest.raises(ConfigError, match=r"critic.mini_batch_size \(96\)"):
        load_config(JobConfig, None, ["critic.mini_batch_size=96", "algorithm.name=ppo"])
