"""Ray metrics: the engine records them only under Ray and at most once per interval, and those of
every component reach a real Ray node's Prometheus endpoint during a short job and a short serving run."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable

import grpc
import openai
import pytest
import ray
from ray import serve

from raylane.controllers import RLJob
from raylane.models import make_tiny_model
from raylane.runner.metrics import EngineMetrics
from raylane.runner.outputs import EngineStats
from raylane.serving import LLMClient, ServingConfig, deploy, undeploy
from tests.conftest import free_port
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


# What _serve_requests_of_each_outcome makes (a histogram shows as _bucket, _count and _sum series
# on the Prometheus side): four generations, each timed once to its first token
# and once per token after it (8 tokens each), and six requests answered.
_SERVED = {
    "raylane_serving_time_to_first_token_seconds_count": 4,
    "raylane_serving_time_per_output_token_seconds_count": 4,
    "raylane_serving_requests_total": 6,
}


def _node_metrics_url() -> str:
    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _samples(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text as ``{metric name without "ray_": [(labels, value), ...]}``."""
    found: dict[str, list[tuple[str, float]]] = {}
    for match in re.finditer(r"^ray_(raylane_\w+)\{(.*)\} (\S+)$", text, re.MULTILINE):
        found.setdefault(match[1], []).append((match[2], float(match[3])))
    return found


def _scrape_until_all_exported(
    url: str, names: tuple[str, ...], timeout_s: float, settled: Callable[[dict], bool] = bool
) -> dict:
    """Every ``raylane_`` series seen by any scrape until ``names`` have all been seen and the
    series are ``settled`` (the latest samples of each name). The node's agent publishes what the
    processes pushed every few seconds, so a page can show some of a burst of records only; and
    Ray 2.60 showed a gauge set once for a limited time only (about 20 s in one run here), so
    gauges set at different moments of a job need not all be on one page."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, list[tuple[str, float]]] = {}
    while True:
        seen.update(_samples(urllib.request.urlopen(url, timeout=5).read().decode()))
        missing = [name for name in names if name not in seen]
        if (not missing and settled(seen)) or time.monotonic() > deadline:
            assert not missing, f"not exported by {url} within {timeout_s} s: {missing}; seen {sorted(seen)}"
            return seen
        time.sleep(1)


def test_engine_trainer_and_weight_sync_metrics_reach_the_node_endpoint(ray_cluster, tmp_path):
    url = _node_metrics_url()
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


def _label(labels: str, key: str) -> str:
    return re.search(rf'{key}="([^"]*)"', labels)[1]


def _of_app(found: dict, app_name: str) -> dict:
    """The series of one Serve application."""
    return {
        name: [(labels, value) for labels, value in series if f'application="{app_name}"' in labels]
        for name, series in found.items()
    }


def _total(found: dict, name: str) -> float:
    return sum(value for _, value in found.get(name, []))


def _serve_requests_of_each_outcome(config: ServingConfig) -> None:
    """Two generations and one unknown model on each protocol, streamed and not."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{config.port}/v1", api_key="unused", max_retries=0)
    client.completions.create(model="tiny", prompt="abc", max_tokens=8, extra_body={"ignore_eos": True})
    chunks = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    assert list(chunks)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="absent", prompt="abc", max_tokens=2)
    with LLMClient(f"127.0.0.1:{config.grpc_port}", application=config.app_name) as grpc_client:
        grpc_client.generate("abc", model="tiny", max_tokens=8, ignore_eos=True)
        assert list(grpc_client.generate_stream("abd", model="tiny", max_tokens=8, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as refused:
            grpc_client.generate("abc", model="absent", max_tokens=2)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_serving_latency_and_request_metrics_reach_the_node_endpoint(ray_cluster, tmp_path):
    config = ServingConfig(
        app_name="scraped-serving",
        models=[{"name": "tiny", "engine": {"model": make_tiny_model(str(tmp_path / "tiny"))}}],
        port=free_port(),
        grpc_port=free_port(),
        grpc_without_api_key=True,
    )
    deploy(config)
    try:
        _serve_requests_of_each_outcome(config)
        found = _scrape_until_all_exported(
            _node_metrics_url(),
            tuple(_SERVED),
            timeout_s=40,
            settled=lambda seen: all(
                _total(_of_app(seen, config.app_name), name) >= count for name, count in _SERVED.items()
            ),
        )
    finally:
        undeploy(config)
        serve.shutdown()
    ours = _of_app(found, config.app_name)
    assert {name: _total(ours, name) for name in _SERVED} == _SERVED
    assert _total(ours, "raylane_serving_time_to_first_token_seconds_sum") > 0
    counted = {
        (_label(labels, "protocol"), _label(labels, "method"), _label(labels, "status")): value
        for labels, value in ours["raylane_serving_requests_total"]
    }
    assert counted == {
        ("http", "/v1/completions", "200"): 1,
        ("http", "/v1/chat/completions", "200"): 1,
        ("http", "/v1/completions", "404"): 1,
        ("grpc", "Generate", "OK"): 1,
        ("grpc", "GenerateStream", "OK"): 1,
        ("grpc", "Generate", "NOT_FOUND"): 1,
    }, counted


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
