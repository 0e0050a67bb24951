"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP) and Hugging Face export.

DCP stores every rank's shards with their global layout, so a checkpoint written at one DP size
loads at another: each rank reads exactly the slices its new shards cover. Next to the DCP files:
the LR-schedule state and step (identical on every rank), each rank's RNG state, and a small
``extra`` dict from the controller (data position, metrics history). :class:`BackgroundSaver`
writes the same files, persisting the shards in the background (``lazy``: also taking the snapshot
while the next step runs).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_state_dict,
)

from raylane.fault_tolerance.checkpoint_slots import HostSlots
from raylane.fault_tolerance.train_state import FlatTrainState, train_state
from raylane.models import ModelConfig, save_checkpoint

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DCP_DIR = "dcp"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointLoadError(RuntimeError):
    """A training checkpoint is missing files or holds truncated or corrupt ones; the message names them."""


def _damaged(path: str, problem: str) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"cannot resume from {path!r}: {problem}. The checkpoint is incomplete or corrupt (an interrupted "
        "save or copy?): resume from an earlier step_* folder, or start over without resume"
    )


def _check_dcp_files(path: str, dcp_dir: str) -> None:
    """Every shard file the DCP metadata references is there and long enough (cheap, before loading)."""
    try:
        metadata = FileSystemReader(dcp_dir).read_metadata()
    except FileNotFoundError:
        raise _damaged(path, f"{os.path.join(dcp_dir, '.metadata')} is missing") from None
    except Exception as exc:
        raise _damaged(path, f"{os.path.join(dcp_dir, '.metadata')} is unreadable ({exc!r})") from exc
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(dcp_dir, name)
        if not os.path.isfile(file):
            raise _damaged(path, f"the shard {file} is missing")
        if os.path.getsize(file) < size:
            raise _damaged(
                path, f"the shard {file} is truncated: {os.path.getsize(file)} bytes of at least {size}"
            )


