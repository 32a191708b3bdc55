"""What a compiled Wan layer keeps for its backward under each ``--recompute-modules`` setting, with
AOT autograd's min-cut partitioner (the one inductor uses; here without inductor, on the CPU): the
FFN-wide activations (input projection output, GELU output) are the large ones. ``mlp`` must keep
none of them, also inside a compiled layer, where a plain checkpoint let the partitioner keep the
input projection's output (a matmul) and recompute only the GELU."""

from __future__ import annotations

import pytest

from tests.dist_helper import run_distributed

FFN = 1024


def _ffn_wide_saved(rank, world):
    import torch

    from mm.models.predictor.wan import WanDiT, WanDiTConfig
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.wan_helpers import inputs, megatron_config, tiny_kwargs

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kw = dict(tiny_kwargs(layers=2), hidden_size=64, num_heads=2, ffn_dim=FFN)
    x = inputs(kw, 5, 8, 8)
    tokens = x["latents"].shape[0] * 5 * 8 * 8 // 4
    counts = {}
    for name, modules in {"none": None, "mlp": ["mlp"], "layernorm": ["layernorm"],
                          "layernorm_mlp": ["layernorm", "mlp"]}.items():
        for compiled in (False, True):
            extra = dict(recompute_granularity="selective", recompute_modules=modules) if modules else {}
            torch.manual_seed(0)
            model = WanDiT(WanDiTConfig(**kw), megatron_config(kw, **extra)).train()
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            if compiled:
                torch._dynamo.reset()
                model.compile_blocks(backend="aot_eager_decomp_partition")
                model(**x).square().mean().backward()  # compile outside the counted forward
            saved = []

            def pack(t, saved=saved):
                if t.untyped_storage().data_ptr() not in params and t.shape[-1:] == (FFN,):
                    saved.append(t.numel() // tokens)  # FFN-wide activations, in units of [tokens, ffn]
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(**x)
            counts[name, compiled] = len([n for n in saved if n == FFN])
    destroy_parallel()
    return counts


@pytest.mark.slow
def test_mlp_recompute_keeps_no_ffn_activation_in_compiled_layers():
    ((counts),) = run_distributed(1, _ffn_wide_saved)
    layers = 2
    # without recompute: the input projection's output and the GELU output per layer, eager or compiled
    assert counts["none", False] >= 2 * layers and counts["none", True] >= 2 * layers, counts
    # layernorm keeps the matmul output (its policy) but not the GELU output
    assert counts["layernorm", True] == layers, counts
    for name in ("mlp", "layernorm_mlp"):
        for compiled in (False, True):
            assert counts[name, compiled] == 0, (name, compiled, counts)
