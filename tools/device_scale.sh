#!/usr/bin/env bash
# Issue 10's GPU run, prepared for one visit to a lent GPU machine (the `device` tool), ~6 minutes:
# the CUDA search's tests, then tools/bench_scale.py with --device cuda on the 1B and 3B shapes
# (AWQ, 16 x 512 WikiText-2 validation: seconds per layer, peak GPU memory, peak RSS).
#
#   here, once:  bash tools/device_scale.sh --pack       # bench/device/: SmolLM2's tokenizer and the
#                                                        # calibration text (that machine has neither)
#   there:       run(command="bash tools/device_scale.sh", carry=["bench/device"], timeout_s=590)
#   here, a dry run of the same steps on the CPU (2 layers each):
#                DEVICE=cpu LAYERS=2 PYTHON=.venv/bin/python OUT=/tmp/dry bash tools/device_scale.sh
#
# That machine's python3 has torch (CUDA), transformers, onnx, onnxruntime and safetensors but not
# this package: it runs from the checkout (PYTHONPATH, passes/ linked where the install puts it).
# Each shape is its own bench_scale run (--merge), so what finished comes back if the time runs out;
# everything goes to $OUT: scale-cuda.json, the tables, the log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKED=bench/device

if [ "${1:-}" = "--pack" ]; then
    DATA=${2:-../shared/data}
    mkdir -p "$PACKED"
    cp "$DATA/wikitext2-valid-tokenized.txt" "$PACKED/"
    "$PY" -c "import sys; sys.path.insert(0, 'tools'); from random_checkpoint import smollm2_tokenizer; \
smollm2_tokenizer().save_pretrained('$PACKED/tokenizer')" 2>&1 | grep -v "it/s" || true
    du -sh "$PACKED"
    exit 0
fi

OUT=${OUT:?set by the device tool; for a dry run here, OUT=/tmp/dry}
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-}  # empty: each shape's whole depth
mkdir -p "$OUT"
[ -f "$PACKED/wikitext2-valid-tokenized.txt" ] && [ -d "$PACKED/tokenizer" ] \
    || { echo "device_scale.sh: $PACKED/ is missing: run 'bash tools/device_scale.sh --pack' here and carry it"; exit 2; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
"$PY" -c "import awq_graph.passes" 2>/dev/null || ln -sfn ../passes awq_graph/passes
{
    date; uname -m; nproc; free -g | head -2
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'sees a GPU', torch.cuda.is_available(), '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

echo "== the CUDA search's tests" | tee "$OUT/log.txt"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_search.py tests/test_scale.py \
    -k "cuda or sharded_bf16" 2>&1 | tail -15 | tee -a "$OUT/log.txt"

depth=()
[ -n "$LAYERS" ] && depth=(--layers "$LAYERS")
for shape in 1b 3b; do
    echo "== $shape, AWQ 16 x 512, --device $DEVICE" | tee -a "$OUT/log.txt"
    timeout "$([ $shape = 1b ] && echo 200 || echo 300)" "$PY" tools/bench_scale.py --shapes "$shape" "${depth[@]}" --modes awq --device "$DEVICE" \
        --n-samples 16 --seqlen 512 --data "$PACKED" --tokenizer-from "$PACKED/tokenizer" --work /tmp/scale \
        --results "$OUT/scale-$DEVICE.json" --merge --generate 2>>"$OUT/log.txt" | tee "$OUT/table-$shape.md"
    rm -rf /tmp/scale/out-*  # the compiled folders: the disk is 64 GB, the 3B checkpoint and OUT 8 GB
done
tail -5 "$OUT/log.txt"
