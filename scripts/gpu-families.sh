#!/usr/bin/env bash
# Issue 21's comparison on the device machine, in one call (carrying .device with ggrun and
# llama-bench.xz.* from `scripts/llamacpp-gpu-bench.sh build`): the GPU tests, then ggrun and
# llama.cpp on the Qwen3-30B-A3B-width Q4_K_M (48 layers) and GPT-OSS-20B-width (MXFP4) presets,
# all in VRAM and at the issue's budgets (12 GiB and 8 GiB; llama.cpp at -ncmoe values around
# the same split, its peak GPU memory recorded so that the fitting one can be picked).
#   scripts/gpu-families.sh [tests] [gpt-oss] [qwen]   # the parts to run, in that order ("tests"
#                                                       # needs scripts/gpu-test.sh's build)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
SECONDS=0
q=qwen3moe-30b-a3b/q4_k_m
g=gpt-oss-20b/mxfp4
parts=" $* "
# The 48-layer file takes ~4.5 minutes to generate on 16 cores: start it first.
if [[ $parts == *" qwen "* ]] && [ ! -s /tmp/qwen3moe-30b-a3b-q4_k_m.gguf ]; then
  .device/ggrun gen-model --preset qwen3moe-30b-a3b --mix q4_k_m \
    --out /tmp/qwen3moe-30b-a3b-q4_k_m.gguf > /dev/null &
  gen=$!
fi
if [[ $parts == *" tests "* ]]; then
  timeout 240 bash scripts/gpu-test.sh run > "$out/gpu-test.log" 2>&1
  echo "gpu tests: rc $? after $SECONDS s"
  grep -E "test result|panicked|FAILED" "$out/gpu-test.log"
fi
if [[ $parts == *" gpt-oss "* ]]; then
  bash scripts/gpu-bench.sh $g 512 128 "-ngl 999" "--gpu-mem 8GiB"
  bash scripts/llamacpp-gpu-bench.sh run $g "-ngl 99" "-ngl 99 -ncmoe 10 -lm none" \
    "-ngl 99 -ncmoe 12 -lm none" >> "$out/llama.txt" 2>&1
  echo "gpt-oss done after $SECONDS s"
fi
if [[ $parts == *" qwen "* ]]; then
  [ -z "${gen:-}" ] || wait "$gen"
  bash scripts/gpu-bench.sh $q 512 128 "--gpu-mem 12GiB"
  bash scripts/llamacpp-gpu-bench.sh run $q "-ngl 99 -ncmoe 20 -lm none" "-ngl 99 -ncmoe 20" \
    >> "$out/llama.txt" 2>&1
  echo "qwen done after $SECONDS s"
fi
[ -s "$out/llamacpp.jsonl" ] || exit 0
python3 - "$out/llamacpp.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(d.get("model"), d.get("config"), "peak", d.get("peak_gpu_mib"), "MiB",
          "pp%s" % d.get("n_prompt") if d.get("n_prompt") else "tg%s" % d.get("n_gen"),
          round(d.get("avg_ts", 0), 1), d.get("error", ""))
PY
