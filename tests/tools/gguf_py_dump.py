#!/usr/bin/env python3
"""Independent view of a GGUF file through gguf-py (the reader llama.cpp ships), for tests.

    gguf_py_dump.py MODEL.gguf OUT_PREFIX

Writes OUT_PREFIX.json (tensor_count, parameters, per-type count and bytes, and each tensor's
name, type and element count in file order) and OUT_PREFIX.f32 (every tensor that gguf-py can
dequantize, in file order, as little-endian float32).
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

r = GGUFReader(sys.argv[1])
out = sys.argv[2]
types, tensors, params = {}, [], 0
with open(out + ".f32", "wb") as f:
    for t in r.tensors:
        name = t.tensor_type.name
        n = int(np.prod(t.shape))
        params += n
        e = types.setdefault(name, {"count": 0, "bytes": 0})
        e["count"] += 1
        e["bytes"] += int(t.n_bytes)
        tensors.append({"name": t.name, "type": name, "elements": n})
        dequantize(t.data, t.tensor_type).astype("<f4").tofile(f)
json.dump({"tensor_count": len(r.tensors), "parameters": params, "types": types,
           "tensors": tensors}, open(out + ".json", "w"))
