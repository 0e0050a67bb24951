"""Offline batch generation: ``LLM(model_dir).generate(prompts, sampling_params)``."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from raylane.runner.config import EngineConfig
from raylane.runner.engine import LLMEngine
from raylane.runner.outputs import RequestOutput
from raylane.runner.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Generate for a whole list of prompts with continuous batching.

    Prompts are text, token-id lists, or dicts with ``prompt`` or ``prompt_token_ids``.
    Keyword arguments are :class:`EngineConfig` fields.
    """

    def __init__(self, model: str, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Returns one :class:`RequestOutput` per prompt, in input order."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [f"offline-{i}" for i in range(len(prompts))]
        for request_id, prompt, params in zip(ids, prompts, params_list, strict=True):
            self.engine.add_request(request_id, sampling_params=params, **_prompt_kwargs(prompt))
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step(return_unfinished=False):
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in ids]


def _prompt_kwargs(prompt: Prompt) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict):
        keys = set(prompt) & {"prompt", "prompt_token_ids"}
        if len(keys) != 1:
            raise ValueError(
                f"a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids', got {sorted(prompt)}"
            )
        return {key: prompt[key] for key in keys}
    return {"prompt_token_ids": list(prompt)}
