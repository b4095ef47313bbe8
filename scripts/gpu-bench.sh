#!/usr/bin/env bash
# GPU and hybrid speed on the device machine, on the 52-layer Nemotron-width synthetic model.
#   scripts/gpu-test.sh build                          # here: binaries into .device/
#   scripts/gpu-bench.sh MODEL [PROMPT] [GEN] [CONFIG...] # on the device, carrying .device
# MODEL is a mix of the 52-layer Nemotron-width model (q4_k_m, q8_0: 23-31 GiB) or PRESET/MIX
# (scripts/device-model.sh), generated into /tmp unless there; each CONFIG is a quoted set of
# placement flags ("" = CPU only). One JSON line per configuration, also in $OUT/bench.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/device-model.sh "$1"
name="$1"; p="${2:-512}"; n="${3:-128}"; shift 3 || true
[ $# -gt 0 ] || set -- "-ngl 999" "--gpu-mem 24GiB" ""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export GGRUN_CACHE_DIR="${GGRUN_CACHE_DIR:-/tmp/ggrun-cache}"
m="$model_file"
if [ ! -s "$m" ]; then
  # shellcheck disable=SC2086
  /usr/bin/time -f "generated $m in %e s" .device/ggrun gen-model $gen_args --out "$m"
fi
out="${OUT:-/tmp}/bench.jsonl"
for cfg in "$@"; do
  # shellcheck disable=SC2086
  line=$(timeout 300 .device/ggrun bench -m "$m" -p "$p" -n "$n" -r 1 --json --no-profile $cfg || echo '{"error": "failed or timed out"}')
  echo "{\"model\": \"$name\", \"config\": \"${cfg:-cpu only}\", \"p\": $p, \"n\": $n, \"result\": $line}" | tee -a "$out"
done
