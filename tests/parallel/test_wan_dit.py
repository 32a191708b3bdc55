"""The Wan DiT against diffusers' WanTransformer3DModel (fp32, CPU) and TP=2 (+SP) against TP=1."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.dist_helper import run_distributed
from tests.wan_helpers import diffusers_inputs, diffusers_model, inputs, megatron_config, tiny_kwargs

SHAPES = [(1, 4, 4), (3, 4, 6), (5, 6, 2)]  # (latent frames, height, width): odd frames, non-square


def _build_mm(kwargs, tp=1, sp=False, dtype=torch.float32, **extra):
    from mm.models.predictor.wan import WanDiT, WanDiTConfig

    return WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs, tp, sp, dtype, **extra))


def _parity_worker(rank, world, variant):
    from mm.models.predictor.wan import load_hf_weights, mm_to_hf
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs(image=variant == "i2v", flf2v=variant == "flf2v")
    per_token = variant == "ti2v_per_token"
    ref = diffusers_model(kwargs)
    model = _build_mm(kwargs)
    load_hf_weights(model, ref.state_dict())
    errors = []
    for frames, height, width in SHAPES:
        x = inputs(kwargs, frames, height, width, per_token=per_token)
        x_ref = {k: v.clone().requires_grad_(v.is_floating_point() and k != "timestep") for k, v in x.items()}
        x_mm = {k: v.clone().requires_grad_(v.is_floating_point() and k != "timestep") for k, v in x.items()}
        ref.zero_grad()
        model.zero_grad()
        out_ref = ref(**diffusers_inputs(kwargs, x_ref), return_dict=False)[0]
        out_mm = model(**x_mm)
        probe = torch.randn_like(out_ref)
        (out_ref * probe).sum().backward()
        (out_mm * probe).sum().backward()
        errors.append(("out", (out_mm - out_ref).abs().max().item()))
        for k in x_mm:
            if x_mm[k].grad is not None:
                errors.append((f"d{k}", (x_mm[k].grad - x_ref[k].grad).abs().max().item()))
        grads = mm_to_hf([{n: p.grad for n, p in model.named_parameters()}])
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
        errors.append(("dparams", max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)))
    destroy_parallel()
    return errors


@pytest.mark.parametrize("variant", ["t2v", "i2v", "flf2v", "ti2v_per_token"])
def test_matches_diffusers_outputs_and_gradients(variant):
    (errors,) = run_distributed(1, _parity_worker, variant)
    worst = {name: max(e for n, e in errors if n == name) for name, _ in errors}
    assert all(err <= 1e-5 for err in worst.values()), worst


def _tp_worker(rank, world, sp, variant, recompute=()):
    from megatron.core import parallel_state as mpu

    from mm.models.predictor.wan import load_hf_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=world), seed=0)
    kwargs = tiny_kwargs(image=variant == "i2v")
    source = {k: v.double() for k, v in diffusers_model(kwargs).state_dict().items()}
    extra = dict(recompute_granularity="selective", recompute_modules=list(recompute)) if recompute else {}
    model = _build_mm(kwargs, tp=world, sp=sp, dtype=torch.float64, **extra).train()
    load_hf_weights(model, source, tp_size=world, tp_rank=rank)
    x = {k: (v.double() if k != "timestep" else v).requires_grad_(k != "timestep")
         for k, v in inputs(kwargs, 3, 4, 6, per_token=variant == "ti2v_per_token").items()}
    out = model(**x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * probe).sum().backward()
    # what megatron-core's finalize_model_grads does for parameters used on sequence shards
    tp_group = mpu.get_tensor_model_parallel_group()
    for p in model.parameters():
        if sp and getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=tp_group)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    input_grads = {k: v.grad.detach().clone() for k, v in x.items() if v.grad is not None}
    destroy_parallel()
    return out.detach(), grads, input_grads


@pytest.mark.parametrize("sp,variant,recompute", [
    (False, "t2v", ()), (False, "i2v", ()), (False, "ti2v_per_token", ()), (True, "t2v", ()), (True, "i2v", ()),
    (True, "ti2v_per_token", ()),
    # op-level recompute under TP + SP: the sequence all-gathers and reduce-scatters run again in the
    # recompute; the single rank computes without recompute
    (True, "i2v", ("layernorm",)), (True, "t2v", ("layernorm", "mlp"))],
    ids=["tp2-t2v", "tp2-i2v", "tp2-ti2v_per_token", "tp2_sp-t2v", "tp2_sp-i2v", "tp2_sp-ti2v_per_token",
         "tp2_sp-i2v-layernorm", "tp2_sp-t2v-layernorm_mlp"])
def test_tensor_parallel_matches_single_rank(sp, variant, recompute):
    from mm.models.predictor.wan import mm_to_hf

    (ref_out, ref_grads, ref_inputs), = run_distributed(1, _tp_worker, False, variant)
    results = run_distributed(2, _tp_worker, sp, variant, recompute)
    full_ref = mm_to_hf([ref_grads])
    full_tp = mm_to_hf([r[1] for r in results])  # merge the TP shards of the gradients
    assert set(full_ref) == set(full_tp)
    for out, _, input_grads in results:
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        for k in ref_inputs:
            torch.testing.assert_close(input_grads[k], ref_inputs[k], rtol=1e-10, atol=1e-10)
    for name in full_ref:
        torch.testing.assert_close(full_tp[name], full_ref[name], rtol=1e-9, atol=1e-10, msg=name)
    # q/k RMSNorm statistics span both ranks' heads: per-rank normalisation would change these
    assert any("norm_q" in n for n in full_ref)


class _AttentionKernelRuns(TorchDispatchMode):
    """Counts the attention kernels' forward calls that really run (an op a selective checkpoint
    answers from its cache never reaches this mode)."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.runs += "attention" in name and "backward" not in name
        return func(*args, **(kwargs or {}))


