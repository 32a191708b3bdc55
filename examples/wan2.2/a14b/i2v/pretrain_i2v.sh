#!/usr/bin/env bash
# Wan2.2-I2V-A14B pre-training (image to video), 81 frames at 480p, with pretrain_i2v.py. A14B is
# two 14B experts split by timestep: the high-noise one denoises t >= 900 (of 1000), the low-noise
# one the rest (Wan2.2's I2V-A14B boundary 0.900). They are trained one at a time: EXPERT=high or
# EXPERT=low picks the model JSON (whose from_pretrained is that expert's weights: diffusers'
# transformer / transformer_2) and the timestep range, through --min/--max-timestep-boundary
# (fractions of the 1000 training timesteps; DiffSynth-Studio's 0.358 for the same split is a
# fraction of its shifted sampling steps, not of the timesteps).
#
# Before the first run, edit the placeholder paths (they point at ./weights and ./data):
#   - pretrain_i2v_high_noise_model.json and pretrain_i2v_low_noise_model.json beside this script:
#     the "from_pretrained" paths;
#   - data.json beside this script: basic_parameters.data_path (a data.txt of
#     "dataset_root,annotation.json" lines) and tokenizer_config.from_pretrained.
# Run from anywhere: EXPERT=high bash examples/wan2.2/a14b/i2v/pretrain_i2v.sh
# Every variable in the first block can be set from the environment instead of editing this file,
# e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 EXPERT=low bash examples/wan2.2/a14b/i2v/pretrain_i2v.sh
# Multi-node: the same command on every node, with NNODES, NODE_RANK (0 on the master) and
# MASTER_ADDR (the master's IP, not localhost) set; only NODE_RANK differs between nodes.
#
# Layout for 14B (40 layers, 40 heads, hidden 5120), 81 x 480 x 832 (32760 tokens), bf16, 80 GB devices.
# Per device, approximately: bf16 weights 29 GB / TP, fp32 gradients 57 GB / TP, and Adam states
# with fp32 master weights 171 GB / (TP x DP x CP) with --use-distributed-optimizer; activations
# with full recompute keep one [s, b, h] input per layer (13 GB / (TP x CP) for the 40 layers).
#   - one node of 8 (default): TP=4 with --sequence-parallel, CP=2 (Ulysses; 40 heads % (TP x CP)
#     == 0), full recompute of all 40 layers, distributed optimizer: about 43 GB before activations;
#   - several nodes: keep TP x CP = 8 inside a node and let data parallelism grow across nodes,
#     which shards the optimizer states further (RECOMPUTE_LAYERS can then drop below 40);
#   - 720p (81 x 720 x 1280, 75600 tokens): CP=4 across two nodes, CP_ALGO=hybrid_cp_algo
#     ULYSSES=2 (Ulysses inside a node, ring attention between nodes), TP=4;
#   - less memory per device: PP=2 with "pipeline_num_layers": [18, 22] in the model JSON (stage 0
#     also holds the VAE and the text encoder, so it gets fewer layers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29501}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

EXPERT=${EXPERT:-high}  # high: t >= boundary, low: t < boundary (MM_EXTRA_ARGS: its timestep range)
BOUNDARY=${BOUNDARY:-0.9}
case "$EXPERT" in
    high) MM_EXTRA_ARGS="--min-timestep-boundary ${BOUNDARY} --max-timestep-boundary 1.0" ;;
    low) MM_EXTRA_ARGS="--min-timestep-boundary 0.0 --max-timestep-boundary ${BOUNDARY}" ;;
    *) echo "pretrain_i2v.sh: EXPERT=$EXPERT; valid: high, low" >&2; exit 2 ;;
esac

TP=${TP:-4}
PP=${PP:-1}  # PP > 1 also needs predictor.pipeline_num_layers in the model JSON
VP=${VP:-1}  # 1: no interleaving; > 1 needs a 2-D pipeline_num_layers
CP=${CP:-2}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring) or hybrid_cp_algo
ULYSSES=${ULYSSES:-2}  # Ulysses part of CP with hybrid_cp_algo
MBS=${MBS:-1}
GBS=${GBS:-$((MBS * WORLD_SIZE / (TP * PP * CP) * (VP > 1 ? PP : 1)))}  # interleaving (VP > 1) needs >= PP micro-batches
RECOMPUTE_LAYERS=${RECOMPUTE_LAYERS:-40}  # layers recomputed in the backward (of 40)
TRAIN_ITERS=${TRAIN_ITERS:-5000}
LR=${LR:-1e-5}
ADAM_EPS=${ADAM_EPS:-1e-8}
NUM_WORKERS=${NUM_WORKERS:-4}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}

ENTRY_POINT=pretrain_i2v.py
MM_MODEL=${MM_MODEL:-examples/wan2.2/a14b/i2v/pretrain_i2v_${EXPERT}_noise_model.json}
MM_DATA=${MM_DATA:-examples/wan2.2/a14b/i2v/data.json}
RUN_NAME=${RUN_NAME:-wan2.2_a14b_i2v_${EXPERT}_noise}
LOG_DIR=${LOG_DIR:-outputs/logs}
SAVE_PATH=${SAVE_PATH:-}  # checkpoint directory; empty: no checkpoints
# resume from here: with LOAD_PATH = SAVE_PATH (the default) a relaunch continues from the last
# checkpoint; for mm-convert's weights set LOAD_ARGS="--no-load-optim --no-load-rng"
LOAD_PATH=${LOAD_PATH:-$SAVE_PATH}
LOAD_ARGS=${LOAD_ARGS:-}
CKPT_FORMAT=${CKPT_FORMAT:-torch_dist}  # torch_dist (any layout loads it) or torch (per-rank files)
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

source examples/pretrain_launch.sh  # DISTRIBUTED_ARGS, GPT_ARGS, MM_ARGS, OUTPUT_ARGS and torchrun
