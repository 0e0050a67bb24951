"""Rule-based reward functions (verifiers), registered by name.

A reward function scores one response: ``fn(response_text, ground_truth, **extra) -> float``,
where ``extra`` carries the dataset row's other fields (a function uses what it needs and
ignores the rest). Add one with::

    @register_reward("my_task")
    def my_task(response_text: str, ground_truth: str, **extra) -> float: ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from raylane.registry import Registry

RewardFn = Callable[..., float]

REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")
register_reward = REWARD_FUNCTIONS.register


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered under ``name`` (``ValueError`` listing the names if unknown)."""
    return REWARD_FUNCTIONS.get(name)


def compute_reward(name: str, response_text: str, ground_truth: str, **extra: object) -> float:
    """Score one response with the reward function ``name``."""
    return float(get_reward_fn(name)(response_text, ground_truth, **extra))


def _normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


@register_reward("exact_match")
def exact_match(response_text: str, ground_truth: str, **extra: object) -> float:
    """1.0 when the response equals the ground truth up to surrounding and repeated whitespace."""
    return float(_normalise_whitespace(response_text) == _normalise_whitespace(ground_truth))


# A number as written in word problems: optional sign (not a minus between two operands),
# optional "$", thousands separators only in groups of three, optional decimals.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_INTEGER = re.compile(r"(?:(?<![\w)])-)?\d+")
# LaTeX spacing and escapes that appear inside \boxed{} around numbers.
_LATEX_NOISE = re.compile(r"\\[!,;:]|\\%|\\\$|\{,\}|\\text\{[^}]*\}|\\mathrm\{[^}]*\}")


def _to_float(number: str) -> float:
    return float(number.replace("$", "").replace(",", ""))


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for pos in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[begin:pos]
    return None


def extract_final_number(text: str) -> float | None:
    """The final numeric answer of a worked solution, or None when it has none.

    Looked for in order: the number after the last ``####`` (GSM8K's answer marker), the
    number in the last ``\\boxed{}``, then the last number anywhere in the text. Dollar
    signs, thousands commas and LaTeX spacing are ignored.
    """
    marker = text.rfind("####")
    if marker >= 0:
        found = _NUMBER.search(text, marker + 4)
        if found:
            return _to_float(found.group())
    boxed = _last_boxed(text)
    if boxed is not None:
        numbers = _NUMBER.findall(_LATEX_NOISE.sub("", boxed))
        if numbers:
            return _to_float(numbers[-1])
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


@register_reward("gsm8k")
def gsm8k(response_text: str, ground_truth: str, **extra: object) -> float:
    """1.0 when the response's final number equals the ground truth's, numerically.

    ``ground_truth`` may be the bare answer ("18") or a full GSM8K solution ending in "#### 18".
    """
    expected = extract_final_number(ground_truth)
    if expected is None:
        raise ValueError(f"gsm8k ground truth {ground_truth!r} contains no number")
    answer = extract_final_number(response_text)
    return float(answer is not None and math.isclose(answer, expected, rel_tol=1e-6, abs_tol=1e-9))


@register_reward("arithmetic")
def arithmetic(response_text: str, ground_truth: str, **extra: object) -> float:
    """1.0 when the first integer in the response equals the integer ground truth."""
    try:
        expected = int(ground_truth.strip())
    except ValueError:
        raise ValueError(f"arithmetic ground truth must be an integer, got {ground_truth!r}") from None
    found = _INTEGER.search(response_text)
    return float(found is not None and int(found.group()) == expected)
