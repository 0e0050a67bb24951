"""Typed knobs of fault tolerance: the probes on every rank, the detector that reads them, and the
isolation of a faulty node."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylane.config import StrictConfig

__all__ = [
    "DetectorConfig",
    "FaultAction",
    "FaultPolicies",
    "FaultToleranceConfig",
    "NodeIsolationConfig",
    "ProbeConfig",
]


class ProbeConfig(StrictConfig):
    """How a rank ships its collective records and heartbeat to the detector.

    Records are appended in the calling thread (a few microseconds per collective) and shipped
    by a background thread every ``flush_interval_s``; that shipment is also the heartbeat.
    ``max_batch`` caps one shipment (the rest waits for the next one).
    """

    flush_interval_s: float = Field(0.2, gt=0)
    max_batch: int = Field(20_000, gt=0)


class DetectorConfig(StrictConfig):
    """Thresholds of the detector's rules (C4's classes); none is a fixed per-rank timeout on a step.

    - ``silence_s``: a rank whose heartbeat is older than this is asked whether it is alive; a
      dead actor is a crash at once.
    - ``hang_s``: how long the first rank of a group may wait in a collective for the others (or
      everyone for the collective to finish) before it is a hang; a silent rank that no hang
      explains is reported as a crash (silent heartbeat) after the same time.
    - ``straggler_window``: the most complete collectives of one op of a group that the straggler
      rule reads; it tests the last w of them for every w up to this. ``straggler_alpha``: a rank
      must arrive last in so many of the w that chance (each of the group's n ranks last with
      probability 1/n) would do it with probability below this: a rank last every time is named
      after 5 collectives with 4 ranks, 10 with 2; with 4 ranks, 9 of 12 also suffice;
      ``straggler_min_margin_s`` and ``straggler_margin_ratio``: how much later than the next one
      it must arrive, in seconds and as a multiple of the median spread of the other ranks.
    - ``link_window``: point-to-point transfers kept per (sender, receiver) pair;
      ``link_slow_ratio``: how many times the seconds-per-byte of the fastest half of the pairs makes
      a cell hot, if its median transfer also takes ``link_min_seconds`` (below that it is noise).
    """

    check_interval_s: float = Field(0.2, gt=0)
    silence_s: float = Field(1.0, gt=0)
    hang_s: float = Field(4.0, gt=0)
    straggler_window: int = Field(12, ge=3)
    straggler_alpha: float = Field(1e-3, gt=0, lt=1)
    straggler_min_margin_s: float = Field(0.02, ge=0)
    straggler_margin_ratio: float = Field(4.0, ge=1.0)
    link_window: int = Field(8, ge=2)
    link_slow_ratio: float = Field(4.0, gt=1.0)
    link_min_transfers: int = Field(3, ge=1)
    link_min_seconds: float = Field(0.005, ge=0)


class NodeIsolationConfig(StrictConfig):
    """How a faulty node is isolated so that nothing new lands on it.

    - ``backends``: ``ray`` drains the Ray node (Ray schedules nothing new there; what runs there
      keeps running, and the node leaves the cluster once idle); ``kubernetes`` cordons and taints
      the Kubernetes node under the Ray pod, which needs the Helm chart's RBAC (``rbac.create``).
      ``auto``: ``ray``, and ``kubernetes`` too when this runs inside a Kubernetes pod.
    - ``taint_key`` and ``taint_effects``: the taint ``<taint_key>=<fault kind>:<effect>`` put on
      the Kubernetes node; ``NoExecute`` also evicts the pods already there that do not tolerate it.
    - ``namespace``: where the Ray pods run ("" = the namespace of the pod this runs in, else of
      the kubeconfig's current context); ``kubeconfig``: a file to use outside a pod ("" = the
      default one).
    """

    backends: Literal["auto"] | list[Literal["ray", "kubernetes"]] = Field("auto", min_length=1)
    taint_key: str = Field("raylane.io/faulty", min_length=1)
    taint_effects: list[Literal["NoSchedule", "NoExecute"]] = Field(
        default_factory=lambda: ["NoSchedule"], min_length=1
    )
    namespace: str = ""
    kubeconfig: str = ""


FaultAction = Literal["replace_rank", "isolate_and_replace", "stop", "log_only"]


class FaultPolicies(StrictConfig):
    """What a job does on each class of event (C4's classes).

    - ``replace_rank``: kill the culprit, start it afresh on its bundle, re-form the process group,
      reload the last checkpoint and redo the steps since.
    - ``isolate_and_replace``: first keep new work off the culprit's node, then ``replace_rank``
      on other nodes: the pool's placement groups with a bundle on that node are reserved again
      elsewhere, and every rank on them is replaced.
    - ``stop``: end the job with the fault report.
    - ``log_only``: the event is logged and counted (as every event is), the job goes on.

    A straggler or a slow link still trains, only slower: replacing it costs a reload, so they are
    logged by default.
    """

    crash: FaultAction = "replace_rank"
    noncomm_hang: FaultAction = "replace_rank"
    comm_hang: FaultAction = "replace_rank"
    noncomm_slow: FaultAction = "log_only"
    comm_slow: FaultAction = "log_only"

    def action(self, kind: str) -> FaultAction:
        """The policy of event class ``kind`` (one of ``FAULT_KINDS``)."""
        return getattr(self, kind)


class FaultToleranceConfig(StrictConfig):
    """Fault tolerance inside ``raylane train``: probes on the trainer ranks, the detector, and the
    policy of each fault class.

    Off by default: a job that turns it on runs one more actor and, to have something to reload,
    saves a checkpoint before its first RL step; ``checkpoint_every=1`` bounds what a fault costs to
    the step in flight. ``max_replacements`` bounds the ranks replaced over the whole job; the next
    fault stops it with the report of every fault. ``event_wait_s``: how long a step that failed on
    a rank waits for the detector to name the fault before the failure is raised as it is.
    """

    enabled: bool = Field(False, description="watch the trainer ranks and act on faults")
    detector: DetectorConfig = DetectorConfig()
    probes: ProbeConfig = ProbeConfig()
    policies: FaultPolicies = FaultPolicies()
    max_replacements: int = Field(3, ge=0, description="ranks replaced at most over the job")
    survivor_grace_s: float = Field(
        3.0, gt=0, description="a rank still busy this long after the culprit died is replaced too"
    )
    event_wait_s: float = Field(
        10.0, gt=0, description="a step failed on a rank waits this long for the event naming it"
    )
    isolation: NodeIsolationConfig = Field(
        default_factory=NodeIsolationConfig,
        description="how an isolate_and_replace policy keeps new work off the faulty node",
    )
