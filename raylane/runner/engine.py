"""The step API of the runner: add requests, step, abort, update weights.

Servers and rollout loops drive :class:`LLMEngine` one step at a time; :class:`~raylane.runner.LLM`
wraps it for offline batches. With async scheduling (the default on CUDA) a step that continues
every running sequence by one token is launched before the previous step's tokens reach the host,
fed from them on the device, so the host's per-step work (reading tokens, stop checks, scheduling,
building inputs) runs while the device computes instead of between its steps.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from raylane.models import CausalLM, Tokenizer, load_model
from raylane.runner.block_manager import BlockManager
from raylane.runner.compile_cache import use_compile_cache
from raylane.runner.config import EngineConfig
from raylane.runner.detokenizer import IncrementalDetokenizer
from raylane.runner.metrics import EngineMetrics
from raylane.runner.model_runner import ModelRunner, PendingStep, kv_cache_block_bytes
from raylane.runner.outputs import CompletionOutput, EngineStats, RequestOutput
from raylane.runner.sampling_params import SamplingParams
from raylane.runner.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from raylane.runner.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

_SEED_MODULUS = 2**62


class RequestsFailedError(RuntimeError):
    """A step could not compute some requests: those were aborted, every other request progressed.

    ``failures`` maps each failed request id to what it raised; ``outputs`` are the step's outputs of
    the requests that progressed, as `LLMEngine.step` would have returned them.
    """

    def __init__(self, failures: dict[str, Exception], outputs: list[RequestOutput]) -> None:
        super().__init__("; ".join(f"request {rid!r} failed: {exc!r}" for rid, exc in failures.items()))
        self.failures = failures
        self.outputs = outputs


class UnknownRequestError(KeyError):
    """The request id names no running or waiting request."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer] | None

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


@dataclass
class _LaunchedStep:
    plan: SchedulerOutput
    pending: PendingStep
    weight_version: int  # the weights the step computes with, whatever happens before it is read


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device='cpu'")
    return resolved


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype != torch.float32 else torch.bfloat16


