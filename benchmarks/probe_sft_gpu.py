"""Probe: how fast a random model of the GPU job's shape learns the reverse task by SFT, per learning rate.

Picks the warm-start of ``examples/grpo_gpu.yaml`` (steps and learning rate that leave held-out exact
match low but above zero, so RL has something to raise). Plain PyTorch on one GPU, bf16 autocast over
fp32 weights as the trainer's FSDP2 mixed precision does; prints held-out greedy exact match.

    python benchmarks/probe_sft_gpu.py --lrs 1e-4 3e-4 1e-3 --steps 150
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from raylane.config import load_config
from raylane.controllers.config import JobConfig
from raylane.models import CausalLM, make_tiny_tokenizer
from raylane.models.tiny import init_weights, tiny_config
from raylane.rlhf import make_toy_task


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _batch(tokenizer, rows, device):
    prompts = [tokenizer.encode(r["prompt"]) for r in rows]
    targets = [
        [*tokenizer.encode(r["completion"], add_special_tokens=False), tokenizer.eos_token_id] for r in rows
    ]
    ids = torch.tensor([p + t for p, t in zip(prompts, targets)], device=device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(prompts[0]) :] = True
    return ids, mask


@torch.no_grad()
def _exact_match(model, tokenizer, rows, device) -> float:
    ids = torch.tensor([tokenizer.encode(r["prompt"]) for r in rows], device=device)
    for _ in range(4):
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    answers = [tokenizer.decode(row[-4:-1].tolist()) for row in ids]
    return sum(a == r["ground_truth"] for a, r in zip(answers, rows)) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="examples/grpo_gpu.yaml")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    args = parser.parse_args()
    job = load_config(JobConfig, args.config, [])
    device = torch.device("cuda")
    tokenizer = make_tiny_tokenizer()
    files = make_toy_task(job.task.name, tempfile.mkdtemp(), job.task.n_train, job.task.n_eval)
    sft, held_out = _rows(files.sft), _rows(files.eval)
    for lr in args.lrs:
        model = CausalLM(tiny_config(job.model.tiny_arch, **job.model.tiny_shape))
        init_weights(model, job.model.tiny_seed)
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            picks = torch.randint(len(sft), (job.sft.batch_size,), generator=generator).tolist()
            ids, mask = _batch(tokenizer, [sft[i] for i in picks], device)
            with torch.autocast("cuda", torch.bfloat16):
                logits = model(ids)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]].float(), ids[:, 1:][mask[:, 1:]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % args.eval_every == 0:
                match = _exact_match(model, tokenizer, held_out, device)
                print(f"lr {lr:g} step {step:4d} loss {loss.item():.3f} held-out {match:.3f} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
        del model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
