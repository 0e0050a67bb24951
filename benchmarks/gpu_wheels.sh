#!/usr/bin/env bash
# Builds ./.whl, the wheels that benchmarks/gpu_all.sh installs on a GPU machine that has PyTorch but
# neither Ray nor pydantic: Ray core (via ../shared/tools/gpu-wheels), pydantic, what Ray Serve imports
# when it serves (FastAPI, Starlette, uvicorn, OpenTelemetry, grpcio-reflection), grpcio-tools for
# raylane's gRPC stubs, redis for the rollout stream and the official openai client. The versions are
# the ones the CPU suite runs with. Parts of Ray that no GPU step uses (RLlib, Ray Data, Ray LLM, the
# dashboard's web client) are cut out so the carried tree stays under the device's 64 MiB.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl
../shared/tools/gpu-wheels \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  starlette==1.10.0 fastapi==0.165.0 uvicorn==0.54.0 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 \
  grpcio==1.85.3 grpcio-reflection==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2 redis==8.1.0 \
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore jiter==0.19.0 sniffio
for wheel in .whl/ray-*.whl; do
  zip -q -d "$wheel" 'ray/rllib/*' 'ray/data/*' 'ray/llm/*' 'ray/dashboard/client/*' >/dev/null
done
du -sh .whl
