"""The Step-Video-T2V DiT against the reference's golden fixtures (tests/fixtures/stepvideo, made by
make_dit_fixtures.py from stepfun-ai/Step-Video-T2V + xDiT): outputs and gradients of every input
and weight, loaded from the release's weight names; the reference's bf16 RoPE; the predictor config
(MindSpeed-MM's JSON keys, unknown keys, bad values) and head-count divisibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.stepvideo_helpers import gradient_record, inputs, predictor_params, release_weights

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stepvideo"


def _meta() -> dict:
    return json.loads((FIXTURES / "dit_golden.json").read_text())


def _megatron_config(arch, dtype, **extra):
    from megatron.core.transformer import TransformerConfig

    heads = extra.get("tensor_model_parallel_size", arch.num_heads)  # megatron's check: heads % TP
    return TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=heads,
                             params_dtype=dtype, use_cpu_initialization=True, **extra)


def _golden_worker(rank, world, dtype):
    from safetensors.torch import load_file

    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT
    from mm.families.stepvideo.weights import load_weights, mm_to_hf
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    meta = _meta()
    golden = load_file(str(FIXTURES / "dit_golden.safetensors"))
    errors = {}
    for case, reference in meta["cases"].items():
        arch = StepVideoDiTConfig.from_json(predictor_params(reference))
        model = StepVideoDiT(arch, _megatron_config(arch, dtype))
        load_weights(model, release_weights(meta["weight_shapes"][case], meta["weight_seed"]))
        x = inputs(case)
        for k, v in x.items():  # the fixture's inputs are the helper's (fp64)
            if v is not None:
                assert torch.equal(v, golden[f"{case}.input.{k}" if k != "probe" else f"{case}.probe"]), (case, k)
        probe = x.pop("probe")
        leaves = {k: v.clone().to(dtype if k != "timestep" else v.dtype).requires_grad_()
                  for k, v in x.items() if v is not None and k != "llm_mask"}
        out = model(leaves["latents"], leaves["timestep"], leaves["llm_context"], x["llm_mask"],
                    leaves.get("clip_context"))
        (out * probe.to(dtype)).sum().backward()
        ref = golden[f"{case}.output"]
        errors[(case, "output")] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        for k, v in leaves.items():
            ref = golden[f"{case}.grad.{k}"]
            errors[(case, f"d{k}")] = ((v.grad.double() - ref).abs().max() / ref.abs().max()).item()
        grads = mm_to_hf([{n: p.grad for n, p in model.named_parameters()}])
        stored = {k.split(".weight_grad.", 1)[1] for k in golden if k.startswith(f"{case}.weight_grad.")}
        assert set(grads) == stored, set(grads) ^ stored
        for name, grad in grads.items():
            ref, got = golden[f"{case}.weight_grad.{name}"], gradient_record(name, grad)
            scale = ref[-1] if ref.shape != grad.shape else ref.abs().max()  # a sketch ends with the norm
            errors[(case, name)] = ((got - ref).abs().max() / scale).item()
    destroy_parallel()
    return errors


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_matches_reference_outputs_and_gradients(dtype, tol):
    (errors,) = run_distributed(1, _golden_worker, dtype)
    assert len(errors) > 50
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (worst, errors[worst])


def test_rope_matches_the_reference_bf16_angles():
    """The reference casts the RoPE angles to the activation dtype before cos/sin: in bf16 a frame
    angle of 35 rad is off by up to 0.125. mm's tables do the same, bit for bit."""
    from safetensors.torch import load_file

    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.layers import apply_rope, rope_tables

    golden = load_file(str(FIXTURES / "dit_golden.safetensors"))
    f, h, w = _meta()["rope_grid"]
    arch = StepVideoDiTConfig(num_layers=1, num_heads=1)
    tokens = golden["rope.tokens"].transpose(0, 1)  # [s, b, n, d]
    ref = golden["rope.output"].transpose(0, 1)
    got = apply_rope(tokens, *rope_tables(arch, f, h, w, torch.bfloat16, tokens.device), arch.channel_split)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref)
    fp32 = apply_rope(tokens.float(), *rope_tables(arch, f, h, w, torch.float32, tokens.device), arch.channel_split)
    assert (fp32 - ref.float()).abs().max() > 0.1  # the check can tell the two precisions apart


