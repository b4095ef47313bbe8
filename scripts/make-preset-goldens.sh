#!/usr/bin/env bash
# Goldens for the real-width presets from llama.cpp, through ../shared/tools/llamacpp_side.py
# (llama-cpp-python 0.3.36, CPU build): one-layer files of qwen3moe-30b-a3b (Q4_K_M, IQ4_XS,
# IQ3_XXS, IQ2_XXS)
# and gpt-oss-20b (MXFP4_MOE), rebuilt by `ggrun gen-model` in tests/presets.rs and checked against
# the golden's sha256.
#   scripts/make-preset-goldens.sh [PRESET:MIX ...]   # writes tests/data/presets/*.golden.json
# Per file: the generator command, sha256, prompt, llama.cpp's token ids and greedy
# continuation, and of each logit row (one per prompt position from one batched eval, then one
# per greedy decode step) llama.cpp's 32 largest logits as [id, logit] (whole rows of these
# vocabularies would be 50-70 MB a file).
set -euo pipefail
cd "$(dirname "$0")/.."
side=../shared/tools/llamacpp_side.py
out=tests/data/presets
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release -q
bin=target/release/ggrun
mkdir -p "$out"
decode=8
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(qwen3moe-30b-a3b:q4_k_m qwen3moe-30b-a3b:iq4_xs gpt-oss-20b:mxfp4
  qwen3moe-30b-a3b:iq3_xxs qwen3moe-30b-a3b:iq2_xxs)
for spec in "${specs[@]}"; do
  preset=${spec%%:*}; mix=${spec##*:}; name="$preset-$mix-1layer"
  case $preset in
    qwen*) prompt=$'<|im_start|>user\nWhy does a hybrid model need less memory for long contexts?<|im_end|>\n<|im_start|>assistant\n' ;;
    gpt-oss*) prompt='<|start|>user<|message|>Why does a hybrid model need less memory for long contexts?<|end|><|start|>assistant' ;;
  esac
  gen="ggrun gen-model --preset $preset --mix $mix --layers 1 --out FILE"
  $bin gen-model --preset "$preset" --mix "$mix" --layers 1 --out "$tmp/$name.gguf" >/dev/null
  toks=$(python3 "$side" tokenize "$tmp/$name.gguf" "$prompt" | python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["ids"])))')
  python3 "$side" logits "$tmp/$name.gguf" --tokens "$toks" --decode $decode --out "$tmp/$name.f32" > "$tmp/run.json"
  sha=$(sha256sum "$tmp/$name.gguf" | cut -d' ' -f1)
  PROMPT="$prompt" python3 - "$out/$name.golden.json" "$name" "$preset" "$gen" "$sha" "$toks" "$tmp/run.json" "$tmp/$name.f32" <<'PY'
import json, os, sys
import numpy as np
path, name, preset, gen, sha, toks, run, rows_file = sys.argv[1:]
r = json.load(open(run))
nv = r["n_vocab"]
rows = np.fromfile(rows_file, dtype="<f4").reshape(-1, nv)
top = []
for row in rows:
    ids = np.argsort(-row, kind="stable")[:32]
    top.append([[int(i), float(row[i])] for i in ids])
json.dump({
    "model": name, "preset": preset, "generator": gen, "sha256": sha,
    "prompt": os.environ["PROMPT"], "prompt_tokens": [int(t) for t in toks.split(",")],
    "generated": r["generated"], "n_vocab": nv, "top_logits": top,
}, open(path, "w"))
print(f"{path}: {len(top)} rows")
PY
done
