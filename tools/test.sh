#!/usr/bin/env bash
# The test command: sets up .venv (torch pinned to the local CPU build) and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