# ------------------------------------------------------------------------------ configs

# the predictor sections of MindSpeed-MM's examples/stepvideo/t2v/{pretrain,inference}_t2v_model.json
MINDSPEED_PRETRAIN = {"num_layers": 24, "num_heads": 48, "head_dim": 128, "channel_split": [64, 32, 32],
                      "in_channels": 64, "out_channels": 64, "patch_size": 1, "patch_size_thw": [1, 1, 1],
                      "norm_elementwise_affine": False, "norm_eps": 1e-06, "attention_norm_type": "rmsnorm",
                      "attention_norm_elementwise_affine": True, "attention_norm_eps": 1e-06, "fa_layout": "bsnd",
                      "use_additional_conditions": False, "caption_channels": [6144, 1024]}
MINDSPEED_INFERENCE = {"num_layers": 48, "num_heads": 48, "head_dim": 128, "channel_split": [64, 32, 32],
                       "in_channels": 64, "out_channels": 64, "dropout": 0.0, "patch_size": 1,
                       "patch_size_thw": [1, 1, 1], "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
                       "norm_eps": 1e-06, "use_additional_conditions": False, "caption_channels": [6144, 1024]}


def test_mindspeed_json_keys_and_the_released_size():
    from mm.families.stepvideo.config import StepVideoDiTConfig

    for params in (MINDSPEED_PRETRAIN, MINDSPEED_INFERENCE):
        arch = StepVideoDiTConfig.from_json(params)
        assert arch.hidden_size == 6144 and arch.patch_size == (1, 1, 1) and arch.out_dim == 64
        assert (arch.llm_channels, arch.clip_channels) == (6144, 1024)
    assert _released_parameter_count() == _meta()["full_size_parameter_count"] == 29_342_478_400


def _count_worker(rank, world):
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1))
    arch = StepVideoDiTConfig.from_json(MINDSPEED_INFERENCE)
    with torch.device("meta"):
        model = StepVideoDiT(arch, _megatron_config(arch, torch.bfloat16, perform_initialization=False))
    destroy_parallel()
    return sum(p.numel() for p in model.parameters())


def _released_parameter_count() -> int:
    (count,) = run_distributed(1, _count_worker)
    return count


@pytest.mark.parametrize("params,message", [
    (dict(num_layers=2, num_heads=2, hidden_size=256),
     "predictor keys ['hidden_size'] are not stepvideodit parameters"),
    (dict(num_heads=2), "predictor.num_layers is required"),
    (dict(num_layers=2, num_heads=2, channel_split=[64, 32, 30]), "predictor.channel_split = [64, 32, 30]"),
    (dict(num_layers=2, num_heads=2, head_dim=96), "summing to predictor.head_dim = 96"),
    (dict(num_layers=2, num_heads=2, patch_size=2, patch_size_thw=[1, 1, 1]), "disagree"),
    (dict(num_layers=2, num_heads=2, patch_size_thw=[2, 1, 1]), "predictor.patch_size_thw = [2, 1, 1]"),
    (dict(num_layers=2, num_heads=2, use_additional_conditions=True), "predictor.use_additional_conditions = True"),
    (dict(num_layers=2, num_heads=2, attention_norm_type="layernorm"), "predictor.attention_norm_type = 'layernorm'"),
    (dict(num_layers=2, num_heads=2, caption_channels="6144"), "predictor.caption_channels = '6144'; expected"),
    (dict(num_layers=2, num_heads=2, dropout=0.1), "predictor.dropout = 0.1"),
    (dict(num_layers=2, num_heads=2, fa_layout="tnd"), "predictor.fa_layout = 'tnd'"),
])
def test_config_errors_name_the_key(params, message):
    from mm.families.stepvideo.config import StepVideoDiTConfig

    with pytest.raises(ValueError) as e:
        StepVideoDiTConfig.from_json(params)
    assert message in str(e.value)


def test_head_count_must_split_over_tensor_parallel_ranks():
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT

    arch = StepVideoDiTConfig.from_json(dict(num_layers=1, num_heads=6, head_dim=8, channel_split=[4, 2, 2]))
    with pytest.raises(ValueError, match=r"predictor.num_heads = 6 is not divisible by --tensor-model-parallel-size 4"):
        # (megatron's own TransformerConfig check needs its head count to split: give it 4)
        config = _megatron_config(arch, torch.float32, tensor_model_parallel_size=4)
        StepVideoDiT(arch, config)


