"""A scraped excerpt of raylane's Ray metrics from a real local run: a short GRPO job, then a short
serving run (HTTP and gRPC, a few good requests and one for a model that does not exist).

A thread reads the local Ray node's Prometheus endpoint every second for the whole run and keeps
the newest sample of every ``ray_raylane_*`` series (a gauge leaves the page some seconds after
its last update, so one scrape at the end would miss the job's). Prints a table of the metric
names and their series, and writes the excerpt in Prometheus' text format plus a JSON summary
under ``benchmarks/results/``.

    python benchmarks/scrape_metrics.py        # ~1 min on a laptop CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import tempfile
import threading
import time
import urllib.request

import openai
import ray
from ray import serve

from raylane.controllers import JobConfig, RLJob
from raylane.models import make_tiny_model
from raylane.serving import LLMClient, ServingConfig, deploy, undeploy

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# A sample line of a raylane series: name, {labels}, value.
_SAMPLE = re.compile(r"^(ray_raylane_\w+)(\{.*\})? (\S+)$")
# A metric's HELP and TYPE lines.
_META = re.compile(r"^# (?:HELP|TYPE) (ray_raylane_\w+) ")


class Scraper(threading.Thread):
    """Scrapes ``url`` every ``interval_s`` until stopped, keeping the newest line of each series."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.series: dict[str, str] = {}
        self.meta: dict[str, list[str]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.scrape_once()
            self._stop_event.wait(self.interval_s)

    def scrape_once(self) -> None:
        page = urllib.request.urlopen(self.url, timeout=5).read().decode()
        for line in page.splitlines():
            if match := _SAMPLE.match(line):
                self.series[f"{match[1]}{match[2] or ''}"] = line
            elif match := _META.match(line):
                lines = self.meta.setdefault(match[1], [])
                if line not in lines:
                    lines.append(line)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.scrape_once()

    def text(self) -> str:
        """The excerpt in Prometheus' text format, grouped by metric."""
        out = []
        for name in sorted(self.meta):
            out += self.meta[name]
            # A histogram's _bucket/_count/_sum series and a counter's _total follow its HELP/TYPE.
            out += [line for key, line in sorted(self.series.items()) if re.match(rf"{name}(_\w+)?\{{", key)]
        return "\n".join(out) + "\n"


def short_job(output_dir: str) -> None:
    config = JobConfig.model_validate(
        {
            "output_dir": output_dir,
            "steps": 3,
            "seed": 0,
            "prompts_per_step": 8,
            "eval_every": 0,
            "eval_prompts": 16,
            "task": {"name": "reverse", "reward_fn": "exact_match"},
            "rollout": {"n": 8, "max_tokens": 4},
            "actor": {"micro_batch_size": 32},
            "placement": {"trainer_ranks": 1},
            # A short warm-start, so the sampled rewards (and the policy-gradient loss) are not all zero.
            "sft": {"steps": 25, "batch_size": 64, "lr": 3.0e-3},
        }
    )
    RLJob(config).run()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_serving_run(model_dir: str) -> None:
    config = ServingConfig(
        app_name="scrape",
        models=[{"name": "tiny", "engine": {"model": model_dir}}],
        port=_unused_port(),
        grpc_port=_unused_port(),
        grpc_without_api_key=True,
    )
    deploy(config)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{config.port}/v1", api_key="none", max_retries=0)
        for i in range(4):
            client.completions.create(
                model="tiny", prompt=f"abc{i}", max_tokens=16, extra_body={"ignore_eos": True}
            )
        list(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        with contextlib.suppress(openai.NotFoundError):
            client.completions.create(model="absent", prompt="abc", max_tokens=2)
        with LLMClient(f"127.0.0.1:{config.grpc_port}", application=config.app_name) as grpc_client:
            grpc_client.generate("abc", model="tiny", max_tokens=16, ignore_eos=True)
            list(grpc_client.generate_stream("abd", model="tiny", max_tokens=16, ignore_eos=True))
        # The replicas push their metrics every few seconds: stay up until the scraper saw them.
        time.sleep(15)
    finally:
        undeploy(config)
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.path.join(RESULTS, "metrics_scrape"), help="path without extension"
    )
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    node = next(n for n in ray.nodes() if n["Alive"])
    scraper = Scraper(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics")
    scraper.start()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        short_job(os.path.join(tmp, "job"))
        short_serving_run(make_tiny_model(os.path.join(tmp, "serving-model")))
    scraper.stop()
    ray.shutdown()

    counts: dict[str, int] = {}
    for key in scraper.series:
        name = key.split("{")[0]
        counts[name] = counts.get(name, 0) + 1
    print(f"{'metric (Prometheus name)':<62} series")
    for name, count in sorted(counts.items()):
        print(f"{name:<62} {count:>6}")
    with open(args.out + ".prom", "w") as f:
        f.write(scraper.text())
    summary = {
        "what": "ray_raylane_* series scraped from the local Ray node during a 3-step GRPO job and a short serving run",
        "ray": ray.__version__,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
        "series_per_metric": dict(sorted(counts.items())),
    }
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.out}.prom and {args.out}.json")


if __name__ == "__main__":
    main()
