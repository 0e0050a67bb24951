"""A user's own reward function and toy task, outside raylane's registries, named by import path.

``tests.user_code:row_weight`` scores every response with the dataset row's ``weight`` field,
so a job's reward shows both that the function ran inside the reward actors and that the row's
extra fields reached it. ``tests.user_code:COUNT_UP`` is a toy task.
"""

from raylane.rlhf import ToyTask


def row_weight(response_text: str, ground_truth: str, *, weight: float, **extra: object) -> float:
    if not isinstance(response_text, str) or not isinstance(ground_truth, str):
        raise TypeError("a reward function gets the response and the ground truth as text")
    return float(weight)


def _count_up(i: int) -> tuple[str, str]:
    return f"{i}:", str(i + 1)


COUNT_UP = ToyTask("count_up", "the next number: '41:' -> '42'", num_problems=100, problem=_count_up)


def first_character(response_text: str, ground_truth: str, **extra: object) -> float:
    """A graded score of the response's first character, so the samples of one prompt differ."""
    return (ord(response_text[0]) % 10) / 10 if response_text else 0.0
