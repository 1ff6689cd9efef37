#!/usr/bin/env bash
# The one GPU check (tools/gpu_check.py says what it runs): installs what is missing, then runs every phase under
# its own time limit and prints one table (also written to $OUT/gpu_check.txt, or --out DIR).
#
#   bash tools/gpu_check.sh [--out DIR] [--budget 470] [--phases prepare,epic_bf16,...]
#   bash tools/gpu_check.sh --dry-run --out /tmp/gpu_check     # CPU: the same phases at toy sizes
#
# Missing packages (deepspeed, webdataset, braceexpand, hjson, pydantic on a bare CUDA image without a package
# registry) come from wheels in .whl/ (made on a machine with PyPI by `bash tools/gpu_wheels.sh`; carry .whl),
# else from `pip install -e .` where an index is reachable. Nothing else is changed on the machine.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
NEED="import deepspeed, webdataset, braceexpand, timm, transformers, safetensors, tqdm, yaml, PIL, tokenizers"
if ! timeout 120 "$PY" -c "$NEED" 2>/dev/null; then
  if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "[gpu_check] installing the wheels in .whl/ into /tmp/epic-site"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/epic-site "$ROOT"/.whl/*.whl || echo "[gpu_check] WARNING: installing .whl/ failed"
    export PYTHONPATH="/tmp/epic-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check] installing the package and its dependencies (pip install -e .)"
    timeout 300 "$PY" -m pip install -q -e "$ROOT" || echo "[gpu_check] WARNING: pip install -e . failed"
  fi
  timeout 120 "$PY" -c "$NEED" || echo "[gpu_check] WARNING: still missing a package; the phases needing it fail"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PY" tools/gpu_check.py "$@"
