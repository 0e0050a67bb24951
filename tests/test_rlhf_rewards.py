"""Rule-based reward functions and their registry."""

import pytest

from raylane.registry import Registry
from raylane.rlhf import (
    REWARD_FUNCTIONS,
    compute_reward,
    extract_final_number,
    get_reward_fn,
    register_reward,
)


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("47", "47", 1.0),
        ("  47 \n", "47", 1.0),
        ("hello   world", "hello world", 1.0),
        ("4 7", "47", 0.0),
        ("Cba", "cba", 0.0),
        ("47", "48", 0.0),
    ],
)
def test_exact_match(response, truth, expected):
    assert compute_reward("exact_match", response, truth) == expected


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Janet has 3 ducks ... she makes 9 * 2 = $18 every day.\n#### 18", 18.0),
        ("The total is #### 1,234 dollars", 1234.0),
        ("#### $1,000,000.50", 1000000.5),
        ("So the answer is \\boxed{42}.", 42.0),
        ("\\boxed{1{,}000}", 1000.0),
        ("\\boxed{\\$5.50}", 5.5),
        ("\\boxed{x = 7}", 7.0),
        ("\\boxed{\\text{about } 12\\%}", 12.0),
        ("first 3 apples, then 5 more, so 8 in total.", 8.0),
        ("the change is -3 degrees", -3.0),
        ("10-3=7", 7.0),
        ("count 1,2,3", 3.0),
        ("\\boxed{41} but really #### 42", 42.0),
        ("I do not know", None),
    ],
)
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("She pays $18.", "Eggs: 16 - 3 - 4 = <<16-3-4=9>>9 eggs, 9 * 2 = <<9*2=18>>18.\n#### 18", 1.0),
        ("The answer is 1,234", "1234", 1.0),
        ("\\boxed{42.0}", "42", 1.0),
        ("so 0.5 of it", "0.50", 1.0),
        ("5 then 8", "5", 0.0),
        ("no idea", "7", 0.0),
        ("-3", "#### -3", 1.0),
    ],
)
def test_gsm8k(response, truth, expected):
    assert compute_reward("gsm8k", response, truth, question="ignored extra field") == expected


def test_gsm8k_rejects_ground_truth_without_number():
    with pytest.raises(ValueError, match="contains no number"):
        compute_reward("gsm8k", "42", "forty-two")


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("47", "47", 1.0),
        ("47 and then 48", "47", 1.0),
        ("answer: 47", " 47 ", 1.0),
        ("-5", "-5", 1.0),
        ("48", "47", 0.0),
        ("12+35=47", "47", 0.0),  # the *first* integer counts
        ("", "47", 0.0),
    ],
)
def test_arithmetic(response, truth, expected):
    assert compute_reward("arithmetic", response, truth) == expected


def test_arithmetic_rejects_non_integer_ground_truth():
    with pytest.raises(ValueError, match="must be an integer"):
        compute_reward("arithmetic", "4", "4.5")


def test_registry_lookup_registration_and_errors():
    assert {"exact_match", "gsm8k", "arithmetic"} <= set(REWARD_FUNCTIONS.names())
    with pytest.raises(ValueError, match="unknown reward function 'exactmatch'; valid names: arithmetic"):
        get_reward_fn("exactmatch")
    with pytest.raises(ValueError, match="'exact_match' is already registered"):
        register_reward("exact_match")(lambda response_text, ground_truth, **extra: 0.0)

    @register_reward("test_rewards.length_match")
    def length_match(response_text: str, ground_truth: str, **extra: object) -> float:
        return float(len(response_text) == int(extra["length"]))

    assert compute_reward("test_rewards.length_match", "abc", "", length=3) == 1.0


def test_registry_is_independent_per_table():
    table: Registry[int] = Registry("widget")
    table.register("a")(1)
    assert "a" in table and "b" not in table
    assert table.get("a") == 1
    with pytest.raises(ValueError, match="unknown widget 'b'; valid names: a"):
        table.get("b")
