"""Groups a rollout engine generates for the rollout stream, carried across weight updates.

The driver admits groups (:class:`GroupRequest`); the engine generates their samples alongside
anything else it runs. When new weights arrive while samples are still generating, ``keep`` lets
them continue on their KV cache, computed by the old weights; ``abort_resume`` stops them at the
step boundary and continues each from its prompt plus the tokens it has, recomputing that prefix
under the new weights. Either way every token keeps the weight version that produced it and the
log-prob it was sampled with (the behaviour policy's), so the trainer can correct for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from raylane.rlhf.rewards import get_reward_fn
from raylane.rlhf.trajectory import Trajectory, TrajectoryGroup
from raylane.roles.config import RolloutConfig
from raylane.runner import LLMEngine, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

PartialRolloutMode = Literal["abort_resume", "keep"]

_SEED_MODULUS = 2**62


def request_seed(batch_seed: int, prompt_index: int) -> int:
    """The sampling seed of one prompt's request: the batch's seed mixed with the dataset row."""
    return (int(batch_seed) * 1_000_003 + int(prompt_index)) % _SEED_MODULUS


@dataclass(frozen=True)
class GroupRequest:
    """One prompt to sample ``n`` responses for; ``group_id`` is unique over the job."""

    group_id: str
    prompt_index: int
    prompt: str | None
    messages: list | None
    ground_truth: str | None
    reward_fn: str
    extra: dict | None
    seed: int


@dataclass
class _Sample:
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Group:
    request: GroupRequest
    prompt_ids: list[int]
    start_version: int
    samples: list[_Sample]


class PartialRollouts:
    """The groups one engine is generating for the stream, and those it has finished and scored."""

    def __init__(self, engine: LLMEngine, config: RolloutConfig, mode: PartialRolloutMode) -> None:
        self.engine = engine
        self.config = config
        self.mode = mode
        self._groups: dict[str, _Group] = {}
        # engine request id -> (group id, sample index; None: the request carries every sample)
        self._requests: dict[str, tuple[str, int | None]] = {}
        self._version = engine.weight_version
        self._finished: list[TrajectoryGroup] = []
        self.resumed_samples = 0

    def _params(self, n: int, seed: int, max_tokens: int) -> SamplingParams:
        cfg = self.config
        return SamplingParams(
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_tokens=max_tokens,
            seed=seed,
            logprobs=True,
        )

    def admit(self, request: GroupRequest, prompt_ids: list[int]) -> None:
        """Start generating ``n`` samples of a prompt, as one engine request (as the synchronous loop does)."""
        if request.group_id in self._groups:
            raise ValueError(f"group {request.group_id!r} is already generating")
        self.before_step()  # a weight update since the last step concerns the requests already running
        params = self._params(self.config.n, request.seed, self.config.max_tokens)
        self.engine.add_request(request.group_id, prompt_token_ids=prompt_ids, sampling_params=params)
        samples = [_Sample() for _ in range(self.config.n)]
        self._groups[request.group_id] = _Group(request, prompt_ids, self.engine.weight_version, samples)
        self._requests[request.group_id] = (request.group_id, None)

    def owns(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def samples_in_flight(self) -> int:
        return sum(not s.finished for group in self._groups.values() for s in group.samples)

    def before_step(self) -> None:
        """Call before each engine step: under ``abort_resume``, continue the samples in flight
        from their tokens once the engine's weights have changed. Requests still queued untouched
        stay as they are: the new weights compute all of them anyway."""
        if self.engine.weight_version == self._version:
            return
        self._version = self.engine.weight_version
        if self.mode == "keep":
            return
        for request_id in list(self._requests):
            if self.engine.has_started(request_id):
                self._take(self.engine.abort(request_id), resume=True)

    def take(self, output: RequestOutput) -> None:
        """Record a finished engine request of this tracker."""
        self._take(output, resume=False)

    def _take(self, output: RequestOutput, resume: bool) -> None:
        group_id, index = self._requests.pop(output.request_id)
        group = self._groups[group_id]
        for completion in output.outputs:
            i = completion.index if index is None else index
            sample = group.samples[i]
            if sample.finished:
                continue
            sample.tokens += completion.token_ids
            sample.log_probs += completion.logprobs or []
            sample.versions += completion.weight_versions
            if completion.finish_reason == "abort" and resume:
                self._continue(group, i)
            else:
                sample.finished = True
        if all(sample.finished for sample in group.samples):
            self._finished.append(self._score(self._groups.pop(group_id)))

    def _continue(self, group: _Group, index: int) -> None:
        sample = group.samples[index]
        request_id = f"{group.request.group_id}/{index}@{len(sample.tokens)}"
        # A fresh seed per continuation: the noise of the rest of the sample is a new draw.
        seed = request_seed(group.request.seed * 1_000_003 + index, len(sample.tokens))
        params = self._params(1, seed, self.config.max_tokens - len(sample.tokens))
        self.engine.add_request(
            request_id, prompt_token_ids=group.prompt_ids + sample.tokens, sampling_params=params
        )
        self._requests[request_id] = (group.request.group_id, index)
        self.resumed_samples += 1

    def _score(self, group: _Group) -> TrajectoryGroup:
        request = group.request
        reward = get_reward_fn(request.reward_fn)
        trajectories = []
        for i, sample in enumerate(group.samples):
            text = self.engine.tokenizer.decode(sample.tokens)
            trajectories.append(
                Trajectory(
                    uid=f"{request.group_id}-{i}",
                    prompt_ids=tuple(group.prompt_ids),
                    response_ids=tuple(sample.tokens),
                    behaviour_log_probs=tuple(sample.log_probs),
                    weight_versions=tuple(sample.versions),
                    score=float(reward(text, request.ground_truth, **(request.extra or {}))),
                    start_version=group.start_version,
                )
            )
        return TrajectoryGroup(request.group_id, request.prompt_index, tuple(trajectories))

    def pop_finished(self) -> list[TrajectoryGroup]:
        """The groups finished and scored since the last call."""
        finished, self._finished = self._finished, []
        return finished
