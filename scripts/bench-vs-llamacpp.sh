#!/usr/bin/env bash
# Side-by-side speed of ggrun and llama.cpp on one GGUF, same machine, same threads, one sitting.
# Needs llama-cpp-python (see ../shared/tools/llamacpp_side.py for the build flags).
#   scripts/bench-vs-llamacpp.sh MODEL [THREADS] [REPS]
# pp512 and tg128 are measured as separate runs (pp: 512-token prompt, no generation; tg: 128
# tokens generated after a 1-token prompt, as llama-bench's tg128 does): llamacpp_side.py keeps
# logits for at most 512 positions, so it cannot run both in one context.
set -euo pipefail
cd "$(dirname "$0")/.."
m="$1"; t="${2:-2}"; r="${3:-3}"
side=../shared/tools/llamacpp_side.py
lc_pp=$(python3 "$side" bench "$m" --threads "$t" --prompt 512 --gen 0 --reps "$r" 2>/dev/null | tail -1)
gg_pp=$(./target/release/ggrun bench -m "$m" -p 512 -n 0 -t "$t" -r "$r" --json)
lc_tg=$(python3 "$side" bench "$m" --threads "$t" --prompt 1 --gen 128 --reps "$r" 2>/dev/null | tail -1)
gg_tg=$(./target/release/ggrun bench -m "$m" -p 1 -n 128 -t "$t" -r "$r" --json)
python3 - "$m" "$t" "$lc_pp" "$gg_pp" "$lc_tg" "$gg_tg" <<'PY'
import json, sys
m, t = sys.argv[1], sys.argv[2]
lc_pp, gg_pp, lc_tg, gg_tg = (json.loads(x) for x in sys.argv[3:])
pp, lpp = gg_pp["pp_tok_s"], lc_pp["pp_tok_s"]
tg, ltg = gg_tg["tg_tok_s"], lc_tg["tg_tok_s"]
print(json.dumps({"model": m, "threads": int(t), "ggrun_pp512": round(pp, 2), "llamacpp_pp512": round(lpp, 2),
                  "pp_ratio": round(pp / lpp, 3), "ggrun_tg128": round(tg, 2), "llamacpp_tg128": round(ltg, 2),
                  "tg_ratio": round(tg / ltg, 3)}))
PY