def _loader_errors_worker(rank, world):
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT
    from mm.families.stepvideo.weights import WeightMappingError, load_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    meta = _meta()
    params = predictor_params(meta["cases"]["t2v"])
    arch = StepVideoDiTConfig.from_json(params)
    source = release_weights(meta["weight_shapes"]["t2v"], dtype=torch.float32)
    messages = {}
    broken = dict(source)
    del broken["transformer_blocks.1.attn2.wkv.weight"]
    broken["transformer_blocks.5.attn1.wqkv.weight"] = torch.zeros(1)
    mindspeed = {k.replace("attn1.wqkv", "attn1.proj_qkv"): v for k, v in source.items()}
    for name, sd in {"keys": broken, "shape": dict(source, **{"proj_out.weight": torch.zeros(3, 256)}),
                     "mindspeed": mindspeed}.items():
        try:
            load_weights(StepVideoDiT(arch, _megatron_config(arch, torch.float32)), sd)
        except WeightMappingError as e:
            messages[name] = str(e)
    destroy_parallel()
    return messages


def test_loading_fails_loudly():
    (messages,) = run_distributed(1, _loader_errors_worker)
    assert "missing (1): transformer_blocks.1.attn2.wkv.weight" in messages["keys"]
    assert "unexpected (1): transformer_blocks.5.attn1.wqkv.weight" in messages["keys"]
    assert "proj_out.weight: source gives (3, 256), model has (8, 256)" in messages["shape"]
    assert "MindSpeed-MM's converted names" in messages["mindspeed"]


# ------------------------------------------------------------------------------ FLOPs

FLOPS_PARAMS = dict(num_layers=3, num_heads=6, head_dim=8, channel_split=[4, 2, 2], in_channels=4, out_channels=4,
                    caption_channels=[16, 12], patch_size=2)
FLOPS_GRID, FLOPS_BATCH, LLM_LEN, CLIP_LEN = (3, 4, 6), 2, 7, 5


