#!/usr/bin/env bash
# Distributed training on one node with torchrun (GPUs, or CPU processes without a GPU):
#   bash tools/dist_train.sh CONFIG NPROC [tools/train.py args...]
# e.g. bash tools/dist_train.sh configs/cascade_mask_rcnn/cascade-mask-rcnn_convnext-dcls-t_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py 8
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun (tools/dist_run.sh).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG NPROC [train.py args...]" >&2
  exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec bash "$ROOT/tools/dist_run.sh" "$NPROC" "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
