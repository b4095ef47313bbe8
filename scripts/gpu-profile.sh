#!/usr/bin/env bash
# Where a forward pass spends its GPU time: kernel times summed by kernel name, from Nsight
# Compute, on the device machine (carrying .device, as scripts/gpu-test.sh builds it).
#   scripts/gpu-profile.sh [MODEL] [BENCH ARGS...]   # default: q8_0 -p 512 -n 0 -ngl 999
# MODEL is a name scripts/device-model.sh knows (a Nemotron-width mix, PRESET/MIX or
# PRESET/MIX/LAYERS, e.g. gpt-oss-20b/mxfp4/4). Generates it into /tmp, runs `ggrun bench` once to
# compile and cache the kernels, then once under ncu (each kernel timed alone, caches and clocks
# left as they are), and prints the top kernels; the raw CSV is $OUT/profile.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device-model.sh "${1:-q8_0}"; shift || true
[ $# -gt 0 ] || set -- -p 512 -n 0 -ngl 999
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export GGRUN_CACHE_DIR="${GGRUN_CACHE_DIR:-/tmp/ggrun-cache}"
m="$model_file"
# shellcheck disable=SC2086
[ -s "$m" ] || .device/ggrun gen-model $gen_args --out "$m" >/dev/null
.device/ggrun bench -m "$m" -r 1 --json --no-profile "$@"
csv="${OUT:-/tmp}/profile.csv"
ncu --cache-control none --clock-control none --metrics gpu__time_duration.sum --csv \
  --log-file "$csv" .device/ggrun bench -m "$m" -r 1 --json --no-profile "$@" >/dev/null 2>&1
python3 - "$csv" <<'PY'
import collections, csv, sys
lines = open(sys.argv[1]).read().splitlines()
head = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
total, count = collections.defaultdict(float), collections.Counter()
for r in csv.DictReader(lines[head:]):
    scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "nsecond": 1e-3}[r["Metric Unit"]]
    total[r["Kernel Name"]] += float(r["Metric Value"].replace(",", "")) * scale
    count[r["Kernel Name"]] += 1
all_us = sum(total.values())
print(f"kernel time {all_us / 1e3:.1f} ms in {sum(count.values())} launches (warm-up and measured runs)")
for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:20]:
    print(f"{us / 1e3:9.2f} ms {100 * us / all_us:5.1f}% {count[name]:6d}  {name}")
PY
