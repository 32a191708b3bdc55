#!/usr/bin/env bash
# The README's demo command. It sets up .venv itself (Python 3.12, pinned requirements).
#
# Today mm has its foundation only (configuration, accelerator layer, process groups, megatron-core
# on CPU and GPU), so this runs a smoke test of that: 4 processes, TP=2 x PP=2, training a toy
# residual MLP with megatron-core's pipeline schedule, DDP and distributed optimizer. It will train
# a tiny video DiT on synthetic videos and sample an .mp4 once the model, data, training and
# inference issues land.
#
#   GPUS_PER_NODE=4 MM_ACCELERATOR=cpu bash examples/quickstart/run.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$repo/scripts/bootstrap_venv.sh"
cd "$repo"

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29517}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TP=${TP:-2}
PP=${PP:-2}
export MM_ACCELERATOR=${MM_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
GPT_ARGS="--tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP \
    --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --clip-grad 1.0 --train-iters 60 \
    --use-distributed-optimizer --log-interval 10 --seed 1234"
MM_ARGS="--mm-model examples/quickstart/model.json --mm-data examples/quickstart/data.json"

"$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS examples/quickstart/parallel_smoke.py $GPT_ARGS $MM_ARGS