def _recompute_worker(rank, world):
    from torch.utils.flop_counter import FlopCounterMode

    from mm.models.predictor.wan import load_hf_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs(image=True, layers=3)
    source = {k: v.double() for k, v in diffusers_model(kwargs).state_dict().items()}
    x = {k: v.double() if v.is_floating_point() and k != "timestep" else v for k, v in inputs(kwargs, 3, 4, 4).items()}

    def selective(*modules):
        return dict(recompute_granularity="selective", recompute_modules=list(modules))

    def block(layers, *modules):  # without modules: megatron's default, ignored under full
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=layers,
                    **(dict(recompute_modules=list(modules)) if modules else {}))

    results = {}
    settings = {"none": {}, "full_uniform": dict(recompute_granularity="full", recompute_method="uniform",
                                                 recompute_num_layers=2),
                "full_block": block(2),
                # block recompute of the first layers, the modules selectively in the others
                "block_mlp": block(1, "mlp"), "block_layernorm": block(2, "layernorm"),
                "block_layernorm_core_attn": block(2, "layernorm", "core_attn"),
                "selective": dict(recompute_granularity="selective"),
                "selective_mlp": selective("mlp"), "selective_both": selective("core_attn", "mlp"),
                "selective_layernorm": selective("layernorm"), "selective_layernorm_mlp": selective("layernorm", "mlp"),
                "selective_layernorm_core_attn": selective("layernorm", "core_attn"),
                # --compile-dit-blocks (traced by dynamo + AOT autograd, run without inductor on the CPU)
                "compiled": {}, "compiled_mlp": selective("mlp"), "compiled_layernorm": selective("layernorm"),
                "compiled_layernorm_mlp": selective("layernorm", "mlp"),
                "compiled_block_layernorm": block(1, "layernorm")}
    fc1_calls, flops = {}, {}
    for name, extra in settings.items():
        model = _build_mm(kwargs, dtype=torch.float64, **extra)
        load_hf_weights(model, source)
        model.train()
        if name.startswith("compiled"):
            keys = list(model.state_dict())
            model.compile_blocks(backend="aot_eager")
            assert all(block._compiled_call_impl is not None for block in model.blocks)
            assert list(model.state_dict()) == keys  # names unchanged: checkpoints and weight maps still fit
        elif "layernorm" not in name:  # how often each FFN input projection runs: twice per step when the
            fc1_calls[name] = 0        # mlp is recomputed (op-level recompute reruns modules, not their matmuls)
            for block in model.blocks:
                block.mlp.linear_fc1.register_forward_hook(
                    lambda *_, name=name: fc1_calls.__setitem__(name, fc1_calls[name] + 1))
        if name.startswith("block") or name.endswith("block_layernorm"):  # the first layers recomputed whole
            first = extra["recompute_num_layers"]
            assert [block.recompute for block in model.blocks] == [set()] * first + [set(extra["recompute_modules"])] * (3 - first)
        counter, attention = FlopCounterMode(display=False), _AttentionKernelRuns()
        with counter, attention:  # the matmuls and attention kernels that really ran (not cached results)
            out = model(**x)
            out.square().sum().backward()
        flops[name] = (counter.get_total_flops(), attention.runs)
        results[name] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    destroy_parallel()
    return results, fc1_calls, flops