def _restore(path: str, file: str, apply: Callable[[dict], T]) -> T:
    """``apply`` to what ``file`` (saved with torch.save) holds; any failure names the file."""
    try:
        return apply(torch.load(file, weights_only=False))
    except Exception as exc:
        raise _damaged(path, f"{file} is unreadable or does not hold what raylane saved ({exc!r})") from exc


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rank_files(path: str, scheduler, step: int, rank: int, extra: dict) -> None:
    """What DCP does not hold: this rank's RNG state and (rank 0) the LR schedule, step and ``extra``."""
    os.makedirs(path, exist_ok=True)
    torch.save({"rng": _rng_state()}, os.path.join(path, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(
            {"scheduler": scheduler.state_dict(), "step": step, "extra": extra},
            os.path.join(path, "train_state.pt"),
        )


def _shard_writer(path: str, writer_threads: int, keep_host_copy: bool = False) -> FileSystemWriter:
    """DCP's file writer for ``path``; with several threads each rank's shards go to as many files,
    written in parallel (one thread leaves a fast disk mostly idle). With ``keep_host_copy`` it stages
    into pinned host buffers that it keeps for its next save."""
    return FileSystemWriter(
        os.path.join(path, _DCP_DIR), thread_count=writer_threads, cache_staged_state_dict=keep_host_copy
    )


def save_train_state(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    rank: int,
    extra: dict,
    writer_threads: int = 1,
) -> None:
    """Collective: every rank of the model's process group calls it with the same ``path``."""
    _save_rank_files(path, scheduler, step, rank, extra)
    dcp.save(train_state(model, optimizer), storage_writer=_shard_writer(path, writer_threads))
    if rank == 0:
        logger.info("saved checkpoint of step %d to %s", step, path)


class BackgroundSaver:
    """One rank's asynchronous checkpoints: :meth:`save` snapshots the shards to host memory and returns,
    while a thread writes them. At most one write is in flight: a new save first waits for the previous
    one, whose host copies it overwrites. The writes run their collectives on a process group of their
    own (gloo), so they never interleave with the training step's collectives on the model's group.

    Where CUDA is present, the host copies are pinned and kept from one save to the next: a snapshot
    is then one device-to-host copy into memory that is already paged in, instead of an allocation of
    the whole state each time. The price is host memory the size of this rank's shards, held while
    the saver lives.

    With ``lazy`` (DataStates' idea) :meth:`save` returns before the snapshot is taken: the copy to
    host memory starts at the model's next forward, so that it overlaps training rather than a
    colocated engine's decoding, and runs while the step goes on (on CUDA on a side stream, on CPU in
    the writer thread). Its host buffers are the memory tier's shard files (:class:`HostSlots`, under
    ``host_dir``): the copy writes the checkpoint, and publishing it is a hard link per file. The first
    lazy save, and one after the state's layout changes, writes with ``dcp.save`` before returning.
    Parameters and optimizer state change only in the optimizer step, so that is what waits: a step
    pre-hook on the snapshotted optimizer orders it after the copy (on CUDA on the device, without
    blocking the host), so the snapshot of step k cannot hold step k+1's state; anything else that
    writes the state in place calls :meth:`wait_snapshot` first."""

    def __init__(self, lazy: bool = False) -> None:
        self.lazy = lazy
        self._group: dist.ProcessGroup | None = None
        self._writer: FileSystemWriter | None = None
        self._slots: HostSlots | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._snapshot: Future | None = None
        self._persist: Future | None = None
        self._pending: tuple[Callable[[], Callable[[], None]], Callable[[], None]] | None = None
        self._hooked: set[int] = set()
        self._state = FlatTrainState()

    def save(
        self,
        path: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        step: int,
        rank: int,
        extra: dict,
        writer_threads: int = 1,
        host_dir: str | None = None,
    ) -> None:
        """Collective, like :func:`save_train_state`; returns once the snapshot is taken (``lazy``: at once).
        ``lazy`` needs ``host_dir``: a folder on the filesystem of ``path`` (the memory tier) for the
        host buffers, one per role, kept from save to save."""
        if self.lazy and host_dir is None:
            raise ValueError(
                "a lazy BackgroundSaver needs host_dir, a folder beside the memory tier's checkpoints"
            )
        self.wait()
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        # Small and host-side (RNG, schedule, ``extra``): written now, at the step boundary.
        _save_rank_files(path, scheduler, step, rank, extra)
        if self.lazy:
            self._save_lazily(path, model, optimizer, writer_threads, host_dir)
            return
        if self._writer is None or self._writer.thread_count != writer_threads:
            # The writer holds the host copies; DCP points it at each new checkpoint_id.
            self._writer = _shard_writer(path, writer_threads, keep_host_copy=torch.cuda.is_available())
        # The writer stages synchronously: the shards are in host memory when async_save returns, so
        # the next optimizer step may change the parameters in place.
        self._persist = dcp.async_save(
            train_state(model, optimizer),
            checkpoint_id=os.path.join(path, _DCP_DIR),
            storage_writer=self._writer,
            process_group=self._group,
        )

    def _save_lazily(
        self,
        path: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        writer_threads: int,
        host_dir: str,
    ) -> None:
        if self._slots is None or self._slots.root != host_dir:
            if self._slots is not None:
                self._slots.close()
            self._slots = HostSlots(host_dir, self._group)
            self._thread = self._thread or ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="raylane-lazy-checkpoint"
            )
        if id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(lambda *_: self._order_step_after_snapshot())
            self._hooked.add(id(optimizer))
        dcp_dir = os.path.join(path, _DCP_DIR)
        state, flat = self._state.get(model, optimizer)
        slot = self._slots.acquire(flat)
        if slot is None:
            state = state or train_state(model, optimizer)
            self._slots.rebuild(state, flat, writer_threads).publish(dcp_dir)
            return
        self._pending = (lambda: self._slots.start_copy(slot, flat), lambda: slot.publish(dcp_dir))
        # On a GPU the copy engine would hold back every small device-to-host read queued behind 4 GB of
        # state (a colocated engine reads its sampled tokens each decode step), so the copy waits for
        # the model's next forward (training, where no such reads are), its optimizer step or a wait.
        if id(model) not in self._hooked:
            model.register_forward_pre_hook(lambda *_: self._start_pending())
            self._hooked.add(id(model))

    def _start_pending(self) -> None:
        if self._pending is None:
            return
        (start, publish), self._pending = self._pending, None
        snapshot = self._thread.submit(start())
        # Queued behind the snapshot on the same thread: the copy is in the files when it runs.
        self._persist = self._thread.submit(lambda: (snapshot.result(), publish()))
        self._snapshot = snapshot

    def _order_step_after_snapshot(self) -> None:
        self._start_pending()
        if self._snapshot is None:
            return
        if self._slots.cuda:
            self._slots.order_after()
        else:
            self._snapshot.result()

    def wait_snapshot(self) -> None:
        """Block until the state of the save in flight is in host memory; raises if the copy failed."""
        self._start_pending()
        if self._snapshot is not None:
            self._snapshot.result()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; raises if it failed."""
        self._start_pending()
        snapshot, persist, self._snapshot, self._persist = self._snapshot, self._persist, None, None
        if snapshot is not None:
            snapshot.result()
        if persist is not None:
            persist.result()


def load_train_state(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int
) -> tuple[int, dict]:
    """Collective: restore model and optimizer shards (at any DP size), schedule, RNG; returns (step, extra)."""
    meta_path = os.path.join(path, "train_state.pt")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path!r} is not a raylane checkpoint (no train_state.pt); pick a step_* folder"
        )

    def restore_schedule(meta: dict) -> tuple[int, dict]:
        scheduler.load_state_dict(meta["scheduler"])
        return meta["step"], meta["extra"]

    step, extra = _restore(path, meta_path, restore_schedule)
    dcp_dir = os.path.join(path, _DCP_DIR)
    _check_dcp_files(path, dcp_dir)
    state = train_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=dcp_dir)
    except (Exception, CheckpointException) as exc:  # DCP's error derives from BaseException
        raise _damaged(path, f"the shards in {dcp_dir} cannot be read ({exc!r})") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_path):
        # Resuming on more ranks than were saved: new ranks continue from rank 0's stream.
        rng_path = os.path.join(path, "rng_rank0.pt")
    _restore(path, rng_path, lambda saved: _set_rng_state(saved["rng"]))
    return step, extra


def save_hf_checkpoint(path: str, model: nn.Module, source_dir: str, rank: int) -> None:
    """Collective: gather full weights and write them (rank 0) as a Hugging Face checkpoint with tokenizer."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    config = ModelConfig.from_pretrained(source_dir)
    save_checkpoint(state, config, path)
    for name in _TOKENIZER_FILES:
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(path, name))
    logger.info("exported Hugging Face checkpoint to %s", path)
