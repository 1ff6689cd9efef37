#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the Python packages that tools/gpu_check.sh needs and a GPU machine
# without a package registry lacks, as wheels for its Python (3.12, x86_64) in .whl/ (git-ignored through
# .git/info/exclude). Carry .whl to the GPU machine; gpu_check.sh installs from it with --no-index.
#
#   bash tools/gpu_wheels.sh [PYTHON_VERSION=3.12]
#
# DeepSpeed publishes only a source archive: it is built here into a pure-Python wheel (no ops prebuilt; the
# ops DeepSpeed JIT-compiles are not used by these runs: torch's fused AdamW, no CPU Adam).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${1:-3.12}"
PY="${EPIC_VENV:-$ROOT/.venv}/bin/python"
[ -x "$PY" ] || PY=python3
DEST="$ROOT/.whl"
mkdir -p "$DEST"
# .whl/ is listed in .gitignore
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
# pure-Python packages and pydantic's compiled core, at the versions this venv runs
for name in webdataset braceexpand hjson pydantic annotated-types typing-inspection typing-extensions pydantic-core; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$name==$(ver "$name")"
done
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(ver deepspeed)"
fi
ls -la "$DEST"
du -sh "$DEST"
