#!/usr/bin/env bash
# Set up (or reuse) .venv and run the whole dcls-mm test suite (slow tests included, as CI
# does). Extra args go to pytest, e.g. the fast subset: bash tools/test.sh -m "not slow"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/env/setup.sh"
cd "$ROOT"
exec "${DCLS_MM_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
