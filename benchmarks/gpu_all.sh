#!/usr/bin/env bash
# Every GPU measurement of raylane in one go, for a GPU machine that has PyTorch but not Ray:
# the GPU tests, the RL job on the GPU phase by phase (bench_rl_gpu), one colocated transition against
# HybridFlow's baseline (bench_transitions_gpu), its trained model served from
# the GPU (scored through the openai client, then Serve against the in-process engine), the runner
# benchmark (batch 1/16/64/256 + GRPO prefix caching, against HF), both model shapes of issue 20
# with cold/warm engine start-up, batch 1 again with async scheduling off, the same-GPU weight
# reshard and, with two GPUs, the disaggregated NCCL weight-sync benchmark and the two-GPU
# colocated reshard. Run in parts with ONLY=name1,name2 (a step's name, as printed).
#
#   bash benchmarks/gpu_wheels.sh                 # here: .whl/ (Ray core + Serve's needs, pydantic, openai)
#   bash benchmarks/gpu_all.sh [RESULTS_DIR]      # there, with .whl carried; default: $OUT, else benchmarks/results
#
# Keeps NVLink multicast off (the lent machines require it). Each step is bounded in time and
# logs to RESULTS_DIR; a failing step does not stop the ones after it.
set -uo pipefail
results=${1:-${OUT:-benchmarks/results}}
mkdir -p "$results"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "GPUs: $gpus"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  echo "== $name"
  timeout "$seconds" "$@" > "$results/$name.log" 2>&1
  echo "   exit $? (log: $results/$name.log)"
  grep -E "passed|failed|tok/s|GB/s|x$|Error|share|gap|reward|start-up|transition|steps/s|^(none|sync|async|lazy|d2h|torch_save|dcp_save|disk_copy) " "$results/$name.log" | grep -v -i warn | tail -30
}

step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_runner_gpu.py tests/test_actors_gpu.py \
  tests/test_runner_compile.py tests/test_training.py
step bench_rl_gpu 560 python3 benchmarks/bench_rl_gpu.py --output "$results" --fp32-trainer
# Issue 14's transitions against HybridFlow's baseline: one colocated actor -> rollout transition of the GPU
# job's model, raylane's (sleep, wake, in-place reshard) against the full state dict gathered to host
# memory, put in the object store and loaded by the engine; both checked bit for bit, same run.
step bench_transitions_gpu 420 python3 benchmarks/bench_transitions.py --device cuda --config examples/grpo_gpu.yaml \
  --repeats 10 --output "$results/bench_transitions_cuda.json"
# The model that job trained, served from the GPU: `raylane serve` scored on the job's held-out prompts
# through the official openai client, then Serve against the in-process engine at a few request rates,
# with the ingress in its own deployment (two Ray hops per streamed chunk) and in the model's replica
# (one hop, the default for one model), one after the other (the engine and the replica each take
# 0.3 of the GPU, since the driver's engine may keep its share).
trained=outputs/bench-rl-gpu/grpo
step serve_trained 300 bash benchmarks/serve_trained.sh "$trained" "$results/serve_trained_gpu.json" 8 --device cuda
serving_model=$trained/final_model
if [ ! -f "$serving_model/config.json" ] && { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",bench_serving_gpu"* ]]; }; then
  # Without that job's model, a random one of its shape: the serving hops' cost does not depend on weights.
  serving_model=/tmp/grpo-gpu-shape
  python3 -c "import sys, yaml; from raylane.models import make_tiny_model; m = yaml.safe_load(open('examples/grpo_gpu.yaml'))['model']; make_tiny_model(sys.argv[1], arch=m['tiny_arch'], **m['tiny_shape'])" "$serving_model"
fi
# The ingress in the model's replica only (a separate ingress deployment measured 1.4x its TTFT before),
# streaming each engine step's tokens (the default), then in chunks of 4 tokens after the first.
step bench_serving_gpu 420 python3 benchmarks/bench_serving.py --model "$serving_model" --device cuda \
  --gpu-memory-utilization 0.3 --max-model-len 128 --prompt-len 24 --output-len 24 --num-requests 200 \
  --request-rate 8 32 128 --ingress with_model --output "$results/bench_serving_cuda.json"
step bench_serving_gpu_chunk4 420 python3 benchmarks/bench_serving.py --model "$serving_model" --device cuda \
  --gpu-memory-utilization 0.3 --max-model-len 128 --prompt-len 24 --output-len 24 --num-requests 200 \
  --request-rate 8 32 128 --ingress with_model --tokens-per-chunk 4 --output "$results/bench_serving_cuda_chunk4.json"
# Issue 14's last target: the same loads through the proxy and on the replica's own port (Serve's direct
# ingress: no proxy hop), on one deployment, taking turns over 2 rounds, against the engine's 2 runs.
step bench_serving_gpu_direct 540 python3 benchmarks/bench_serving.py --model "$serving_model" --device cuda \
  --gpu-memory-utilization 0.3 --max-model-len 128 --prompt-len 24 --output-len 24 --num-requests 200 \
  --request-rate 8 32 128 --ingress with_model direct --rounds 2 --output "$results/bench_serving_cuda_direct.json"
