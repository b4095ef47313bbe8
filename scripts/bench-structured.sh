#!/usr/bin/env bash
# The cost of constrained decoding (structured output through llguidance): generation speed of
# `ggrun serve` with a JSON schema against the same request without one, both forced to the same
# number of tokens (a schema of at least 200 integers; the free run with the end token banned).
#   scripts/bench-structured.sh MODEL [TOKENS] [THREADS] [REPS]
# Prints the median tok/s of each and their ratio (usage.timings of each reply).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench-structured.sh MODEL [TOKENS] [THREADS] [REPS]}
tokens=${2:-200}; threads=${3:-2}; reps=${4:-5}
cargo build --release -q
port=$((20000 + RANDOM % 20000))
target/release/ggrun serve -m "$model" --port "$port" -c 4096 -t "$threads" -q 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 100); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 0.2; done
eos=$(curl -s "localhost:$port/api/show" -d '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["model_info"].get("tokenizer.ggml.eos_token_id", 0))')
python3 - "$port" "$tokens" "$reps" "$eos" <<'PY'
import json, statistics, sys, urllib.request
port, tokens, reps, eos = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rate(extra):
    body = {"messages": [{"role": "user", "content": "List numbers as a JSON array."}],
            "max_tokens": tokens, "temperature": 1.0, **extra}
    req = urllib.request.Request(f"http://localhost:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = json.load(urllib.request.urlopen(req))["usage"]["timings"]
    assert t["predicted_n"] == tokens, t
    return t["predicted_n"] / t["predicted_ms"] * 1000
schema = {"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": {"type": "integer"}, "minItems": 10 * tokens}}}
free, constrained = [], []
for seed in range(reps + 1):
    f = rate({"seed": seed, "logit_bias": {eos: -100}})
    c = rate({"seed": seed, "response_format": schema})
    if seed:  # the first round warms up
        free.append(f); constrained.append(c)
mf, mc = statistics.median(free), statistics.median(constrained)
print(json.dumps({"tokens": tokens, "free_tok_s": round(mf, 1), "constrained_tok_s": round(mc, 1), "ratio": round(mc / mf, 3)}))
PY
