"""Ray metrics: the engine records them only under Ray and at most once per interval, and those of
every component reach a real Ray node's Prometheus endpoint during a short job."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import textwrap
import time
import urllib.request

import ray

from raylane.controllers import RLJob
from raylane.runner.metrics import EngineMetrics
from raylane.runner.outputs import EngineStats
from tests.test_rl_job import _config

# Ray prefixes every metric with "ray_" and counters end in "_total" on the Prometheus side.
_EXPECTED = (
    "raylane_engine_generated_tokens_total",
    "raylane_engine_running_seqs",
    "raylane_engine_waiting_seqs",
    "raylane_engine_kv_cache_usage",
    "raylane_engine_prefix_cache_hit_rate",
    "raylane_step_phase_seconds",
    "raylane_actor_loss",
    "raylane_actor_grad_norm",
    "raylane_trainer_tokens_per_second",
    "raylane_weight_sync_seconds",
    "raylane_weight_sync_bytes",
)


def _samples(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text as ``{metric name without "ray_": [(labels, value), ...]}``."""
    found: dict[str, list[tuple[str, float]]] = {}
    for match in re.finditer(r"^ray_(raylane_\w+)\{(.*)\} (\S+)$", text, re.MULTILINE):
        found.setdefault(match[1], []).append((match[2], float(match[3])))
    return found


def _scrape_until_all_exported(url: str, names: tuple[str, ...], timeout_s: float) -> dict:
    """Every ``raylane_`` series seen by any scrape until ``names`` have all been seen (the latest
    samples of each name). The node's agent publishes what the processes pushed every few seconds,
    and Ray 2.60 showed a gauge set once for a limited time only (about 20 s in one run here), so
    gauges set at different moments of a job need not all be on one page."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, list[tuple[str, float]]] = {}
    while True:
        seen.update(_samples(urllib.request.urlopen(url, timeout=5).read().decode()))
        missing = [name for name in names if name not in seen]
        if not missing or time.monotonic() > deadline:
            assert not missing, f"not exported by {url} within {timeout_s} s: {missing}; seen {sorted(seen)}"
            return seen
        time.sleep(1)


def test_engine_trainer_and_weight_sync_metrics_reach_the_node_endpoint(ray_cluster, tmp_path):
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    job = RLJob(_config(tmp_path, "scraped"))
    job.build_groups()
    try:
        for step in range(2):
            job.metrics.log(step + 1, job.rl_step(step))
        found = _scrape_until_all_exported(url, _EXPECTED, timeout_s=40)
    finally:
        job.shutdown()
    assert sum(value for _, value in found["raylane_engine_generated_tokens_total"]) > 0
    phases = {re.search(r'phase="(\w+)"', labels)[1] for labels, _ in found["raylane_step_phase_seconds"]}
    assert {"generate", "update_actor", "sync_weights"} <= phases, phases
    assert all(0.0 <= value <= 1.0 for _, value in found["raylane_engine_kv_cache_usage"])
    assert max(value for _, value in found["raylane_weight_sync_bytes"]) > 0


def test_engine_generates_outside_ray_without_creating_metrics(tmp_path):
    # A fresh interpreter: the test session may already have connected to Ray.
    script = textwrap.dedent(f"""
        import ray
        from raylane.models import make_tiny_model
        from raylane.runner import LLM, SamplingParams
        from raylane.runner import metrics
        out = LLM(make_tiny_model({str(tmp_path / "tiny")!r})).generate(
            ["abc", "abd"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
        )
        assert [len(o.outputs[0].token_ids) for o in out] == [4, 4], out
        assert not ray.is_initialized(), "generating connected to Ray"
        assert metrics._instruments.cache_info().currsize == 0, "metrics created outside Ray"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def _stats(generated: int) -> EngineStats:
    return EngineStats(
        num_total_blocks=8,
        num_free_blocks=6,
        num_running=1,
        num_waiting=0,
        num_preemptions=0,
        num_prompt_tokens_computed=4,
        num_cached_prompt_tokens=4,
        num_generated_tokens=generated,
        num_steps=generated,
    )


def test_engine_records_once_per_interval_and_when_it_goes_idle(ray_cluster):
    recorder = EngineMetrics(interval_s=60.0)
    recorded = [recorder.maybe_record(functools.partial(_stats, n), idle=False) for n in range(1, 4)]
    assert recorded == [True, False, False]
    assert recorder.maybe_record(lambda: _stats(4), idle=True)