# Issue 14's in-job rollout gap: the job at one and at eight CPUs per bundle (Ray sets an actor's torch
# threads from its CPU share) against the standalone runner with all its threads and with one.
step bench_rollout_in_job 420 python3 benchmarks/bench_rollout_in_job.py --cpus 1 8 --output "$results"
# Issue 17's checkpoint cost in the GPU job: none, sync, async (snapshot to host memory, persist in
# the background) and lazy (the snapshot overlaps the next step, a memory tier in /dev/shm, the disk
# coalesced) every step, in rotated blocks of one run; no warm-start, only steps and checkpoints.
step bench_checkpoint_gpu 540 python3 benchmarks/bench_checkpoint.py --config examples/grpo_gpu.yaml \
  --rounds 2 --steps 3 --output "$results/bench_checkpoint_gpu.json"
# Lazy mode alone against none (more steps for the same time; its first checkpoints timed apart), and what slows a GPU step beside each
# part of a checkpoint's pipeline (device-to-host copy, tmpfs write, disk copy).
step bench_checkpoint_gpu_lazy 540 python3 benchmarks/bench_checkpoint.py --config examples/grpo_gpu.yaml \
  --modes lazy --rounds 4 --steps 8 --set checkpoint_disk_interval_s=0 --output "$results/bench_checkpoint_gpu_lazy.json"
# The same with a stationary workload (lr 1e-12: the policy, hence the rollouts' lengths, stay put while
# the optimizer does all its work) and the disk every 60 s, so the blocks differ by the checkpoint only;
# it prints the overhead of the mean step with its 95 % bootstrap interval (pool runs: --pool A.json B.json).
step bench_checkpoint_gpu_lazy_stationary 540 python3 benchmarks/bench_checkpoint.py --config examples/grpo_gpu.yaml \
  --modes lazy --rounds 10 --steps 8 --set checkpoint_disk_interval_s=60 actor.optim.lr=1e-12 \
  --output "$results/bench_checkpoint_gpu_lazy_stationary.json"
step probe_checkpoint_interference 150 python3 benchmarks/probe_checkpoint_interference.py --gb 4
# The GPU job checkpointing asynchronously, then resumed from its latest complete checkpoint.
step train_resume_gpu 400 bash -c "python3 -m raylane.cli train examples/grpo_gpu.yaml output_dir=/tmp/resume-gpu \
  steps=4 sft.steps=2 eval_every=0 checkpoint_every=2 && python3 -m raylane.cli train examples/grpo_gpu.yaml \
  output_dir=/tmp/resume-gpu steps=6 sft.steps=2 eval_every=0 checkpoint_every=2 resume_from=latest \
  && ls /tmp/resume-gpu/checkpoints && tail -2 /tmp/resume-gpu/metrics.jsonl"
step bench_runner 420 python3 benchmarks/bench_runner.py --preset llama-1b --device cuda \
  --batch-sizes 1 16 64 256 --output "$results/bench_runner_cuda_llama-1b.json"
# Issue 20, both model shapes in one run (one JSON, one copy-bandwidth measurement, roofline share per
# shape): batch 1, 64 and 256, and engine start-up cold and warm-cache in new processes. Lazy capture.
step bench_runner_presets 570 python3 benchmarks/bench_runner.py --preset llama-1b qwen-0.5b --device cuda \
  --batch-sizes 1 64 256 --no-hf --grpo-prompts 0 --startup --graph-capture lazy \
  --output "$results/bench_runner_cuda_presets.json"
# The same without programmatic dependent launch (on by default for the batch-1 graph on Hopper): its effect.
step bench_runner_presets_no_pdl 400 python3 benchmarks/bench_runner.py --preset qwen-0.5b llama-1b --device cuda \
  --batch-sizes 1 64 256 --no-hf --grpo-prompts 0 --graph-capture lazy --no-programmatic-launch \
  --output "$results/bench_runner_cuda_presets_no_pdl.json"
# The same batch-1 workload with async scheduling off: its effect, measured on this machine.
step bench_runner_b1_sync 240 python3 benchmarks/bench_runner.py --preset llama-1b --device cuda \
  --batch-sizes 1 --no-hf --no-async-scheduling --output "$results/bench_runner_cuda_llama-1b_b1_sync.json"
step bench_weight_sync_same_gpu 240 python3 benchmarks/bench_weight_sync.py --device cuda \
  --shape llama-1b --dp 1 --tp 1 --modes colocated --repeats 10 \
  --output "$results/bench_weight_sync_cuda_colocated_dp1tp1.json"
if [ "$gpus" -ge 2 ]; then
  # NCCL's own log of forming the group and of each point-to-point call, for a stall's diagnosis.
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P step bench_weight_sync_disaggregated 300 \
    python3 benchmarks/bench_weight_sync.py --device cuda \
    --shape llama-1b --dp 1 --tp 1 --modes disaggregated --timeout-s 120 \
    --output "$results/bench_weight_sync_cuda_disaggregated.json"
  step bench_weight_sync_disaggregated_one_by_one 300 python3 benchmarks/bench_weight_sync.py --device cuda \
    --shape llama-1b --dp 1 --tp 1 --modes disaggregated --timeout-s 120 --no-coalesce \
    --output "$results/bench_weight_sync_cuda_disaggregated_one_by_one.json"
  step bench_weight_sync_colocated 300 python3 benchmarks/bench_weight_sync.py --device cuda \
    --shape llama-1b --dp 2 --tp 2 --modes colocated --repeats 10 \
    --output "$results/bench_weight_sync_cuda_dp2tp2.json"
fi
