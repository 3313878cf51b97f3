#!/usr/bin/env bash
# The test command: set up everything that is missing, then lint, type-check and run the suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

# checkov, the second opinion on generated pod manifests, pins packages that clash with ours,
# so it lives in a venv of its own (locked in requirements-checkov.lock).
CHECKOV_VENV="$ROOT/.venv-checkov"
if [ ! -x "$CHECKOV_VENV/bin/checkov" ]; then
  echo "[stepguard setup] installing checkov into $CHECKOV_VENV" >&2
  uv venv -q --python "$VENV/bin/python" "$CHECKOV_VENV"
  uv pip install -q --python "$CHECKOV_VENV/bin/python" -r "$ROOT/requirements-checkov.lock"
fi
export STEPGUARD_CHECKOV="$CHECKOV_VENV/bin/checkov"

echo "== ruff"; ruff check .
echo "== mypy --strict (sdk, plugins, components)"; mypy
echo "== pytest"; exec pytest "$@"
