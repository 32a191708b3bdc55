#!/usr/bin/env bash
# Phantom-Wan-1.3B sampling (subject to video) with inference.py: the prompts, reference images
# (ref_image), size, steps, guidance and output directory are the "inference" section of
# inference_s2v_model.json beside this script.
#
# Before the first run, edit the placeholder "./weights/..." paths of that JSON (Phantom-Wan-1.3B.pth
# for the DiT; a diffusers Wan2.1-T2V-1.3B directory's vae/ and text_encoder/ + tokenizer/), or set
# LOAD_PATH to an mm checkpoint (a training run's --save directory, or mm-convert's output) to take
# the DiT's weights from there.
# Or, with Wan's and Phantom's downloads as they are (no conversion):
#   MM_MODEL=examples/phantom/1.3b/s2v/inference_s2v_release_model.json bash examples/phantom/1.3b/s2v/inference_s2v.sh
# whose "inference" section is Phantom's generate config itself (task s2v-1.3B, size, ckpt_dir =
# the Wan2.1-T2V-1.3B download, phantom_ckpt, nulls for Wan's defaults); see docs/inference.md.
# The JSON holds Phantom's own generate settings: ulysses_size 4 x ring_size 2 (the CP flags below must
# agree: CP=8, hybrid_cp_algo, ULYSSES=4), t5_fsdp and dit_fsdp (text encoder and DiT parameters
# sharded over the ranks), and the image/text guidance scales. Phantom's three guidance branches run
# on each rank (no CFG pairs).
# Every variable in the first block can be set from the environment, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/phantom/1.3b/s2v/inference_s2v.sh
# (a CP other than 8 means other ulysses_size x ring_size in the JSON, or none there)
# The layout (TP, CP, CFG pairs, prompts side by side) is explained in examples/inference_launch.sh;
# the DiT has 12 heads, so Ulysses needs 12 % (TP x Ulysses degree) == 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29511}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

TP=${TP:-1}
CP=${CP:-8}
CP_ALGO=${CP_ALGO:-hybrid_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring), hybrid_cp_algo
ULYSSES=${ULYSSES:-4}  # Ulysses degree inside CP with hybrid_cp_algo
CFG_PARALLEL=${CFG_PARALLEL:-0}  # Phantom's three guidance branches run on one rank: 0
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
MM_MODEL=${MM_MODEL:-examples/phantom/1.3b/s2v/inference_s2v_model.json}
LOAD_PATH=${LOAD_PATH:-}  # an mm checkpoint for the DiT; empty: predictor.from_pretrained

source examples/inference_launch.sh
