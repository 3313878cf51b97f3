#!/usr/bin/env bash
# The main job: set up everything that is missing, then run the secured pipeline end to end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec stepguard demo "$@"
