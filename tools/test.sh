#!/usr/bin/env bash
# The README's test command: sets up .venv (first run: a few minutes) and runs the whole test suite on CPU.
#   bash tools/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider -n "${EPIC_TEST_WORKERS:-0}" --durations=15 "${@:-tests}"
