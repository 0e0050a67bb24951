"""The staleness bound: AReaL's admission capacity plus deadline-aware batches keep every trained
group within the bound of the policy it started under, on a simulated async run with heavy-tailed
generation times, with and without APRIL's over-provisioning."""

from __future__ import annotations

import numpy as np
import pytest

from raylane.rlhf import StalenessBound


def simulate(
    max_staleness: int,
    batch_groups: int = 4,
    n_groups: int = 160,
    train_ticks: int = 3,
    extra_groups: int = 0,
):
    """Engines with unlimited slots and a trainer, in ticks. Returns (staleness by group, batches, ticks)."""
    bound = StalenessBound(batch_groups, max_staleness, extra_groups)
    durations = 1 + np.floor(4 * np.random.default_rng(0).pareto(1.5, n_groups)).astype(int)
    version = started = ticks = training_left = 0
    generating: dict[int, list[int]] = {}  # group -> [start version, ticks left]
    ready: list[tuple[int, int]] = []  # (group, start version) in the order they finished
    staleness: dict[int, int] = {}
    batches = []
    while len(staleness) < n_groups:
        ticks += 1
        assert ticks < 100_000, "the simulated run deadlocked"
        for _ in range(min(bound.admission_capacity(version, started), n_groups - started)):
            generating[started] = [version, int(durations[started])]
            started += 1
        for group in list(generating):
            generating[group][1] -= 1
            if generating[group][1] == 0:
                ready.append((group, generating.pop(group)[0]))
        if training_left:
            training_left -= 1
            version += training_left == 0
            continue
        chosen = bound.select_batch(version, [s for _, s in ready], [s for s, _ in generating.values()])
        if chosen is not None:
            batch = [ready[i] for i in chosen]
            assert not {group for group, _ in batch} & staleness.keys(), "a group was trained twice"
            staleness.update((group, version - start) for group, start in batch)
            batches.append((version, batch))
            ready = [entry for i, entry in enumerate(ready) if i not in set(chosen)]
            training_left = train_ticks
    return staleness, batches, ticks


@pytest.mark.parametrize("max_staleness", [0, 1, 2, 4])
def test_no_group_is_trained_staler_than_the_bound_and_none_is_dropped(max_staleness):
    staleness, batches, _ = simulate(max_staleness)
    assert sorted(staleness) == list(range(160))
    assert max(staleness.values()) <= max_staleness
    assert [version for version, _ in batches] == list(range(40))
    if max_staleness:
        assert max(staleness.values()) == max_staleness  # the run really goes ahead of training


def test_zero_staleness_is_the_synchronous_loop():
    _, batches, _ = simulate(0)
    for version, batch in batches:
        assert sorted(group for group, _ in batch) == list(range(4 * version, 4 * version + 4))


def test_going_ahead_of_training_takes_fewer_ticks():
    ticks = {eta: simulate(eta)[2] for eta in (0, 1, 4)}
    assert ticks[4] < ticks[1] < ticks[0]


@pytest.mark.parametrize("extra_groups", [1, 4, 6])
def test_over_provisioning_adds_its_batches_to_the_bound(extra_groups):
    bound = StalenessBound(4, 1, extra_groups)
    staleness, _, _ = simulate(1, extra_groups=extra_groups)
    assert sorted(staleness) == list(range(160))
    assert bound.bound == 1 + -(-extra_groups // 4)
    assert max(staleness.values()) <= bound.bound


def test_admission_capacity():
    bound = StalenessBound(batch_groups=4, max_staleness=2)
    assert bound.admission_capacity(version=0, started=0) == 12
    assert bound.admission_capacity(version=1, started=12) == 4
    assert bound.admission_capacity(version=0, started=13) == 0
    assert StalenessBound(4, 0, extra_groups=2).admission_capacity(version=1, started=8) == 2


def test_select_batch_takes_the_oldest_ready_and_waits_for_a_group_due_now():
    bound = StalenessBound(batch_groups=2, max_staleness=1)
    assert bound.select_batch(3, [3], []) is None
    assert bound.select_batch(3, [3, 2, 3, 2], []) == [1, 3]
    assert bound.select_batch(3, [3, 2, 2], [3]) == [1, 2]
    # A group started at 2 is due at version 3: the batch waits for it.
    assert bound.select_batch(3, [3, 3, 3], [2]) is None
    # At version 2 it is not due yet: two young ready groups overtake it, as 1 batch remains for it.
    assert bound.select_batch(2, [3, 3, 3], [2]) == [0, 1]
    assert bound.select_batch(3, [3, 2, 3], [3]) == [0, 1]
    # Overtaking would leave three groups due at version 4 for the one batch of version 4.
    assert bound.select_batch(3, [4, 4], [3, 3, 3]) is None
    with pytest.raises(ValueError, match="max_staleness >= 0"):
        StalenessBound(batch_groups=2, max_staleness=-1)
