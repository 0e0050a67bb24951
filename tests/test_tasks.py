"""JSONL prompt datasets, the resumable prompt loader, and the built-in toy tasks."""

import json

import numpy as np
import pytest

from raylane.rlhf import (
    TOY_TASKS,
    DatasetError,
    PromptDataset,
    PromptExample,
    PromptLoader,
    compute_reward,
    make_toy_task,
)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def small_dataset(n):
    return PromptDataset([PromptExample(index=i, ground_truth=str(i), prompt=f"p{i}") for i in range(n)])


def read(path):
    with open(path) as f:
        return f.read()


def test_from_jsonl_reads_text_chat_and_extra_fields(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "12+35=", "ground_truth": 47, "level": 1}),
            "",
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "2+2?"}],
                    "ground_truth": "4",
                    "completion": "4",
                    "reward_fn": "gsm8k",
                }
            ),
        ],
    )
    data = PromptDataset.from_jsonl(path)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert (first.index, first.prompt, first.ground_truth, first.extra) == (0, "12+35=", "47", {"level": 1})
    assert first.messages is None and first.reward_fn is None
    assert second.messages == [{"role": "user", "content": "2+2?"}]
    assert (second.index, second.prompt, second.completion, second.reward_fn) == (1, None, "4", "gsm8k")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "ground_truth": "b"', "d.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}', "d.jsonl:2: missing 'ground_truth'"),
        ('{"ground_truth": "b"}', "needs exactly one of 'prompt'"),
        ('{"prompt": "a", "messages": [], "ground_truth": "b"}', "needs exactly one of 'prompt'"),
        ('{"messages": ["hi"], "ground_truth": "b"}', "'messages' must be a list"),
        ('{"prompt": 3, "ground_truth": "b"}', "'prompt' must be a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_from_jsonl_names_file_line_and_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "ok", "ground_truth": "1"}', line])
    with pytest.raises(DatasetError, match=message):
        PromptDataset.from_jsonl(path)


def test_from_jsonl_requires_completion_for_sft_and_rejects_empty_files(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "ok", "ground_truth": "1"}'])
    with pytest.raises(DatasetError, match="missing 'completion'"):
        PromptDataset.from_jsonl(path, require_completion=True)
    with pytest.raises(DatasetError, match="holds no examples"):
        PromptDataset.from_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))


def indices(batch):
    return [example.index for example in batch]


def test_loader_epochs_cover_each_prompt_once_in_a_fresh_order():
    loader = PromptLoader(small_dataset(10), batch_size=3, seed=7)
    epoch0 = [indices(loader.next_batch()) for _ in range(3)]
    assert (loader.epoch, loader.position) == (0, 3)
    epoch1 = [indices(loader.next_batch()) for _ in range(3)]
    assert loader.epoch == 1
    for epoch in (epoch0, epoch1):
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == 9  # 10 // 3 full batches; the partial batch is dropped
    assert epoch0 != epoch1


def test_loader_is_deterministic_per_seed_and_unshuffled_in_order():
    data = small_dataset(12)
    first = [indices(b) for b, _ in zip(PromptLoader(data, 4, seed=1), range(5))]
    again = [indices(b) for b, _ in zip(PromptLoader(data, 4, seed=1), range(5))]
    other = [indices(b) for b, _ in zip(PromptLoader(data, 4, seed=2), range(5))]
    assert first == again and first != other
    plain = PromptLoader(data, 4, shuffle=False)
    assert [indices(plain.next_batch()) for _ in range(4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [0, 1, 2, 3],
    ]


def test_loader_resume_gives_the_same_next_batches_across_epochs():
    data = small_dataset(10)
    uninterrupted = PromptLoader(data, batch_size=3, seed=3)
    for _ in range(2):
        uninterrupted.next_batch()
    # Checkpoints store the state as JSON-like data.
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = [indices(uninterrupted.next_batch()) for _ in range(5)]
    resumed = PromptLoader(data, batch_size=3, seed=999)
    resumed.load_state_dict(state)
    assert [indices(resumed.next_batch()) for _ in range(5)] == expected


def test_loader_rejects_bad_batch_size_and_mismatched_state():
    data = small_dataset(5)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 5\]"):
        PromptLoader(data, batch_size=6)
    state = PromptLoader(small_dataset(6), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="saved with dataset_size=6 but this loader has dataset_size=5"):
        PromptLoader(data, batch_size=2).load_state_dict(state)


