#!/usr/bin/env bash
# Fetches, on this (networked) machine, the wheels that bench/gpu.sh installs on a lent GPU
# machine, which has PyTorch, Lightning, peft, pyarrow and torchmetrics but none of these and
# no network. They go to .whl/ (git-ignored through .git/info/exclude) and travel with the run:
#   bash bench/gpu_wheels.sh
# then device run with carry [".whl"] and command `bash bench/gpu.sh`.
set -euo pipefail
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
du -sh .whl
