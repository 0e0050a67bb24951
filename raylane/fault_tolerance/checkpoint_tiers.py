"""The two tiers of ``checkpoint_mode=lazy``: memory (a :class:`CheckpointStore` on tmpfs) and disk.

Every checkpoint is committed to the memory tier within the step after it: a folder in ``/dev/shm``
outlives the process that wrote it, so a crashed rank or driver resumes from it, losing at most the
step in flight. A :class:`DiskPersister` thread copies memory checkpoints to the disk store as fast as
the disk allows, always the newest one: when the disk is slower than one checkpoint per step, the
steps it had no time for stay in memory only (coalescing), and training never waits for the disk.
The memory tier keeps its newest checkpoint and the one being copied; a node's loss loses its memory
tier, so there only the disk tier counts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from raylane.fault_tolerance.checkpoint_store import CheckpointStore

logger = logging.getLogger(__name__)

MEMORY_TIER_ROOT = "/dev/shm/raylane-checkpoints"
# Under the memory tier's root: the lazy savers' host buffers, the files its checkpoints link.
HOST_BUFFERS_DIR = ".host"


def memory_tier_dir(output_dir: str) -> str:
    """The memory tier of the job writing to ``output_dir``: the same folder for every run of it, so
    a resumed run finds what a crashed one left."""
    key = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:16]
    return os.path.join(MEMORY_TIER_ROOT, f"{os.path.basename(os.path.abspath(output_dir))}-{key}")


def newest_checkpoint(*stores: CheckpointStore) -> str | None:
    """The newest complete checkpoint of ``stores`` (a tie goes to the first), or None."""
    newest = [(steps[-1], store) for store in stores if (steps := store.complete_steps())]
    if not newest:
        return None
    step, store = max(newest, key=lambda entry: entry[0])
    return store.path(step)


def _copy_file(source: str, target: str) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())


def copy_checkpoint(source: str, target: str, threads: int = 4) -> None:
    """Copy the checkpoint folder ``source`` into the empty folder ``target``, every file synced to
    disk, ``threads`` files at a time (the shards of each rank are several files)."""
    files = []
    for folder, _, names in os.walk(source):
        relative = os.path.relpath(folder, source)
        os.makedirs(os.path.join(target, relative), exist_ok=True)
        files += [(os.path.join(folder, n), os.path.join(target, relative, n)) for n in names]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda pair: _copy_file(*pair), files))


def persist_to_disk(source: str, disk: CheckpointStore, step: int, threads: int = 4) -> str:
    """Copy the memory-tier checkpoint folder ``source`` into ``disk`` as ``step`` and commit it there;
    returns its path on disk."""
    copy_checkpoint(source, disk.staging(step), threads)
    return disk.commit(step)


class DiskPersister:
    """A thread that copies committed memory-tier checkpoints to the disk store, newest first.

    :meth:`offer` hands it the step just committed to ``memory`` and never blocks; a step offered
    while an older one is still being copied, or before ``min_interval_s`` has passed since the last
    copy started, replaces any step waiting (counted in ``skipped``). The interval is for hosts where
    writing to disk slows the training step (an H200 VM's GPU loop ran at half speed while a 4 GB
    file was copied to its disk): a node's loss then loses about the interval and one copy's time.
    ``persisted`` is the newest step committed to ``disk``. A failed copy is raised by the next
    :meth:`offer` or :meth:`drain`; :meth:`drain` copies the step waiting without waiting out the interval."""

    def __init__(
        self, memory: CheckpointStore, disk: CheckpointStore, threads: int = 4, min_interval_s: float = 0.0
    ) -> None:
        self.memory, self.disk, self.threads, self.min_interval_s = memory, disk, threads, min_interval_s
        self.persisted: int | None = None
        self.skipped = 0
        self._waiting: int | None = None
        self._copying: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._draining = False
        self._next_copy_at = 0.0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="raylane-disk-persister", daemon=True)
        self._thread.start()

    def offer(self, step: int) -> None:
        """Persist the memory checkpoint of ``step`` once the thread is free, unless a newer one comes first."""
        with self._changed:
            self._raise_error()
            if self._waiting is not None:
                self.skipped += 1
            self._waiting = step
            self._prune_memory()
            self._changed.notify_all()

    def drain(self) -> None:
        """Block until every offered checkpoint is on disk (or skipped for a newer one); raises a failed copy."""
        with self._changed:
            self._draining = True
            self._changed.notify_all()
            try:
                self._changed.wait_for(
                    lambda: self._error or (self._waiting is None and self._copying is None)
                )
            finally:
                self._draining = False
            self._raise_error()

    def close(self) -> None:
        """Stop after the copy in progress (a checkpoint left half-copied stays uncommitted)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                f"persisting a memory-tier checkpoint to {self.disk.root} failed ({self._error!r}); the "
                f"newest checkpoints are in {self.memory.root}: free disk space or fix the folder's "
                "permissions and resume_from=latest"
            ) from self._error

    def _prune_memory(self) -> None:
        """Keep the newest memory checkpoint and the one being copied (caller holds the lock)."""
        for step in self.memory.complete_steps()[:-1]:
            if step != self._copying and step != self._waiting:
                shutil.rmtree(self.memory.path(step), ignore_errors=True)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed:
                    if self._waiting is None:
                        self._changed.wait()
                        continue
                    delay = 0.0 if self._draining else self._next_copy_at - time.monotonic()
                    if delay <= 0:
                        break
                    self._changed.wait(delay)
                if self._closed:
                    return
                self._copying, self._waiting = self._waiting, None
                self._next_copy_at = time.monotonic() + self.min_interval_s
            step = self._copying
            try:
                persist_to_disk(self.memory.path(step), self.disk, step, self.threads)
            except BaseException as exc:  # handed to the training thread by offer() and drain()
                logger.exception("persisting the memory checkpoint of step %d failed", step)
                with self._changed:
                    self._error, self._copying = exc, None
                    self._changed.notify_all()
                return
            with self._changed:
                self.persisted, self._copying = step, None
                self._prune_memory()
                self._changed.notify_all()