def _measure_flops(rank, world, recompute):
    """Forward and backward FLOPs as torch counts them, with the math attention kernel (two bmm
    calls torch counts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    arch = StepVideoDiTConfig.from_json(FLOPS_PARAMS)
    extra = {"full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             "block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
             "selective": dict(recompute_granularity="selective"), None: {}}[recompute]
    model = StepVideoDiT(arch, _megatron_config(arch, torch.float32, **extra)).train()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(FLOPS_BATCH, LLM_LEN + 2)
    mask[0, LLM_LEN:] = 0  # the longest prompt has LLM_LEN tokens: the context keeps LLM_LEN
    mask[1, 3:] = 0
    args = (torch.randn(FLOPS_BATCH, 4, *FLOPS_GRID, generator=g), torch.tensor([0.3, 0.7]),
            torch.randn(FLOPS_BATCH, LLM_LEN + 2, 16, generator=g), mask,
            torch.randn(FLOPS_BATCH, CLIP_LEN, 12, generator=g))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            out = model(*args)
        with FlopCounterMode(display=False) as backward:
            out.square().mean().backward()
    destroy_parallel()
    return forward.get_total_flops(), backward.get_total_flops()


def _unneeded(parts: dict, arch) -> int:
    """Backward products nobody needs: the data gradients of the first products on untrained inputs
    (latents, the sinusoidal timestep embedding, the Step-LLM and CLIP states)."""
    h = arch.hidden_size
    return (parts["patch_embedding"] + 2 * FLOPS_BATCH * 256 * h + 2 * FLOPS_BATCH * LLM_LEN * 16 * h
            + 2 * FLOPS_BATCH * CLIP_LEN * 12 * h)


def test_flops_equal_flop_counter():
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.flops import stepvideo_forward_flops, stepvideo_training_flops

    ((fwd, bwd),) = run_distributed(1, _measure_flops, None)
    arch = StepVideoDiTConfig.from_json(FLOPS_PARAMS)
    parts = stepvideo_forward_flops(arch, *FLOPS_GRID, LLM_LEN, CLIP_LEN, FLOPS_BATCH)
    assert sum(parts.values()) == fwd
    s, h = FLOPS_GRID[0] * FLOPS_GRID[1] * FLOPS_GRID[2] // 4, arch.hidden_size
    assert parts["self_attention_core"] == arch.num_layers * 2 * 2 * FLOPS_BATCH * s * s * h
    assert 2 * fwd - _unneeded(parts, arch) == bwd
    assert stepvideo_training_flops(arch, *FLOPS_GRID, LLM_LEN, CLIP_LEN, FLOPS_BATCH) == 3 * fwd


@pytest.mark.parametrize("recompute", ["full", "block", "selective"])
def test_flops_of_recompute(recompute):
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.flops import stepvideo_forward_flops, stepvideo_training_flops

    ((fwd, bwd),) = run_distributed(1, _measure_flops, recompute)
    arch = StepVideoDiTConfig.from_json(FLOPS_PARAMS)
    parts = stepvideo_forward_flops(arch, *FLOPS_GRID, LLM_LEN, CLIP_LEN, FLOPS_BATCH)
    layers = {"full": None, "block": 2, "selective": None}[recompute]
    expected = stepvideo_training_flops(arch, *FLOPS_GRID, LLM_LEN, CLIP_LEN, FLOPS_BATCH,
                                        recompute="full" if recompute == "block" else recompute,
                                        recompute_layers=layers)
    assert fwd + bwd + _unneeded(parts, arch) == expected > 3 * fwd


def test_flops_errors_and_the_released_model():
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.flops import stepvideo_forward_flops, stepvideo_training_flops

    arch = StepVideoDiTConfig.from_json(MINDSPEED_INFERENCE)
    parts = stepvideo_forward_flops(arch, 36, 34, 62, 320, 77)  # 204 x 544 x 992 frames
    s, h = 36 * 34 * 62, 6144
    assert parts["self_attention_core"] == 48 * 4 * s * s * h
    # per layer and token: q/k/v/o 8h^2, cross q/o 4h^2, FFN 16h^2 (x2 for multiply-add)
    assert parts["self_attention_linear"] + parts["ffn"] == 48 * 2 * s * (4 + 8) * h * h
    assert stepvideo_training_flops(arch, 36, 34, 62, 320) == 3 * sum(parts.values())
    with pytest.raises(ValueError, match="reads CLIP tokens"):
        stepvideo_forward_flops(arch, 36, 34, 62, 320, 0)
    with pytest.raises(ValueError, match="recompute = 'ful'"):
        stepvideo_training_flops(arch, 36, 34, 62, 320, recompute="ful")
    with pytest.raises(ValueError, match="recompute_layers = 49"):
        stepvideo_training_flops(arch, 36, 34, 62, 320, recompute="full", recompute_layers=49)


# ------------------------------------------------------------------------------ the name table


def _state_keys_worker(rank, world, params):
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT
    from mm.models.predictor.name_table import is_weight_key
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1))
    arch = StepVideoDiTConfig.from_json(params)
    with torch.device("meta"):
        model = StepVideoDiT(arch, _megatron_config(arch, torch.float32, perform_initialization=False))
    destroy_parallel()
    return sorted(filter(is_weight_key, model.state_dict()))


@pytest.mark.parametrize("case", ["t2v", "patch2_llm_only"])
def test_name_table_covers_the_model_and_the_release_config(case):
    from mm.families.stepvideo.weights import (
        STEPVIDEO_WEIGHTS,
        read_stepvideo_arch,
        stepvideo_expected_keys,
        stepvideo_release_config,
    )

    reference = _meta()["cases"][case]
    params = predictor_params(reference)
    (keys,) = run_distributed(1, _state_keys_worker, params)
    assert sorted(stepvideo_expected_keys(params)) == keys
    release = STEPVIDEO_WEIGHTS.mm_to_hf([{k: torch.zeros(1) for k in keys}])
    assert set(release) == set(_meta()["weight_shapes"][case])  # the reference's state dict, key for key
    config = stepvideo_release_config(params)
    assert {k: config[k] for k in reference if k != "attention_type"} == \
        {k: v for k, v in reference.items() if k != "attention_type"}
    shapes = _meta()["weight_shapes"][case]
    arch = read_stepvideo_arch(config, "release", lambda name: shapes.get(name), "config.json")
    assert {k: arch[k] for k in params} == params
