"""The rollout stream on both backends (a Ray actor, a real redis-server): delivery, holding until
commit, claims of a dead consumer's entries, exactly-once training across crashes, and a Redis
server killed and restarted with its append-only file."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
import ray

from raylane.rlhf import Trajectory, TrajectoryGroup
from raylane.streaming import Receipt, RedisRolloutStream, RolloutStream, StreamConfig, open_rollout_stream

# Long enough that a loaded 2-core machine does not make a live consumer's entries look idle.
CLAIM_IDLE_S = 1.0


def make_group(index: int, n: int = 2) -> TrajectoryGroup:
    trajectories = tuple(
        Trajectory(
            uid=f"g{index}-s{s}",
            prompt_ids=(1, 2, index),
            response_ids=tuple(range(s + 1)),
            behaviour_log_probs=tuple(-0.1 * (k + 1) / 3 for k in range(s + 1)),
            weight_versions=(index,) * s + (index + 1,),
            score=float(s % 2),
            start_version=index,
        )
        for s in range(n)
    )
    return TrajectoryGroup(group_id=f"g{index}", prompt_index=index, trajectories=trajectories)


@pytest.fixture(params=["memory", "redis"])
def open_stream(request):
    """``open_stream(consumer, claim_idle_s=...)``: handles on one fresh stream of this test."""
    if request.param == "memory":
        request.getfixturevalue("ray_cluster")
        redis_url = None
    else:
        redis_url = request.getfixturevalue("redis_url")
    key = f"test:{uuid.uuid4().hex}"
    opened = []

    def open_(consumer: str, claim_idle_s: float = CLAIM_IDLE_S) -> RolloutStream:
        config = StreamConfig(redis_url=redis_url, stream_key=key, claim_idle_s=claim_idle_s)
        opened.append(open_rollout_stream(config, consumer))
        return opened[-1]

    yield open_
    if request.param == "memory" and opened:
        ray.kill(opened[0].actor)


def uids_of(entries) -> list[str]:
    return group_uids(entry.group for entry in entries)


def group_uids(groups) -> list[str]:
    return [uid for group in groups for uid in group.uids]


def test_trajectory_group_round_trips_exactly():
    group = make_group(3, n=3)
    assert TrajectoryGroup.decode(group.encode()) == group
    assert group.start_version == 3


def test_trajectory_rejects_misaligned_or_backward_versions():
    with pytest.raises(ValueError, match="one entry per response token"):
        Trajectory("u", (1,), (5, 6), (-0.1,), (0, 0), 1.0, 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        Trajectory("u", (1,), (5, 6), (-0.1, -0.2), (1, 0), 1.0, 0)
    with pytest.raises(ValueError, match="start_version"):
        Trajectory("u", (1,), (5,), (-0.1,), (0,), 1.0, 1)


def test_put_get_commit_round_trip(open_stream):
    producer, trainer = open_stream("producer"), open_stream("trainer-0")
    groups = [make_group(i) for i in range(3)]
    ids = [producer.put(group) for group in groups]
    entries = trainer.get(max_groups=10)
    assert [e.entry_id for e in entries] == ids
    assert [e.group for e in entries] == groups
    assert trainer.depth() == 3
    assert trainer.get(max_groups=10) == []
    trainer.commit(e.receipt for e in entries)
    assert trainer.depth() == 0 and trainer.held == []


def test_a_handle_sent_to_a_ray_task_puts_into_the_same_stream(open_stream, ray_cluster):
    producer, trainer = open_stream("producer"), open_stream("trainer-0")
    groups = [make_group(0), make_group(1)]
    # A lambda travels by value: this test module cannot be imported in a Ray worker.
    put_all = ray.remote(lambda stream, groups: [stream.put(group) for group in groups])
    ids = ray.get(put_all.remote(producer, groups))
    assert [(e.entry_id, e.group) for e in trainer.get(max_groups=10)] == list(zip(ids, groups))
    # A copy elsewhere is a new handle: committing what this one holds is not its business.
    assert ray.get(ray.remote(lambda stream: stream.held).remote(trainer)) == []


def test_appends_started_without_waiting_are_all_in_the_stream_once_flushed(open_stream, ray_cluster):
    producer, trainer = open_stream("producer"), open_stream("trainer-0")
    groups = [make_group(i) for i in range(6)]

    def put_all(stream, groups):
        for group in groups:
            stream.put_nowait(group)
        stream.flush()

    ray.get(ray.remote(put_all).remote(producer, groups))
    # All of them, each once (the in-memory stream's actor may run concurrent appends in any order).
    assert sorted(group_uids(e.group for e in trainer.get(max_groups=10))) == sorted(group_uids(groups))


def test_get_waits_for_a_put(open_stream):
    trainer = open_stream("trainer-0")
    start = time.monotonic()
    assert trainer.get(max_groups=1, block_s=0.3) == []
    assert time.monotonic() - start >= 0.25


def test_uncommitted_entries_go_to_another_consumer_after_the_idle_timeout(open_stream):
    producer, dead, live = open_stream("producer"), open_stream("trainer-0"), open_stream("trainer-1")
    for i in range(3):
        producer.put(make_group(i))
    taken = dead.get(max_groups=2)
    assert uids_of(live.get(max_groups=10)) == group_uids([make_group(2)])
    time.sleep(CLAIM_IDLE_S * 1.2)
    assert uids_of(live.get(max_groups=10)) == uids_of(taken)


def test_a_restarted_consumer_gets_its_held_entries_back_at_once(open_stream):
    producer = open_stream("producer")
    for i in range(3):
        producer.put(make_group(i))
    before_crash = open_stream("trainer-0", claim_idle_s=60).get(max_groups=2)
    after_restart = open_stream("trainer-0", claim_idle_s=60)
    assert uids_of(after_restart.get(max_groups=1)) == uids_of(before_crash[:1])
    assert uids_of(after_restart.get(max_groups=2)) == uids_of(before_crash[1:]) + group_uids([make_group(2)])


def test_redeliver_gives_back_what_the_handle_took_and_did_not_commit(open_stream):
    # A trainer rolled back in place: the batch it committed stays trained, the rest comes back in order.
    producer, trainer = open_stream("producer"), open_stream("trainer-0", claim_idle_s=60)
    for i in range(4):
        producer.put(make_group(i))
    committed, *rolled_back = trainer.get(max_groups=3)
    trainer.commit([committed.receipt])
    trainer.redeliver()
    assert trainer.held == []
    again = trainer.get(max_groups=1) + trainer.get(max_groups=1)
    assert uids_of(again) == uids_of(rolled_back)
    assert uids_of(trainer.get(max_groups=4)) == group_uids([make_group(3)])
    assert trainer.get(max_groups=4) == []


def test_a_live_consumer_keeps_its_entries(open_stream):
    producer, slow, other = open_stream("producer"), open_stream("trainer-0"), open_stream("trainer-1")
    producer.put(make_group(0))
    held = slow.get(max_groups=1)
    time.sleep(CLAIM_IDLE_S * 0.6)
    assert slow.get(max_groups=1) == []  # renews its lease and does not take its own entry twice
    time.sleep(CLAIM_IDLE_S * 0.6)
    assert other.get(max_groups=1) == []
    assert slow.held == [held[0].receipt]


def test_a_consumer_that_was_too_slow_does_not_take_its_entries_back(open_stream, caplog):
    producer, slow, other = open_stream("producer"), open_stream("trainer-0"), open_stream("trainer-1")
    producer.put(make_group(0))
    taken = slow.get(max_groups=1)
    time.sleep(CLAIM_IDLE_S * 1.2)
    assert uids_of(other.get(max_groups=1)) == uids_of(taken)
    with caplog.at_level("WARNING", logger="raylane.streaming.base"):
        assert slow.get(max_groups=1) == []
    assert slow.held == [] and other.held == [taken[0].receipt]
    assert "raise claim_idle_s" in caplog.text
    time.sleep(CLAIM_IDLE_S * 0.6)
    assert other.get(max_groups=1) == [] and other.held == [taken[0].receipt]


def test_a_group_put_twice_is_trained_once(open_stream):
    producer, trainer = open_stream("producer"), open_stream("trainer-0")
    producer.put(make_group(0))
    producer.put(make_group(0))  # a producer retrying a put whose reply it lost
    producer.put(make_group(1))
    first = trainer.get(max_groups=1)
    trainer.commit(e.receipt for e in first)
    assert uids_of(trainer.get(max_groups=10)) == group_uids([make_group(1)])
    assert trainer.depth() == 1


class ToyTrainer:
    """Trains by counting uids into its model state; a checkpoint (JSON text) saves that state with
    the receipts of the steps it covers, as the async controller will."""

    def __init__(self, stream: RolloutStream, checkpoint: str | None) -> None:
        self.stream = stream
        self.model, self.uncommitted = Counter(), []
        if checkpoint:
            saved = json.loads(checkpoint)
            self.model.update(saved["model"])
            stream.commit(Receipt.from_dict(raw) for raw in saved["receipts"])

    def step(self, groups_per_step: int) -> bool:
        entries = self.stream.get(max_groups=groups_per_step)
        self.model.update(uids_of(entries))
        self.uncommitted += [e.receipt for e in entries]
        return bool(entries)

    def checkpoint(self) -> str:
        return json.dumps({"model": self.model, "receipts": [r.to_dict() for r in self.uncommitted]})

    def commit(self) -> None:
        self.stream.commit(self.uncommitted)
        self.uncommitted = []


@pytest.mark.parametrize("crash_point", ["after_training", "after_checkpoint"])
def test_every_group_is_trained_exactly_once_across_a_crash(open_stream, crash_point):
    producer = open_stream("producer")
    groups = [make_group(i) for i in range(8)]
    for group in groups:
        producer.put(group)
    trainer = ToyTrainer(open_stream("trainer-0"), None)
    trainer.step(2)
    saved = trainer.checkpoint()
    trainer.commit()
    trainer.step(2)
    if crash_point == "after_checkpoint":
        saved = trainer.checkpoint()
    # The process dies here: its model is gone, and its last step was never committed.
    resumed = ToyTrainer(open_stream("trainer-0"), saved)
    while resumed.step(3):
        resumed.commit()
    assert resumed.model == Counter(group_uids(groups))


def test_a_redis_server_killed_and_restarted_loses_nothing_committed_or_held(durable_redis):
    key = "test:durable"
    producer = RedisRolloutStream(durable_redis.url, "producer", stream_key=key)
    trainer = RedisRolloutStream(durable_redis.url, "trainer-0", stream_key=key, claim_idle_s=60)
    for i in range(6):
        producer.put(make_group(i))
    held = trainer.get(max_groups=4)
    trainer.commit(e.receipt for e in held[:2])
    durable_redis.kill()
    durable_redis.restart()
    # The running trainer carries on over a new connection; a restarted one finds its held entries.
    assert trainer.depth() == 4
    restarted = RedisRolloutStream(durable_redis.url, "trainer-0", stream_key=key, claim_idle_s=60)
    assert uids_of(restarted.get(max_groups=10)) == uids_of(held[2:]) + group_uids(
        [make_group(4), make_group(5)]
    )
    trainer.commit(e.receipt for e in held[2:])
    assert restarted.depth() == 2
    assert restarted._trained(uids_of(held)) == [True] * 8


def test_an_unreachable_redis_or_a_bad_config_says_what_to_change():
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with pytest.raises(ConnectionError, match=r"cannot reach Redis at redis_url=.*start redis-server there"):
        open_rollout_stream(StreamConfig(redis_url=url), "trainer-0")
    with pytest.raises(ValueError, match="claim_idle_s"):
        StreamConfig(claim_idle_s=0)
