# The device environment of every launch script in examples/ (sourced after it set GPUS_PER_NODE and
# DIST_TIMEOUT_MINUTES): on an Ascend NPU (MM_ACCELERATOR=npu, or npu-smi on the PATH) CANN's set_env.sh
# and the HCCL/runtime settings of MindSpeed-MM's scripts, elsewhere NVIDIA's. Values already in the
# environment win. It also defines mm_preflight, which the launch scripts run before torchrun.

# The pre-flight check: `mm_preflight <torchrun's arguments>` validates the configuration torchrun is
# about to start, once, in one process, with the checks every rank would run (python -m mm.preflight:
# flags, model and data JSONs, the files they name, output directories), for GPUS_PER_NODE x NNODES
# processes. A bad configuration prints each problem once and stops the script with exit code 2 before
# torchrun starts. MM_PREFLIGHT=0 skips it; MM_PYTHON is the Python to run it with (default: the one
# torchrun runs the entry point with, from its #! line, else python).
mm_preflight() {
    [[ "${MM_PREFLIGHT:-1}" != 0 ]] || return 0
    local python="${MM_PYTHON:-}" launcher line
    if [[ -z "$python" ]]; then
        python=python
        launcher="$(command -v torchrun || true)"
        if [[ -n "$launcher" && -f "$launcher" ]] && IFS= read -r line < "$launcher" && [[ "$line" == '#!'*python* ]]; then
            python="${line#\#!}"
        fi
    fi
    $python -m mm.preflight "$@" || exit $?
}

if [[ "${MM_ACCELERATOR:-}" == npu || ( -z "${MM_ACCELERATOR:-}" && -n "$(command -v npu-smi)" ) ]]; then
    # Ascend NPU: the CANN environment and the HCCL/runtime settings of MindSpeed-MM's scripts
    for env_script in "${ASCEND_SET_ENV:-}" /usr/local/Ascend/cann/set_env.sh /usr/local/Ascend/ascend-toolkit/set_env.sh; do
        if [[ -n "$env_script" && -f "$env_script" ]]; then
            set +u; source "$env_script"; set -u
            break
        fi
    done
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}  # seconds to set up links, [120, 7200]
    # seconds a collective may wait, [68, 17340]; mm warns if shorter than --distributed-timeout-minutes
    export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-$((DIST_TIMEOUT_MINUTES * 60))}
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
    export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
    export NPUS_PER_NODE=${NPUS_PER_NODE:-$GPUS_PER_NODE}
    export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}  # CANN's logs not on the screen
    export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}  # errors only
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}  # fuses non-contiguous operator pairs
    export MULTI_STREAM_MEMORY_REUSE=${MULTI_STREAM_MEMORY_REUSE:-1}
else
    # NVIDIA: megatron-core orders TP/SP communication behind compute on one connection
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # seconds torch's monitor lets NCCL's watchdog thread go without a heartbeat (stuck in a CUDA/NCCL
    # call, as behind a long VAE decode or while aborting a timed-out collective) before it kills the
    # process: the collective timeout, and never below torch's own default of 480
    heartbeat=$((DIST_TIMEOUT_MINUTES * 60 > 480 ? DIST_TIMEOUT_MINUTES * 60 : 480))
    export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-$heartbeat}
fi
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
