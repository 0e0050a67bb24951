#!/usr/bin/env bash
# Checks an image built from deploy/Dockerfile the way the chart uses it, as the image's user (uid
# 1000): the imports and the CLI, a Ray head that passes KubeRay's exec probe, and a two-step GRPO
# job (examples/grpo_reverse.yaml) on that head. Stops at the first failing check.
# Run from the repository root: deploy/smoke_test_image.sh IMAGE [podman run options...]
# PODMAN overrides the podman command line (e.g. PODMAN="podman --runtime runc").
set -euo pipefail
image=$1
shift
# shellcheck disable=SC2086  # PODMAN is a command line
${PODMAN:-podman} run --rm --shm-size=2g -e RAY_ADDRESS=127.0.0.1:6379 \
    -v "$PWD/examples:/examples:ro" "$@" "$image" bash -c '
check() {
    echo "== $*"
    start=$SECONDS
    "$@" || { rc=$?; echo "== FAILED rc=$rc: $*"; exit $rc; }
    echo "== ok ($((SECONDS - start)) s): $*"
}
# KubeRay 1.x probe of the head: the raylet through the dashboard agent, the GCS through the dashboard.
kuberay_probe() {
    wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep -q success \
        && wget --tries 1 -T 10 -q -O- http://localhost:8265/api/gcs_healthz | grep -q success
}
wait_for_probe() { for _ in $(seq 60); do kuberay_probe && return; sleep 1; done; return 1; }
check id
check python -c "import raylane, ray, torch; print(ray.__version__, torch.__version__)"
check raylane --help
check ray start --head --num-cpus=4 --disable-usage-stats
check ray status
check wait_for_probe
check raylane train /examples/grpo_reverse.yaml steps=2 eval_every=1 eval_prompts=16
check test -s outputs/grpo-reverse/metrics.jsonl
check ray stop
'
