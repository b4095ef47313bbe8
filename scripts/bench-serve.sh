#!/usr/bin/env bash
# Aggregate generation speed of `ggrun serve` with 1, 2, 4 and 8 concurrent clients.
#   scripts/bench-serve.sh MODEL [TOKENS] [THREADS] [PARALLEL]
# PARALLEL is the server's --parallel (slots decoded together; default 8).
# Starts the server on a free port, sends every client the same kind of request (a short chat
# prompt, TOKENS generated at temperature 0, each client a different prompt), and prints one
# line per client count: requests, generated tokens, wall seconds, aggregate tokens/s. Then an
# agent's resent history: a conversation of about 2,000 prompt tokens, answered, then sent again
# with the answer and a new user turn; one line with both prompts' sizes, the tokens reused
# and the prefill time of each (usage.timings).
# With LLAMA_SERVER=path/to/llama-server the same load goes to llama.cpp's server instead
# (-np PARALLEL slots of 4096 tokens each, continuous batching, its own build of the template).
# GGRUN=path/to/ggrun uses that binary instead of building one (the device machine has no Rust),
# and GGRUN_ARGS adds placement flags to the server (e.g. "-ngl 999" on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"; n="${2:-64}"; threads="${3:-0}"; parallel="${4:-8}"
log=$(mktemp)
if [ -n "${LLAMA_SERVER:-}" ]; then
  [ "$threads" != 0 ] || threads=$(nproc)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$LLAMA_SERVER" -m "$model" --host 127.0.0.1 --port "$port" -c $((4096 * parallel)) \
    -np "$parallel" -t "$threads" --jinja >"$log" 2>&1 &
  pid=$!
  addr="127.0.0.1:$port"
  for _ in $(seq 300); do
    curl -sf "http://$addr/health" >/dev/null 2>&1 && break; sleep 0.2
  done
else
  bin="${GGRUN:-}"
  [ -n "$bin" ] || { cargo build --release -q; bin=target/release/ggrun; }
  # shellcheck disable=SC2086
  "$bin" serve -m "$model" --port 0 -c 4096 -t "$threads" --parallel "$parallel" -q \
    ${GGRUN_ARGS:-} 2>"$log" &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.2; done
  addr=$(sed -n 's/^listening on http:\/\///p' "$log")
fi
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
python3 - "$addr" "$n" "$parallel" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
addr, n = sys.argv[1], int(sys.argv[2])
def post(messages, max_tokens):
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
def ask(i):
    msgs = [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]
    return post(msgs, n)["usage"]["completion_tokens"]
ask(0)  # warm-up
for clients in (1, 2, 4, 8):
    t0 = time.time()
    with ThreadPoolExecutor(clients) as ex:
        toks = sum(ex.map(ask, range(1, 2 * clients + 1)))
    dt = time.time() - t0
    print(json.dumps({"parallel": int(sys.argv[3]), "clients": clients, "requests": 2 * clients, "tokens": toks,
                      "seconds": round(dt, 2), "tok_s": round(toks / dt, 1)}))
history = [{"role": "system", "content": "You are a careful assistant. " + " ".join(
               f"Rule {k}: answer about item {k} only when asked about item {k}." for k in range(120))},
           {"role": "user", "content": "Which rule covers item 7?"}]
first = post(history, 16)
answer = first["choices"][0]["message"]["content"]
again = post(history + [{"role": "assistant", "content": answer},
                        {"role": "user", "content": "And item 9?"}], 16)
# ggrun reports timings inside usage, llama-server beside it.
t1, t2 = (r.get("timings") or r["usage"]["timings"] for r in (first, again))
u1, u2 = first["usage"], again["usage"]
print(json.dumps({"history_tokens": u1["prompt_tokens"], "first_prefill_ms": round(t1["prompt_ms"]),
                  "resent_tokens": u2["prompt_tokens"],
                  "cached_tokens": u2.get("prompt_tokens_details", {}).get("cached_tokens",
                                                                           u2["prompt_tokens"] - t2["prompt_n"]),
                  "resent_prefill_ms": round(t2["prompt_ms"])}))
PY
