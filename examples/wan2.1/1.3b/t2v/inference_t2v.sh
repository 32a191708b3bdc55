#!/usr/bin/env bash
# Wan2.1-T2V-1.3B sampling (text to video) with inference.py: the prompts, size, steps, guidance
# and output directory are the "inference" section of inference_t2v_model.json beside this script.
#
# Before the first run, edit the placeholder "from_pretrained" paths of that JSON (./weights/...: a
# diffusers Wan2.1-T2V-1.3B directory's transformer/, vae/ and text_encoder/ + tokenizer/), or set
# LOAD_PATH to an mm checkpoint (a training run's --save directory, or mm-convert's output) to take
# the DiT's weights from there.
# Every variable in the first block can be set from the environment, e.g.
#   GPUS_PER_NODE=4 CP=4 bash examples/wan2.1/1.3b/t2v/inference_t2v.sh
#
# Layout: every rank of a TP x CP group samples the same video (CP splits the sequence: Ulysses needs
# 12 heads % (TP x ULYSSES) == 0; CP_ALGO=megatron_cp_algo is ring attention, hybrid_cp_algo with
# ULYSSES=U is Ulysses x ring, seed 000's "ulysses_size x ring_size"). The remaining factor of the
# world size runs prompts side by side, or with CFG_PARALLEL=1 pairs of ranks run the conditional
# and unconditional branches of one prompt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29505}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

TP=${TP:-1}
CP=${CP:-4}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring), hybrid_cp_algo
ULYSSES=${ULYSSES:-2}  # Ulysses degree inside CP with hybrid_cp_algo
CFG_PARALLEL=${CFG_PARALLEL:-1}  # 1: the two guidance branches on a pair of ranks (world / (TP x CP) even)
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
MM_MODEL=${MM_MODEL:-examples/wan2.1/1.3b/t2v/inference_t2v_model.json}
LOAD_PATH=${LOAD_PATH:-}  # an mm checkpoint for the DiT; empty: predictor.from_pretrained

source examples/launch_env.sh  # Ascend's environment on an NPU, NVIDIA's otherwise

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"
PARALLEL_ARGS="
    --tensor-model-parallel-size ${TP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ${CP_ALGO} \
    --bf16 \
    --distributed-timeout-minutes ${DIST_TIMEOUT_MINUTES}
"
if [[ "$CP_ALGO" == hybrid_cp_algo ]]; then
    PARALLEL_ARGS="$PARALLEL_ARGS --ulysses-degree-in-cp ${ULYSSES}"
fi
if [[ "$CFG_PARALLEL" == 1 ]]; then
    PARALLEL_ARGS="$PARALLEL_ARGS --cfg-parallel"
fi
MM_ARGS="--mm-model $MM_MODEL"
if [[ -n "$LOAD_PATH" ]]; then
    MM_ARGS="$MM_ARGS --load $LOAD_PATH"
fi

torchrun $DISTRIBUTED_ARGS inference.py $PARALLEL_ARGS $MM_ARGS
