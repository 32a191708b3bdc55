#!/usr/bin/env bash
# Step-Video-T2V pre-training (text to video: the 30B DiT "stepvideodit", 48 layers x 48 heads x 128),
# MindSpeed-MM's setting of 136 frames at 544 x 992, with pretrain_t2v.py. docs/stepvideo.md has the
# whole walk-through.
#
# Before the first run:
#   1. Download the release (stepfun-ai/stepvideo-t2v) to ./weights/stepvideo-t2v, or edit the paths below.
#      Where each of its directories goes:
#        transformer/   (config.json, diffusion_pytorch_model-0000N-of-00006.safetensors): mm-convert's source
#        vae/           (vae_v2.safetensors): ae.from_pretrained of pretrain_t2v_model.json (the directory or the file)
#        step_llm/      (config.json, model-*.safetensors, step1_chat_tokenizer.model): text_encoder[0]
#                       (StepLLmModel) of the model JSON; step_llm/step1_chat_tokenizer.model is the data
#                       JSON's first tokenizer_config ("stepchat", 320 tokens)
#        hunyuan_clip/  clip_text_encoder/ is text_encoder[1] (BertModel) of the model JSON, tokenizer/ the data
#                       JSON's second tokenizer_config ("BertTokenizer", 77 tokens)
#      A missing directory or file is named before anything starts (exit status 2).
#   2. Convert the DiT for this run's TP (and PP: pp_layers = the model JSON's predictor.pipeline_num_layers):
#        mm-convert StepVideoConverter hf_to_mm \
#          --cfg.source_path ./weights/stepvideo-t2v/transformer \
#          --cfg.target_path mm_ckpt/stepvideo-t2v/dit-tp8-pp1 \
#          --cfg.target_parallel_config.tp_size 8 \
#          --cfg.target_parallel_config.pp_layers '[]'
#      ('[]': no pipelining; '[16,32]' for PP=2 below). LOAD_PATH defaults to mm_ckpt/stepvideo-t2v/dit-tp${TP}-pp${PP}:
#      the converted checkpoint holds one file per model-parallel rank and loads only under that split.
#   3. The data: data.json's basic_parameters.data_path is a data.txt of "dataset_root,annotation.json" lines
#      (each record: path, cap, and ideally resolution and num_frames). Clips are resized and cropped to
#      544 x 992 and cut to 136 frames at train_fps 8. Frame counts must be multiples of 17 (the VAE's
#      chunks: 136 frames -> 24 latent frames), sides multiples of 16 (its spatial compression).
# Run from anywhere: bash examples/stepvideo/t2v/pretrain_t2v.sh
# Every variable in the first block can be set from the environment, e.g. TP=4 CP=2 bash ...
# Multi-node: the same command on every node, with NNODES, NODE_RANK (0 on the master) and MASTER_ADDR
# (the master's IP, not localhost) set; only NODE_RANK differs between nodes.
#
# Layout (MindSpeed-MM's): TP=8 on one node of 8 (--sequence-parallel added), full recompute of all 48
# layers, distributed optimizer; 136 x 544 x 992 is 24 x 34 x 62 = 50592 tokens. The heads split over TP x
# the Ulysses degree of CP: TP x CP (Ulysses) must divide 48 (1, 2, 3, 4, 6, 8, 12, 16, 24, 48), e.g.
# TP=8, TP=4 CP=2, TP=2 CP=4; CP_ALGO=megatron_cp_algo (ring attention) has no head constraint;
# CP_ALGO=hybrid_cp_algo ULYSSES=u needs 48 % (TP x u) == 0. A layout that does not divide is refused
# with the valid counts.
# Memory (an estimate, docs/stepvideo.md "Memory plan"; not measured yet): at TP=8 each rank holds ~3.97B
# DiT parameters, 18 bytes each with bf16 weights, fp32 gradients and the distributed optimizer's fp32
# states (DP=1: nothing to shard them over) = ~71 GB, plus the frozen encoders that stage 0 keeps on
# every rank (Step-LLM ~39 GB in bf16, HunyuanCLIP and the VAE ~2 GB) and the activations: ~115 GB, which
# fits 141 GB cards (H200). On 80 GB cards use two nodes with PP=2 and a copy of the model JSON with
# "pipeline_num_layers": [16, 32] (stage 0, which also holds the encoders, gets fewer layers):
#   NNODES=2 PP=2 MM_MODEL=<that copy> ... (convert with pp_layers '[16,32]').
# Timeouts: DIST_TIMEOUT_MINUTES (--distributed-timeout-minutes, also NCCL's heartbeat monitor through
# TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, see examples/launch_env.sh) bounds a collective wait. With PP > 1 the
# later stages wait for stage 0's encoder loading outside any collective (a heartbeat, docs/reliability.md),
# so the 30 minutes only need to cover one step's slowest collective and a checkpoint save.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29501}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

TP=${TP:-8}
PP=${PP:-1}  # PP > 1 also needs predictor.pipeline_num_layers in the model JSON
VP=${VP:-1}  # 1: no interleaving; > 1 needs a 2-D pipeline_num_layers
CP=${CP:-1}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}  # ulysses_cp_algo, megatron_cp_algo (ring) or hybrid_cp_algo
CP_WINDOW=${CP_WINDOW:-1}  # megatron_cp_algo: inner ring size of double ring attention (1: one ring)
ULYSSES=${ULYSSES:-2}  # hybrid_cp_algo: the Ulysses part of CP
MBS=${MBS:-1}
GBS=${GBS:-$((MBS * WORLD_SIZE / (TP * PP * CP) * (VP > 1 ? PP : 1)))}  # interleaving (VP > 1) needs >= PP micro-batches
RECOMPUTE_LAYERS=${RECOMPUTE_LAYERS:-48}  # layers recomputed in the backward (of 48)
TRAIN_ITERS=${TRAIN_ITERS:-5000}
LR=${LR:-1e-5}
ADAM_EPS=${ADAM_EPS:-1e-15}
NUM_WORKERS=${NUM_WORKERS:-8}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}

ENTRY_POINT=pretrain_t2v.py
MM_MODEL=${MM_MODEL:-examples/stepvideo/t2v/pretrain_t2v_model.json}
MM_DATA=${MM_DATA:-examples/stepvideo/t2v/data.json}
RUN_NAME=${RUN_NAME:-stepvideo_t2v}
LOG_DIR=${LOG_DIR:-outputs/logs}
LOAD_PATH=${LOAD_PATH-mm_ckpt/stepvideo-t2v/dit-tp${TP}-pp${PP}}  # hf_to_mm's output; empty: random DiT weights
LOAD_ARGS=${LOAD_ARGS-"--no-load-optim --no-load-rng"}  # unset: weights only; empty (resuming): everything
SAVE_PATH=${SAVE_PATH:-}  # checkpoint directory; empty: no checkpoints. To resume: LOAD_PATH=SAVE_PATH LOAD_ARGS=
CKPT_FORMAT=${CKPT_FORMAT:-torch}  # torch (per-rank files, what hf_to_mm writes) or torch_dist
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

source examples/pretrain_launch.sh  # DISTRIBUTED_ARGS, GPT_ARGS, MM_ARGS, OUTPUT_ARGS and torchrun
