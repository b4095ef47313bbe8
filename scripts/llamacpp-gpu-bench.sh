#!/usr/bin/env bash
# llama.cpp's speed on the device machine, on the same synthetic models as scripts/gpu-bench.sh,
# for the side-by-side tables in BENCHMARKS.md.
#   scripts/llamacpp-gpu-bench.sh pack SDIST   # here: llama.cpp's source (vendored in the
#                                               # llama-cpp-python sdist) into .device/
#   scripts/llamacpp-gpu-bench.sh build        # on the device: llama-bench with CUDA for its GPU
#                                               # into .llama-build/ (about 5 minutes on 16 cores),
#                                               # also as $OUT/llama-bench.xz.* for later calls
#   scripts/llamacpp-gpu-bench.sh run MODEL [ARGS...]  # on the device, carrying .device
# MODEL as scripts/device-model.sh names it (a Nemotron mix, or PRESET/MIX). `run` takes
# llama-bench from .llama-build/, else from .device/llama-bench.xz.* (carried back from a build),
# else builds it; generates the model unless it is in /tmp, and runs llama-bench once per quoted
# ARGS (default: all on the GPU, and the experts of the first 16 layers in RAM, mapped and not):
# pp512, pp2048 (one 2048-token batch) and tg128, 16 threads, flash attention on, with the GPU
# memory in use at its peak. JSON lines go to stdout and $OUT/llamacpp.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=.llama-build/bin/llama-bench
build() {
  for d in /usr/local/cuda/bin; do [ -d "$d" ] && export PATH="$d:$PATH"; done
  rm -rf .llama-src && mkdir -p .llama-src && tar xJf .device/llama-src.tar.xz -C .llama-src
  # This machine's own SIMD level, named (no -march=native: some VMs list AMX they fault on).
  simd="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  if grep -q avx512f /proc/cpuinfo; then simd="$simd -DGGML_AVX512=ON"; fi
  if grep -q avx512_vnni /proc/cpuinfo; then simd="$simd -DGGML_AVX512_VNNI=ON"; fi
  # shellcheck disable=SC2086
  cmake -S .llama-src/llama.cpp -B .llama-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF $simd > "${OUT:-/tmp}/llama-configure.log" 2>&1
  /usr/bin/time -f "built llama-bench in %e s" cmake --build .llama-build -j"$(nproc)" \
    --target llama-bench > "${OUT:-/tmp}/llama-build.log" 2>&1
}
case "${1:-}" in
  pack)
    sdist="$2"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tar xzf "$sdist" -C "$tmp" --wildcards '*/vendor/llama.cpp/*'
    src=$(dirname "$(find "$tmp" -maxdepth 4 -type d -name llama.cpp | head -1)")
    mkdir -p .device
    # Only what llama-bench needs: the models, docs and tests are most of the 176 MB.
    tar cJf .device/llama-src.tar.xz -C "$src" \
      --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/tests \
      --exclude=llama.cpp/benches --exclude=llama.cpp/examples --exclude=llama.cpp/.git \
      --exclude=llama.cpp/conversion --exclude='llama.cpp/tools/server/public*' llama.cpp
    ls -la .device/llama-src.tar.xz
    ;;
  build)
    build
    tail -1 "${OUT:-/tmp}/llama-build.log"
    strip -o /tmp/llama-bench "$bench"
    xz -T0 -6 -c /tmp/llama-bench | split -b 15M - "${OUT:-/tmp}/llama-bench.xz."
    ls -la "$bench" "${OUT:-/tmp}"/llama-bench.xz.*
    ;;
  run)
    . scripts/device-model.sh "$2"
    name="$2"; shift 2
    [ $# -gt 0 ] || set -- "-ngl 99" "-ngl 99 -ncmoe 16" "-ngl 99 -ncmoe 16 -lm none"
    m="$model_file"
    if [ ! -s "$m" ]; then
      # shellcheck disable=SC2086
      .device/ggrun gen-model $gen_args --out "$m" &
      gen=$!
    fi
    if [ ! -x "$bench" ] && ls .device/llama-bench.xz.* > /dev/null 2>&1; then
      mkdir -p "$(dirname "$bench")"
      cat .device/llama-bench.xz.* | xz -d > "$bench" && chmod +x "$bench"
    fi
    [ -x "$bench" ] || build
    [ -z "${gen:-}" ] || wait "$gen"
    out="${OUT:-/tmp}/llamacpp.jsonl"
    for cfg in "$@"; do
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/mem.log &
      smi=$!
      # One micro-batch per prompt (-ub 2048): pp512, pp2048 and tg128 in one run.
      # shellcheck disable=SC2086
      timeout 300 "$bench" -m "$m" -t 16 -fa 1 -p 512,2048 -n 128 -b 2048 -ub 2048 -r 1 \
        -o jsonl $cfg 2>/tmp/llama-bench.err > /tmp/llama-bench.out ||
        echo "{\"model\": \"$name\", \"config\": \"$cfg\", \"error\": \"$(tail -1 /tmp/llama-bench.err)\"}"
      kill "$smi"
      peak=$(sort -n /tmp/mem.log | tail -1)
      sed "s|^{|{\"model\": \"$name\", \"config\": \"$cfg\", \"peak_gpu_mib\": ${peak:-0}, |" /tmp/llama-bench.out | tee -a "$out"
    done
    ;;
  *)
    echo "usage: $0 pack SDIST | build | run MODEL [ARGS...]" >&2
    exit 2
    ;;
esac
