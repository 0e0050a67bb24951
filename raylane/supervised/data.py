"""Tokenized SFT examples and preference pairs from JSONL, and the padded or packed rows they train as.

SFT rows (one JSON object per line) are ``{"prompt": ..., "completion": ...}`` or
``{"messages": [..., {"role": "assistant", "content": ...}]}``: the messages before the last are
rendered by the tokenizer's chat template as the prompt, the last (the assistant's) is the
completion. Preference rows are ``{"prompt" | "messages", "chosen": ..., "rejected": ...}``.
Completions get the tokenizer's end-of-sequence token appended, as the RL warm-start does, so the
model learns to stop and the reward model scores the token a finished response ends with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raylane.batch import Batch
from raylane.models import Tokenizer
from raylane.rlhf import DatasetError, read_jsonl


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the completion trained on; ``completion_ids`` end with the end-of-sequence token."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred completion (each ending with end-of-sequence)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _read_rows(path: str) -> list[tuple[str, dict]]:
    rows = read_jsonl(path)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return rows


def _text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _prompt_and_reply(row: dict, where: str, tokenizer: Tokenizer) -> tuple[str, str | None]:
    """The prompt text, and the assistant's reply when the row is chat ``messages`` ending with one."""
    if ("prompt" in row) == ("messages" in row):
        raise DatasetError(f"{where}: needs exactly one of 'prompt' (text) or 'messages' (chat)")
    if "prompt" in row:
        return _text_field(row, "prompt", where), None
    messages = row["messages"]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if messages[-1].get("role") == "assistant":
        return tokenizer.apply_chat_template(messages[:-1]), _text_field(messages[-1], "content", where)
    return tokenizer.apply_chat_template(messages), None


class _Encoder:
    """Token ids of prompts and of completions (with end-of-sequence), checked against ``max_length``."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def completion(self, text: str, prompt_len: int, where: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False) + self.eos
        if prompt_len + len(ids) > self.max_length:
            raise DatasetError(
                f"{where}: prompt and completion are {prompt_len + len(ids)} tokens, over max_length "
                f"({self.max_length}); raise max_length or shorten the example"
            )
        return ids


def load_sft_examples(path: str, tokenizer: Tokenizer, max_length: int) -> list[SFTExample]:
    """Read and tokenize ``path``; a malformed or too long row raises :class:`DatasetError` naming its line."""
    encoder = _Encoder(tokenizer, max_length)
    examples = []
    for where, row in _read_rows(path):
        prompt, reply = _prompt_and_reply(row, where, tokenizer)
        completion = reply if reply is not None else _text_field(row, "completion", where)
        prompt_ids = encoder.prompt(prompt)
        examples.append(
            SFTExample(prompt_ids, encoder.completion(completion, len(prompt_ids), where), completion)
        )
    return examples


def load_preference_pairs(path: str, tokenizer: Tokenizer, max_length: int) -> list[PreferencePair]:
    """Read and tokenize preference pairs; a malformed or too long row raises :class:`DatasetError`."""
    encoder = _Encoder(tokenizer, max_length)
    pairs = []
    for where, row in _read_rows(path):
        prompt, _ = _prompt_and_reply(row, where, tokenizer)
        prompt_ids = encoder.prompt(prompt)
        chosen, rejected = (
            encoder.completion(_text_field(row, key, where), len(prompt_ids), where)
            for key in ("chosen", "rejected")
        )
        pairs.append(PreferencePair(prompt_ids, chosen, rejected))
    return pairs


def padded_rows(examples: Sequence[SFTExample], pad_id: int) -> Batch:
    """One right-padded row per example: ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on the
    completion tokens, the ones the loss predicts)."""
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), length)
    for row, example in enumerate(examples):
        prompt_len, total = len(example.prompt_ids), len(example.prompt_ids) + len(example.completion_ids)
        input_ids[row, :total] = torch.tensor(example.prompt_ids + example.completion_ids)
        attention_mask[row, :total] = 1
        loss_mask[row, prompt_len:total] = 1
    return Batch.from_dict({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})


def packed_rows(examples: Sequence[SFTExample], max_length: int, pad_id: int) -> Batch:
    """Examples laid back to back in rows of ``max_length`` tokens (first fit, in order).

    Each example's ``position_ids`` restart at 0, which is how the model keeps packed examples
    from attending to each other; the unused tail of a row is padding (``attention_mask`` 0).
    """
    rows: list[list[SFTExample]] = []
    used: list[int] = []
    for example in examples:
        size = len(example.prompt_ids) + len(example.completion_ids)
        fit = next((i for i, length in enumerate(used) if length + size <= max_length), None)
        if fit is None:
            rows.append([example])
            used.append(size)
        else:
            rows[fit].append(example)
            used[fit] += size
    input_ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), max_length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), max_length, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), max_length)
    for row, members in enumerate(rows):
        start = 0
        for example in members:
            prompt_len = len(example.prompt_ids)
            end = start + prompt_len + len(example.completion_ids)
            input_ids[row, start:end] = torch.tensor(example.prompt_ids + example.completion_ids)
            position_ids[row, start:end] = torch.arange(end - start)
            loss_mask[row, start + prompt_len : end] = 1
            start = end
        attention_mask[row, :start] = 1
        position_ids[row, start:] = torch.arange(max_length - start)
    return Batch.from_dict(
        {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
        }
    )


def pair_rows(pairs: Sequence[PreferencePair], pad_id: int) -> Batch:
    """One row per pair: right-padded ``chosen_ids``/``rejected_ids`` with their ``*_mask``, so that
    splitting rows into micro-batches keeps each pair's two sequences together."""
    chosen = [p.prompt_ids + p.chosen_ids for p in pairs]
    rejected = [p.prompt_ids + p.rejected_ids for p in pairs]
    length = max(map(len, chosen + rejected))
    columns = {}
    for name, sequences in (("chosen", chosen), ("rejected", rejected)):
        ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
        mask = torch.zeros(len(pairs), length, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        columns[f"{name}_ids"], columns[f"{name}_mask"] = ids, mask
    return Batch.from_dict(columns)


def write_toy_preferences(task_rows_path: str, out_path: str, seed: int = 0) -> str:
    """Preference pairs from a toy task split (``prompt``, ``ground_truth``): each prompt's right answer
    is chosen and the answer to another prompt of the split, a well-formed but wrong one, rejected."""
    rows = [row for _, row in _read_rows(task_rows_path)]
    if len({row["ground_truth"] for row in rows}) < 2:
        raise DatasetError(f"{task_rows_path}: needs at least two different answers to make pairs")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            answer = row["ground_truth"]
            rejected = answer
            while rejected == answer:
                rejected = rows[int(rng.integers(len(rows)))]["ground_truth"]
            f.write(json.dumps({"prompt": row["prompt"], "chosen": answer, "rejected": rejected}) + "\n")
    return out_path
