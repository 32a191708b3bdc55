#!/usr/bin/env bash
# Open-Sora-Plan v1.3 pre-training (text to video: the sparse DiT "videoditsparse", 32 layers,
# 24 heads x 96), up to 93 frames at about 352 x 640 pixels, with pretrain_t2v.py.
#
# Before the first run:
#   1. Convert the released weights (MindSpeed-MM's guide; mm-convert is mm's console script):
#        mm-convert OpenSoraPlanConverter --version v1.3 vae_convert \
#          --cfg.source_path "raw_ckpt/open-sora-plan/merged.ckpt" \
#          --cfg.target_path "mm_ckpt/open-sora-plan/vae.pt"
#        mm-convert OpenSoraPlanConverter --version v1.3 hf_to_mm \
#          --cfg.source_path "./raw_ckpt/open-sora-plan/93x480p/" \
#          --cfg.target_path "mm_ckpt/open-sora-plan/pretrained-checkpoint-dit" \
#          --cfg.target_parallel_config.tp_size <TP> \
#          --cfg.target_parallel_config.pp_layers <[] without PP, e.g. '[8,8,8,8]' for PP=4>
#      The DiT split (tp_size, pp_layers) must be the TP and pipeline_num_layers this script trains
#      with: the converted checkpoint holds one file per model-parallel rank.
#   2. Edit the placeholder paths: in pretrain_t2v_model.json beside this script
#      text_encoder.from_pretrained (a HuggingFace google/mt5-xxl directory) and ae.from_pretrained
#      (vae_convert's vae.pt); in the data JSON (MM_DATA) tokenizer_config.from_pretrained, and in
#      the data.txt it names, one "dataset_root,annotation.json" line per dataset.
# Run from anywhere: bash examples/opensoraplan1.3/t2v/pretrain_t2v.sh
# Every variable in the first block can be set from the environment instead of editing this file,
# e.g. CP=2 CP_ALGO=megatron_cp_algo bash examples/opensoraplan1.3/t2v/pretrain_t2v.sh
# Multi-node: the same command on every node, with NNODES, NODE_RANK (0 on the master) and
# MASTER_ADDR (the master's IP, not localhost) set; only NODE_RANK differs between nodes.
#
# Checkpoints: LOAD_PATH is hf_to_mm's output, which holds weights only, hence the default
# LOAD_ARGS="--no-load-optim --no-load-rng". To resume a run instead, set SAVE_PATH and
# LOAD_PATH to the same directory and LOAD_ARGS= (empty).
# Resolution: dynamic by default (every clip keeps its aspect ratio within max_hxw pixels, sides cut
# to multiples of hw_stride); MM_DATA=examples/opensoraplan1.3/t2v/data_static_resolution.json
# resizes and crops every clip to 352 x 640. (data.json is the dynamic one under the guide's plain
# name.)
#
# Layout (about 2.7B DiT parameters; 93 x 352 x 640 is 24 x 22 x 40 = 21120 tokens): the default is
# pure data parallelism with full recompute of all 32 layers, as MindSpeed-MM runs it. For longer
# or larger videos:
#   - CP > 1 with Ulysses (CP_ALGO=ulysses_cp_algo): 24 heads % (TP x CP) == 0, e.g. CP 2, 4, 8;
#   - ring attention (CP_ALGO=megatron_cp_algo) has no head constraint; CP_WINDOW=w > 1 is double
#     ring attention with inner rings of w ranks (w divides CP);
#   - Ulysses inside ring (CP_ALGO=hybrid_cp_algo ULYSSES=u): u divides CP, 1 < u < CP, and
#     24 % (TP x u) == 0; keep the Ulysses part inside a node;
#   - TP > 1 adds --sequence-parallel; 24 heads % (TP x Ulysses degree) == 0 again;
#   - PP > 1: set predictor.pipeline_num_layers in the model JSON, one entry per stage summing to 32,
#     e.g. PP=4 with [8, 8, 8, 8] (stage 0 also holds mT5 and the VAE, so [6, 8, 9, 9] balances
#     better); PP x VP: a 2-D list of VP rows of PP stages, e.g. PP=4 VP=2 with
#     [[4, 4, 4, 4], [4, 4, 4, 4]]. Convert the DiT with the same pp_layers.
#   - VAE-CP: ae.vae_cp_size > 1 in the model JSON splits the VAE encode over that many of the TP x CP
#     ranks holding one video (it must divide TP x CP; CP is a good value); not with PP.
#   - Encoder-DP: "enable_encoder_dp": true makes each of the TP x CP ranks that share a batch encode
#     (VAE and mT5) only its part of the samples and gather the rest, instead of every rank encoding
#     all of them (pays off with MBS > 1; one all-gather more); not with PP or VAE-CP.
#   - "encoder_offload_interval": N > 1 brings the encoders to the device every N steps to encode the
#     next N steps' batches at once, and keeps them in host memory in between (10 or more hides
#     the transfers; raise NUM_WORKERS with it); works with encoder-DP.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

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
CP_WINDOW=${CP_WINDOW:-1}  # megatron_cp_algo: inner ring size of double ring attention (1: one ring)
ULYSSES=${ULYSSES:-2}  # hybrid_cp_algo: the Ulysses part of CP
MBS=${MBS:-1}
GBS=${GBS:-$((MBS * WORLD_SIZE / (TP * PP * CP) * (VP > 1 ? PP : 1)))}  # interleaving (VP > 1) needs >= PP micro-batches
RECOMPUTE_LAYERS=${RECOMPUTE_LAYERS:-32}  # layers recomputed in the backward (of 32)
TRAIN_ITERS=${TRAIN_ITERS:-5000}
LR=${LR:-1e-5}
ADAM_EPS=${ADAM_EPS:-1e-15}
NUM_WORKERS=${NUM_WORKERS:-4}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}

ENTRY_POINT=pretrain_t2v.py
MM_DATA=${MM_DATA:-examples/opensoraplan1.3/t2v/data_dynamic_resolution.json}
# static resolution: MM_DATA=examples/opensoraplan1.3/t2v/data_static_resolution.json
MM_MODEL=${MM_MODEL:-examples/opensoraplan1.3/t2v/pretrain_t2v_model.json}
RUN_NAME=${RUN_NAME:-opensoraplan1.3_t2v}
LOG_DIR=${LOG_DIR:-outputs/logs}
LOAD_PATH=${LOAD_PATH-mm_ckpt/open-sora-plan/pretrained-checkpoint-dit}  # empty: random DiT weights
LOAD_ARGS=${LOAD_ARGS-"--no-load-optim --no-load-rng"}  # unset: weights only; empty: everything
SAVE_PATH=${SAVE_PATH:-}  # checkpoint directory; empty: no checkpoints
CKPT_FORMAT=${CKPT_FORMAT:-torch}  # torch (per-rank files, as MindSpeed-MM saves) or torch_dist
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
# MindSpeed-MM's flags for this model: with ring attention (megatron_cp_algo, hybrid_cp_algo), and with
# PP > 1, where stages exchange the hidden states with the caption and its mask, at each sample's own size
RING_ARGS="--attention-mask-type general"
PP_ARGS="--optimization-level 2 --use-multiparameter-pipeline-model-parallel --variable-seq-lengths"

source examples/pretrain_launch.sh  # DISTRIBUTED_ARGS, GPT_ARGS, MM_ARGS, OUTPUT_ARGS and torchrun
