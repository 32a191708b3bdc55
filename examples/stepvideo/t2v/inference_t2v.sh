#!/usr/bin/env bash
# Step-Video-T2V sampling (text to video) with inference.py: the release's settings, 204 frames at 544 x 992,
# 50 Euler steps with time shift 13.0, guidance scale 9.0, written at 25 fps. What to sample is the
# "inference" section of inference_t2v_model.json beside this script (prompt: samples_prompt.txt, one
# prompt per line; the release's prompt_suffix and negative_prompt; seed; size; save_path); the steps
# and the shift are its "diffusion" section (num_inference_timesteps, shift). docs/stepvideo.md has the
# whole walk-through.
#
# Before the first run:
#   1. Download the release (stepfun-ai/stepvideo-t2v) to ./weights/stepvideo-t2v, or edit the JSON's paths:
#        vae/vae_v2.safetensors               -> ae.from_pretrained (the vae/ directory or the file)
#        step_llm/ (+ step1_chat_tokenizer.model) -> text_encoder[0] (StepLLmModel, 320 tokens, bf16)
#        hunyuan_clip/clip_text_encoder       -> text_encoder[1] (BertModel, 77 tokens, fp32; its
#                                                tokenizer is found in the sibling hunyuan_clip/tokenizer)
#      A missing directory or file is named before anything starts (exit status 2).
#   2. The DiT: LOAD_PATH (default mm_ckpt/stepvideo-t2v/dit-tp${TP}-pp1) is the release's transformer/
#      converted for this TP (a converted checkpoint loads only under its own TP):
#        mm-convert StepVideoConverter hf_to_mm \
#          --cfg.source_path ./weights/stepvideo-t2v/transformer \
#          --cfg.target_path mm_ckpt/stepvideo-t2v/dit-tp2-pp1 \
#          --cfg.target_parallel_config.tp_size 2 \
#          --cfg.target_parallel_config.pp_layers '[]'
#      (a training run's checkpoint: mm-convert StepVideoConverter resplit with the same target options).
#      Or LOAD_PATH= (empty) with predictor.from_pretrained set to the release's transformer/ directory:
#      then every rank reads all 58.7 GB of it into host memory and keeps its TP share.
# Every variable in the first block can be set from the environment, e.g.
#   GPUS_PER_NODE=4 TP=2 CP=2 bash examples/stepvideo/t2v/inference_t2v.sh
#
# Layout: every rank of a TP x CP group samples the same video; TP x the Ulysses degree must divide the
# 48 heads (1, 2, 3, 4, 6, 8, 12, 16, 24, 48; CP_ALGO=megatron_cp_algo, ring attention, has no head
# constraint), and the rest of the world runs prompts side by side, or with CFG_PARALLEL=1 pairs of
# ranks the two guidance branches (examples/inference_launch.sh). The DiT is 58.7 GB in bf16, so on
# 80 GB cards TP >= 2. Recommended:
#   8 GPUs: TP=2 CP=4 (Ulysses; the default), or TP=2 CP=2 CFG_PARALLEL=1, or TP=4 CP=2, TP=8
#   4 GPUs: GPUS_PER_NODE=4 TP=2 CP=2, or TP=4 CP=1 (MindSpeed-MM's)
#   2 GPUs: GPUS_PER_NODE=2 TP=2 CP=1;  3 GPUs: GPUS_PER_NODE=3 TP=3 CP=1 (48 heads split in 3 too)
# Memory per rank at TP=2 (estimate): the DiT's share ~30 GB; Step-LLM (~39 GB in bf16) sharded over the
# TP x CP group by "t5_fsdp": true (set it false on one rank); the VAE and HunyuanCLIP ~2 GB; the
# activations and the VAE decode: not measured yet (docs/stepvideo.md "Memory plan"). Each rank decodes
# the video; "ae.vae_cp_size": 4 (dividing TP x CP) shares the decode of its 12 chunks of 17 frames.
# Timeouts: ranks no longer wait in a collective while another decodes or loads encoders (they wait on a
# heartbeat, docs/reliability.md), which was what hit NCCL's 10-minute watchdog in the reference's parallel
# inference (Step-Video-T2V issue #27); DIST_TIMEOUT_MINUTES (30) bounds the collectives that remain and
# sets TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC to match (examples/launch_env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29505}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

TP=${TP:-2}
CP=${CP:-4}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring), hybrid_cp_algo
ULYSSES=${ULYSSES:-2}  # Ulysses degree inside CP with hybrid_cp_algo
CFG_PARALLEL=${CFG_PARALLEL:-0}  # 1: the two guidance branches on a pair of ranks (world / (TP x CP) even)
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
MM_MODEL=${MM_MODEL:-examples/stepvideo/t2v/inference_t2v_model.json}
LOAD_PATH=${LOAD_PATH-mm_ckpt/stepvideo-t2v/dit-tp${TP}-pp1}  # empty: predictor.from_pretrained

source examples/inference_launch.sh
