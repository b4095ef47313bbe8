#!/usr/bin/env bash
# Fetches the chat templates of llama.cpp's source (models/templates: real models' templates,
# Nemotron 3 Nano, Qwen3, Qwen3-Coder, gpt-oss among them) from the llama-cpp-python 0.3.36
# source package on PyPI into models/templates unless they are already there, and prints that
# directory. The package is checked against its published sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/templates
if [ ! -s "$out/Qwen3-Coder.jinja" ]; then
  mkdir -p models
  sdist=models/llama_cpp_python-0.3.36.tar.gz
  if [ ! -s "$sdist" ]; then
    curl -fsSL -o "$sdist.part" \
      https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz
    mv "$sdist.part" "$sdist"
  fi
  echo "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e  $sdist" | sha256sum -c --quiet >&2
  rm -rf "$out.part" && mkdir -p "$out.part"
  tar -xzf "$sdist" -C "$out.part" --strip-components=5 \
    llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates
  rm -rf "$out" && mv "$out.part" "$out"
  rm -f "$sdist"
fi
echo "$out"
