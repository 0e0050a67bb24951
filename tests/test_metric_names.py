"""Each Ray metric raylane exports is registered once, under one ``raylane_`` name."""

import collections
import pathlib
import re

import raylane
from raylane.controllers import metrics

# A metric constructed with a literal name: metrics.Gauge("raylane_x", ...), Counter(...), Histogram(...).
_CONSTRUCTED = re.compile(r"\b(?:Gauge|Counter|Histogram)\(\s*\"(\w+)\"")


def registered_metric_names() -> list[str]:
    """Every metric name raylane registers with Ray, once per registration."""
    package = pathlib.Path(raylane.__file__).parent
    names = [name for path in package.rglob("*.py") for name in _CONSTRUCTED.findall(path.read_text())]
    # The tracker builds its gauges from a table rather than from literals.
    return names + list(metrics._DASHBOARD.values())


def test_every_metric_name_is_registered_once():
    names = registered_metric_names()
    assert "raylane_weight_sync_seconds" in names and "raylane_reward_mean" in names
    assert {"raylane_engine_generated_tokens", "raylane_step_phase_seconds", "raylane_actor_loss"} <= set(
        names
    )
    assert all(name.startswith("raylane_") for name in names), names
    twice = [name for name, count in collections.Counter(names).items() if count > 1]
    assert not twice, f"metrics registered more than once (with different tags each time): {twice}"
