#!/usr/bin/env bash
# Distributed training on one node with torchrun:
#   bash tools/dist_train.sh CONFIG GPUS [tools/train.py args...]
# e.g. bash tools/dist_train.sh configs/cascade_mask_rcnn/cascade-mask-rcnn_convnext-dcls-t_fpn_ms-crop-3x_coco.py 8
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG GPUS [train.py args...]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
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
    --nproc_per_node="$GPUS" --master_port="$MASTER_PORT" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
