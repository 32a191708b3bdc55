#!/usr/bin/env bash
# The README's demo command. It sets up .venv itself (Python 3.12, pinned requirements), makes its
# own assets (a synthetic video dataset of moving shapes, a tiny random Wan VAE and UMT5 text
# encoder, model/data JSONs) under outputs/quickstart, and trains a tiny Wan DiT with
# pretrain_t2v.py on 2 CPU processes with ring context parallelism (send/recv overlap), then samples
# the trained checkpoint with inference.py into .mp4 files under $OUT/samples. Both configurations are
# validated first (python -m mm.preflight), once; MM_VERBOSE=1 shows the third-party notices mm silences.
#
#   GPUS_PER_NODE=2 MM_ACCELERATOR=cpu bash examples/quickstart/run.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$repo/scripts/bootstrap_venv.sh"
cd "$repo"

OUT=${OUT:-outputs/quickstart}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29517}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
CP=${CP:-2}
export MM_ACCELERATOR=${MM_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[[ -f "$OUT/model.json" ]] || "$MM_PYTHON" examples/quickstart/make_assets.py "$OUT"

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
GPT_ARGS="--context-parallel-size $CP --context-parallel-algo megatron_cp_algo --use-cp-send-recv-overlap \
    --micro-batch-size 2 --global-batch-size 2 --lr 1e-3 --lr-warmup-iters 5 --clip-grad 1.0 --train-iters ${TRAIN_ITERS:-40} \
    --use-distributed-optimizer --log-interval 5 --log-throughput --num-workers 1 --seed 1234 \
    --save $OUT/checkpoints"
MM_ARGS="--mm-model $OUT/model.json --mm-data $OUT/data.json"

# the prompts, size, steps and guidance are the "inference" section of inference_model.json
INFERENCE_ARGS="--context-parallel-size $CP --context-parallel-algo megatron_cp_algo \
    --mm-model $OUT/inference_model.json --load $OUT/checkpoints"

# both configurations checked once before any process starts (exit 2 on a bad one; MM_PREFLIGHT=0 skips it)
if [[ "${MM_PREFLIGHT:-1}" != 0 ]]; then
    "$MM_PYTHON" -m mm.preflight $DISTRIBUTED_ARGS pretrain_t2v.py $GPT_ARGS $MM_ARGS || exit $?
    "$MM_PYTHON" -m mm.preflight $DISTRIBUTED_ARGS inference.py $INFERENCE_ARGS || exit $?
fi
"$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS pretrain_t2v.py $GPT_ARGS $MM_ARGS
"$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS inference.py $INFERENCE_ARGS
echo "quickstart: trained (checkpoint in $OUT/checkpoints) and sampled: $(ls "$OUT"/samples/*.mp4 | tr '\n' ' ')"
