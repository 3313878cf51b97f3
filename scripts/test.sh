#!/usr/bin/env bash
# The test command: set up everything that is missing, then lint, type-check and run the suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "== ruff"; ruff check .
echo "== mypy --strict sdk/"; mypy
echo "== pytest"; exec pytest "$@"
