#!/usr/bin/env bash
# Distributed testing on one node with torchrun (GPUs, or CPU processes without a GPU):
#   bash tools/dist_test.sh CONFIG CHECKPOINT NPROC [tools/test.py args...]
# Each process evaluates a shard of the test images; the metric is computed on the
# gathered predictions (the same numbers as one process).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun (tools/dist_run.sh).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG CHECKPOINT NPROC [test.py args...]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec bash "$ROOT/tools/dist_run.sh" "$NPROC" "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" \
    --launcher pytorch "$@"
