"""A job's checkpoints folder, where a checkpoint appears whole or not at all.

Each checkpoint is written under a hidden staging name (``.step_N.partial``); once every rank has
persisted its part, :meth:`CheckpointStore.commit` writes a ``COMPLETE`` marker into it and renames it
to ``step_N``. A crash mid-persist leaves the staging folder behind and the previous ``step_*``
loadable; :meth:`CheckpointStore.latest` picks the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d+)")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str) -> bool:
    """Whether ``path`` is a checkpoint whose every part was persisted and committed."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


class CheckpointStore:
    """``root/step_N`` folders, committed atomically, the last ``keep_last`` of them kept (None: all)."""

    def __init__(self, root: str, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (got {keep_last}); None keeps every checkpoint")
        self.root = root
        self.keep_last = keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step}")

    def staging(self, step: int) -> str:
        """An empty folder to write the checkpoint of ``step`` into; what an interrupted save left is removed."""
        path = os.path.join(self.root, f".step_{step}.partial")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def commit(self, step: int) -> str:
        """Mark the staged checkpoint of ``step`` complete and publish it as ``step_N``; returns its path."""
        staged, final = os.path.join(self.root, f".step_{step}.partial"), self.path(step)
        marker = os.path.join(staged, COMPLETE_MARKER)
        with open(marker, "w") as f:
            json.dump({"step": step, "committed_at": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(staged)
        # A resumed run saves the steps after its checkpoint again: the newer lineage wins.
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(staged, final)
        _fsync_dir(self.root)
        logger.info("committed checkpoint %s", final)
        self._prune()
        return final

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.root):
            return []
        steps = [
            int(match.group(1))
            for name in os.listdir(self.root)
            if (match := _STEP_DIR.fullmatch(name)) and is_complete(os.path.join(self.root, name))
        ]
        return sorted(steps)

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None."""
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for step in self.complete_steps()[: -self.keep_last]:
            shutil.rmtree(self.path(step))
            logger.info("removed checkpoint %s (keep_last=%d)", self.path(step), self.keep_last)
