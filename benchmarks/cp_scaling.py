"""Context-parallel scaling of a Wan DiT training step (forward+backward), one configuration per launch.

    torchrun --nproc_per_node 8 benchmarks/cp_scaling.py --context-parallel-algo megatron_cp_algo \
        --use-cp-send-recv-overlap --model examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json --latent 21 60 104
    bash benchmarks/cp_scaling.sh       # every algorithm at CP 1, 2, 4, 8 with the efficiency table

CP = the number of processes. Random bf16 weights and inputs (GPU) or fp32 (CPU, for a smoke run),
full recompute (uniform, 1 layer). Prints one JSON line on rank 0: seconds per step (median),
peak memory, and video tokens per second per GPU; cp_scaling.sh turns those into scaling
efficiency = (throughput per GPU at CP n) / (throughput per GPU at CP 1).
"""

from __future__ import annotations

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core/diffusers are imported: their known notices (MM_VERBOSE=1 shows them)

import argparse
import json
import statistics
import time

import torch

from mm.accelerator import init_distributed, read_launch_env, select_accelerator
from mm.arguments.flags import CP_ALGOS
from mm.families import build_predictor, predictor_config
from mm.parallel import ParallelSizes, initialize_parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json")
    parser.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"))
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--context-parallel-algo", choices=CP_ALGOS, default="ulysses_cp_algo")
    parser.add_argument("--ulysses-degree-in-cp", type=int, default=None)
    parser.add_argument("--cp-window-size", type=int, default=1)
    parser.add_argument("--use-cp-send-recv-overlap", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", default=None)
    args = parser.parse_args()

    from megatron.core.transformer import TransformerConfig

    acc = select_accelerator(args.accelerator)
    launch = read_launch_env()
    init_distributed(acc, 30, launch)
    cp = launch.world_size
    algo = args.context_parallel_algo
    u = cp if algo == "ulysses_cp_algo" else (args.ulysses_degree_in_cp or 1) if algo == "hybrid_cp_algo" else 1
    initialize_parallel(ParallelSizes(world_size=cp, context_parallel=cp, ulysses_degree=u,
                                      cp_window_size=args.cp_window_size),
                        cp_algo=algo, cp_overlap=args.use_cp_send_recv_overlap, seed=1234)
    pred = json.load(open(args.model))["predictor"]
    params = {k: v for k, v in pred.items() if k not in ("model_id", "from_pretrained", "dtype", "num_layers", "num_heads")}
    arch = predictor_config("wan_dit", params, pred["num_layers"], pred["num_heads"])
    dtype = torch.float32 if acc.is_cpu else torch.bfloat16
    config = TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                               num_attention_heads=arch.num_heads, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                               context_parallel_size=cp, recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1, use_cpu_initialization=acc.is_cpu)
    dev = acc.device()
    model = build_predictor("wan_dit", arch, config).to(dev).train()
    f, h, w = args.latent
    g = torch.Generator(device=dev).manual_seed(0)
    latents = torch.randn(1, arch.in_dim, f, h, w, device=dev, dtype=dtype, generator=g)
    context = torch.randn(1, args.text_len, arch.text_dim, device=dev, dtype=dtype, generator=g)
    timestep = torch.tensor([500.0], device=dev)

    def step():
        model.zero_grad(set_to_none=True)
        model(latents, timestep, context).float().mean().backward()
        acc.synchronize()

    step()
    acc.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = f * h * w // (arch.patch_size[0] * arch.patch_size[1] * arch.patch_size[2])
    if launch.rank == 0:
        print(json.dumps({"algo": algo, "cp": cp, "ulysses_degree": u, "cp_window_size": args.cp_window_size,
                          "overlap": args.use_cp_send_recv_overlap, "tokens": tokens, "seconds": round(seconds, 4),
                          "tokens_per_s_per_gpu": round(tokens / seconds / cp, 1),
                          "peak_gib": round(acc.max_memory_allocated() / 2**30, 2)}), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
