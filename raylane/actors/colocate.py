"""Roles and colocation: which Worker classes a group hosts, together, in each rank's process.

A group hosts one role (``WorkerGroup(pool, Rollout, ...)``) or several colocated roles
(``WorkerGroup(pool, {"actor": Trainer, "rollout": Role(Rollout, tp_size=2)}, ...)``).
Colocated roles are objects in the same process on every bundle: they share the device
and can hand tensors to each other without copies (``Worker.colocated(name)``), and the
driver reaches each role's methods under its name (``group.rollout.generate(batch)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raylane.actors.dispatch import MethodSpec, method_spec
from raylane.actors.worker import Worker

__all__ = ["Role", "registered_methods", "resolve_roles"]

SINGLE_ROLE = ""


@dataclass(frozen=True)
class Role:
    """A Worker class, its constructor arguments and its tensor-parallel size inside the group."""

    cls: type[Worker]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and issubclass(self.cls, Worker)):
            raise TypeError(f"a role's class must subclass raylane.actors.Worker, got {self.cls!r}")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))


def registered_methods(cls: type) -> dict[str, MethodSpec]:
    """The methods of ``cls`` (inherited ones included) marked with ``@register``."""
    methods = {}
    for name in dir(cls):
        spec = method_spec(getattr(cls, name, None))
        if spec is not None:
            methods[name] = spec
    return methods


def _check_methods(role: Role, reserved: frozenset[str], owner: str) -> None:
    clashes = sorted(set(registered_methods(role.cls)) & reserved)
    if clashes:
        raise ValueError(
            f"{role.cls.__name__} registers methods {clashes} that clash with {owner} attributes; rename them"
        )


def resolve_roles(
    worker: type[Worker] | Role | Mapping[str, type[Worker] | Role],
    group_reserved: frozenset[str],
    handle_reserved: frozenset[str],
) -> dict[str, Role]:
    """Normalise a group's ``worker`` argument to ``{role name: Role}``.

    A single class or Role becomes the one role ``""``, whose methods sit on the group
    itself; a mapping gives colocated roles reached as ``group.<name>``. Role and method
    names must not shadow the attributes of the group or of its role handles.
    """
    if isinstance(worker, Mapping):
        if not worker:
            raise ValueError("a colocated group needs at least one role")
        roles = {name: r if isinstance(r, Role) else Role(r) for name, r in worker.items()}
        for name, role in roles.items():
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"role name {name!r} must be a Python identifier not starting with '_'")
            if name in group_reserved:
                raise ValueError(f"role name {name!r} clashes with WorkerGroup.{name}; pick another name")
            _check_methods(role, handle_reserved, "role handle")
        return roles
    role = worker if isinstance(worker, Role) else Role(worker)
    _check_methods(role, group_reserved | handle_reserved, "WorkerGroup")
    return {SINGLE_ROLE: role}
