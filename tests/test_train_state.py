"""The flattened train state that lazy checkpoints keep between saves: reused while the same tensors
are live (values read through to the live parameters and moments, the learning rate re-read), rebuilt
when the optimizer's state is replaced."""

from __future__ import annotations

import copy

import torch

from raylane.fault_tolerance.train_state import FlatTrainState, flatten, train_state


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_kept_view_follows_the_live_state_and_is_rebuilt_when_the_state_is_replaced():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    view = FlatTrainState()

    state, _ = view.get(model, optimizer)
    assert state is not None  # the first call builds the state dicts

    optimizer.param_groups[0]["lr"] = 3e-3
    _step(model, optimizer)
    state, flat = view.get(model, optimizer)
    assert state is None  # reused
    expected = flatten(train_state(model, optimizer))
    assert flat.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(flat[key], value), key
        else:
            assert flat[key] == value, key
    assert flat["optim.param_groups.0.lr"] == 3e-3

    # A resume loads new moment tensors into the optimizer: the kept view would read the old ones.
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    state, flat = view.get(model, optimizer)
    assert state is not None
    _step(model, optimizer)
    moments = {
        key: value for key, value in flatten(train_state(model, optimizer)).items() if key.endswith("exp_avg")
    }
    assert moments and all(torch.equal(flat[key], value) for key, value in moments.items())
