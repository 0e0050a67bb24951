"""``Batch``: the rows that flow between the single controller and its worker groups.

A batch holds named tensors and named non-tensor columns (prompts, raw answers, anything
picklable), all with the same number of rows along dim 0, plus a ``meta`` dict for
batch-wide values (policy version, temperature, ...). Worker groups split batches across
data-parallel ranks and concatenate the results, so every row operation here (index,
split, chunk, concat, pad) keeps all columns aligned.

Through Ray's object store a batch travels as raw buffers: its tensors are pickled as
uint8 numpy views, which Ray writes out-of-band straight into shared memory, so one
``ray.put`` costs one memory copy instead of ``torch.save``'s several, and a reader pays
one copy to get private, writable tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Batch"]

Index = int | slice | Sequence[int] | np.ndarray | torch.Tensor


def _as_column(name: str, value: Any) -> np.ndarray:
    """A non-tensor column as a numpy array with at least one dimension."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise ValueError(f"non-tensor field {name!r} is a 0-d array; fields need one entry per row")
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(
            f"non-tensor field {name!r} must be a list or numpy array with one entry per row, "
            f"got {type(value).__name__}; put batch-wide values in `meta`"
        )
    items = list(value)
    # Element-wise assignment: np.array() would turn a list of equal-length lists into a 2-D array.
    column = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        column[i] = item
    return column


def _rows_index(index: Index, length: int) -> slice | torch.Tensor:
    """Normalise a row index to a slice or a 1-D int64 tensor of row positions."""
    if isinstance(index, slice):
        return index
    if isinstance(index, int):
        if not -length <= index < length:
            raise IndexError(f"row {index} is out of range for a batch of {length} rows")
        return slice(index % length, index % length + 1)
    rows = index if isinstance(index, torch.Tensor) else torch.as_tensor(np.asarray(index))
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.long)  # np.asarray([]) is float64
    if rows.dtype == torch.bool:
        if rows.shape != (length,):
            raise IndexError(f"boolean row mask has shape {tuple(rows.shape)}, expected ({length},)")
        return rows.nonzero().flatten()
    if rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise IndexError(f"row index must hold integers or booleans, got {rows.dtype}")
    rows = rows.long().flatten()
    if rows.numel() and not (-length <= int(rows.min()) and int(rows.max()) < length):
        raise IndexError(f"row index out of range for a batch of {length} rows")
    return torch.where(rows < 0, rows + length, rows)


def _tensor_state(tensor: torch.Tensor) -> tuple[np.ndarray, str, tuple[int, ...]]:
    # A uint8 view lets numpy carry any dtype (bfloat16 has no numpy equivalent) as a raw buffer.
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy(), str(flat.dtype).removeprefix("torch."), tuple(tensor.shape)


def _tensor_from_state(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    # Copy out of the read-only shared-memory buffer: the tensor must be private and writable,
    # since ranks on one node read the same object.
    return torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).reshape(shape)


def _rebuild(tensors: dict, non_tensors: dict, meta: dict, num_padding: int) -> Batch:
    restored = {name: _tensor_from_state(*state) for name, state in tensors.items()}
    return Batch(restored, non_tensors, meta, num_padding=num_padding)


