"""Score a served model on a job's held-out prompts through the official OpenAI client.

A `raylane train` job on a toy task leaves the task's held-out split in ``OUTPUT_DIR/data/eval.jsonl``
and the trained model in ``OUTPUT_DIR/final_model``. Serve the model, then ask it every held-out
prompt with greedy decoding, as the job's own evaluation does, and score the answers with each
row's reward function:

    raylane serve outputs/grpo-gpu/final_model --device cuda &
    python examples/query_served_model.py --eval-file outputs/grpo-gpu/data/eval.jsonl --model final_model

It prints the held-out reward (comparable to the job's last ``eval_reward_mean``) and a few answers;
``--output FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from raylane.rlhf.rewards import compute_reward


def wait_until_served(client: openai.OpenAI, model: str, wait_s: float) -> None:
    """Return once the server lists ``model``; raise if it does not within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            served = [m.id for m in client.models.list().data]
        except openai.APIConnectionError:
            served = []
        if model in served:
            return
        if time.monotonic() >= deadline:
            listed = f"it serves {served}" if served else "nothing answered"
            raise SystemExit(f"{client.base_url} does not serve {model!r} after {wait_s:.0f} s: {listed}")
        time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-file", required=True, help="JSONL rows with prompt, ground_truth, reward_fn")
    parser.add_argument("--model", required=True, help="the served model's name (`raylane serve` prints it)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("RAYLANE_API_KEY", "none"))
    parser.add_argument("--max-tokens", type=int, default=8, help="the job's rollout.max_tokens")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--wait-s", type=float, default=0.0, help="wait this long for the server to answer")
    parser.add_argument("--output", help="also write the score and the answers here, as JSON")
    args = parser.parse_args()

    with open(args.eval_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][: args.limit]
    if not rows:
        parser.error(f"{args.eval_file} holds no rows")
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=2)
    wait_until_served(client, args.model, args.wait_s)

    def answer(row: dict) -> str:
        completion = client.completions.create(
            model=args.model, prompt=row["prompt"], max_tokens=args.max_tokens, temperature=0.0
        )
        return completion.choices[0].text

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(answer, rows))
    seconds = time.perf_counter() - start
    scores = [
        compute_reward(row.get("reward_fn", "exact_match"), text, row["ground_truth"])
        for row, text in zip(rows, answers, strict=True)
    ]
    reward = sum(scores) / len(scores)
    print(f"{args.model}: held-out reward {reward:.3f} over {len(rows)} prompts in {seconds:.1f} s")
    for row, text in list(zip(rows, answers, strict=True))[:5]:
        print(f"  {row['prompt']!r} -> {text!r} (expected {row['ground_truth']!r})")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "model": args.model,
                    "eval_file": args.eval_file,
                    "prompts": len(rows),
                    "held_out_reward": reward,
                    "seconds": seconds,
                    "answers": [
                        {
                            "prompt": row["prompt"],
                            "answer": text,
                            "ground_truth": row["ground_truth"],
                            "score": s,
                        }
                        for row, text, s in zip(rows, answers, scores, strict=True)
                    ],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
