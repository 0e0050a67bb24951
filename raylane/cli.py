"""The ``raylane`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from raylane.serving.cli import add_serve_parser

logger = logging.getLogger("raylane")


class CLIError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def _read_prompts(path: str) -> list[dict[str, Any]]:
    prompts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{path}:{line_no}: not valid JSON ({err})") from err
            if not isinstance(item, dict) or not ({"prompt", "prompt_token_ids", "messages"} & set(item)):
                raise CLIError(
                    f"{path}:{line_no}: expected an object with 'prompt', 'prompt_token_ids' or 'messages'"
                )
            prompts.append(item)
    if not prompts:
        raise CLIError(f"{path} holds no prompts")
    return prompts


def _engine_prompt(item: dict[str, Any], tokenizer) -> dict[str, Any]:
    if "messages" in item:
        return {"prompt": tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True)}
    key = "prompt" if "prompt" in item else "prompt_token_ids"
    return {key: item[key]}


def cmd_generate(args: argparse.Namespace) -> int:
    from raylane.runner import LLM, SamplingParams

    if (args.prompt is None) == (args.input is None):
        raise CLIError("give exactly one of --prompt TEXT or --input prompts.jsonl")
    items = [{"prompt": args.prompt}] if args.prompt is not None else _read_prompts(args.input)
    try:
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=args.stop or [],
            ignore_eos=args.ignore_eos,
            logprobs=args.logprobs,
        )
    except ValueError as err:
        raise CLIError(f"invalid sampling option: {err}") from err
    options = {"dtype": args.dtype, "device": args.device}
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **options)
    try:
        prompts = [_engine_prompt(item, llm.tokenizer) for item in items]
    except ValueError as err:
        raise CLIError(str(err)) from err
    start = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    except ValueError as err:
        raise CLIError(str(err)) from err
    elapsed = time.perf_counter() - start
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115 - stdout is not closed
    try:
        for output in outputs:
            for sample in output.outputs:
                record: dict[str, Any] = {
                    "text": sample.text,
                    "token_ids": sample.token_ids,
                    "finish_reason": sample.finish_reason,
                }
                if args.n > 1:
                    record["index"] = sample.index
                if args.logprobs:
                    record["logprobs"] = sample.logprobs
                out.write(json.dumps(record) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    generated = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    print(
        f"generated {generated} tokens for {len(outputs)} prompts in {elapsed:.2f} s "
        f"({generated / max(elapsed, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from raylane.models import make_tiny_model

    make_tiny_model(args.output_dir, arch=args.arch, seed=args.seed, std=args.std)
    print(f"wrote a tiny random {args.arch} checkpoint to {args.output_dir}", file=sys.stderr)
    return 0


def _job_config(config_cls, args: argparse.Namespace):
    """The job's config from its YAML file and overrides, also written to ``OUTPUT_DIR/config.yaml``."""
    import os

    from raylane.config import ConfigError, dump_config, load_config

    try:
        config = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        raise CLIError(str(err)) from err
    os.makedirs(config.output_dir, exist_ok=True)
    dump_config(config, os.path.join(config.output_dir, "config.yaml"))
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from raylane.controllers import JobConfig, run_job

    config = _job_config(JobConfig, args)
    history = run_job(config)
    evals = [r["eval_reward_mean"] for r in history if "eval_reward_mean" in r]
    if evals:
        print(
            f"held-out reward: {evals[0]:.3f} -> {evals[-1]:.3f}; outputs in {config.output_dir}",
            file=sys.stderr,
        )
    return 0


def _held_out_change(history: list[dict[str, float]], key: str, label: str) -> str:
    values = [record[key] for record in history if key in record]
    return f"{label}: {values[0]:.3f} -> {values[-1]:.3f}" if values else "no held-out data"


def cmd_sft(args: argparse.Namespace) -> int:
    from raylane.supervised import SFTJobConfig, run_sft

    config = _job_config(SFTJobConfig, args)
    summary = _held_out_change(run_sft(config), "eval_exact_match", "held-out exact match")
    print(f"{summary}; model in {config.final_model_dir}", file=sys.stderr)
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    from raylane.supervised import RewardModelJobConfig, run_reward_model_training

    config = _job_config(RewardModelJobConfig, args)
    history = run_reward_model_training(config)
    summary = _held_out_change(history, "eval_pair_accuracy", "held-out pair accuracy")
    print(f"{summary}; reward model (task.reward_model) in {config.final_model_dir}", file=sys.stderr)
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    from raylane.fault_tolerance import signal_rank

    _connect(args.address)
    node = signal_rank(args.group, args.rank, args.action)
    print(
        f"{args.action}: rank {args.rank} of {args.group!r} (pid {node.pid} on {node.node_ip})",
        file=sys.stderr,
    )
    return 0