class Batch:
    """Named tensors + named non-tensor columns + ``meta``, row-aligned along dim 0.

    ``num_padding`` counts trailing rows added by :meth:`pad_to_divisor`; :meth:`unpad`
    drops them. Row operations keep the count right for the rows they keep, so a worker
    that receives one chunk of a padded batch can tell its padding rows apart (for
    example to leave them out of a loss).
    """

    __slots__ = ("meta", "non_tensors", "num_padding", "tensors")

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        non_tensors: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        num_padding: int = 0,
    ) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.non_tensors: dict[str, np.ndarray] = {
            name: _as_column(name, value) for name, value in (non_tensors or {}).items()
        }
        self.meta: dict[str, Any] = dict(meta or {})
        self.num_padding = num_padding
        self._check()

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Batch:
        """Build a batch from one mapping: tensors become tensor fields, everything else a column."""
        tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}
        return cls(tensors, others, meta)

    def _check(self) -> None:
        clash = self.tensors.keys() & self.non_tensors.keys()
        if clash:
            raise ValueError(f"fields {sorted(clash)} are both tensor and non-tensor fields")
        lengths: dict[str, int] = {}
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor field {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.dim() == 0:
                raise ValueError(f"tensor field {name!r} is 0-d; fields need one entry per row (dim 0)")
            lengths[name] = tensor.shape[0]
        for name, column in self.non_tensors.items():
            lengths[name] = len(column)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"fields have different numbers of rows: {lengths}")
        if not 0 <= self.num_padding <= len(self):
            raise ValueError(f"num_padding={self.num_padding} is outside [0, {len(self)}]")

    # -- fields ---------------------------------------------------------------------------

    def __len__(self) -> int:
        for tensor in self.tensors.values():
            return tensor.shape[0]
        for column in self.non_tensors.values():
            return len(column)
        return 0

    def keys(self) -> list[str]:
        """Tensor field names, then non-tensor field names."""
        return [*self.tensors, *self.non_tensors]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors or name in self.non_tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __setitem__(self, name: str, value: Any) -> None:
        """Add or replace one field; its row count must match the batch's."""
        self.tensors.pop(name, None)
        self.non_tensors.pop(name, None)
        if isinstance(value, torch.Tensor):
            self.tensors[name] = value
        else:
            self.non_tensors[name] = _as_column(name, value)
        try:
            self._check()
        except (ValueError, TypeError):
            self.tensors.pop(name, None)
            self.non_tensors.pop(name, None)
            raise

    def __getitem__(self, key: str | Index) -> Any:
        """``batch["name"]`` is a field; any row index (int, slice, list, mask) is a sub-batch."""
        if isinstance(key, str):
            if key in self.tensors:
                return self.tensors[key]
            if key in self.non_tensors:
                return self.non_tensors[key]
            raise KeyError(f"batch has no field {key!r}; fields: {self.keys()}")
        return self.index(key)

    def select(self, *names: str) -> Batch:
        """A batch with only the named fields (same rows, same meta)."""
        missing = [n for n in names if n not in self]
        if missing:
            raise KeyError(f"batch has no fields {missing}; fields: {self.keys()}")
        return Batch(
            {n: t for n, t in self.tensors.items() if n in names},
            {n: c for n, c in self.non_tensors.items() if n in names},
            self.meta,
            num_padding=self.num_padding,
        )

    def union(self, other: Batch) -> Batch:
        """A batch with the fields of both; a field in both must hold equal values."""
        if len(self) != len(other) and self.keys() and other.keys():
            raise ValueError(f"cannot union batches of {len(self)} and {len(other)} rows")
        tensors = dict(self.tensors)
        for name, tensor in other.tensors.items():
            if name in tensors and not torch.equal(tensors[name], tensor):
                raise ValueError(f"field {name!r} is in both batches with different values")
            tensors[name] = tensor
        columns = dict(self.non_tensors)
        for name, column in other.non_tensors.items():
            if name in columns and not np.array_equal(columns[name], column):
                raise ValueError(f"field {name!r} is in both batches with different values")
            columns[name] = column
        return Batch(tensors, columns, {**self.meta, **other.meta}, num_padding=self.num_padding)

    # -- rows -----------------------------------------------------------------------------

    def index(self, rows: Index) -> Batch:
        """The rows picked by an int, slice, integer sequence or boolean mask, as a batch.

        An int keeps dim 0 (``batch.index(3)`` has one row). Contiguous slices keep track
        of padding rows; other indexing returns exactly the rows asked for, unmarked.
        """
        length = len(self)
        picked = _rows_index(rows, length)
        if isinstance(picked, slice):
            start, stop, step = picked.indices(length)
            tensors = {n: t[start:stop:step] for n, t in self.tensors.items()}
            columns = {n: c[start:stop:step] for n, c in self.non_tensors.items()}
            padding = self._padding_in(start, stop) if step == 1 else 0
            return Batch(tensors, columns, self.meta, num_padding=padding)
        numpy_rows = picked.numpy()
        tensors = {n: t.index_select(0, picked.to(t.device)) for n, t in self.tensors.items()}
        columns = {n: c[numpy_rows] for n, c in self.non_tensors.items()}
        return Batch(tensors, columns, self.meta)

    def _padding_in(self, start: int, stop: int) -> int:
        real = len(self) - self.num_padding
        return max(0, stop - max(start, real)) if stop > start else 0

    def split(self, size: int) -> list[Batch]:
        """Consecutive batches of ``size`` rows; the last one may be shorter."""
        if size <= 0:
            raise ValueError(f"split size must be positive, got {size}")
        return [self.index(slice(i, i + size)) for i in range(0, len(self), size)]

    def chunk(self, parts: int) -> list[Batch]:
        """``parts`` consecutive batches of equal size; the row count must divide evenly."""
        if parts <= 0:
            raise ValueError(f"chunk count must be positive, got {parts}")
        if len(self) % parts:
            raise ValueError(
                f"a batch of {len(self)} rows does not split into {parts} equal chunks; "
                f"call pad_to_divisor({parts}) first"
            )
        size = len(self) // parts
        return [self.index(slice(i * size, (i + 1) * size)) for i in range(parts)]

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """Rows of all ``batches`` in order; fields must match. Meta comes from the first batch."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        first = batches[0]
        for i, batch in enumerate(batches[1:], start=1):
            if list(batch.tensors) != list(first.tensors) or list(batch.non_tensors) != list(
                first.non_tensors
            ):
                raise ValueError(f"batch {i} has fields {batch.keys()}, batch 0 has {first.keys()}")
        for i, batch in enumerate(batches[:-1]):
            if batch.num_padding and any(len(b) - b.num_padding for b in batches[i + 1 :]):
                raise ValueError(f"batch {i} ends with padding rows but later batches hold real rows")
        tensors = {n: torch.cat([b.tensors[n] for b in batches]) for n in first.tensors}
        columns = {n: np.concatenate([b.non_tensors[n] for b in batches]) for n in first.non_tensors}
        return Batch(tensors, columns, first.meta, num_padding=sum(b.num_padding for b in batches))

    def pad_to_divisor(self, divisor: int) -> Batch:
        """Append copies of the first rows until the row count divides by ``divisor``.

        Copies of real rows (not zeros) keep every padded row a valid input (token ids,
        masks); ``num_padding`` records how many were added so :meth:`unpad` can drop them.
        """
        if divisor <= 0:
            raise ValueError(f"divisor must be positive, got {divisor}")
        length = len(self)
        extra = -length % divisor
        if extra == 0:
            return self.index(slice(0, length))
        repeated = self.index(torch.arange(extra) % length)
        tensors = {n: torch.cat([t, repeated.tensors[n]]) for n, t in self.tensors.items()}
        columns = {n: np.concatenate([c, repeated.non_tensors[n]]) for n, c in self.non_tensors.items()}
        return Batch(tensors, columns, self.meta, num_padding=self.num_padding + extra)

    def unpad(self) -> Batch:
        """The batch without its trailing padding rows."""
        return self.index(slice(0, len(self) - self.num_padding))

    # -- storage --------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> Batch:
        """A batch with every tensor on ``device``."""
        moved = {n: t.to(device) for n, t in self.tensors.items()}
        return Batch(moved, self.non_tensors, self.meta, num_padding=self.num_padding)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensor fields."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __reduce__(self) -> tuple:
        tensors = {name: _tensor_state(t) for name, t in self.tensors.items()}
        return _rebuild, (tensors, self.non_tensors, self.meta, self.num_padding)

    def __repr__(self) -> str:
        tensors = ", ".join(
            f"{n}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in self.tensors.items()
        )
        return (
            f"Batch(len={len(self)}, tensors={{{tensors}}}, non_tensors={list(self.non_tensors)}, "
            f"meta={list(self.meta)}, num_padding={self.num_padding})"
        )