def test_activation_recompute_gives_the_same_gradients():
    ((results, fc1_calls, flops),) = run_distributed(1, _recompute_worker)
    assert fc1_calls == {"none": 3, "full_uniform": 6, "full_block": 5, "block_mlp": 6, "selective": 3,
                         "selective_mlp": 6, "selective_both": 6}
    # block 2 + layernorm in the third layer: the matmuls and attention kernels of the whole-layer
    # recompute only (2 layers x 3 attentions again); with core_attn the third layer's kernels too
    assert flops["block_layernorm"] == flops["full_block"] and flops["full_block"][1] == 9 + 6
    assert flops["block_layernorm_core_attn"] == (flops["full_block"][0], 9 + 6 + 3)
    # op-level recompute runs no matmul or attention kernel again; with mlp the FFN's input projection
    # runs twice, as without it; with core_attn each attention kernel runs twice (3 layers x self,
    # text and image attention)
    assert flops["selective_layernorm"] == flops["none"] and flops["none"][1] == 9
    assert flops["selective_layernorm_mlp"] == flops["selective_mlp"]
    assert flops["selective_mlp"][0] > flops["none"][0] and flops["selective_mlp"][1] == 9
    assert flops["selective_layernorm_core_attn"] == (flops["none"][0], 18) == (flops["none"][0], flops["selective"][1])
    ref_out, ref_grads = results.pop("none")
    for name, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12, msg=name)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-12, atol=1e-12, msg=f"{name}: {key}")


def _loader_errors_worker(rank, world):
    from mm.models.predictor.wan import WeightMappingError, load_hf_weights, mm_to_hf
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs()
    ref = diffusers_model(kwargs)
    source = ref.state_dict()
    messages = {}
    broken = dict(source)
    del broken["blocks.1.attn1.to_k.weight"]
    broken["blocks.7.attn1.to_q.weight"] = torch.zeros(1)
    for name, sd in {"keys": broken,
                     "shape": dict(source, **{"proj_out.weight": torch.zeros(3, 24)})}.items():
        try:
            load_hf_weights(_build_mm(kwargs), sd)
        except WeightMappingError as e:
            messages[name] = str(e)
    # the original release's key names load to the same model
    model = _build_mm(kwargs)
    load_hf_weights(model, source)
    original = mm_to_hf([model.state_dict()], fmt="original")
    twin = _build_mm(kwargs)
    load_hf_weights(twin, original)
    x = inputs(kwargs, 1, 4, 4)
    same = torch.equal(model(**x), twin(**x))
    destroy_parallel()
    return messages, sorted(original)[:3], same


def test_loading_fails_loudly_and_reads_original_keys():
    (messages, original_keys, same), = run_distributed(1, _loader_errors_worker)
    assert "missing (1): blocks.1.attn1.to_k.weight" in messages["keys"]
    assert "unexpected (1): blocks.7.attn1.to_q.weight" in messages["keys"]
    assert "head.proj.weight: source gives (3, 24), model has (16, 24)" in messages["shape"]
    assert original_keys == ["blocks.0.cross_attn.k.bias", "blocks.0.cross_attn.k.weight", "blocks.0.cross_attn.norm_k.weight"]
    assert same


CP_LAYOUTS = {
    2: [dict(cp=2, algo="ulysses_cp_algo"), dict(cp=2, algo="megatron_cp_algo"),
        dict(cp=2, algo="megatron_cp_algo", overlap=True)],
    4: [dict(cp=4, algo="hybrid_cp_algo", u=2, overlap=True), dict(cp=4, algo="megatron_cp_algo", w=2),
        dict(tp=2, cp=2, algo="ulysses_cp_algo", sp=True), dict(tp=2, cp=2, algo="megatron_cp_algo")],
}


