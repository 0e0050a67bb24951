"""Driver-side handles: a role's registered methods as attributes, each callable on the group.

``handle.generate(batch)`` blocks and returns the collected result;
``handle.generate.remote(batch)`` returns a :class:`GroupFuture` at once;
``handle.on_ranks([0, 2]).ping()`` calls a subset of ranks (modes that need every rank refuse).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from raylane.actors.dispatch import MethodSpec
from raylane.actors.futures import GroupFuture

if TYPE_CHECKING:
    from raylane.actors.worker_group import WorkerGroup

__all__ = ["GroupMethod", "RoleHandle"]

HANDLE_ATTRIBUTES = frozenset({"on_ranks", "methods", "ranks"})


class GroupMethod:
    """One registered worker method, bound to a group, a role and a set of ranks."""

    def __init__(
        self, group: WorkerGroup, role: str, name: str, spec: MethodSpec, ranks: tuple[int, ...] | None
    ) -> None:
        self._group = group
        self._role = role
        self._name = name
        self._spec = spec
        self._ranks = ranks

    def remote(self, *args: Any, **kwargs: Any) -> GroupFuture:
        """Start the call on the ranks and return its future without waiting."""
        return self._group._submit(self._role, self._name, self._spec, self._ranks, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the call and wait for its collected result."""
        return self.remote(*args, **kwargs).get()

    def __repr__(self) -> str:
        role = f"{self._role}." if self._role else ""
        return f"<group method {self._group.name}.{role}{self._name} [{self._spec.mode_name}]>"


class RoleHandle:
    """The registered methods of one role of a group, as attributes."""

    def __init__(
        self,
        group: WorkerGroup,
        role: str,
        methods: Mapping[str, MethodSpec],
        ranks: tuple[int, ...] | None = None,
    ) -> None:
        self._group = group
        self._role = role
        self._methods = dict(methods)
        self._ranks = ranks

    @property
    def methods(self) -> list[str]:
        """Names of the methods callable through this handle."""
        return sorted(self._methods)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks this handle calls."""
        return self._ranks if self._ranks is not None else tuple(range(self._group.world_size))

    def on_ranks(self, ranks: Iterable[int]) -> RoleHandle:
        """A handle that calls only ``ranks`` (e.g. ``group.on_ranks([0, 1]).load(path)``)."""
        chosen = tuple(ranks)
        world = self._group.world_size
        bad = [r for r in chosen if not isinstance(r, int) or not 0 <= r < world]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"ranks must be distinct ints in [0, {world}) for group {self._group.name!r}, got {chosen}"
            )
        return RoleHandle(self._group, self._role, self._methods, chosen)

    def __getattr__(self, name: str) -> GroupMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        spec = self._methods.get(name)
        if spec is None:
            owner = (
                f"role {self._role!r} of group {self._group.name!r}"
                if self._role
                else f"group {self._group.name!r}"
            )
            raise AttributeError(
                f"{owner} has no method {name!r}; registered methods: {self.methods} "
                "(worker methods need @register(...) to be callable from the driver)"
            )
        return GroupMethod(self._group, self._role, name, spec, self._ranks)

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._methods]

    def __repr__(self) -> str:
        return f"<role {self._role!r} of group {self._group.name!r}: {self.methods}>"
