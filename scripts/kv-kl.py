#!/usr/bin/env python3
"""Issue 25's fidelity check of the KV cache types: ggrun's logits against llama.cpp's with the
same cache type, over teacher-forced tokens of real text.

    scripts/kv-kl.py MODEL [--tokens 256] [--text FILE] [--threads 2] [--types f16,q8_0,q4_0]
    (a type names K and V alike; K:V names each, e.g. q8_0:f16)

Needs llama-cpp-python (see ../shared/tools/llamacpp_side.py; or the package's source on
PYTHONPATH with LLAMA_CPP_LIB_PATH at a llama.cpp build's bin/) and target/release/ggrun.
The text (default: this repository's README.md, English prose) is tokenized by llama.cpp and the
first --tokens ids are evaluated in one batch by both runners with `-ctk T -ctv T` (llama.cpp
with flash attention, which it needs for a quantized V cache; its f16 row uses it too). Per type
it prints one JSON line: the mean KL divergence KL(llama.cpp || ggrun) over the rows, the largest
row's, the top-1 agreement, and for scale the mean KL between llama.cpp's f16 run and its run with
this type (what the cache type itself costs).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama
import llama_cpp

GGML = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
        "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl(p_logits, q_logits):
    """Per-row KL(p || q) from logits."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def split(ty):
    """A type for K and V alike ("q8_0"), or one for each ("q8_0:f16")."""
    k, _, v = ty.partition(":")
    return k, v or k


def llama_logits(model, tokens, ty, threads):
    k, v = split(ty)
    llm = Llama(model_path=model, n_ctx=len(tokens) + 8, n_batch=len(tokens),
                n_ubatch=len(tokens), n_threads=threads, n_threads_batch=threads,
                logits_all=True, flash_attn=True, type_k=GGML[k], type_v=GGML[v],
                verbose=False)
    llm.eval(tokens)
    return np.array([llm.scores[i] for i in range(len(tokens))], dtype=np.float32)


def ggrun_logits(ggrun, model, tokens, ty, threads):
    k, v = split(ty)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.f32")
        subprocess.run([ggrun, "logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
                        "--out", out, "-t", str(threads), "--cache-type-k", k,
                        "--cache-type-v", v], check=True, stdout=subprocess.DEVNULL)
        return np.fromfile(out, dtype="<f4").reshape(len(tokens), -1)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--text", default=os.path.join(here, "..", "README.md"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", default="f16,q8_0,q4_0")
    p.add_argument("--ggrun", default=os.path.join(here, "..", "target", "release", "ggrun"))
    a = p.parse_args()
    text = open(a.text, encoding="utf-8").read()
    vocab = Llama(model_path=a.model, vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)[: a.tokens]
    if len(tokens) < a.tokens:
        sys.exit(f"{a.text} holds only {len(tokens)} tokens")
    base = None
    for ty in a.types.split(","):
        ref = llama_logits(a.model, tokens, ty, a.threads)
        got = ggrun_logits(a.ggrun, a.model, tokens, ty, a.threads)
        if base is None and ty == "f16":
            base = ref
        d = kl(ref, got)
        row = {"model": os.path.basename(a.model), "type": ty, "tokens": len(tokens),
               "mean_kl": float(d.mean()), "max_kl": float(d.max()),
               "top1": float((ref.argmax(-1) == got.argmax(-1)).mean())}
        if base is not None and ty != "f16":
            row["llamacpp_f16_vs_this_type_mean_kl"] = float(kl(base, ref).mean())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
