#!/usr/bin/env bash
# Goldens for the tiny decoder fixtures (qwen2, qwen3, qwen3moe, gemma3, gpt-oss) from llama.cpp,
# through ../shared/tools/llamacpp_side.py (llama-cpp-python 0.3.36, CPU build).
#   scripts/make-decoder-goldens.sh            # writes tests/data/decoders/*
# The models are not checked in: `ggrun gen-model --preset ARCH --mix MIX` rebuilds them
# deterministically (tests/decoders.rs does, and checks their sha256 against the golden's).
# Per fixture X = ARCH-MIX: X.golden.json (generator command, sha256, prompt, llama.cpp's token
# ids, greedy continuation), X.logits.f32 (llama.cpp's logits: one row per prompt position from
# one batched eval, then one per greedy decode step) and X.ref.f32 (llama.cpp with an F32 KV
# cache on X's weights dequantized to F32, fed the same tokens: the exact math of X, up to
# float32 summation order and gemma3's f16 GELU table).
set -euo pipefail
cd "$(dirname "$0")/.."
side=../shared/tools/llamacpp_side.py
out=tests/data/decoders
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release -q
bin=target/release/ggrun
mkdir -p "$out"
decode=16
for spec in qwen2:f32 qwen2:q8_0 qwen3:q4_0 qwen3moe:f32 qwen3moe:q8_0 gemma3:f32 gemma3:q8_0 \
            gpt-oss:f32 gpt-oss:mxfp4; do
  arch=${spec%%:*}; mix=${spec##*:}; name="$arch-$mix"
  case $arch in
    qwen*) prompt=$'<|im_start|>user\nWhy does a hybrid model need less memory for long contexts?<|im_end|>\n<|im_start|>assistant\n' ;;
    gemma3) prompt=$'<start_of_turn>user\nWhy does a hybrid model need less memory for long contexts?<end_of_turn>\n<start_of_turn>model\n' ;;
    gpt-oss) prompt='<|start|>user<|message|>Why does a hybrid model need less memory for long contexts?<|end|><|start|>assistant' ;;
  esac
  gen="ggrun gen-model --preset $arch --mix $mix --out FILE"
  $bin gen-model --preset "$arch" --mix "$mix" --out "$tmp/$name.gguf" >/dev/null
  toks=$(python3 "$side" tokenize "$tmp/$name.gguf" "$prompt" | python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["ids"])))')
  python3 "$side" logits "$tmp/$name.gguf" --tokens "$toks" --decode $decode --out "$out/$name.logits.f32" > "$tmp/run.json"
  $bin gen-model --preset "$arch" --mix "$mix" --dequantized --out "$tmp/$name-deq.gguf" >/dev/null
  gen_ids=$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["generated"])))' "$tmp/run.json")
  python3 - "$tmp/$name-deq.gguf" "$toks" "$gen_ids" "$out/$name.ref.f32" <<'PY'
import sys
import numpy as np
from llama_cpp import Llama
model, toks, gen, out = sys.argv[1:]
toks = [int(t) for t in toks.split(",")]
gen = [int(t) for t in gen.split(",")]
# type 0: F32 K and V.
llm = Llama(model_path=model, n_ctx=len(toks) + len(gen) + 8, n_batch=512, n_ubatch=512,
            n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)
llm.eval(toks)
rows = [np.array(llm.scores[i], dtype=np.float32) for i in range(len(toks))]
for t in gen:
    llm.eval([t])
    rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
np.stack(rows).astype("<f4").tofile(out)
PY
  ref="\"$name.ref.f32\""
  sha=$(sha256sum "$tmp/$name.gguf" | cut -d' ' -f1)
  PROMPT="$prompt" python3 - "$out/$name.golden.json" "$name" "$gen" "$sha" "$toks" "$tmp/run.json" "$ref" <<'PY'
import json, os, sys
path, name, gen, sha, toks, run, ref = sys.argv[1:]
r = json.load(open(run))
json.dump({
    "model": name, "arch": name.rsplit("-", 1)[0], "generator": gen, "sha256": sha,
    "llama_cpp_python": "0.3.36", "prompt": os.environ["PROMPT"],
    "prompt_tokens": [int(t) for t in toks.split(",")], "n_vocab": r["n_vocab"],
    "rows": "one row per prompt position from one batched eval, then one per greedy decode step",
    "generated": r["generated"], "logits_file": name + ".logits.f32", "ref_file": json.loads(ref),
}, open(path, "w"), indent=1)
PY
  echo "$name: $(wc -c < "$out/$name.logits.f32") bytes of logits"
done
