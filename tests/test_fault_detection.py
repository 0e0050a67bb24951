"""The fault detector on real Ray: gloo worker groups with probes, real faults, each C4 rule naming its culprit."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import time

import pytest
import ray
import torch
import torch.distributed as dist

from raylane import cli
from raylane.actors import DistConfig, ResourcePool, WorkerGroup, WorkerGroupConfig, register
from raylane.fault_tolerance import (
    DetectorConfig,
    FaultEvent,
    InRankFault,
    ProbedWorker,
    RankIdentity,
    RankReplacer,
    RetriesExhaustedError,
    find_rank,
    phase,
    signal_process,
    start_detector,
)
from tests.test_metrics_export import _node_metrics_url, _scrape_until_all_exported

# Ray workers cannot import this test module: ship its Worker classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GROUP_CONFIG = WorkerGroupConfig(dist=DistConfig(backend="gloo", timeout_s=60), start_timeout_s=120)
DETECTOR_CONFIG = DetectorConfig(hang_s=2.0, straggler_window=10)


class Trainer(ProbedWorker):
    """Each step: some compute, then the collectives of a data-parallel step."""

    @register
    def train(self, steps: int, compute_s: float = 0.005) -> int:
        grads = torch.ones(4096)
        shards = torch.empty(4096 * self.world_size)
        for step in range(steps):
            with phase("compute", step):
                time.sleep(compute_s)
            with phase("update", step):
                dist.all_reduce(grads)
                dist.all_gather_into_tensor(shards, grads)
                grads.fill_(1.0)
        return steps

    @register
    def send_weights(self, rounds: int, senders: list[int], nbytes: int = 1 << 16) -> int:
        """Like a weight sync: each sender posts a send to every receiver; receivers wait in turn."""
        buffers = {peer: torch.ones(nbytes // 4) for peer in range(self.world_size)}
        for _ in range(rounds):
            if self.rank in senders:
                peers = [p for p in range(self.world_size) if p not in senders]
                works = [dist.isend(buffers[p], p) for p in peers]
            else:
                works = [dist.irecv(buffers[p], p) for p in senders]
            for work in works:
                work.wait()
        return rounds


def start_group(pool_name: str, name: str = "trainer") -> tuple[ResourcePool, WorkerGroup]:
    pool = ResourcePool([4], num_cpus_per_bundle=0.25, name=pool_name)
    try:
        return pool, WorkerGroup(pool, Trainer, name=name, config=GROUP_CONFIG)
    except BaseException:
        pool.release()
        raise


@pytest.fixture(scope="module")
def shared_group(ray_cluster):
    """Four probed gloo ranks for the tests that leave them healthy."""
    pool, group = start_group("probed-shared", name="shared")
    yield group
    group.shutdown()
    pool.release()


@contextlib.contextmanager
def probed(group: WorkerGroup, output_dir: str | None = None):
    """A fresh detector with ``group``'s probes shipping to it."""
    detector = start_detector(DETECTOR_CONFIG, output_dir=output_dir)
    group.start_probes(detector)
    try:
        yield detector
    finally:
        group.arm_fault(None)
        group.stop_probes()
        ray.get(detector.shutdown.remote())
        ray.kill(detector)


@pytest.fixture
def doomed(ray_cluster, tmp_path):
    """Four probed ranks for a test that kills or stops one of them, and their detector."""
    pool, group = start_group("probed-doomed")
    detector = start_detector(DETECTOR_CONFIG, output_dir=str(tmp_path))
    group.start_probes(detector)
    yield group, detector
    group.shutdown()
    pool.release()
    ray.kill(detector)


def wait_for_event(detector, timeout_s: float, kinds: tuple[str, ...] | None = None) -> FaultEvent:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = [e for e in ray.get(detector.events.remote()) if kinds is None or e.kind in kinds]
        if events:
            return events[0]
        time.sleep(0.05)
    raise AssertionError(f"no {kinds or 'fault'} event within {timeout_s} s")


