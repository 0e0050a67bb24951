"""``FaultEvent``: what the detector found, naming the culprit rank, its node and role, the group and the evidence."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["FAULT_KINDS", "FaultEvent", "FaultKind"]

FaultKind = Literal["crash", "noncomm_hang", "comm_hang", "noncomm_slow", "comm_slow"]
FAULT_KINDS: tuple[str, ...] = ("crash", "noncomm_hang", "comm_hang", "noncomm_slow", "comm_slow")


@dataclass(frozen=True)
class FaultEvent:
    """One detected fault (C4's classes).

    ``worker_group``/``rank``/``role``/``node_ip``/``node_id`` name the culprit (``rank`` is -1 for
    a communication hang or a slow link with no single culprit); ``collective_group`` is the group
    label the evidence comes from (empty for a crash); ``nodes`` every node involved;
    ``evidence`` the numbers behind the verdict; ``detected_at`` the detector's ``time.time()``.
    """

    kind: FaultKind
    worker_group: str
    rank: int
    role: str
    node_ip: str
    node_id: str
    collective_group: str
    nodes: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)
    detected_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **{k: v for k, v in asdict(self).items() if k != "kind"}}

    def summary(self) -> str:
        who = (
            f"rank {self.rank} of {self.worker_group!r}" if self.rank >= 0 else f"group {self.worker_group!r}"
        )
        where = f" in {self.collective_group}" if self.collective_group else ""
        return f"{self.kind}: {who} (role {self.role or '-'}, node {self.node_ip}){where}: {self.evidence}"
