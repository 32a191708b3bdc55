#!/usr/bin/env bash
# The README's demo command. It sets up .venv itself (Python 3.12, pinned requirements), makes its
# own assets (a synthetic video dataset of moving shapes, a tiny Wan VAE with random weights and a tiny
# UMT5 text encoder, model/data JSONs) under outputs/quickstart, then on 2 CPU processes:
#   1. fits the VAE to the videos with pretrain_vae.py (data-parallel; reconstruction + KL), saving it
#      over $OUT/vae with the latents' mean/std measured on the data;
#   2. trains a tiny Wan DiT on that VAE's latents with pretrain_t2v.py, ring context parallelism
#      (send/recv overlap);
#   3. samples the trained checkpoint with inference.py into .mp4 files under $OUT/samples;
#   4. checks them (examples/quickstart/check_samples.py): where the prompt's shape is in each frame,
#      and a PNG strip of the frames beside each video.
# Every configuration is validated first (python -m mm.preflight), once; MM_VERBOSE=1 shows the
# third-party notices mm silences.
#
#   GPUS_PER_NODE=2 MM_ACCELERATOR=cpu bash examples/quickstart/run.sh
#
# VAE_IMAGE_ITERS and VAE_ITERS (the VAE's iterations on frames, then on clips; VAE_ITERS=0: keep the
# random VAE) and TRAIN_ITERS (the DiT's) shorten or lengthen the run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$repo/scripts/bootstrap_venv.sh"
cd "$repo"

OUT=${OUT:-outputs/quickstart}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29517}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
CP=${CP:-2}
export MM_ACCELERATOR=${MM_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

VAE_IMAGE_ITERS=${VAE_IMAGE_ITERS:-250}
VAE_ITERS=${VAE_ITERS:-100}
TRAIN_ITERS=${TRAIN_ITERS:-600}

warmup() { echo $(( $1 < 40 ? $1 / 2 : 20 )); }  # warm-up iterations of a run of $1 (fewer than $1)

[[ -f "$OUT/model.json" ]] || "$MM_PYTHON" examples/quickstart/make_assets.py "$OUT"

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
# data-parallel over the processes; first single frames of the videos, then clips of 5 frames
VAE_ARGS="--lr 2e-3 --weight-decay 0 --clip-grad 1.0 --vae-reconstruction-loss mse \
    --vae-kl-weight 1e-6 --log-interval 50 --num-workers 1 --seed 1234 --mm-model $OUT/model.json --save $OUT/vae"
VAE_IMAGE_ARGS="$VAE_ARGS --mm-data $OUT/vae_image_data.json --micro-batch-size 2 --global-batch-size 4 \
    --train-iters $VAE_IMAGE_ITERS --lr-warmup-iters $(warmup $VAE_IMAGE_ITERS) --vae-latent-stats-samples 0"
VAE_CLIP_ARGS="$VAE_ARGS --mm-data $OUT/vae_data.json --micro-batch-size 1 --global-batch-size 2 \
    --train-iters $VAE_ITERS --lr-warmup-iters $(warmup $VAE_ITERS) --vae-latent-stats-samples 32"
GPT_ARGS="--context-parallel-size $CP --context-parallel-algo megatron_cp_algo --use-cp-send-recv-overlap \
    --micro-batch-size 2 --global-batch-size 2 --lr 3e-3 --lr-warmup-iters $(warmup $TRAIN_ITERS) --clip-grad 1.0 --train-iters $TRAIN_ITERS \
    --use-distributed-optimizer --log-interval 50 --log-throughput --num-workers 1 --seed 1234 \
    --save $OUT/checkpoints"
MM_ARGS="--mm-model $OUT/model.json --mm-data $OUT/data.json"
# the prompts, size, steps and guidance are the "inference" section of inference_model.json
INFERENCE_ARGS="--context-parallel-size $CP --context-parallel-algo megatron_cp_algo \
    --mm-model $OUT/inference_model.json --load $OUT/checkpoints"

# every configuration checked once before any process starts (exit 2 on a bad one; MM_PREFLIGHT=0 skips it)
if [[ "${MM_PREFLIGHT:-1}" != 0 ]]; then
    if (( VAE_ITERS > 0 )); then
        if (( VAE_IMAGE_ITERS > 0 )); then
            "$MM_PYTHON" -m mm.preflight $DISTRIBUTED_ARGS pretrain_vae.py $VAE_IMAGE_ARGS || exit $?
        fi
        "$MM_PYTHON" -m mm.preflight $DISTRIBUTED_ARGS pretrain_vae.py $VAE_CLIP_ARGS || exit $?
    fi
    "$MM_PYTHON" -m mm.preflight $DISTRIBUTED_ARGS pretrain_t2v.py $GPT_ARGS $MM_ARGS || exit $?
    "$MM_PYTHON" -m mm.preflight $DISTRIBUTED_ARGS inference.py $INFERENCE_ARGS || exit $?
fi

started=$SECONDS
if (( VAE_ITERS > 0 )); then
    if (( VAE_IMAGE_ITERS > 0 )); then
        "$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS pretrain_vae.py $VAE_IMAGE_ARGS
    fi
    "$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS pretrain_vae.py $VAE_CLIP_ARGS
fi
vae_done=$SECONDS
"$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS pretrain_t2v.py $GPT_ARGS $MM_ARGS
dit_done=$SECONDS
"$repo/.venv/bin/torchrun" $DISTRIBUTED_ARGS inference.py $INFERENCE_ARGS
sampled=$SECONDS
echo "quickstart: trained (checkpoint in $OUT/checkpoints) and sampled: $(ls "$OUT"/samples/*.mp4 | tr '\n' ' ')"
"$MM_PYTHON" examples/quickstart/check_samples.py "$OUT"
echo "quickstart: $((SECONDS - started)) s: VAE fit $((vae_done - started)) s, DiT training $((dit_done - vae_done)) s, \
sampling $((sampled - dit_done)) s"
