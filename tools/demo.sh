#!/usr/bin/env bash
# Set up (or reuse) .venv and run the dcls-mm demo on built-in data. Extra args go to tools/demo.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/env/setup.sh"
cd "$ROOT"
exec "${DCLS_MM_VENV:-$ROOT/.venv}/bin/python" "$ROOT/tools/demo.py" "$@"
