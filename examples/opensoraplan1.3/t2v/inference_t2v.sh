#!/usr/bin/env bash
# Open-Sora-Plan v1.3 sampling (text to video) with inference.py. What to sample is the "inference"
# section of inference_t2v_model.json beside this script: prompt (the guide's key; here
# samples_prompt.txt, one prompt per line; a string or a list works too), negative_prompt, seed,
# 93 x 352 x 640 at 18 fps, save_path. How to sample is its "diffusion" section (Euler ancestral,
# 100 steps, guidance_scale 7.5, v-prediction on the zero-terminal-SNR schedule, trailing timesteps).
#
# Before the first run:
#   1. The DiT: LOAD_PATH is an mm checkpoint. MindSpeed-MM's resplit turns the release's DiT (or a
#      training run's checkpoint split for TP/PP) into one file for TP=1:
#        mm-convert OpenSoraPlanConverter --version v1.3 resplit \
#          --cfg.source_path "./raw_ckpt/open-sora-plan/93x480p/" \
#          --cfg.target_path "mm_ckpt/open-sora-plan/pretrained-checkpoint-dit"
#      For TP > 1 add --cfg.target_parallel_config.tp_size <TP> (a per-rank checkpoint loads only
#      into its own TP). Or leave LOAD_PATH empty and set predictor.from_pretrained to the release's
#      DiT directory (config.json and safetensors).
#   2. The VAE: vae_convert (see pretrain_t2v.sh) writes mm_ckpt/open-sora-plan/vae.pt, the JSON's
#      ae.from_pretrained; text_encoder.from_pretrained is a HuggingFace google/mt5-xxl directory.
# Every variable in the first block can be set from the environment, e.g.
#   GPUS_PER_NODE=4 CP=2 bash examples/opensoraplan1.3/t2v/inference_t2v.sh
# The layout (TP, CP, CFG pairs, prompts side by side) is explained in examples/inference_launch.sh;
# the DiT has 24 heads, so Ulysses needs 24 % (TP x Ulysses degree) == 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

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
MM_MODEL=${MM_MODEL:-examples/opensoraplan1.3/t2v/inference_t2v_model.json}
LOAD_PATH=${LOAD_PATH-mm_ckpt/open-sora-plan/pretrained-checkpoint-dit}  # empty: predictor.from_pretrained

source examples/inference_launch.sh
