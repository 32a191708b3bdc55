#!/usr/bin/env bash
# Wan2.1-T2V-1.3B feature extraction: the VAE latents and umT5 embeddings of data.json's videos, written
# once to SAVE_FEATURES (data.jsonl, features/, features.json), for training on them with
# feature_data.json (MM_DATA=examples/wan2.1/1.3b/t2v/feature_data.json bash .../pretrain_t2v.sh): the
# training then loads and runs no VAE and no text encoder.
#
# The same model and data JSONs as pretrain_t2v.sh (their placeholder paths edited the same way).
# All ranks share the samples; a rerun resumes (files written are kept) and retries bad videos, which
# are skipped and counted. Run from anywhere: bash examples/wan2.1/1.3b/t2v/feature_extraction.sh
# Multi-node: the same command on every node with NNODES, NODE_RANK and MASTER_ADDR set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29501}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NUM_WORKERS=${NUM_WORKERS:-4}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
FEATURE_FORMAT=${FEATURE_FORMAT:-safetensors}  # or pt: MindSpeed-MM's torch files

MM_MODEL=${MM_MODEL:-examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json}
MM_DATA=${MM_DATA:-examples/wan2.1/1.3b/t2v/data.json}
SAVE_FEATURES=${SAVE_FEATURES:-./sora_features}
LOG_DIR=${LOG_DIR:-outputs/logs}

source examples/launch_env.sh  # Ascend's environment on an NPU, NVIDIA's otherwise

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"
ARGS="
    --micro-batch-size 1 \
    --num-workers ${NUM_WORKERS} \
    --bf16 \
    --seed 1234 \
    --distributed-timeout-minutes ${DIST_TIMEOUT_MINUTES} \
    --mm-model $MM_MODEL \
    --mm-data $MM_DATA \
    --save-features $SAVE_FEATURES \
    --feature-format $FEATURE_FORMAT
"

mm_preflight $DISTRIBUTED_ARGS extract_features.py $ARGS  # exit 2 on a bad configuration
mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS extract_features.py $ARGS 2>&1 | tee "${LOG_DIR}/features_wan2.1_1.3b_t2v_$(date +%Y%m%d_%H%M%S).log"
