#!/usr/bin/env bash
# Fetches, on this (networked) machine, the wheels that bench/gpu.sh installs on a lent GPU
# machine, which has PyTorch, Lightning, peft, pyarrow and torchmetrics but none of these and
# no network. They go to .whl/ (git-ignored through .git/info/exclude) and travel with the run:
#   bash bench/gpu_wheels.sh
# then device run with carry [".whl"] and command `bash bench/gpu.sh`.
#   bash bench/gpu_wheels.sh --gradio
# also fetches Gradio and what it needs that the GPU machine lacks (~50 MB), for
# bench/app_latency.py; the carry holds 64 MiB in all, so fetch these for a run of that
# bench alone where the others' wheels leave no room (rm -r .whl first).
set -euo pipefail
gradio=0
[ "${1:-}" = --gradio ] && gradio=1
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in omegaconf==2.4.0 taming-transformers==0.0.1 open-clip-torch==3.3.0 ftfy wcwidth \
           webdataset==1.0.2 braceexpand litdata==0.2.76 boto3 botocore s3transfer jmespath \
           bitsandbytes==0.50.2 lpips==0.1.4; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
if [ "$gradio" = 1 ]; then
  for pkg in gradio==6.31.0 gradio-client==2.7.2 hf-gradio fastapi starlette uvicorn h11 \
             python-multipart safehttpx groovy tomlkit semantic-version orjson brotli pydub \
             pydantic pydantic-core annotated-types typing-inspection pandas pytz tzdata \
             python-dateutil six anyio httpx httpcore typer click shellingham rich \
             markdown-it-py mdurl pygments websockets; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "$pkg"
  done
fi
du -sh .whl
