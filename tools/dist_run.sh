#!/usr/bin/env bash
# Run a dcls-mm tool in NPROC processes on one node with torchrun; GPUs, or CPU processes
# on a machine without a GPU (gloo, see dcls_mm.engine.runner_utils.setup_distributed):
#   bash tools/dist_run.sh NPROC SCRIPT [SCRIPT args...]
# e.g. bash tools/dist_run.sh 2 tools/robustness/test_downstream.py CONFIG CKPT --launcher pytorch
# tools/dist_train.sh and tools/dist_test.sh run tools/train.py / tools/test.py through it.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC SCRIPT [args...]" >&2
  exit 2
fi
NPROC=$1
SCRIPT=$2
shift 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-"${DCLS_MM_VENV:-$ROOT/.venv}/bin/python"}
[ -x "$PYTHON" ] || PYTHON=python
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

PYTHONPATH="$ROOT:${PYTHONPATH:-}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" --master_port="$MASTER_PORT" \
    "$SCRIPT" "$@"
