#!/usr/bin/env bash
# Aggregate generation speed of `ggrun serve` with 1, 2, 4 and 8 concurrent clients.
#   scripts/bench-serve.sh MODEL [TOKENS] [THREADS] [PARALLEL]
# PARALLEL is the server's --parallel (slots decoded together; default 8).
# Starts the server on a free port, sends every client the same kind of request (a short chat
# prompt, TOKENS generated at temperature 0, each client a different prompt), and prints one
# line per client count: requests, generated tokens, wall seconds, aggregate tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"; n="${2:-64}"; threads="${3:-0}"; parallel="${4:-8}"
cargo build --release -q
log=$(mktemp)
target/release/ggrun serve -m "$model" --port 0 -c 4096 -t "$threads" --parallel "$parallel" -q 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.2; done
addr=$(sed -n 's/^listening on http:\/\///p' "$log")
python3 - "$addr" "$n" "$parallel" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
addr, n = sys.argv[1], int(sys.argv[2])
def ask(i):
    body = json.dumps({"messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
                       "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["usage"]["completion_tokens"]
ask(0)  # warm-up
for clients in (1, 2, 4, 8):
    t0 = time.time()
    with ThreadPoolExecutor(clients) as ex:
        toks = sum(ex.map(ask, range(1, 2 * clients + 1)))
    dt = time.time() - t0
    print(json.dumps({"parallel": int(sys.argv[3]), "clients": clients, "requests": 2 * clients, "tokens": toks,
                      "seconds": round(dt, 2), "tok_s": round(toks / dt, 1)}))
PY
