#!/usr/bin/env bash
# Wan2.1-T2V-1.3B pre-training (text to video), 81 frames at 480p, with pretrain_t2v.py.
#
# Before the first run, edit the placeholder paths (they point at ./weights and ./data):
#   - pretrain_t2v_model.json beside this script: the "from_pretrained" paths;
#   - data.json beside this script: basic_parameters.data_path (a data.txt of
#     "dataset_root,annotation.json" lines) and tokenizer_config.from_pretrained.
# Run from anywhere: bash examples/wan2.1/1.3b/t2v/pretrain_t2v.sh
# Every variable in the first block can be set from the environment instead of editing this file,
# e.g. GPUS_PER_NODE=4 CP=2 bash examples/wan2.1/1.3b/t2v/pretrain_t2v.sh
# Multi-node: the same command on every node, with NNODES, NODE_RANK (0 on the master) and
# MASTER_ADDR (the master's IP, not localhost) set; only NODE_RANK differs between nodes.
#
# Layout: 1.3B fits on one device, so the default is pure data parallelism with full recompute
# (81 x 480 x 832 is 32760 tokens). Longer or larger videos: raise CP (Ulysses needs
# 12 heads % (TP x CP) == 0: CP 2, 3, 4, 6; for CP 8 use CP_ALGO=hybrid_cp_algo ULYSSES=4, or
# CP_ALGO=megatron_cp_algo for ring attention).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29501}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

TP=${TP:-1}
PP=${PP:-1}  # PP > 1 also needs predictor.pipeline_num_layers in the model JSON
VP=${VP:-1}  # 1: no interleaving; > 1 needs a 2-D pipeline_num_layers
CP=${CP:-1}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring) or hybrid_cp_algo
ULYSSES=${ULYSSES:-2}  # Ulysses part of CP with hybrid_cp_algo
MBS=${MBS:-1}
GBS=${GBS:-$((MBS * WORLD_SIZE / (TP * PP * CP) * (VP > 1 ? PP : 1)))}  # interleaving (VP > 1) needs >= PP micro-batches
RECOMPUTE_LAYERS=${RECOMPUTE_LAYERS:-30}  # layers recomputed in the backward (of 30)
TRAIN_ITERS=${TRAIN_ITERS:-5000}
LR=${LR:-1e-5}
ADAM_EPS=${ADAM_EPS:-1e-8}
NUM_WORKERS=${NUM_WORKERS:-4}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}

ENTRY_POINT=pretrain_t2v.py
MM_MODEL=${MM_MODEL:-examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json}
MM_DATA=${MM_DATA:-examples/wan2.1/1.3b/t2v/data.json}
RUN_NAME=${RUN_NAME:-wan2.1_1.3b_t2v}
LOG_DIR=${LOG_DIR:-outputs/logs}
SAVE_PATH=${SAVE_PATH:-}  # checkpoint directory; empty: no checkpoints
# resume from here: with LOAD_PATH = SAVE_PATH (the default) a relaunch continues from the last
# checkpoint; for mm-convert's weights set LOAD_ARGS="--no-load-optim --no-load-rng"
LOAD_PATH=${LOAD_PATH:-$SAVE_PATH}
LOAD_ARGS=${LOAD_ARGS:-}
CKPT_FORMAT=${CKPT_FORMAT:-torch_dist}  # torch_dist (any layout loads it) or torch (per-rank files)
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

source examples/pretrain_launch.sh  # DISTRIBUTED_ARGS, GPT_ARGS, MM_ARGS, OUTPUT_ARGS and torchrun
