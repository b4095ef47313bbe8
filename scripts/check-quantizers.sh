#!/usr/bin/env bash
# Our reference quantizers against llama-quantize, byte for byte: a one-layer
# qwen3moe-30b-a3b-width file in F16 (`ggrun gen-model`), quantized by llama-quantize to each
# TYPE given (default IQ4_XS, whose mix also holds Q5_K and Q6_K tensors), then every quantized
# tensor re-quantized by ours from the same F16 values and compared block by block
# (tests/presets.rs, reference_quantizers_write_what_llama_quantize_writes).
#   scripts/check-quantizers.sh PATH/TO/llama-quantize [TYPE ...]
# llama-quantize: built from the llama.cpp in the llama-cpp-python 0.3.36 sdist
# (`cmake --build build --target llama-quantize`). Needs ~6 GB of disk under $TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
quantize=${1:?usage: scripts/check-quantizers.sh PATH/TO/llama-quantize [TYPE ...]}
shift
types=("$@")
[ ${#types[@]} -gt 0 ] || types=(IQ4_XS)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release -q
target/release/ggrun gen-model --preset qwen3moe-30b-a3b --layers 1 --mix f16 --out "$tmp/src.gguf" >/dev/null
for ty in "${types[@]}"; do
  "$quantize" "$tmp/src.gguf" "$tmp/$ty.gguf" "$ty" "$(nproc)" > "$tmp/log" 2>&1 || { tail "$tmp/log"; exit 1; }
  echo "$ty:"
  GGRUN_SOURCE="$tmp/src.gguf" GGRUN_QUANTIZED="$tmp/$ty.gguf" \
    cargo test --release -q --test presets reference_quantizers_write_what_llama_quantize_writes \
    -- --ignored --nocapture 2>&1 | grep -E "blocks|test result"
done