def _connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def cmd_rollout_scale(args: argparse.Namespace) -> int:
    from raylane.controllers import RolloutPoolError, request_scale

    if args.replicas < 1:
        raise CLIError(f"a rollout pool needs at least 1 replica, got {args.replicas}")
    _connect(args.address)
    try:
        applied, message = request_scale(args.job, args.replicas, args.timeout)
    except (RolloutPoolError, TimeoutError) as err:
        raise CLIError(str(err)) from err
    if not applied:
        raise CLIError(f"refused by job {args.job!r}: {message}")
    print(message, file=sys.stderr)
    return 0


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from raylane.controllers import RolloutPoolError, rollout_status

    _connect(args.address)
    try:
        status = rollout_status(args.job)
    except RolloutPoolError as err:
        raise CLIError(str(err)) from err
    print(json.dumps(status))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylane", description="LLM post-training on Ray.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="offline generation with raylane's runner")
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    gen.add_argument("--input", help="JSONL with {'prompt'}, {'prompt_token_ids'} or {'messages'} per line")
    gen.add_argument("--output", help="JSONL to write (default: stdout)")
    gen.add_argument("--prompt", help="a single prompt to try")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--logprobs", action="store_true", help="write the log-prob of each generated token")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    train = commands.add_parser("train", help="run an RL job (GRPO, PPO, ...) from a YAML config")
    train.add_argument("config", nargs="?", help="YAML job config (default: the built-in laptop job)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. actor.optim.lr=1e-4")
    train.set_defaults(func=cmd_train)

    sft = commands.add_parser("sft", help="supervised fine-tuning as a Ray Train job, from a YAML config")
    sft.add_argument("config", nargs="?", help="YAML SFT config (default: the built-in toy job)")
    sft.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    sft.set_defaults(func=cmd_sft)

    rm = commands.add_parser("train-rm", help="train a reward model on preference pairs as a Ray Train job")
    rm.add_argument("config", nargs="?", help="YAML reward-model config (default: the built-in toy job)")
    rm.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. model.path=outputs/sft/final_model"
    )
    rm.set_defaults(func=cmd_train_rm)

    add_serve_parser(commands)

    fault = commands.add_parser(
        "fault", help="inject a fault into a running job: kill, stop or continue one rank's process"
    )
    fault.add_argument("action", choices=["kill", "stop", "cont"], help="SIGKILL, SIGSTOP or SIGCONT")
    fault.add_argument("--group", required=True, help="the worker group's name (e.g. actor, rollout)")
    fault.add_argument("--rank", type=int, required=True)
    fault.add_argument("--address", default="auto", help="the Ray cluster to join (default: auto)")
    fault.set_defaults(func=cmd_fault)

    rollout = commands.add_parser(
        "rollout", help="the rollout pool of a running job (placement.mode=disaggregated, synchronous)"
    )
    rollout_commands = rollout.add_subparsers(dest="rollout_command", required=True)
    scale = rollout_commands.add_parser(
        "scale", help="grow or shrink the pool to N engine replicas (applied between steps)"
    )
    scale.add_argument("replicas", type=int, help="engine replicas to run (rollout_tp ranks each)")
    status = rollout_commands.add_parser("status", help="the pool's replicas and replacements so far")
    for sub, func in ((scale, cmd_rollout_scale), (status, cmd_rollout_status)):
        sub.add_argument("--job", required=True, help="the job's name: the last folder of its output_dir")
        sub.add_argument("--address", default="auto", help="the Ray cluster to join (default: auto)")
        sub.set_defaults(func=func)
    scale.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the job to apply it (default 300)"
    )

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random checkpoint for trying things out")
    tiny.add_argument("output_dir")
    tiny.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--std", type=float, default=0.02, help="init scale of the random weights")
    tiny.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        print(f"raylane {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
