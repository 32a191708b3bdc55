# The launch part of every inference_*.sh script in examples/: each script sets the variables of its
# first block (GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TP, CP, CP_ALGO, ULYSSES,
# CFG_PARALLEL, DIST_TIMEOUT_MINUTES, MM_MODEL, LOAD_PATH) and sources this file from the repository root.
# MM_EXTRA_ARGS (optional): further flags of inference.py (e.g. --compile-dit-blocks).
# Before torchrun, the pre-flight check of launch_env.sh (mm_preflight; MM_PREFLIGHT=0 skips it).
#
# Layout: every rank of a TP x CP group samples the same video (CP splits the sequence: Ulysses needs
# the DiT's heads % (TP x Ulysses degree) == 0; CP_ALGO=megatron_cp_algo is ring attention,
# hybrid_cp_algo with ULYSSES=U is Ulysses x ring, Wan's and Phantom's "ulysses_size x ring_size"). The
# remaining factor of the world size runs prompts side by side, or with CFG_PARALLEL=1 pairs of ranks
# run the conditional and unconditional branches of one prompt.
source examples/launch_env.sh  # Ascend's environment on an NPU, NVIDIA's otherwise

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"
PARALLEL_ARGS="
    --tensor-model-parallel-size ${TP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ${CP_ALGO} \
    --bf16 \
    --distributed-timeout-minutes ${DIST_TIMEOUT_MINUTES}
"
if [[ "$CP_ALGO" == hybrid_cp_algo ]]; then
    PARALLEL_ARGS="$PARALLEL_ARGS --ulysses-degree-in-cp ${ULYSSES}"
fi
if [[ "$CFG_PARALLEL" == 1 ]]; then
    PARALLEL_ARGS="$PARALLEL_ARGS --cfg-parallel"
fi
MM_ARGS="--mm-model $MM_MODEL ${MM_EXTRA_ARGS:-}"
if [[ -n "$LOAD_PATH" ]]; then
    MM_ARGS="$MM_ARGS --load $LOAD_PATH"
fi

mm_preflight $DISTRIBUTED_ARGS inference.py $PARALLEL_ARGS $MM_ARGS  # exit 2 on a bad configuration
torchrun $DISTRIBUTED_ARGS inference.py $PARALLEL_ARGS $MM_ARGS