@pytest.mark.parametrize("name", ["add2", "reverse", "repeat"])
def test_make_toy_task_writes_disjoint_correct_splits(tmp_path, name):
    files = make_toy_task(name, str(tmp_path), n_train=300, n_eval=50, seed=0)
    train = PromptDataset.from_jsonl(files.train)
    held_out = PromptDataset.from_jsonl(files.eval)
    sft = PromptDataset.from_jsonl(files.sft, require_completion=True)
    assert (len(train), len(held_out), len(sft)) == (300, 50, 300)
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert [(e.prompt, e.completion) for e in sft] == [(e.prompt, e.ground_truth) for e in train]
    for example in [*train, *held_out]:
        assert compute_reward(example.reward_fn, example.ground_truth, example.ground_truth) == 1.0
        if name != "repeat":
            assert 1 <= len(example.ground_truth) <= 3 and len(example.prompt) <= 6


def test_toy_task_answers_are_right():
    add2 = TOY_TASKS.get("add2")
    assert [add2.problem(i) for i in (0, 1235, 9999)] == [("0+0=", "0"), ("12+35=", "47"), ("99+99=", "198")]
    reverse = TOY_TASKS.get("reverse")
    prompts = {reverse.problem(i) for i in range(reverse.num_problems)}
    assert len(prompts) == reverse.num_problems == 26**3
    assert all(prompt == answer[::-1] + ">" for prompt, answer in prompts)


def test_repeat_task_answers_are_right_distinct_and_heavy_tailed(tmp_path):
    repeat = TOY_TASKS.get("repeat")
    problems = [repeat.problem(i) for i in range(repeat.num_problems)]
    assert problems[0][0].endswith("1>") and problems[-1][0].endswith("20>")
    assert len({prompt for prompt, _ in problems}) == repeat.num_problems
    for prompt, answer in problems:
        word, k = prompt[:2], int(prompt[2:-1])
        assert answer == word * k
    # The lengths a job trains on: a few answers ~10x the median one, and yet most are short.
    train = PromptDataset.from_jsonl(make_toy_task("repeat", str(tmp_path), n_train=1200, n_eval=200).train)
    lengths = np.array([len(example.ground_truth) for example in train])
    assert np.median(lengths) == 4
    assert np.percentile(lengths, 99) >= 8 * np.median(lengths)
    assert np.mean(lengths > 10 * np.median(lengths)) < 0.05


def test_make_toy_task_is_reproducible_and_validates(tmp_path):
    a = make_toy_task("add2", str(tmp_path / "a"), n_train=20, n_eval=5, seed=4)
    b = make_toy_task("add2", str(tmp_path / "b"), n_train=20, n_eval=5, seed=4)
    c = make_toy_task("add2", str(tmp_path / "c"), n_train=20, n_eval=5, seed=5)
    assert read(a.train) == read(b.train) and read(a.eval) == read(b.eval)
    assert read(a.train) != read(c.train)
    with pytest.raises(ValueError, match="has 10000 distinct problems"):
        make_toy_task("add2", str(tmp_path), n_train=9990, n_eval=11)
    with pytest.raises(ValueError, match="unknown toy task 'add3'; valid names: add2, repeat, reverse"):
        make_toy_task("add3", str(tmp_path))


def test_toy_task_by_import_path(tmp_path):
    files = make_toy_task("tests.user_code:COUNT_UP", str(tmp_path), n_train=8, n_eval=2)
    rows = [json.loads(line) for line in read(files.train).splitlines()]
    assert len(rows) == 8 and all(int(r["prompt"][:-1]) + 1 == int(r["ground_truth"]) for r in rows)
    with pytest.raises(ValueError, match="has no 'COUNT_DOWN'"):
        make_toy_task("tests.user_code:COUNT_DOWN", str(tmp_path))
