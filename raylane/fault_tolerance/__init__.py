"""Fault tolerance: collective probes, the C4-style fault detector, fault injection, node isolation,
and distributed training checkpoints that a job resumes from at any DP size, persisted in the background
and committed atomically (with the Hugging Face export).

    detector = start_detector(DetectorConfig(), output_dir="out/run")
    group.start_probes(detector)              # a role that mixes in ProbedWorker
    ...
    ray.get(detector.events.remote())         # FaultEvent: kind, rank, node, role, group, evidence
    RankReplacer(group, detector).replace(event, pending_call)   # kill, replace, re-form, re-probe
    NodeIsolator(NodeIsolationConfig()).isolate(event)           # nothing new scheduled on its node
    FaultSupervisor(FaultToleranceConfig(enabled=True), group).run(step_fn, step)  # what a job does
"""

from raylane.fault_tolerance.checkpoint import (
    BackgroundSaver,
    CheckpointLoadError,
    load_train_state,
    save_hf_checkpoint,
    save_train_state,
)
from raylane.fault_tolerance.checkpoint_store import COMPLETE_MARKER, CheckpointStore, is_complete
from raylane.fault_tolerance.checkpoint_tiers import (
    HOST_BUFFERS_DIR,
    DiskPersister,
    copy_checkpoint,
    memory_tier_dir,
    newest_checkpoint,
)
from raylane.fault_tolerance.config import (
    DetectorConfig,
    FaultAction,
    FaultPolicies,
    FaultToleranceConfig,
    NodeIsolationConfig,
    ProbeConfig,
)
from raylane.fault_tolerance.detector import Detector
from raylane.fault_tolerance.detector_actor import DetectorActor, start_detector
from raylane.fault_tolerance.events import FAULT_KINDS, FaultEvent
from raylane.fault_tolerance.faults import (
    SIGNALS,
    InRankFault,
    find_rank,
    kill_process,
    remove_node,
    signal_process,
    signal_rank,
)
from raylane.fault_tolerance.isolation import IsolationRecord, NodeIsolator, drain_ray_node
from raylane.fault_tolerance.kube_nodes import KubeIsolationError, KubeNodeIsolator
from raylane.fault_tolerance.probes import CollectiveProbe, ProbeBatch, RankIdentity, active_probe, phase
from raylane.fault_tolerance.recovery import RankReplacer, Replacement, RetriesExhaustedError
from raylane.fault_tolerance.supervisor import (
    FaultRecord,
    FaultStopError,
    FaultSupervisor,
    RanksReplaced,
    node_isolation,
)
from raylane.fault_tolerance.worker import ProbedWorker

__all__ = [
    "COMPLETE_MARKER",
    "FAULT_KINDS",
    "HOST_BUFFERS_DIR",
    "SIGNALS",
    "BackgroundSaver",
    "CheckpointLoadError",
    "CheckpointStore",
    "CollectiveProbe",
    "Detector",
    "DetectorActor",
    "DetectorConfig",
    "DiskPersister",
    "FaultAction",
    "FaultEvent",
    "FaultPolicies",
    "FaultRecord",
    "FaultStopError",
    "FaultSupervisor",
    "FaultToleranceConfig",
    "InRankFault",
    "IsolationRecord",
    "KubeIsolationError",
    "KubeNodeIsolator",
    "NodeIsolationConfig",
    "NodeIsolator",
    "ProbeBatch",
    "ProbeConfig",
    "ProbedWorker",
    "RankIdentity",
    "RankReplacer",
    "RanksReplaced",
    "Replacement",
    "RetriesExhaustedError",
    "active_probe",
    "copy_checkpoint",
    "drain_ray_node",
    "find_rank",
    "is_complete",
    "kill_process",
    "load_train_state",
    "memory_tier_dir",
    "newest_checkpoint",
    "node_isolation",
    "phase",
    "remove_node",
    "save_hf_checkpoint",
    "save_train_state",
    "signal_process",
    "signal_rank",
    "start_detector",
]
