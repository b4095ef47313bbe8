#!/usr/bin/env bash
# The GPU tests, which CI (no GPU) skips: build here, run on the device machine.
#   scripts/gpu-test.sh build   # here: release binaries and test binaries into .device/
#   scripts/gpu-test.sh run     # on the device (the tool's `run`, carrying .device)
# The device machine has CUDA but no Rust; it sees the checkout plus the carried .device/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    cargo build --release
    # Keep what else was packed there (llama.cpp's source or build for the comparisons).
    rm -rf .device/fixtures .device/ggrun .device/gpu-tests && mkdir -p .device
    cp target/release/ggrun .device/
    cargo test --release --no-run --test gpu --message-format=json 2>/dev/null |
      python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], ".device/gpu-tests")
'
    mkdir -p .device/fixtures
    for f in ../shared/fixtures/nemo-*q*.gguf ../shared/fixtures/nemo-*q*.golden.json \
             ../shared/fixtures/nemo-*q*.logits.f32 ../shared/fixtures/nemo-*q*.ref.f32; do
      cp "$f" .device/fixtures/
    done
    strip .device/ggrun .device/gpu-tests   # the debug info would exceed what the device call can carry
    ls -la .device
    ;;
  run)
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
      [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
    done
    export GGRUN_CACHE_DIR="${GGRUN_CACHE_DIR:-/tmp/ggrun-cache}"
    export GGRUN_FIXTURES="$PWD/.device/fixtures"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    .device/ggrun gpu
    .device/gpu-tests --ignored --nocapture --test-threads 1
    .device/ggrun gpu   # the second start finds the kernels cached
    m=.device/fixtures/nemo-tiny-q4_k_m.gguf
    .device/ggrun logits -m $m --tokens 1,2,3,4,5,6,7,8,9,10 --decode 4 --out /tmp/cpu.f32
    .device/ggrun logits -m $m --tokens 1,2,3,4,5,6,7,8,9,10 --decode 4 --out /tmp/gpu.f32 -ngl 99
    .device/ggrun logits -m $m --tokens 1,2,3,4,5,6,7,8,9,10 --decode 4 --out /tmp/hyb.f32 \
      -ngl 99 --n-cpu-moe 2
    ;;
  *)
    echo "usage: scripts/gpu-test.sh build|run" >&2
    exit 2
    ;;
esac
