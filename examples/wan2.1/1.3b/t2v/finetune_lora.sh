#!/usr/bin/env bash
# Wan2.1-T2V-1.3B LoRA fine-tuning (text to video), 81 frames at 480p, with pretrain_t2v.py: low-rank
# adapters (rank 16) on the attention and FFN linears of every DiT layer, every released weight frozen.
# Checkpoints hold the adapters alone (a few MB); docs/lora.md shows how to sample with them and export them.
#
# Before the first run, edit the placeholder paths (they point at ./weights and ./data):
#   - pretrain_t2v_model.json beside this script: the "from_pretrained" paths (the released DiT is the base);
#   - data.json beside this script: basic_parameters.data_path and tokenizer_config.from_pretrained.
# Run from anywhere: bash examples/wan2.1/1.3b/t2v/finetune_lora.sh
# Every variable in the first blocks can be set from the environment instead of editing this file,
# e.g. GPUS_PER_NODE=1 LORA_R=32 bash examples/wan2.1/1.3b/t2v/finetune_lora.sh
#
# The base: predictor.from_pretrained of the model JSON, or an mm checkpoint of it (mm-convert hf_to_mm) in
# LOAD_PATH. The adapters: fresh, or resumed from LORA_LOAD, which is SAVE_PATH by default, so a relaunch
# continues from the last adapter checkpoint. A LoRA run needs no cluster: 1.3B fits one device at any
# layout; TP, CP and PP split it as they split pre-training (pretrain_t2v.sh beside this script).
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
VP=${VP:-1}
CP=${CP:-1}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}
ULYSSES=${ULYSSES:-2}
MBS=${MBS:-1}
GBS=${GBS:-$((MBS * WORLD_SIZE / (TP * PP * CP) * (VP > 1 ? PP : 1)))}
RECOMPUTE_LAYERS=${RECOMPUTE_LAYERS:-30}  # full recompute reaches the adapters behind the frozen embeddings
TRAIN_ITERS=${TRAIN_ITERS:-5000}
LR=${LR:-1e-4}  # adapters take a larger learning rate than full fine-tuning
ADAM_EPS=${ADAM_EPS:-1e-8}
NUM_WORKERS=${NUM_WORKERS:-4}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}

# the adapters (MindSpeed-MM's finetune_lora.sh settings; its module names are read as mm's linears:
# ffn.0 / ffn.2 the FFN, proj_q / proj_k / proj_v / proj_out q, k, v and output of both attentions)
LORA_R=${LORA_R:-16}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_TARGETS=${LORA_TARGETS:-ffn.2 ffn.0 proj_q proj_k proj_v proj_out}

ENTRY_POINT=pretrain_t2v.py
MM_MODEL=${MM_MODEL:-examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json}
MM_DATA=${MM_DATA:-examples/wan2.1/1.3b/t2v/data.json}
RUN_NAME=${RUN_NAME:-wan2.1_1.3b_t2v_lora}
LOG_DIR=${LOG_DIR:-outputs/logs}
SAVE_PATH=${SAVE_PATH:-outputs/wan2.1_1.3b_t2v_lora}  # the adapter checkpoints
LORA_LOAD=${LORA_LOAD:-$SAVE_PATH}  # adapters to resume from (or start from: another LoRA run's SAVE_PATH)
LOAD_PATH=${LOAD_PATH:-}  # the base as an mm checkpoint; empty: the model JSON's predictor.from_pretrained
LOAD_ARGS=${LOAD_ARGS:-}
CKPT_FORMAT=${CKPT_FORMAT:-torch_dist}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}

LORA_ARGS="--lora-r ${LORA_R} --lora-alpha ${LORA_ALPHA} --lora-target-modules ${LORA_TARGETS}"
if [[ -n "$LORA_LOAD" ]]; then
    LORA_ARGS="$LORA_ARGS --lora-load $LORA_LOAD"
fi

source examples/pretrain_launch.sh  # DISTRIBUTED_ARGS, GPT_ARGS, MM_ARGS, OUTPUT_ARGS, LORA_ARGS and torchrun