class LLMEngine:
    """Continuous-batching generation over a paged KV cache.

    ``model``/``tokenizer`` may be passed in (e.g. a rollout worker that already holds the policy);
    otherwise both are loaded from ``config.model``.
    """

    def __init__(
        self, config: EngineConfig, model: CausalLM | None = None, tokenizer: Tokenizer | None = None
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.compile_cache_dir and self.device.type == "cuda" and not config.enforce_eager:
            # Before anything compiles: the decode step and the Triton kernels load from it next time.
            use_compile_cache(config.compile_cache_dir)
        if model is None:
            from raylane.models import ModelConfig

            checkpoint_dtype = ModelConfig.from_pretrained(config.model).dtype
            model = load_model(
                config.model, resolve_dtype(config.dtype, checkpoint_dtype, self.device), self.device
            )
        self.model = model.eval()
        self.model_config = model.config
        if tokenizer is None:
            try:
                tokenizer = Tokenizer.from_pretrained(config.model)
            except (OSError, ValueError) as err:
                logger.warning("no tokenizer (%s); requests must pass prompt_token_ids", err)
        self.tokenizer = tokenizer
        self.max_model_len = self._max_model_len()
        num_blocks = config.num_kv_blocks or self._auto_num_blocks()
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens but max_model_len is "
                f"{self.max_model_len}: raise num_kv_blocks (or kv_cache_memory_gib) or lower max_model_len"
            )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: raise max_num_batched_tokens "
                f"({config.max_num_batched_tokens}) to max_model_len ({self.max_model_len}) or enable chunking"
            )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
        )
        self.runner = ModelRunner(
            self.model,
            num_blocks,
            config.block_size,
            config.attention_backend,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            cuda_graphs=not config.enforce_eager,
            compile_decode=config.compile_decode,
            lazy_capture=config.graph_capture == "lazy",
            programmatic_launch=config.programmatic_launch,
        )
        self.eos_token_ids = set(self.model_config.eos_token_id)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.weight_version = 0
        self.asleep = False
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        self._ahead: _LaunchedStep | None = None
        self._requests: dict[str, _Request] = {}
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self._counters = {"prompt_computed": 0, "prompt_cached": 0, "generated": 0, "steps": 0, "ahead": 0}
        self._metrics = EngineMetrics()
        if self.device.type == "cuda":
            self._warm_up()

    def _warm_up(self) -> None:
        """Run a few tiny requests so that the first real ones pay no one-time GPU costs.

        The decode graphs are compiled and captured already, but CUDA loads each kernel of the eager
        prefill path on its first use, which costs tens of milliseconds per step the first time.
        """
        params = SamplingParams(max_tokens=2, ignore_eos=True, seed=0)
        # Each request fits max_model_len, which the KV pool is checked to hold; a pool too small
        # for both requests of a pair runs them one after the other.
        longest = max(1, self.max_model_len - params.max_tokens)
        for lengths in ([5], [3, 17]):
            for i, length in enumerate(lengths):
                length = min(length, longest)
                self.add_request(f"warm-up-{i}", prompt_token_ids=[0] * length, sampling_params=params)
            while self.has_unfinished_requests():
                self.step(return_unfinished=False)
        self.block_manager.reset_prefix_cache([])
        self._counters = dict.fromkeys(self._counters, 0)

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            # Sliding-window attention is not implemented: stay inside the window, where it is exact.
            limit = min(limit, self.model_config.sliding_window)
        requested = self.config.max_model_len
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds what this model supports ({limit})")
        return requested or limit

    def _auto_num_blocks(self) -> int:
        bs = self.config.block_size
        block_bytes = kv_cache_block_bytes(self.model, bs, next(self.model.parameters()).dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = 1 << 30  # activations and sampling buffers of one step
            budget = free - total * (1 - self.config.gpu_memory_utilization) - reserve
        else:
            budget = (self.config.kv_cache_memory_gib or 1.0) * 2**30
            # On CPU there is no point holding more than every running sequence can use.
            wanted = self.config.max_num_seqs * math.ceil(self.max_model_len / bs) + 1
            budget = min(budget, wanted * block_bytes)
        return max(1, int(budget // block_bytes))

    # ---- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling_params: SamplingParams | None = None,
    ) -> None:
        """Queue a request. Raises ``ValueError`` with an actionable message for bad input.

        Give the prompt as text or as token ids; given both, ``prompt_token_ids`` is taken as the
        tokenization of ``prompt`` (computed by the caller, e.g. off the engine's thread).
        """
        self._check_awake()
        params = sampling_params or SamplingParams()
        params.validate()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self._prompt_tokens(prompt, prompt_token_ids)
        detokenizers = None
        if self.tokenizer is not None:
            detokenizers = [IncrementalDetokenizer(self.tokenizer) for _ in range(params.n)]
        seqs = []
        for index in range(params.n):
            if params.seed is None:
                seed = self._rng.getrandbits(62)
            else:
                seed = params.seed if params.n == 1 else (params.seed * 1_000_003 + index) % _SEED_MODULUS
            seq = Sequence(self._next_seq_id, request_id, index, token_ids, params, seed, self._next_seq_id)
            self._next_seq_id += 1
            seqs.append(seq)
        self._requests[request_id] = _Request(request_id, prompt, token_ids, params, seqs, detokenizers)
        for seq in seqs:
            self.scheduler.add(seq)

    def _prompt_tokens(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt is None and prompt_token_ids is None:
            raise ValueError("pass the prompt as text (prompt) or as token ids (prompt_token_ids)")
        if prompt_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (no tokenizer.json): pass prompt_token_ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt_token_ids)
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not token_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but the maximum context length is {self.max_model_len} "
                "(prompt plus at least one new token): shorten the prompt or raise max_model_len"
            )
        return token_ids

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request now, free its KV blocks and return its final (aborted) output."""
        request = self._requests.pop(request_id, None)
        if request is None:
            raise UnknownRequestError(
                f"cannot abort request {request_id!r}: no such running or waiting request (it may have finished)"
            )
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def has_started(self, request_id: str) -> bool:
        """Whether the current weights computed anything of the request yet: KV of its tokens in
        the cache or a token sampled (a request still queued untouched has neither)."""
        request = self._requests.get(request_id)
        if request is None:
            raise UnknownRequestError(f"no running or waiting request {request_id!r}")
        return any(seq.num_computed_tokens or seq.num_output_tokens for seq in request.seqs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- stepping ---------------------------------------------------------------------------------

    def step(self, return_unfinished: bool = True) -> list[RequestOutput]:
        """Run one scheduler step; return the outputs of the requests that progressed.

        With ``return_unfinished=False`` only requests that finished in this step are returned,
        which saves building (and detokenizing) every running request's output on every step.

        With async scheduling the next decode step may already be running on the device when this
        returns (see :meth:`_launch_ahead`); the next call completes it.
        """
        self._discard_unwanted_ahead()
        launched, self._ahead = self._ahead, None
        if launched is None:
            plan = self.scheduler.schedule()
            if not plan.chunks:
                if self.scheduler.waiting and not self.scheduler.running:
                    raise RuntimeError("no waiting request fits the KV cache; raise num_kv_blocks")
                return []
            try:
                launched = self._launch(plan)
            except Exception as exc:
                return self._step_each_request(plan, exc, return_unfinished)
        if self.async_scheduling:
            self._ahead = self._launch_ahead(launched)
        outputs, failures = self._complete(launched, return_unfinished)
        self._discard_unwanted_ahead()  # e.g. every request stopped at EOS with the tokens just read
        self._metrics.maybe_record(lambda: self.stats, idle=not self._requests)
        self._raise_failures(failures, outputs)
        return outputs

    def _step_each_request(
        self, plan: SchedulerOutput, error: Exception, return_unfinished: bool
    ) -> list[RequestOutput]:
        """Run a step that failed as a batch one request at a time, so a request that breaks the
        step fails alone (see :meth:`_raise_failures`)."""
        logger.warning("an engine step failed (%r); running its requests one at a time", error)
        by_request: dict[str, list[ScheduledChunk]] = {}
        for chunk in plan.chunks:
            by_request.setdefault(chunk.seq.request_id, []).append(chunk)
        outputs: list[RequestOutput] = []
        failures: dict[str, Exception] = {}
        for request_id, chunks in by_request.items():
            try:
                launched = self._launch(SchedulerOutput(chunks=chunks))
            except Exception as exc:
                failures[request_id] = exc
                continue
            completed, failed = self._complete(launched, return_unfinished)
            outputs.extend(completed)
            failures.update(failed)
        self._raise_failures(failures, outputs)
        return outputs

    def _raise_failures(self, failures: dict[str, Exception], outputs: list[RequestOutput]) -> None:
        """Abort each failed request (freeing its KV blocks) and raise `RequestsFailedError`, which
        carries the other requests' outputs of the step; nothing when none failed."""
        if not failures:
            return
        for request_id, error in failures.items():
            logger.error("request %r failed in the engine (%r); aborting it", request_id, error)
            self.abort(request_id)
        raise RequestsFailedError(failures, outputs)

    def _launch(self, plan: SchedulerOutput, feed: PendingStep | None = None) -> _LaunchedStep:
        pending = self.runner.launch(plan, feed)
        self._counters["steps"] += 1
        self._counters["ahead"] += feed is not None
        self._counters["prompt_cached"] += plan.num_cached_tokens
        for chunk in plan.chunks:
            self._counters["prompt_computed"] += max(
                0, min(chunk.start + chunk.num_tokens, chunk.seq.num_prompt_tokens) - chunk.start
            )
        return _LaunchedStep(plan, pending, self.weight_version)

    def _launch_ahead(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Launch the step after ``launched`` before its sampled tokens reach the host.

        Only when that next step is certain to be "every running sequence decodes one more token":
        nothing waits to be admitted, every running sequence samples in ``launched`` and none reaches
        its length limit with that token. The new step takes its input tokens from ``launched``'s
        device output, so the host's bookkeeping of one step overlaps the device's next step. A
        sequence that stops at the token being sampled (EOS, a stop token, an abort) leaves an
        unused row, dropped when the step completes.
        """
        chunks = launched.plan.chunks
        if self.scheduler.waiting or len(chunks) != len(self.scheduler.running):
            return None
        for chunk in chunks:
            seq = chunk.seq
            if seq.is_finished or not chunk.samples:
                return None
            if self._ends_by_length(seq, more=1):  # with the token being sampled
                return None
        if not all(self.block_manager.allocate(chunk.seq, len(chunk.seq) + 1) for chunk in chunks):
            return None
        plan = SchedulerOutput(chunks=[ScheduledChunk(chunk.seq, len(chunk.seq), 1) for chunk in chunks])
        try:
            return self._launch(plan, feed=launched.pending)
        except Exception as exc:
            # The next step schedules these sequences again and isolates whichever breaks it.
            logger.warning("could not launch a step ahead (%r); the next step runs it normally", exc)
            return None

    def _discard_unwanted_ahead(self) -> None:
        """Drop the step launched ahead once every sequence it computes has ended (stop, abort)."""
        if self._ahead is not None and all(chunk.seq.is_finished for chunk in self._ahead.plan.chunks):
            self._discard_ahead()

    def _discard_ahead(self) -> None:
        """Wait for the step launched ahead and drop it (all of its sequences have ended)."""
        if self._ahead is not None:
            self._ahead.pending.result()
            self._ahead = None

    def _complete(
        self, launched: _LaunchedStep, return_unfinished: bool
    ) -> tuple[list[RequestOutput], dict[str, Exception]]:
        """Take a launched step's tokens into its sequences; returns the outputs and, by request id,
        the requests whose bookkeeping raised (a stop check or detokenizing), which fail alone."""
        plan = launched.plan
        # Bookkeeping that does not need the sampled tokens overlaps with the device's work.
        self.scheduler.mark_computed(plan)
        result = launched.pending.result()
        touched: dict[str, _Request] = {}
        failures: dict[str, Exception] = {}
        sampling = [chunk for chunk in plan.chunks if chunk.samples]
        for chunk, token, logprob in zip(sampling, result.sampled_token_ids, result.sampled_logprobs):
            seq = chunk.seq
            if seq.is_finished or seq.request_id in failures:
                continue  # a row launched ahead for a sequence that has stopped since
            try:
                self._append_token(seq, token, logprob, launched.weight_version)
            except Exception as exc:
                failures[seq.request_id] = exc
                continue
            touched[seq.request_id] = self._requests[seq.request_id]
        for chunk in plan.chunks:
            logprobs = result.prompt_logprobs.get(chunk.seq.seq_id)
            if logprobs is not None:
                seq = chunk.seq
                seq.prompt_logprobs.extend(logprobs[: seq.num_prompt_tokens - 1 - len(seq.prompt_logprobs)])
        outputs = []
        for request_id, request in touched.items():
            if request_id in failures:
                continue
            finished = request.finished
            if finished or return_unfinished:
                try:
                    outputs.append(self._output(request))
                except Exception as exc:
                    failures[request_id] = exc
                    continue
            if finished:
                del self._requests[request_id]
        return outputs, failures

    def _append_token(self, seq: Sequence, token: int, logprob: float, weight_version: int) -> None:
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        seq.weight_versions.append(weight_version)
        self._counters["generated"] += 1
        params = seq.params
        if (
            (not params.ignore_eos and token in self.eos_token_ids)
            or token in params.stop_token_ids
            or (params.stop and self._hit_stop_string(seq))
        ):
            self._finish(seq, "stop")
        elif self._ends_by_length(seq):
            self._finish(seq, "length")

    def _ends_by_length(self, seq: Sequence, more: int = 0) -> bool:
        """Whether ``seq`` has reached max_tokens or the context limit (after ``more`` further tokens)."""
        return seq.num_output_tokens + more >= seq.params.max_tokens or len(seq) + more >= self.max_model_len

    def _hit_stop_string(self, seq: Sequence) -> bool:
        request = self._requests[seq.request_id]
        if request.detokenizers is None:
            return False
        text = request.detokenizers[seq.index].update(seq.output_token_ids)
        return any(stop in text for stop in seq.params.stop)

    def _text(self, request: _Request, seq: Sequence) -> str:
        if request.detokenizers is None:
            return ""
        if not seq.is_finished:
            return request.detokenizers[seq.index].update(seq.output_token_ids)
        # Finished: decode once in full, flushing bytes held back for an incomplete character.
        text = self.tokenizer.decode(seq.output_token_ids)
        cuts = [pos for pos in (text.find(stop) for stop in seq.params.stop) if pos >= 0]
        return text[: min(cuts)] if cuts else text

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=self._text(request, seq),
                    token_ids=seq.output_token_ids,
                    logprobs=list(seq.logprobs) if request.params.logprobs else None,
                    finish_reason=seq.finish_reason,
                    weight_versions=list(seq.weight_versions),
                )
            )
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.finished,
            prompt_logprobs=list(first.prompt_logprobs) if request.params.prompt_logprobs else None,
        )

    # ---- weights ----------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> list[str]:
        """Copy new weights (Hugging Face names, full tensors) into the model in place, between steps.

        May be called with a subset of the weights (one bucket at a time). Requests in flight keep
        their KV cache and continue under the new weights; cached prefixes are dropped because they
        were computed by the old ones.
        """
        if not isinstance(version, int):
            raise ValueError(f"weight version must be an int, got {version!r}")
        loaded = self.runner.load_weights(named_tensors)
        live = [seq for request in self._requests.values() for seq in request.seqs]
        self.block_manager.reset_prefix_cache(live)
        self.weight_version = version
        logger.info("weights updated to version %d (%d tensors)", version, len(loaded))
        return loaded

    def synchronize(self) -> None:
        """Wait until the device has finished every step launched so far.

        With async scheduling a decode step can still be running after :meth:`step` returned. Call
        this before writing the model's parameters from outside the engine's stream (a weight sync
        over its own process group); :meth:`update_weights` needs no such call.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_weight_version(self, version: int) -> None:
        """Record that the model's parameters were overwritten in place (e.g. by a resharding weight
        sync writing this rank's tensor-parallel shards) and now hold weight ``version``.

        Call it between steps, after the last tensor landed (and :meth:`synchronize` before the
        writes began). Like :meth:`update_weights`, cached
        prefixes are dropped (the old weights computed them) and requests in flight carry on.
        """
        if not isinstance(version, int):
            raise ValueError(f"weight version must be an int, got {version!r}")
        live = [seq for request in self._requests.values() for seq in request.seqs]
        self.block_manager.reset_prefix_cache(live)
        self.weight_version = version
        logger.info("weights set in place to version %d", version)

    def sleep(self, offload_weights: bool = False) -> None:
        """Release the KV cache (and optionally move the weights to host memory) until :meth:`wake_up`.

        For colocated RL: the trainers on the same device use the memory meanwhile. The engine must
        be idle; cached prefixes are dropped with the cache.
        """
        if self.has_unfinished_requests():
            raise RuntimeError(
                f"sleep() needs an idle engine; {self.num_unfinished_requests} requests are unfinished "
                "(let them finish or abort them first)"
            )
        if not self.asleep:
            self._discard_ahead()
            self.block_manager.reset_prefix_cache([])
            self.runner.release_memory(offload_weights)
            self.asleep = True

    def wake_up(self) -> None:
        """Reallocate what :meth:`sleep` released; the engine can generate again."""
        if self.asleep:
            self.runner.restore_memory()
            self.asleep = False

    def _check_awake(self) -> None:
        if self.asleep:
            raise RuntimeError("the engine is asleep (its KV cache is released): call wake_up() first")

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            num_total_blocks=self.block_manager.num_blocks,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens_computed=self._counters["prompt_computed"],
            num_cached_prompt_tokens=self._counters["prompt_cached"],
            num_generated_tokens=self._counters["generated"],
            num_steps=self._counters["steps"],
            num_steps_launched_ahead=self._counters["ahead"],
        )
