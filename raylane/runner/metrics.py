"""Engine metrics for the Ray dashboard: generated tokens, running and waiting sequences, KV-cache
use and prefix-cache hit rate, each under one ``raylane_engine_`` name.

The engine also runs outside Ray (``raylane generate``, offline :class:`~raylane.runner.LLM`), so
nothing is recorded unless Ray is initialised, and the metrics are created on first use. Recording
happens at most once per ``interval_s`` of wall time, not per step or token.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import ray
from ray.util import metrics

from raylane.runner.outputs import EngineStats

__all__ = ["EngineMetrics"]


@functools.cache
def _instruments() -> dict[str, metrics.Metric]:
    # One registration per process, shared by every engine in it: Ray rejects a name registered twice
    # with other tags, and its exporter adds the worker's identity to each series.
    return {
        "generated": metrics.Counter("raylane_engine_generated_tokens", "Tokens the engine generated"),
        "running": metrics.Gauge("raylane_engine_running_seqs", "Sequences being decoded or prefilled"),
        "waiting": metrics.Gauge("raylane_engine_waiting_seqs", "Sequences waiting for a KV-cache slot"),
        "kv_usage": metrics.Gauge("raylane_engine_kv_cache_usage", "Fraction of KV-cache blocks in use"),
        "prefix_hit_rate": metrics.Gauge(
            "raylane_engine_prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache since the last record",
        ),
    }


class EngineMetrics:
    """Records an engine's :class:`EngineStats` to Ray metrics, throttled to one record per interval."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last_time = -float("inf")
        self._last: EngineStats | None = None

    def maybe_record(self, stats: Callable[[], EngineStats], idle: bool) -> bool:
        """Record ``stats()`` if the interval has passed or the engine just went ``idle`` (so the
        gauges do not keep showing a finished batch); returns whether it recorded."""
        now = time.monotonic()
        if not (idle or now - self._last_time >= self.interval_s) or not ray.is_initialized():
            return False
        self._last_time = now
        self.record(stats())
        return True

    def record(self, stats: EngineStats) -> None:
        """Set the gauges to ``stats`` and count the tokens generated since the previous record."""
        instruments = _instruments()
        last = self._last
        generated = stats.num_generated_tokens - (last.num_generated_tokens if last else 0)
        if generated > 0:
            instruments["generated"].inc(generated)
        instruments["running"].set(stats.num_running)
        instruments["waiting"].set(stats.num_waiting)
        used = stats.num_total_blocks - stats.num_free_blocks
        instruments["kv_usage"].set(used / max(stats.num_total_blocks, 1))
        cached = stats.num_cached_prompt_tokens - (last.num_cached_prompt_tokens if last else 0)
        computed = stats.num_prompt_tokens_computed - (last.num_prompt_tokens_computed if last else 0)
        if cached + computed > 0:
            instruments["prefix_hit_rate"].set(cached / (cached + computed))
        self._last = stats
