#!/usr/bin/env bash
# Wan2.2-I2V-A14B sampling (image to video, two experts) with inference.py: the prompts, first frame,
# low-noise expert and boundary, size, steps, guidance and output directory are the "inference"
# section of inference_i2v_model.json beside this script.
#
# Before the first run, edit the placeholder "./weights/..." paths of that JSON (a diffusers
# Wan2.2-I2V-A14B directory's transformer/ (the high-noise expert), transformer_2/ (low_noise_model),
# vae/ and text_encoder/ + tokenizer/), or set LOAD_PATH to an mm checkpoint (a training run's --save
# directory, or mm-convert's output) to take the DiT's weights from there.
# The high-noise expert (predictor) denoises timesteps >= boundary_ratio x 1000, the low-noise expert
# (low_noise_model) the rest.
# Every variable in the first block can be set from the environment, e.g.
#   GPUS_PER_NODE=4 CP=4 bash examples/wan2.2/a14b/i2v/inference_i2v.sh
# The layout (TP, CP, CFG pairs, prompts side by side) is explained in examples/inference_launch.sh;
# the DiT has 40 heads, so Ulysses needs 40 % (TP x Ulysses degree) == 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29509}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

TP=${TP:-1}
CP=${CP:-4}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring), hybrid_cp_algo
ULYSSES=${ULYSSES:-2}  # Ulysses degree inside CP with hybrid_cp_algo
CFG_PARALLEL=${CFG_PARALLEL:-1}  # 1: the two guidance branches on a pair of ranks (world / (TP x CP) even)
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
MM_MODEL=${MM_MODEL:-examples/wan2.2/a14b/i2v/inference_i2v_model.json}
LOAD_PATH=${LOAD_PATH:-}  # an mm checkpoint for the DiT; empty: predictor.from_pretrained

source examples/inference_launch.sh
