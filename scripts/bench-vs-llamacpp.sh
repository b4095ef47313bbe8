#!/usr/bin/env bash
# Side-by-side speed of ggrun and llama.cpp on one GGUF, same machine, same threads, one sitting.
# Needs llama-cpp-python (see ../shared/tools/llamacpp_side.py for the build flags).
#   scripts/bench-vs-llamacpp.sh MODEL [THREADS] [ROUNDS]
# pp512 and tg128 are measured as separate runs (pp: 512-token prompt, no generation; tg: 128
# tokens generated after a 1-token prompt, as llama-bench's tg128 does): llamacpp_side.py keeps
# logits for at most 512 positions, so it cannot run both in one context. The two runners take
# turns, one repetition each per round (after each one's own warm-up), and the medians over the
# rounds are compared: on a shared machine whose speed drifts by 10-25% over minutes, turns keep
# both runners under the same conditions. ggrun's tg runs carry --roofline (the read bandwidth
# taken right before them): the summary gives ggrun's share of that roofline and the bandwidth
# range over the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
m="$1"; t="${2:-2}"; rounds="${3:-5}"
side=../shared/tools/llamacpp_side.py
runs=()
for _ in $(seq "$rounds"); do
  runs+=("$(python3 "$side" bench "$m" --threads "$t" --prompt 512 --gen 0 --reps 1 2>/dev/null | tail -1)")
  runs+=("$(./target/release/ggrun bench -m "$m" -p 512 -n 0 -t "$t" -r 1 --json --no-profile)")
  runs+=("$(python3 "$side" bench "$m" --threads "$t" --prompt 1 --gen 128 --reps 1 2>/dev/null | tail -1)")
  runs+=("$(./target/release/ggrun bench -m "$m" -p 1 -n 128 -t "$t" -r 1 --json --no-profile --roofline)")
done
python3 - "$m" "$t" "${runs[@]}" <<'PY'
import json, statistics, sys
m, t = sys.argv[1], sys.argv[2]
runs = [json.loads(x) for x in sys.argv[3:]]
med = lambda k, i: statistics.median(r[k] for r in runs[i::4])
lpp, pp, ltg, tg = med("pp_tok_s", 0), med("pp_tok_s", 1), med("tg_tok_s", 2), med("tg_tok_s", 3)
roof = med("tg_roofline_pct", 3)
bw = [r["read_gb_s"] for r in runs[3::4]]
print(json.dumps({"model": m, "threads": int(t), "rounds": len(runs) // 4,
                  "ggrun_pp512": round(pp, 2), "llamacpp_pp512": round(lpp, 2),
                  "pp_ratio": round(pp / lpp, 3), "ggrun_tg128": round(tg, 2),
                  "llamacpp_tg128": round(ltg, 2), "tg_ratio": round(tg / ltg, 3),
                  "ggrun_tg_roofline_pct": round(roof, 1),
                  "read_gb_s": [round(min(bw), 1), round(max(bw), 1)],
                  "mb_per_token": round(runs[3]["bytes_per_token"] / 1e6, 1)}))
PY
