# Sourced by tools/test.sh and tools/demo.sh: create or reuse .venv and install the package (editable) into it.
# Re-installs only when setup.py changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EPIC_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY_BOOT" -m venv "$VENV"
fi
STAMP="$VENV/.epic-install-stamp"
WANT="$(cat "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV/bin/python" -c "import epic" 2>/dev/null; then
  echo "[setup] installing epic and its dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 \
    | grep -v "is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import epic, torch, deepspeed, timm, transformers, webdataset" \
    || { echo "[setup] installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
