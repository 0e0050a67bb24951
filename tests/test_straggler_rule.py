"""The straggler rule on synthetic probe batches (plain Python, no Ray): how many collectives it
needs to name a rank that is always last, and that random arrival order names nobody."""

import random

from raylane.fault_tolerance import DetectorConfig
from raylane.fault_tolerance.detector import Detector
from raylane.fault_tolerance.probes import ProbeBatch, RankIdentity


def _detector(size: int) -> tuple[Detector, list[RankIdentity]]:
    detector = Detector(DetectorConfig())
    ranks = [RankIdentity("trainer", r, "", "node", "192.0.2.1", 1000 + r) for r in range(size)]
    for identity in ranks:
        detector.register(identity, 0.0)
    return detector, ranks


def _all_reduce(
    detector: Detector, ranks: list[RankIdentity], seq: int, late: dict[int, float], t0: float
) -> None:
    """Collective ``seq``: rank r enters at ``t0 + late[r]``; everyone leaves together."""
    t_exit = t0 + max(late.values()) + 0.001
    for identity in ranks:
        t_enter = t0 + late[identity.rank]
        batch = ProbeBatch(
            identity,
            enters=[(seq, "trainer/0", "allreduce", seq, 4096, -1, identity.rank, len(ranks), t_enter)],
            exits=[(seq, t_exit, True, t_exit)],
            phases=[],
            sent_at=t_exit,
        )
        detector.ingest(batch)


def _collectives_until_named(size: int, victim: int, jitter_s: float = 0.002, limit: int = 40):
    detector, ranks = _detector(size)
    rng = random.Random(0)
    for seq in range(limit):
        t0 = 1.0 + seq
        late = {r: rng.uniform(0, jitter_s) for r in range(size)}
        late[victim] += 0.05
        _all_reduce(detector, ranks, seq, late, t0)
        events = detector.check(t0 + 0.1)
        if events:
            return seq + 1, events
    return None, []


def test_a_rank_last_every_time_is_named_after_the_fewest_collectives_chance_cannot_explain():
    # alpha = 1e-3: (1/4)^5 < alpha <= (1/4)^4 and (1/2)^10 < alpha <= (1/2)^9.
    assert _collectives_until_named(4, victim=2)[0] == 5
    count, events = _collectives_until_named(2, victim=1)
    assert count == 10
    (event,) = events
    assert (event.kind, event.rank, event.evidence["last_in"]) == ("noncomm_slow", 1, "10/10")


def test_random_arrival_order_names_nobody():
    detector, ranks = _detector(4)
    rng = random.Random(1)
    for seq in range(300):
        late = {r: rng.uniform(0, 0.01) for r in range(4)}
        _all_reduce(detector, ranks, seq, late, 1.0 + seq)
        assert detector.check(1.5 + seq) == [], seq
