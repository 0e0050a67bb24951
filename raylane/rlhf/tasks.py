"""Built-in toy tasks that a tiny model learns on a laptop CPU, written out as JSONL splits.

A toy task is a finite, numbered set of problems ``problem(i) -> (prompt, answer)``. Splits
are drawn without replacement, so held-out prompts never appear in training. Prompts are a
few characters and answers mostly 1-3 characters, sized for a byte-level tokenizer (one token
per character): an SFT warm-start gets the model partly right, and RL against the exact-match
verifier has room to finish the job. ``repeat`` is the exception on purpose: its answer lengths
are heavy-tailed, the shape that makes synchronous RL steps wait on a few long generations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from raylane.registry import Registry

ProblemFn = Callable[[int], tuple[str, str]]


@dataclass(frozen=True)
class ToyTask:
    """A numbered problem set: ``problem(i)`` for ``0 <= i < num_problems`` gives ``(prompt, answer)``."""

    name: str
    description: str
    num_problems: int
    problem: ProblemFn
    reward_fn: str = "exact_match"


TOY_TASKS: Registry[ToyTask] = Registry("toy task")


def register_toy_task(
    name: str, *, num_problems: int, description: str, reward_fn: str = "exact_match"
) -> Callable[[ProblemFn], ProblemFn]:
    """Decorator registering ``problem(i) -> (prompt, answer)`` as the toy task ``name``."""

    def add(problem: ProblemFn) -> ProblemFn:
        TOY_TASKS.register(name)(ToyTask(name, description, num_problems, problem, reward_fn))
        return problem

    return add


@register_toy_task("add2", num_problems=100 * 100, description="two-digit addition: '12+35=' -> '47'")
def _add2(i: int) -> tuple[str, str]:
    a, b = divmod(i, 100)
    return f"{a}+{b}=", str(a + b)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@register_toy_task(
    "reverse", num_problems=len(_LETTERS) ** 3, description="reverse three letters: 'abc>' -> 'cba'"
)
def _reverse(i: int) -> tuple[str, str]:
    word = "".join(_LETTERS[(i // len(_LETTERS) ** k) % len(_LETTERS)] for k in range(3))
    return f"{word}>", word[::-1]


# How many problems repeat their word k times, for k = 1, 2, ...: falling off as k**-1.5, so the
# answer lengths (2k letters) are heavy-tailed: median 4 letters, 99th percentile ~37, longest 40.
_REPEAT_COUNTS = tuple(max(1, int(len(_LETTERS) ** 2 / k**1.5)) for k in range(1, 21))
_REPEAT_STARTS = np.cumsum((0, *_REPEAT_COUNTS))


@register_toy_task(
    "repeat",
    num_problems=sum(_REPEAT_COUNTS),
    description="repeat two letters k times, k heavy-tailed: 'ab3>' -> 'ababab'",
)
def _repeat(i: int) -> tuple[str, str]:
    k = int(np.searchsorted(_REPEAT_STARTS, i, side="right"))
    # Spread each k's words over the alphabet (263 is coprime with 26**2), not only the first ones.
    w = ((i - int(_REPEAT_STARTS[k - 1])) * 263 + 97 * k) % len(_LETTERS) ** 2
    word = _LETTERS[w // len(_LETTERS)] + _LETTERS[w % len(_LETTERS)]
    return f"{word}{k}>", word * k


@dataclass(frozen=True)
class ToyTaskFiles:
    """Paths written by :func:`make_toy_task`."""

    train: str  # RL prompts: prompt, ground_truth, reward_fn
    eval: str  # held-out prompts, disjoint from train
    sft: str  # the train prompts with their target ``completion``, for SFT warm-start


def _write_jsonl(path: str, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def make_toy_task(
    name: str, out_dir: str, n_train: int = 2000, n_eval: int = 200, seed: int = 0
) -> ToyTaskFiles:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``sft.jsonl`` for toy task ``name`` into ``out_dir``.

    The same ``(name, n_train, n_eval, seed)`` always gives the same files. SFT completions are
    the bare answers; the trainer appends the tokenizer's end-of-sequence token so the model
    also learns to stop.
    """
    task = TOY_TASKS.get(name)
    if n_train < 1 or n_eval < 1 or n_train + n_eval > task.num_problems:
        raise ValueError(
            f"toy task {name!r} has {task.num_problems} distinct problems; n_train ({n_train}) and "
            f"n_eval ({n_eval}) must be >= 1 and sum to at most that"
        )
    ids = np.random.default_rng(seed).choice(task.num_problems, size=n_train + n_eval, replace=False)
    rows = []
    for i in ids.tolist():
        prompt, answer = task.problem(i)
        rows.append({"prompt": prompt, "ground_truth": answer, "reward_fn": task.reward_fn})
    os.makedirs(out_dir, exist_ok=True)
    files = ToyTaskFiles(*(os.path.join(out_dir, f"{split}.jsonl") for split in ("train", "eval", "sft")))
    _write_jsonl(files.eval, rows[:n_eval])
    _write_jsonl(files.train, rows[n_eval:])
    _write_jsonl(files.sft, [{**row, "completion": row["ground_truth"]} for row in rows[n_eval:]])
    return files
