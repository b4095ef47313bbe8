#!/usr/bin/env bash
# llama.cpp's speed on the device machine, on the same 52-layer synthetic models as
# scripts/gpu-bench.sh, for the side-by-side table in BENCHMARKS.md.
#   scripts/llamacpp-gpu-bench.sh pack SDIST   # here: llama.cpp's source (vendored in the
#                                               # llama-cpp-python sdist) into .device/
#   scripts/llamacpp-gpu-bench.sh run MIX [ARGS...]  # on the device, carrying .device
# `run` builds llama-bench with CUDA for the device's GPU into .llama-build/ (once per machine,
# about 5 minutes on 16 cores), generates /tmp/nano52-MIX.gguf with .device/ggrun unless it is
# there, and runs llama-bench once per quoted ARGS (default: all on the GPU, and the experts of
# the first 16 layers in RAM, mapped and not): pp512, pp2048 (one 2048-token batch) and tg128,
# 16 threads, flash attention on. JSON lines go to stdout and $OUT/llamacpp-MIX.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
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
  run)
    mix="$2"; shift 2
    [ $# -gt 0 ] || set -- "-ngl 99" "-ngl 99 -ncmoe 16" "-ngl 99 -ncmoe 16 -lm none"
    for d in /usr/local/cuda/bin; do [ -d "$d" ] && export PATH="$d:$PATH"; done
    m="/tmp/nano52-$mix.gguf"
    if [ ! -s "$m" ]; then
      .device/ggrun gen-model --layers 52 --mix "$mix" --out "$m" &
      gen=$!
    fi
    bench=.llama-build/bin/llama-bench
    if [ ! -x "$bench" ]; then
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
    fi
    [ -z "${gen:-}" ] || wait "$gen"
    out="${OUT:-/tmp}/llamacpp-$mix.jsonl"
    for cfg in "$@"; do
      # One micro-batch per prompt (-ub 2048): pp512, pp2048 and tg128 in one run.
      # shellcheck disable=SC2086
      timeout 300 "$bench" -m "$m" -t 16 -fa 1 -p 512,2048 -n 128 -b 2048 -ub 2048 -r 1 \
        -o jsonl $cfg 2>/tmp/llama-bench.err | sed "s/^{/{\"config\": \"$cfg\", /" | tee -a "$out" ||
        echo "{\"config\": \"$cfg\", \"error\": \"$(tail -1 /tmp/llama-bench.err)\"}"
    done
    ;;
  *)
    echo "usage: $0 pack SDIST | run MIX [ARGS...]" >&2
    exit 2
    ;;
esac
