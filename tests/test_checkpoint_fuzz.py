"""Corrupt and missing checkpoints get errors a user can act on: which file, what is wrong, what to do.

Hypothesis truncates files and flips bytes in real checkpoints (a tiny Hugging Face checkpoint and
a DCP training checkpoint); the property: loading either succeeds or raises the loader's own error
naming the checkpoint and what to do, never a bare EOFError or a library traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raylane.fault_tolerance import CheckpointLoadError, load_train_state, save_train_state
from raylane.models import ModelConfigError, WeightLoadError, check_checkpoint, load_model, make_tiny_model

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("fuzz-hf") / "m"))


def _train_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz-dcp") / "step_3")
    model, optimizer, scheduler = _train_objects()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        save_train_state(path, model, optimizer, scheduler, step=3, rank=0, extra={"epoch": 1})
    return path


def _load_train_state(path: str) -> tuple[int, dict]:
    model, optimizer, scheduler = _train_objects()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_train_state(path, model, optimizer, scheduler, rank=0)


# A damage: (file to damage, how) where how is ("truncate", keep fraction) or ("flip", positions).
def _damages(files: list[str]) -> st.SearchStrategy:
    truncate = st.tuples(st.just("truncate"), st.floats(0.0, 0.999))
    flip = st.tuples(st.just("flip"), st.lists(st.floats(0.0, 0.999), min_size=1, max_size=8))
    return st.tuples(st.sampled_from(files), st.one_of(truncate, flip))


def _damaged_copy(source: str, damage: tuple) -> str:
    copy = os.path.join(tempfile.mkdtemp(prefix="raylane-fuzz-"), os.path.basename(source))
    shutil.copytree(source, copy)
    name, (how, where) = damage
    path = os.path.join(copy, name)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "truncate":
        data = data[: int(len(data) * where)]
    else:
        for fraction in where:
            data[int(len(data) * fraction)] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    return copy


@FUZZ
@given(data=st.data())
def test_damaged_hugging_face_checkpoints_fail_naming_the_folder(hf_checkpoint, data):
    damage = data.draw(_damages(["model.safetensors", "config.json"]))
    copy = _damaged_copy(hf_checkpoint, damage)
    try:
        check_checkpoint(copy)
        model = load_model(copy)
    except (WeightLoadError, ModelConfigError) as exc:
        # Which file (or folder, for a tensor the header now misnames), and what to do.
        assert copy in str(exc), str(exc)
        if damage[0] == "model.safetensors" and damage[1][0] == "truncate":
            assert "model.safetensors" in str(exc) and "re-download or re-export" in str(exc)
    else:
        assert sum(p.numel() for p in model.parameters()) > 0
    finally:
        shutil.rmtree(os.path.dirname(copy))


@FUZZ
@given(data=st.data())
def test_damaged_training_checkpoints_fail_naming_the_checkpoint(dcp_checkpoint, data):
    files = sorted(
        os.path.relpath(os.path.join(root, name), dcp_checkpoint)
        for root, _, names in os.walk(dcp_checkpoint)
        for name in names
    )
    damage = data.draw(_damages(files))
    copy = _damaged_copy(dcp_checkpoint, damage)
    # Loading may succeed: a flipped tensor byte or pickled number is undetectable without checksums.
    try:
        _load_train_state(copy)
    except CheckpointLoadError as exc:
        assert copy in str(exc) and "resume from an earlier step_* folder" in str(exc), str(exc)
    finally:
        shutil.rmtree(os.path.dirname(copy))


def test_a_truncated_dcp_shard_or_safetensors_file_is_named(hf_checkpoint, dcp_checkpoint):
    copy = _damaged_copy(dcp_checkpoint, ("dcp/__0_0.distcp", ("truncate", 0.5)))
    with pytest.raises(CheckpointLoadError, match=r"the shard .*__0_0\.distcp is truncated"):
        _load_train_state(copy)
    os.remove(os.path.join(copy, "dcp", "__0_0.distcp"))
    with pytest.raises(CheckpointLoadError, match=r"the shard .*__0_0\.distcp is missing"):
        _load_train_state(copy)

    copy = _damaged_copy(hf_checkpoint, ("model.safetensors", ("truncate", 0.9)))
    with pytest.raises(WeightLoadError, match=r"cannot read .*model\.safetensors .* truncated or corrupt"):
        load_model(copy)
    os.remove(os.path.join(copy, "model.safetensors"))
    with pytest.raises(WeightLoadError, match="no weights in"):
        check_checkpoint(copy)
    with pytest.raises(ModelConfigError, match=r"no config\.json"):
        check_checkpoint(os.path.join(copy, "nope"))


def test_serve_refuses_a_truncated_checkpoint_before_deploying(hf_checkpoint):
    from raylane.serving import ModelDeploymentConfig, ServingConfig, deploy

    copy = _damaged_copy(hf_checkpoint, ("model.safetensors", ("truncate", 0.5)))
    config = ServingConfig(models=[ModelDeploymentConfig.from_path(copy)])
    with pytest.raises(WeightLoadError, match=r"cannot read .*model\.safetensors"):
        deploy(config)  # before Serve (or Ray) is touched: no replica retries a traceback
