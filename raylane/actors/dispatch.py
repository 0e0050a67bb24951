"""Dispatch modes: how a group call's arguments reach the ranks and how their results come back.

A worker method declares its mode with :func:`register`; the group does the rest:

    class Rollout(Worker):
        @register(Dispatch.DP_SHARD, pad=True)
        def generate(self, prompts: Batch) -> Batch: ...

Modes are entries of the ``DISPATCH_MODES`` registry, keyed by name: one class each,
with a ``plan`` (which rank gets which arguments) and a ``collect`` (how the results
combine). Register a new class under a new name to add a mode.

Data crosses to the ranks once: an argument sent to several ranks is ``ray.put`` once
and every rank gets the reference; a DP-sharded argument is put once per shard and the
shard reference is shared by the ranks of one TP group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar, TypeVar

import numpy as np
import ray
import torch

from raylane.actors.errors import DispatchError
from raylane.actors.mesh import MeshLayout
from raylane.batch import Batch
from raylane.registry import Registry

__all__ = [
    "DISPATCH_MODES",
    "CallPlan",
    "Dispatch",
    "DispatchMode",
    "DispatchTarget",
    "MethodSpec",
    "RankCall",
    "method_spec",
    "register",
]

F = TypeVar("F", bound=Callable[..., Any])

_SPEC_ATTR = "__raylane_dispatch__"
# Values cheap enough to send inline to every rank; anything else is put in the object store once.
_INLINE_TYPES = (type(None), bool, int, float, complex, str, Enum)


class Dispatch(StrEnum):
    """Names of the built-in dispatch modes."""

    ONE_TO_ALL = "one_to_all"
    """Every target rank gets the same arguments; returns the list of results in rank order."""
    ALL_TO_ALL = "all_to_all"
    """Every argument is a list with one entry per target rank; returns the list of results."""
    DP_SHARD = "dp_shard"
    """Split Batch/tensor arguments along dim 0 by DP rank, replicate inside each TP group,
    take the result of each DP group's first rank and concatenate them."""
    RANK_ZERO = "rank_zero"
    """Only rank 0 runs the call (so it must not enter a collective); returns its result."""


@dataclass(frozen=True)
class DispatchTarget:
    """Who a call goes to: the ranks addressed, out of the group's layout for the role."""

    group: str
    method: str
    ranks: tuple[int, ...]
    layout: MeshLayout

    @property
    def is_subset(self) -> bool:
        return self.ranks != tuple(range(self.layout.world_size))


@dataclass
class RankCall:
    """The arguments one rank receives; ``keep_result=False`` makes the rank return ``None``
    instead of a result nobody collects (e.g. the TP replicas of a DP group)."""

    rank: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    keep_result: bool = True


@dataclass
class CallPlan:
    """The per-rank calls of one group call, plus whatever ``collect`` needs to know."""

    calls: list[RankCall]
    state: Any = None

    @property
    def kept_ranks(self) -> list[int]:
        return [c.rank for c in self.calls if c.keep_result]


