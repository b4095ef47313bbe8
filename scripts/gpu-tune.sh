#!/usr/bin/env bash
# `ggrun tune` on the device machine for the 52-layer Nemotron-width synthetic model, then the
# tuned profile in use (bench with no placement flags) beside manual placements.
#   scripts/gpu-test.sh build                                   # here
#   scripts/gpu-tune.sh MIX [BUDGET] [TIME] [MANUAL CONFIG...]  # on the device, carrying .device
# MIX is q4_k_m or q8_0; BUDGET defaults to 24GiB, TIME to 4m. Each MANUAL CONFIG is a quoted set
# of placement flags benchmarked with --no-profile (pp512 and tg128, one repeat each).
set -euo pipefail
cd "$(dirname "$0")/.."
mix="$1"; budget="${2:-24GiB}"; time="${3:-4m}"; shift 3 || shift $#
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export GGRUN_CACHE_DIR="${GGRUN_CACHE_DIR:-/tmp/ggrun-cache}"
m="/tmp/nano52-$mix.gguf"
[ -s "$m" ] || .device/ggrun gen-model --layers 52 --mix "$mix" --out "$m" >/dev/null
out="${OUT:-/tmp}"
.device/ggrun tune -m "$m" --gpu-mem "$budget" -c 4096 --time "$time" | tee "$out/tune-$mix.txt"
echo "profile in use (no flags): $(.device/ggrun bench -m "$m" -p 512 -n 128 -r 1 --json)"
for cfg in "$@"; do
  # shellcheck disable=SC2086
  echo "manual $cfg: $(.device/ggrun bench -m "$m" -p 512 -n 128 -r 1 --json --no-profile $cfg)"
done
