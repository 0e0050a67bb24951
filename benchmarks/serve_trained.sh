#!/usr/bin/env bash
# Serves a finished `raylane train` job's model with `raylane serve` and scores it on the job's held-out
# prompts through the official OpenAI client (examples/query_served_model.py), then stops the server.
#
#   bash benchmarks/serve_trained.sh JOB_OUTPUT_DIR RESULT_JSON [MAX_TOKENS] [raylane serve flags...]
set -uo pipefail
job=$1 result=$2 max_tokens=${3:-8}
shift $(( $# < 3 ? $# : 3 ))
port=${PORT:-8000}
python3 -m raylane.cli serve --model "$job/final_model" --port "$port" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
for _ in $(seq 300); do
  kill -0 $server 2>/dev/null || { echo "raylane serve exited before serving" >&2; exit 1; }
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/v1/models', timeout=2)" \
    2>/dev/null && break
  sleep 1
done
python3 examples/query_served_model.py --eval-file "$job/data/eval.jsonl" --model final_model \
  --base-url "http://127.0.0.1:$port/v1" --max-tokens "$max_tokens" --output "$result"
