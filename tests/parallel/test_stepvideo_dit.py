"""The Step-Video-T2V DiT under TP + SP, CP (Ulysses over 2 and 3 ranks, ring with send/recv
overlap) and pipeline stages against one process (fp64 on CPU gloo ranks, outputs and the
gradients of every input and weight); activation recompute; the Ulysses head-count check."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.stepvideo_helpers import release_shapes, release_weights

# 6 heads of 8 channels (RoPE split [4, 2, 2]): 3 heads per TP2 rank, 2 per Ulysses-3 rank
PARAMS = dict(num_layers=2, num_heads=6, head_dim=8, channel_split=[4, 2, 2], in_channels=4, out_channels=4,
              caption_channels=[16, 12])
# latent grids: 27 tokens (padded for CP2 and TP2 + SP), 20 tokens (padded for CP3)
GRIDS = [(3, 3, 3), (2, 2, 5)]
LLM_LEN, CLIP_LEN, REAL = 6, 5, [5, 3]  # the second prompt is padded (the cross-attention mask matters)


def _arch(**overrides):
    from mm.families.stepvideo.config import StepVideoDiTConfig

    return StepVideoDiTConfig.from_json(dict(PARAMS, **overrides))


def _source(arch) -> dict[str, torch.Tensor]:
    return release_weights(release_shapes(arch.num_layers, arch.num_heads, arch.head_dim, arch.in_channels,
                                          arch.out_channels, list(arch.caption_channels)))


def _model(arch, tp=1, sp=False, cp=1, **stage_and_extra):
    from megatron.core.transformer import TransformerConfig

    from mm.families.stepvideo.model import StepVideoDiT

    stage = {k: stage_and_extra.pop(k) for k in ("pre_process", "post_process", "layer_offset", "num_layers")
             if k in stage_and_extra}
    config = TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                               num_attention_heads=arch.num_heads, tensor_model_parallel_size=tp,
                               sequence_parallel=sp, context_parallel_size=cp, params_dtype=torch.float64,
                               pipeline_dtype=torch.float64, use_cpu_initialization=True, **stage_and_extra)
    return StepVideoDiT(arch, config, **stage)


def _inputs(grid, seed=1, real=REAL) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    mask = (torch.arange(LLM_LEN)[None, :] < torch.tensor(real)[:, None]).double()
    return {"latents": torch.randn(2, PARAMS["in_channels"], f, h, w, generator=g, dtype=torch.float64),
            "timestep": torch.tensor([0.037, 0.912], dtype=torch.float64),
            "llm_context": torch.randn(2, LLM_LEN, 16, generator=g, dtype=torch.float64),
            "llm_mask": mask,
            "clip_context": torch.randn(2, CLIP_LEN, 12, generator=g, dtype=torch.float64)}


def _step(stages, grid, real=REAL):
    """Forward (stages chained through their messages), backward of ``sum(out * probe)``; the output
    and the input gradients."""
    x = _inputs(grid, real=real)
    leaves = {k: v.requires_grad_() for k, v in x.items() if k != "llm_mask"}
    out = stages[0](x["latents"], x["timestep"], x["llm_context"], x["llm_mask"], x["clip_context"])
    for stage in stages[1:]:
        stage.set_input_tensor(out)
        out = stage()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _grads(stages) -> dict:
    from mm.models.predictor.name_table import global_name

    return {global_name(n, s.layer_offset): p.grad.detach().clone() for s in stages for n, p in s.named_parameters()}


def _parallel_worker(rank, world, layout):
    from megatron.core import parallel_state as mpu

    from mm.families.stepvideo.weights import load_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    tp, cp, sp = layout.get("tp", 1), layout.get("cp", 1), layout.get("sp", False)
    algo = layout.get("algo", "ulysses_cp_algo")
    u = cp if algo == "ulysses_cp_algo" else 1
    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=tp, context_parallel=cp, ulysses_degree=u),
                        cp_algo=algo, cp_overlap=layout.get("overlap", False), seed=0)
    arch = _arch()
    source = _source(arch)
    tp_rank = mpu.get_tensor_model_parallel_rank()
    results = []
    for grid in GRIDS:
        model = _model(arch, tp, sp, cp)
        load_weights(model, source, tp, tp_rank)
        out, input_grads = _step([model], grid)
        # what DDP (over CP) and finalize_model_grads (over TP, sequence-parallel parameters) do
        cp_group, tp_group = mpu.get_context_parallel_group(), mpu.get_tensor_model_parallel_group()
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, group=cp_group)
            if sp and getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=tp_group)
        for g in input_grads.values():
            torch.distributed.all_reduce(g, group=cp_group)
        if sp:  # like the adaLN parameters', the timestep's gradient is a partial sum over TP ranks under SP
            torch.distributed.all_reduce(input_grads["timestep"], group=tp_group)
        results.append((out, input_grads, _grads([model])))
    ranks = (tp_rank, mpu.get_context_parallel_rank())
    destroy_parallel()
    return results, ranks


@functools.lru_cache(maxsize=1)
def _single_process():
    ((results, _),) = run_distributed(1, _parallel_worker, {})
    return results


LAYOUTS = {"tp2_sp": (2, dict(tp=2, sp=True)), "tp2": (2, dict(tp=2)),
           "cp2_ulysses": (2, dict(cp=2, algo="ulysses_cp_algo")),
           "cp2_ring_overlap": (2, dict(cp=2, algo="megatron_cp_algo", overlap=True)),
           "cp3_ulysses": (3, dict(cp=3, algo="ulysses_cp_algo"))}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_layouts_match_one_process(name):
    from mm.families.stepvideo.weights import mm_to_hf

    world, layout = LAYOUTS[name]
    reference = _single_process()
    per_rank = run_distributed(world, _parallel_worker, layout)
    tp = layout.get("tp", 1)
    for i, grid in enumerate(GRIDS):
        ref_out, ref_inputs, ref_grads = reference[i]
        for results, _ in per_rank:
            out, input_grads, _ = results[i]
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=f"{name} {grid}")
            for k in ref_inputs:
                # the timestep's sinusoid runs in fp32: its gradient is as exact as fp32
                rtol = 1e-6 if k == "timestep" else 1e-9
                torch.testing.assert_close(input_grads[k], ref_inputs[k], rtol=rtol, atol=1e-10,
                                           msg=f"{name} {grid} d{k}")
        shards = [next(r[0][i][2] for r in per_rank if r[1] == (t, 0)) for t in range(tp)]
        merged, full = mm_to_hf(shards), mm_to_hf([ref_grads])
        assert set(merged) == set(full)
        for key in full:
            torch.testing.assert_close(merged[key], full[key], rtol=1e-9, atol=1e-10, msg=f"{name} {grid} {key}")
        # the shared per-head q/k norm weights get whole gradients on every TP rank
        for t in range(tp):
            rank_grads = next(r[0][i][2] for r in per_rank if r[1] == (t, 0))
            torch.testing.assert_close(rank_grads["blocks.1.attn2.k_norm.weight"],
                                       ref_grads["blocks.1.attn2.k_norm.weight"], rtol=1e-9, atol=1e-10)


def _stages_worker(rank, world):
    from mm.families.stepvideo.weights import load_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    arch = _arch(num_layers=3)
    source = _source(arch)
    results = {}
    # a padded prompt (the context keeps 5 tokens, 2 of them padding of the second prompt: the key
    # mask must travel between stages) and prompts of full length (no mask)
    for real in (REAL, [LLM_LEN, LLM_LEN]):
        whole = _model(arch)
        load_weights(whole, source)
        results[("whole", *real)] = (*_step([whole], GRIDS[0], real), _grads([whole]))
        # two stages (layers 0 and 1-2) and three of one layer each: embedders on the first, head on the last
        for name, spans in {"pp2": [(0, 1), (1, 2)], "pp3": [(0, 1), (1, 1), (2, 1)]}.items():
            stages = []
            for j, (offset, count) in enumerate(spans):
                stage = _model(arch, pre_process=j == 0, post_process=j == len(spans) - 1, layer_offset=offset,
                               num_layers=count)
                load_weights(stage, source)
                stages.append(stage)
            results[(name, *real)] = (*_step(stages, GRIDS[0], real), _grads(stages))
    destroy_parallel()
    return results


def test_pipeline_stages_match_the_whole_model():
    (results,) = run_distributed(1, _stages_worker)
    assert len(results) == 6
    for (name, *real), (out, input_grads, grads) in results.items():
        ref_out, ref_inputs, ref_grads = results[("whole", *real)]
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12, msg=name)
        for k in ref_inputs:
            torch.testing.assert_close(input_grads[k], ref_inputs[k], rtol=1e-12, atol=1e-12, msg=f"{name} d{k}")
        assert set(grads) == set(ref_grads), name
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-12, atol=1e-12, msg=f"{name} {key}")


def _recompute_worker(rank, world):
    from mm.families.stepvideo.weights import load_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    arch = _arch(num_layers=3)
    source = _source(arch)
    settings = {"none": {}, "full_uniform": dict(recompute_granularity="full", recompute_method="uniform",
                                                 recompute_num_layers=2),
                "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
                "selective": dict(recompute_granularity="selective"),
                "selective_both": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
                # op-level recompute (its modules run again, its matmuls and attention kernels do not)
                "selective_layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                "selective_layernorm_mlp": dict(recompute_granularity="selective",
                                                recompute_modules=["layernorm", "mlp"]),
                "compiled_layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"])}
    results, fc1_calls = {}, {}
    for name, extra in settings.items():
        model = _model(arch, **extra).train()
        load_weights(model, source)
        if name.startswith("compiled"):
            torch._dynamo.reset()
            model.compile_blocks(backend="aot_eager")
        elif "layernorm" not in name:
            fc1_calls[name] = 0
            for block in model.blocks:
                block.ff.net[0].proj.register_forward_hook(
                    lambda *_, name=name: fc1_calls.__setitem__(name, fc1_calls[name] + 1))
        results[name] = (*_step([model], GRIDS[0]), _grads([model]))
    try:
        _model(arch, recompute_granularity="selective", recompute_modules=["moe"])
        refusal = None
    except ValueError as e:
        refusal = str(e)
    destroy_parallel()
    return results, fc1_calls, refusal


def test_activation_recompute_gives_the_same_gradients():
    ((results, fc1_calls, refusal),) = run_distributed(1, _recompute_worker)
    assert fc1_calls == {"none": 3, "full_uniform": 6, "full_block": 5, "selective": 3, "selective_both": 6}
    assert refusal == "--recompute-modules moe: the Step-Video DiT recomputes core_attn, mlp, layernorm only"
    ref_out, _, ref_grads = results.pop("none")
    for name, (out, _, grads) in results.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12, msg=name)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-12, atol=1e-12, msg=f"{name}: {key}")


def _heads_worker(rank, world):
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=2, ulysses_degree=2))
    try:
        _model(_arch(num_heads=3), cp=2)
        message = None
    except ValueError as e:
        message = str(e)
    destroy_parallel()
    return message


def test_ulysses_needs_whole_heads_per_rank():
    messages = run_distributed(2, _heads_worker)
    assert messages[0] == messages[1] == (
        "predictor.num_heads = 3 is not divisible by --tensor-model-parallel-size (1) x the Ulysses degree of "
        "context parallelism (2) = 2: every rank attends with whole heads")
