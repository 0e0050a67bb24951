"""A user's own reward function, outside raylane's registry, named by import path in tests.

``tests.custom_reward:row_weight`` scores every response with the dataset row's ``weight``
field, so a job's reward shows both that the function ran inside the reward actors and that
the row's extra fields reached it.
"""


def row_weight(response_text: str, ground_truth: str, *, weight: float, **extra: object) -> float:
    if not isinstance(response_text, str) or not isinstance(ground_truth, str):
        raise TypeError("a reward function gets the response and the ground truth as text")
    return float(weight)
