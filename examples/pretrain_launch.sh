# The launch part of every pretrain_*.sh script in examples/: each script sets the variables of its first
# blocks and sources this file from the repository root, which builds MindSpeed-MM's DISTRIBUTED_ARGS,
# GPT_ARGS, MM_ARGS and OUTPUT_ARGS from them and runs torchrun on ENTRY_POINT, its output also written to
# ${LOG_DIR}/train_${RUN_NAME}_<date>.log, after the pre-flight check of launch_env.sh (mm_preflight;
# MM_PREFLIGHT=0 skips it).
#
# Variables every script sets:
#   launch:     GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, DIST_TIMEOUT_MINUTES
#   layout:     TP, PP, VP, CP, CP_ALGO (ulysses_cp_algo, megatron_cp_algo or hybrid_cp_algo), ULYSSES
#               (the Ulysses part of CP with hybrid_cp_algo), MBS, GBS
#   recipe:     RECOMPUTE_LAYERS, TRAIN_ITERS, LR, ADAM_EPS, NUM_WORKERS
#   files:      ENTRY_POINT (pretrain_t2v.py or pretrain_i2v.py), MM_MODEL, MM_DATA, RUN_NAME, LOG_DIR
#   checkpoints: SAVE_PATH (empty: none), LOAD_PATH (empty: none), LOAD_ARGS, CKPT_FORMAT, SAVE_INTERVAL
# and, where the model needs them (unset: nothing added):
#   CP_WINDOW      megatron_cp_algo: --cp-window-size (inner ring size of double ring attention)
#   RING_ARGS      flags added with megatron_cp_algo and hybrid_cp_algo (e.g. --attention-mask-type general)
#   PP_ARGS        flags added with PP > 1 (e.g. the pipeline's variable sequence lengths)
#   MM_EXTRA_ARGS  flags after --mm-model / --mm-data (e.g. Wan2.2's timestep range of one expert)
#   LORA_ARGS      LoRA fine-tuning's flags (--lora-r, --lora-alpha, --lora-target-modules, --lora-load:
#                  finetune_lora.sh)
#
# TP > 1 adds --sequence-parallel; ring attention (megatron_cp_algo, and the ring part of hybrid_cp_algo)
# overlaps its send/recv with compute (--use-cp-send-recv-overlap).
source examples/launch_env.sh  # Ascend's environment on an NPU, NVIDIA's otherwise

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --virtual-pipeline-model-parallel-size ${VP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ${CP_ALGO} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --train-iters ${TRAIN_ITERS} \
    --lr ${LR} \
    --min-lr ${LR} \
    --lr-decay-style constant \
    --lr-warmup-iters 0 \
    --weight-decay 1e-2 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --adam-eps ${ADAM_EPS} \
    --clip-grad 1.0 \
    --bf16 \
    --use-distributed-optimizer \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers ${RECOMPUTE_LAYERS} \
    --num-workers ${NUM_WORKERS} \
    --seed 1234 \
    --distributed-timeout-minutes ${DIST_TIMEOUT_MINUTES}
"
if (( TP > 1 )); then
    GPT_ARGS="$GPT_ARGS --sequence-parallel"
fi
if (( PP > 1 )) && [[ -n "${PP_ARGS:-}" ]]; then
    GPT_ARGS="$GPT_ARGS $PP_ARGS"
fi
case "$CP_ALGO" in
    megatron_cp_algo)
        GPT_ARGS="$GPT_ARGS ${RING_ARGS:-} --use-cp-send-recv-overlap${CP_WINDOW:+ --cp-window-size ${CP_WINDOW}}" ;;
    hybrid_cp_algo)
        GPT_ARGS="$GPT_ARGS ${RING_ARGS:-} --use-cp-send-recv-overlap --ulysses-degree-in-cp ${ULYSSES}" ;;
esac

MM_ARGS="
    --mm-model $MM_MODEL \
    --mm-data $MM_DATA \
    ${MM_EXTRA_ARGS:-}
"

OUTPUT_ARGS="
    --log-interval 1 \
    --log-throughput \
    --tensorboard-dir ${LOG_DIR}/tensorboard/${RUN_NAME}
"
if [[ -n "$SAVE_PATH" ]]; then
    OUTPUT_ARGS="$OUTPUT_ARGS --save $SAVE_PATH --save-interval $SAVE_INTERVAL --ckpt-format $CKPT_FORMAT"
fi
if [[ -n "$LOAD_PATH" ]]; then
    OUTPUT_ARGS="$OUTPUT_ARGS --load $LOAD_PATH --ckpt-format $CKPT_FORMAT $LOAD_ARGS"
fi

LORA_ARGS=${LORA_ARGS:-}
mm_preflight $DISTRIBUTED_ARGS $ENTRY_POINT $GPT_ARGS $MM_ARGS $OUTPUT_ARGS $LORA_ARGS  # exit 2 on a bad configuration
mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS $ENTRY_POINT $GPT_ARGS $MM_ARGS $OUTPUT_ARGS $LORA_ARGS 2>&1 | tee "${LOG_DIR}/train_${RUN_NAME}_$(date +%Y%m%d_%H%M%S).log"