class DispatchMode(ABC):
    """One way of fanning a call out to ranks and folding their results back.

    Options given to :func:`register` are passed to the constructor, so a mode's options
    are checked when the worker class is defined, not at the first call. A mode that needs
    every rank sets ``supports_subset = False``; the group then refuses subset calls.
    """

    supports_subset: ClassVar[bool] = True

    @abstractmethod
    def plan(self, target: DispatchTarget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallPlan:
        """The per-rank calls for ``args``/``kwargs``; raises ``DispatchError`` on unfit input."""

    @abstractmethod
    def collect(self, target: DispatchTarget, plan: CallPlan, results: list[Any]) -> Any:
        """The call's result from the results of ``plan``'s kept calls (in plan order)."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


DISPATCH_MODES: Registry[type[DispatchMode]] = Registry("dispatch mode")


@dataclass(frozen=True)
class MethodSpec:
    """What :func:`register` records on a worker method."""

    mode_name: str
    mode: DispatchMode = field(compare=False)
    control: bool = False  # runs on the rank's control thread, beside a call in progress


def register(
    mode: str | F = Dispatch.ONE_TO_ALL, /, *, control: bool = False, **options: Any
) -> Callable[[F], F] | F:
    """Expose a worker method on its group, called with dispatch mode ``mode``.

    ``@register`` alone means ONE_TO_ALL. Options go to the mode, e.g.
    ``@register(Dispatch.DP_SHARD, pad=True)``. ``control=True`` runs the method on the rank's
    control thread instead of in call order, so it starts while a long call is still running: for
    short, thread-safe methods that signal that call (a flag it polls), never for model work.
    """
    if callable(mode) and not isinstance(mode, str):
        return register(Dispatch.ONE_TO_ALL)(mode)
    name = str(mode)
    mode_cls = DISPATCH_MODES.get(name)
    try:
        instance = mode_cls(**options)
    except TypeError as exc:
        raise TypeError(f"bad options {options} for dispatch mode {name!r}: {exc}") from None

    def decorate(fn: F) -> F:
        setattr(fn, _SPEC_ATTR, MethodSpec(name, instance, control))
        return fn

    return decorate


def method_spec(fn: Any) -> MethodSpec | None:
    """The dispatch spec :func:`register` put on ``fn``, or ``None`` for a plain method."""
    return getattr(fn, _SPEC_ATTR, None)


def share(value: Any, fanout: int) -> Any:
    """``value`` itself if it goes to one rank or is a small scalar, else one object-store reference."""
    if fanout <= 1 or isinstance(value, (*_INLINE_TYPES, ray.ObjectRef)):
        return value
    return ray.put(value)


@DISPATCH_MODES.register(Dispatch.ONE_TO_ALL)
class OneToAll(DispatchMode):
    """Same arguments to every target rank; results as a list in rank order."""

    def plan(self, target: DispatchTarget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallPlan:
        fanout = len(target.ranks)
        shared_args = tuple(share(a, fanout) for a in args)
        shared_kwargs = {k: share(v, fanout) for k, v in kwargs.items()}
        return CallPlan([RankCall(rank, shared_args, shared_kwargs) for rank in target.ranks])

    def collect(self, target: DispatchTarget, plan: CallPlan, results: list[Any]) -> list[Any]:
        return results


@DISPATCH_MODES.register(Dispatch.ALL_TO_ALL)
class AllToAll(DispatchMode):
    """Entry ``i`` of every argument goes to the ``i``-th target rank; results as a list."""

    def plan(self, target: DispatchTarget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallPlan:
        count = len(target.ranks)
        named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
            (f"argument {k!r}", v) for k, v in kwargs.items()
        ]
        for label, value in named:
            if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != count:
                got = f"{len(value)} entries" if isinstance(value, Sequence) else type(value).__name__
                raise DispatchError(
                    f"{target.method} uses ALL_TO_ALL on {count} ranks: every argument must be a list with one "
                    f"entry per rank, but {label} has {got}"
                )
        calls = [
            RankCall(rank, tuple(a[i] for a in args), {k: v[i] for k, v in kwargs.items()})
            for i, rank in enumerate(target.ranks)
        ]
        return CallPlan(calls)

    def collect(self, target: DispatchTarget, plan: CallPlan, results: list[Any]) -> list[Any]:
        return results


@DISPATCH_MODES.register(Dispatch.RANK_ZERO)
class RankZero(DispatchMode):
    """Only rank 0 runs; its result is the call's result."""

    supports_subset = False

    def plan(self, target: DispatchTarget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallPlan:
        return CallPlan([RankCall(0, args, kwargs)])

    def collect(self, target: DispatchTarget, plan: CallPlan, results: list[Any]) -> Any:
        return results[0]


_Rows = Batch | torch.Tensor | np.ndarray


def _is_rows(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    if isinstance(value, np.ndarray):
        return value.ndim > 0
    return isinstance(value, Batch)


@dataclass(frozen=True)
class _ShardState:
    rows: int
    padding: int


def _pad_rows(value: _Rows, extra: int, divisor: int) -> _Rows:
    if isinstance(value, Batch):
        return value.pad_to_divisor(divisor)
    repeat = np.arange(extra) % len(value)
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value[torch.from_numpy(repeat).to(value.device)]])
    return np.concatenate([value, value[repeat]])


def _chunk_rows(value: _Rows, parts: int) -> list[_Rows]:
    if isinstance(value, Batch):
        return value.chunk(parts)
    if isinstance(value, torch.Tensor):
        return list(value.chunk(parts))
    return np.split(value, parts)


def concat_rows(results: list[Any]) -> Any:
    """Concatenate per-DP-rank results along dim 0 when they are rows (Batch, tensor, array);
    ``None`` if every rank returned ``None``; otherwise the list of results unchanged."""
    if all(r is None for r in results):
        return None
    if all(isinstance(r, Batch) for r in results):
        return Batch.concat(results)
    if all(isinstance(r, torch.Tensor) and r.dim() > 0 for r in results):
        return torch.cat(results)
    if all(isinstance(r, np.ndarray) and r.ndim > 0 for r in results):
        return np.concatenate(results)
    return results


@DISPATCH_MODES.register(Dispatch.DP_SHARD)
class DPShard(DispatchMode):
    """Split rows by DP rank, replicate within TP groups, gather one result per DP group.

    Every ``Batch``, tensor and numpy array argument is split along dim 0 (they must have
    the same number of rows); other arguments go to every rank. With ``pad=True`` a row
    count that does not divide by the DP size is padded with copies of the first rows
    (the shard's ``Batch.num_padding`` marks them) and the padding rows are dropped from
    the gathered result; with ``pad=False`` (the default, because padding rows change
    what a training step sees) such a batch is refused. ``merge`` folds the DP groups' results
    into one (default: :func:`concat_rows`), for results whose rows need more than concatenating.
    """

    supports_subset = False

    def __init__(self, pad: bool = False, merge: Callable[[list[Any]], Any] | None = None) -> None:
        self.pad = pad
        self.merge = merge or concat_rows

    def plan(self, target: DispatchTarget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallPlan:
        layout = target.layout
        positions = [i for i, a in enumerate(args) if _is_rows(a)]
        names = [k for k, v in kwargs.items() if _is_rows(v)]
        if not positions and not names:
            raise DispatchError(
                f"{target.method} uses DP_SHARD but got no Batch, tensor or array argument to split by rows "
                "(object refs are passed to every rank unsplit: pass the Batch itself)"
            )
        lengths = {len(args[i]) for i in positions} | {len(kwargs[k]) for k in names}
        if len(lengths) > 1:
            raise DispatchError(
                f"{target.method}: DP_SHARD arguments have different row counts {sorted(lengths)}"
            )
        rows = lengths.pop()
        extra = -rows % layout.dp
        if extra and not self.pad:
            raise DispatchError(
                f"{target.method} got {rows} rows, which do not split evenly over the {layout.dp} data-parallel "
                f"ranks of group {target.group!r}; send a multiple of {layout.dp} rows, pad with "
                f"Batch.pad_to_divisor({layout.dp}), or declare @register(Dispatch.DP_SHARD, pad=True)"
            )

        def shards(value: _Rows) -> list[ray.ObjectRef]:
            padded = _pad_rows(value, extra, layout.dp) if extra else value
            return [ray.put(chunk) for chunk in _chunk_rows(padded, layout.dp)]

        fanout = layout.world_size
        arg_shards = {i: shards(args[i]) for i in positions}
        kwarg_shards = {k: shards(kwargs[k]) for k in names}
        shared_args = [share(a, fanout) if i not in arg_shards else None for i, a in enumerate(args)]
        shared_kwargs = {k: share(v, fanout) for k, v in kwargs.items() if k not in kwarg_shards}
        calls = []
        for rank in target.ranks:
            dp_rank = layout.dp_rank(rank)
            rank_args = tuple(
                arg_shards[i][dp_rank] if i in arg_shards else a for i, a in enumerate(shared_args)
            )
            rank_kwargs = {**shared_kwargs, **{k: s[dp_rank] for k, s in kwarg_shards.items()}}
            calls.append(RankCall(rank, rank_args, rank_kwargs, keep_result=layout.tp_rank(rank) == 0))
        return CallPlan(calls, _ShardState(rows=rows, padding=extra))

    def collect(self, target: DispatchTarget, plan: CallPlan, results: list[Any]) -> Any:
        merged = self.merge(results)
        state: _ShardState = plan.state
        if not state.padding or not _is_rows(merged):
            return merged
        padded_rows = state.rows + state.padding
        if len(merged) != padded_rows:
            raise DispatchError(
                f"{target.method} returned {len(merged)} rows for {padded_rows} input rows (incl. "
                f"{state.padding} padding rows); with pad=True its results must have one row per input row"
            )
        return merged.index(slice(0, state.rows)) if isinstance(merged, Batch) else merged[: state.rows]