def _cp_dit_worker(rank, world, layouts):
    from megatron.core import parallel_state as mpu

    from mm.models.predictor.wan import load_hf_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    kwargs = dict(tiny_kwargs(image=True), num_heads=4, hidden_size=48)
    source = {k: v.double() for k, v in diffusers_model(kwargs).state_dict().items()}
    results = []
    for layout in layouts:
        tp, cp, sp = layout.get("tp", 1), layout.get("cp", 1), layout.get("sp", False)
        algo = layout.get("algo", "ulysses_cp_algo")
        u = cp if algo == "ulysses_cp_algo" else layout.get("u", 1)
        initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=tp, context_parallel=cp,
                                          ulysses_degree=u, cp_window_size=layout.get("w", 1)),
                            cp_algo=algo, cp_overlap=layout.get("overlap", False), seed=0)
        model = _build_mm(kwargs, tp=tp, sp=sp, dtype=torch.float64, context_parallel_size=cp)
        load_hf_weights(model, source, tp_size=tp, tp_rank=mpu.get_tensor_model_parallel_rank())
        x = {k: (v.double() if k != "timestep" else v).requires_grad_(k != "timestep")
             for k, v in inputs(kwargs, 3, 4, 6).items()}  # 18 tokens: padded for CP 4 and TP2 x CP2 + SP
        out = model(**x)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        (out * probe).sum().backward()
        # what DDP (over CP) and finalize_model_grads (over TP, sequence-parallel parameters) do
        cp_group, tp_group = mpu.get_context_parallel_group(), mpu.get_tensor_model_parallel_group()
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, group=cp_group)
            if sp and getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=tp_group)
        input_grads = {}
        for k, v in x.items():
            if v.grad is not None:
                torch.distributed.all_reduce(v.grad, group=cp_group)
                input_grads[k] = v.grad
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results.append((out.detach(), grads, input_grads, mpu.get_tensor_model_parallel_rank(),
                        mpu.get_context_parallel_rank()))
        destroy_parallel()
    return results


@pytest.mark.parametrize("world", sorted(CP_LAYOUTS))
def test_context_parallel_dit_matches_single_rank(world):
    from mm.models.predictor.wan import mm_to_hf

    ((ref_out, ref_grads, ref_inputs, _, _),), = run_distributed(1, _cp_dit_worker, [{}])
    full_ref = mm_to_hf([ref_grads])
    per_rank = run_distributed(world, _cp_dit_worker, CP_LAYOUTS[world])
    for i, layout in enumerate(CP_LAYOUTS[world]):
        results = [r[i] for r in per_rank]
        for out, _, input_grads, _, _ in results:
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=str(layout))
            for k in ref_inputs:
                torch.testing.assert_close(input_grads[k], ref_inputs[k], rtol=1e-9, atol=1e-10, msg=f"{layout} d{k}")
        tp = layout.get("tp", 1)
        shards = [next(r[1] for r in results if r[3] == t and r[4] == 0) for t in range(tp)]
        merged = mm_to_hf(shards)
        for name in full_ref:
            torch.testing.assert_close(merged[name], full_ref[name], rtol=1e-9, atol=1e-10, msg=f"{layout} {name}")


def test_selective_recompute_modules_of_a_wan_layer():
    from megatron.core.transformer import TransformerConfig

    from mm.models.predictor.wan.layers import selective_recompute_modules

    def config(**extra):
        return TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=2, **extra)

    assert selective_recompute_modules(config()) == set()
    assert selective_recompute_modules(config(recompute_granularity="selective")) == {"core_attn"}
    both = config(recompute_granularity="selective", recompute_modules=["mlp", "core_attn"])
    assert selective_recompute_modules(both) == {"core_attn", "mlp"}
    assert selective_recompute_modules(config(recompute_granularity="selective",
                                              recompute_modules=["layernorm", "mlp"])) == {"layernorm", "mlp"}
    with pytest.raises(ValueError, match="--recompute-modules moe: the Wan DiT recomputes core_attn, mlp, layernorm only"):
        selective_recompute_modules(config(recompute_granularity="selective", recompute_modules=["moe"]))
