"""JSONL prompt datasets and a resumable, deterministic batch loader over them.

One JSON object per line::

    {"prompt": "12+35=", "ground_truth": "47"}
    {"messages": [{"role": "user", "content": "..."}], "ground_truth": "18", "reward_fn": "gsm8k"}

``prompt`` (plain text) or ``messages`` (chat, rendered by the tokenizer's chat template)
is required, and so is ``ground_truth`` (what the verifier compares against). Optional:
``completion`` (a target answer, used by SFT warm-start) and ``reward_fn`` (overrides the
job's reward function for this row). Every other key is kept in ``extra`` and passed to the
reward function as keyword arguments.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_KNOWN_KEYS = ("prompt", "messages", "ground_truth", "completion", "reward_fn")


@dataclass(frozen=True)
class PromptExample:
    """One prompt of a dataset; ``index`` is its row number, stable across epochs and resumes."""

    index: int
    ground_truth: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    completion: str | None = None
    reward_fn: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DatasetError(ValueError):
    """A dataset file cannot be used; the message names the file, line and field."""


def _parse_row(row: object, index: int, where: str, require_completion: bool) -> PromptExample:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if ("prompt" in row) == ("messages" in row):
        raise DatasetError(f"{where}: needs exactly one of 'prompt' (text) or 'messages' (chat)")
    messages = row.get("messages")
    if messages is not None and not (
        isinstance(messages, list)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
    ):
        raise DatasetError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
    if "ground_truth" not in row:
        raise DatasetError(f"{where}: missing 'ground_truth' (the answer the reward function checks)")
    if require_completion and not isinstance(row.get("completion"), str):
        raise DatasetError(f"{where}: missing 'completion' (the target answer SFT trains on)")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise DatasetError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    # Numeric answers are common in JSONL ("ground_truth": 47); verifiers compare text.
    ground_truth = row["ground_truth"]
    return PromptExample(
        index=index,
        ground_truth=ground_truth if isinstance(ground_truth, str) else json.dumps(ground_truth),
        prompt=prompt,
        messages=messages,
        completion=row.get("completion"),
        reward_fn=row.get("reward_fn"),
        extra={k: v for k, v in row.items() if k not in _KNOWN_KEYS},
    )


def read_jsonl(path: str) -> list[tuple[str, Any]]:
    """``(where, row)`` for each non-blank line of ``path``, ``where`` being ``path:line``; a line that is
    not JSON, or a file without rows, raises :class:`DatasetError`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
    if not rows:
        raise DatasetError(f"{path} holds no examples")
    return rows


class PromptDataset(Sequence[PromptExample]):
    """An in-memory list of :class:`PromptExample`, loaded from JSONL."""

    def __init__(self, examples: Sequence[PromptExample]) -> None:
        self.examples = list(examples)

    @classmethod
    def from_jsonl(cls, path: str, require_completion: bool = False) -> PromptDataset:
        """Read ``path``; blank lines are skipped, any malformed line raises :class:`DatasetError`."""
        return cls(
            [
                _parse_row(row, index, where, require_completion)
                for index, (where, row) in enumerate(read_jsonl(path))
            ]
        )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:
        return self.examples[index]


class PromptLoader:
    """Endless batches of prompts: a fresh seeded shuffle each epoch, resumable mid-epoch.

    The order of epoch ``e`` depends only on ``(seed, e)``, so ``state_dict()`` (seed, epoch
    and position within the epoch) is all a checkpoint needs to continue with exactly the
    batch an uninterrupted run would have drawn next. The last partial batch of an epoch is
    dropped so that every step sees ``batch_size`` prompts.
    """

    def __init__(
        self, dataset: Sequence[PromptExample], batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if not 0 < batch_size <= len(dataset):
            raise ValueError(
                f"batch_size must be in [1, {len(dataset)}] (the dataset size), got {batch_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches already drawn in the current epoch
        self._order = self._epoch_order()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))

    def next_batch(self) -> list[PromptExample]:
        """The next ``batch_size`` prompts, moving to a new epoch when this one is used up."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        start = self.position * self.batch_size
        self.position += 1
        return [self.dataset[int(i)] for i in self._order[start : start + self.batch_size]]

    def __iter__(self) -> Iterator[list[PromptExample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from ``state``; the dataset and batch size must be those it was saved with."""
        for key, current in (("dataset_size", len(self.dataset)), ("batch_size", self.batch_size)):
            if state[key] != current:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this loader has {key}={current}; "
                    "resume with the same dataset and batch size"
                )
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()
