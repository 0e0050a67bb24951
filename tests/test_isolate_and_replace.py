"""``isolate_and_replace`` inside ``raylane train`` on a real multi-node Ray cluster: trainer rank 1 is
killed; its node is drained (nothing new lands there), the ranks' bundles are reserved again on the
other node, both ranks start there, the last checkpoint is reloaded and the run ends.

The cluster is ``ray.cluster_utils.Cluster`` in a child Python (this file run as a script, printing
what it saw as JSON): a driver joins one Ray cluster per process and the session's is single-node.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import run_cluster_script


def scenario() -> dict:
    """A head without CPUs and nodes A and B of one CPU each: the two trainer ranks (half a CPU each,
    one placement group packed on one node) start on one of them, the other is the spare."""
    import ray
    from ray.cluster_utils import Cluster

    from raylane.fault_tolerance import InRankFault
    from tests.test_rl_fault_tolerance import FAULT_AT_SEQ, FaultyJob, _lines, _tolerant

    class WatchedJob(FaultyJob):
        """Records where the trainer ranks are at each step."""

        nodes_at: dict[int, list[str]]

        def rl_step(self, step: int) -> dict[str, float]:
            self.nodes_at[step] = [n.node_id for n in self.trainer_group.nodes]
            return super().rl_step(step)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        root = Path(tempfile.mkdtemp(prefix="isolate-"))
        config = _tolerant(
            root,
            "isolated",
            policies={"crash": "isolate_and_replace"},
            isolation={"backends": ["ray"]},
        )
        job = WatchedJob(config)
        job.fault = InRankFault("kill", at_seq=FAULT_AT_SEQ, inside=True)
        job.nodes_at = {}
        history = job.run()
        crashes = [line for line in _lines(config) if line.get("event") == "crash"]
        faulty = crashes[0]["node_id"] if crashes else ""
        node = next((n for n in ray.nodes() if n["NodeID"] == faulty), {})
        return {
            "steps": [row["step"] for row in history],
            "recoveries": [row for row in history if "fault_tolerance/replacements" in row],
            "crashes": [(c["worker_group"], c["rank"]) for c in crashes],
            "faulty_node": faulty,
            "nodes_at": {str(k): v for k, v in job.nodes_at.items()},
            "faulty_node_alive": node.get("Alive"),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_isolated_nodes_ranks_are_replaced_on_another_node_and_the_run_ends():
    seen = run_cluster_script(__file__, timeout=420)
    assert seen["steps"] == [0, 1, 2, 3, 4], seen
    assert seen["crashes"] == [["rl", 1]], seen
    [recovery] = seen["recoveries"]
    assert recovery["fault_tolerance/steps_lost"] <= 1, recovery
    first, last = seen["nodes_at"]["0"], seen["nodes_at"][str(len(seen["nodes_at"]) - 1)]
    assert first == [seen["faulty_node"]] * 2, seen
    # Both ranks moved, the survivor too: its bundle was on the isolated node.
    assert len(set(last)) == 1 and last[0] != seen["faulty_node"], seen
    # Drained, then idle once the ranks left: the node's raylet exited.
    assert seen["faulty_node_alive"] is False, seen


if __name__ == "__main__":
    sys.stdout.write(json.dumps(scenario()) + "\n")
