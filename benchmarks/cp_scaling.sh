#!/usr/bin/env bash
# Every CP algorithm at CP 1, 2, 4, 8 (as many as the node's GPUs allow) for one Wan DiT step;
# prints per-GPU throughput and scaling efficiency against CP 1. Extra args go to cp_scaling.py.
#   GPUS=8 bash benchmarks/cp_scaling.sh --latent 21 60 104
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GPUS=${GPUS:-8}
PYTHON=${PYTHON:-python3}
out=$(mktemp)
run() { "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$1" benchmarks/cp_scaling.py "${@:2}" | grep '^{' >> "$out"; }
run 1 "$@"
for cp in 2 4 8; do
    (( cp <= GPUS )) || break
    run $cp --context-parallel-algo ulysses_cp_algo "$@"
    run $cp --context-parallel-algo megatron_cp_algo "$@"
    run $cp --context-parallel-algo megatron_cp_algo --use-cp-send-recv-overlap "$@"
    (( cp >= 4 )) && run $cp --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2 --use-cp-send-recv-overlap "$@"
    (( cp >= 4 )) && run $cp --context-parallel-algo megatron_cp_algo --cp-window-size 2 --use-cp-send-recv-overlap "$@"
done
"$PYTHON" - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = next(r for r in rows if r["cp"] == 1)["tokens_per_s_per_gpu"]
print(f"{'algo':<18}{'cp':>3}{'U':>3}{'W':>3}{'overlap':>8}{'s/step':>9}{'tok/s/GPU':>11}{'efficiency':>11}{'peak GiB':>9}")
for r in rows:
    print(f"{r['algo']:<18}{r['cp']:>3}{r['ulysses_degree']:>3}{r['cp_window_size']:>3}{str(r['overlap']):>8}"
          f"{r['seconds']:>9.3f}{r['tokens_per_s_per_gpu']:>11.0f}{r['tokens_per_s_per_gpu'] / base:>11.0%}{r['peak_gib']:>9.1f}")
PY