def wait_for_records(detector, timeout_s: float = 30.0) -> None:
    """Until every rank has shipped collectives (the probe and the group's first steps are up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.get(detector.stats.remote())["collectives"] >= 3:
            return
        time.sleep(0.05)
    raise AssertionError("the ranks' probes shipped no collectives")


@ray.remote(num_cpus=0)
class Busy:
    """An actor in one long call: a liveness ping to it waits behind the call, unanswered."""

    def block(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.mark.parametrize("raylet_up", [False, True], ids=["raylet-gone", "raylet-up"])
def test_silent_unanswering_rank_is_a_crash_when_its_raylet_accepts_no_connection(ray_cluster, raylet_up):
    """Its node is gone (a crash, said before Ray's health checks would), unless its raylet still
    accepts connections: then it may just be stopped, which the hang rules judge."""
    with socket.socket() as raylet:
        raylet.bind(("127.0.0.1", 0))  # bound without listening: a connection is refused
        if raylet_up:
            raylet.listen()
        rank = Busy.remote()
        rank.block.remote(30)
        detector = start_detector(DetectorConfig(silence_s=0.5, hang_s=30))
        host, port = raylet.getsockname()
        identity = RankIdentity("lost", 0, "trainer", "node-x", host, 1, f"{host}:{port}")
        try:
            ray.get(detector.register.remote(identity, rank))
            if raylet_up:
                time.sleep(3)
                assert ray.get(detector.events.remote()) == []
            else:
                event = wait_for_event(detector, 5, kinds=("crash",))
                assert (event.worker_group, event.rank) == ("lost", 0)
                assert event.evidence["reason"].startswith(f"node unreachable: its raylet at {host}:{port}")
        finally:
            ray.get(detector.shutdown.remote())
            ray.kill(detector)
            ray.kill(rank)


def test_fault_free_run_raises_no_alarm(shared_group, tmp_path):
    with probed(shared_group, str(tmp_path)) as detector:
        assert shared_group.train(150) == [150] * 4
        shared_group.send_weights(10, senders=[0, 1])
        time.sleep(DETECTOR_CONFIG.hang_s)
        assert ray.get(detector.events.remote()) == []
        assert ray.get(detector.stats.remote()) == {"collectives": 4 * 2 * 150, "orphan_exits": 0}
    assert not (tmp_path / "metrics.jsonl").exists()


def test_crash_sigkill_is_named_within_two_seconds(doomed, tmp_path):
    group, detector = doomed
    future = group.train.remote(100_000)
    wait_for_records(detector)
    victim = group.nodes[1]
    killed_at = signal_process(victim.node_id, victim.pid, signal.SIGKILL)
    event = wait_for_event(detector, 10)
    assert (event.kind, event.worker_group, event.rank, event.node_ip) == (
        "crash",
        "trainer",
        1,
        victim.node_ip,
    )
    assert event.detected_at - killed_at <= 2.0, event
    assert event.evidence["reason"] == "actor died"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "crash" and lines[0]["rank"] == 1
    # The event is counted where the Ray dashboard reads it: the node's Prometheus endpoint.
    found = _scrape_until_all_exported(_node_metrics_url(), ("raylane_detector_events_total",), timeout_s=40)
    assert any(
        'kind="crash"' in labels and value >= 1 for labels, value in found["raylane_detector_events_total"]
    )
    del future


def test_noncomm_hang_names_the_rank_that_never_arrived(doomed):
    group, detector = doomed
    group.on_ranks([2]).arm_fault(InRankFault("stop", at_seq=40))
    future = group.train.remote(100_000)
    event = wait_for_event(detector, 15)
    assert (event.kind, event.rank) == ("noncomm_hang", 2), event
    assert event.evidence["missing_group_ranks"] == [2]
    assert event.evidence["seq"] == 40 and event.collective_group == "trainer/0"
    assert event.evidence["waited_s"] <= 10.0  # the target for a hang
    del future


def test_comm_hang_names_group_and_the_silent_rank(doomed):
    group, detector = doomed
    group.on_ranks([0]).arm_fault(InRankFault("stop", at_seq=40, inside=True))
    future = group.train.remote(100_000)
    event = wait_for_event(detector, 15)
    assert (event.kind, event.rank, event.collective_group) == ("comm_hang", 0, "trainer/0"), event
    assert event.evidence["not_left"] == [0, 1, 2, 3] and event.evidence["silent_ranks"] == [0]
    assert event.nodes == (group.nodes[0].node_ip,)
    del future


def test_straggler_is_named_from_arrival_order(shared_group):
    with probed(shared_group) as detector:
        shared_group.on_ranks([1]).arm_fault(InRankFault("delay", delay_s=0.05, ops=("allreduce",)))
        shared_group.train(40)
        event = wait_for_event(detector, 5)
    assert (event.kind, event.rank) == ("noncomm_slow", 1), event
    assert event.evidence["median_margin_s"] >= 0.04


def test_slow_sender_is_a_hot_row_of_the_link_matrix(shared_group):
    with probed(shared_group) as detector:
        shared_group.on_ranks([0]).arm_fault(InRankFault("delay", delay_s=0.03, inside=True, ops=("send",)))
        shared_group.send_weights(6, senders=[0, 1])
        event = wait_for_event(detector, 5)
    assert (event.kind, event.rank, event.evidence["culprit"]) == ("comm_slow", 0, "sender"), event
    assert event.evidence["median_blocked_s"] >= 0.02


def test_hung_rank_is_replaced_and_training_goes_on_then_retries_run_out(doomed):
    group, detector = doomed
    replacer = RankReplacer(group, detector, max_replacements=1)
    group.on_ranks([2]).arm_fault(InRankFault("stop", at_seq=20))
    stalled = group.train.remote(100_000)
    event = wait_for_event(detector, 15)
    assert (event.kind, event.rank) == ("noncomm_hang", 2), event
    old_pid = group.nodes[2].pid

    replacement = replacer.replace(event, stalled)

    assert replacement.ranks[0] == 2 and replacement.old_pid == old_pid != replacement.new_pid
    assert replacement.new_pid == group.nodes[2].pid
    assert group.train(20) == [20] * 4  # the re-formed process group trains on
    assert ray.get(detector.events.remote()) == [event]  # killing the stuck ranks raised no event
    # The new rank is watched like the old one: a second fault on it is named too, and is one too many.
    group.on_ranks([2]).arm_fault(InRankFault("kill", at_seq=45))  # train(20) ran seqs 0-39
    stalled = group.train.remote(100_000)
    second = wait_for_event_after(detector, 1, 15)
    assert (second.kind, second.rank) == ("crash", 2), second
    with pytest.raises(RetriesExhaustedError, match="max_replacements=1"):
        replacer.replace(second, stalled)


def wait_for_event_after(detector, seen: int, timeout_s: float) -> FaultEvent:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = ray.get(detector.events.remote())
        if len(events) > seen:
            return events[seen]
        time.sleep(0.05)
    raise AssertionError(f"no new event within {timeout_s} s")


def test_cli_stops_continues_and_kills_a_rank_of_a_running_group(doomed):
    group, detector = doomed
    running = group.train.remote(400, 0.01)
    wait_for_records(detector)
    assert cli.main(["fault", "stop", "--group", "trainer", "--rank", "1"]) == 0
    hang = wait_for_event(detector, 15)
    # Stopped from outside at any moment: in its compute, or inside a collective.
    assert hang.kind in ("noncomm_hang", "comm_hang") and hang.rank == 1, hang
    assert cli.main(["fault", "cont", "--group", "trainer", "--rank", "1"]) == 0
    assert running.get(timeout_s=60) == [400] * 4  # continued, the job goes on
    assert cli.main(["fault", "kill", "--group", "trainer", "--rank", "3"]) == 0
    assert group.check_alive() == [3]
    assert cli.main(["fault", "kill", "--group", "trainer", "--rank", "7"]) == 2  # no such rank: an error
    pool, twin = start_group("probed-twin")  # a second group named "trainer"
    try:
        with pytest.raises(ValueError, match="several worker groups named 'trainer'"):
            find_rank("trainer", 0)
        assert find_rank(f"trainer-{twin._uid}", 0).pid == twin.nodes[0].pid
    finally:
        twin.shutdown()
        pool.release()
