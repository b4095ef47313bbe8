#!/usr/bin/env bash
# The tensor types llama-quantize picks for each mix of the real-width presets, from its
# --dry-run on a skeleton of the real shapes (`ggrun gen-model --skeleton`: the header with the
# data left as a hole, so the 40-60 GB F16 input takes no disk), into tests/data/mixes/*.tsv,
# which tests/presets.rs holds the generator to.
#   scripts/mix-dry-run.sh PATH/TO/llama-quantize
# llama-quantize: built from the llama.cpp in the llama-cpp-python 0.3.36 sdist (the same
# source as ../shared/tools/llamacpp_side.py), `cmake --build build --target llama-quantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
quantize=${1:?usage: scripts/mix-dry-run.sh PATH/TO/llama-quantize}
out=tests/data/mixes
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release -q
bin=target/release/ggrun
mkdir -p "$out"
for spec in qwen3moe-30b-a3b:Q8_0 qwen3moe-30b-a3b:Q4_0 qwen3moe-30b-a3b:Q4_K_M \
            qwen3moe-30b-a3b:IQ4_XS gpt-oss-20b:Q8_0 gpt-oss-20b:Q4_0 gpt-oss-20b:Q4_K_M \
            gpt-oss-20b:MXFP4_MOE gpt-oss-20b:IQ4_XS qwen3moe-30b-a3b:IQ3_XXS \
            qwen3moe-30b-a3b:IQ2_XXS gpt-oss-20b:IQ3_XXS gpt-oss-20b:IQ2_XXS; do
  preset=${spec%%:*}; mix=${spec##*:}
  skel="$tmp/$preset-f16.gguf"
  [ -e "$skel" ] || $bin gen-model --preset "$preset" --mix f16 --skeleton --out "$skel" >/dev/null
  "$quantize" --dry-run "$skel" "$mix" > "$tmp/log" 2>&1
  python3 - "$tmp/log" "$out/$preset-$mix.tsv" "$preset" "$mix" <<'PY'
import re, sys
log, out, preset, mix = sys.argv[1:]
line = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[([^\]]*)\], type =\s+(\S+),(.*)$")
rows = []
for l in open(log):
    m = line.search(l)
    if not m:
        continue
    name, shape, cur, rest = m.groups()
    new = re.search(r"\((\w+)\)\s*$", rest)
    dims = ",".join(d.strip() for d in shape.split(","))
    rows.append((name, dims, (new.group(1) if new else cur)))
if not rows:
    sys.exit(f"no tensor lines in llama-quantize's output for {preset} {mix}")
with open(out, "w") as f:
    f.write(f"# tensor\tne (ggml order)\ttype llama-quantize --dry-run picks for {mix} on {preset}'s real shapes (llama.cpp of llama-cpp-python 0.3.36)\n")
    for r in rows:
        f.write("\t".join(r) + "\n")
print(f"{out}: {len(rows)} tensors")
PY
done
