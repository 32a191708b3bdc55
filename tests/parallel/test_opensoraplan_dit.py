"""The Open-Sora-Plan v1.3 DiT: golden outputs of the reference at 4b14d58 (fixtures), its
full-size parameter count, config errors, and TP (+SP), CP (Ulysses, ring, hybrid, double ring)
and pipeline stages against one process (fp64 on CPU, outputs and gradients)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from tests.dist_helper import run_distributed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "opensoraplan"

# parallel tests: 4 heads (TP2 x Ulysses 2), 4 layers (dense, dense, strided sparse, block sparse)
TINY = dict(num_layers=4, num_heads=4, head_dim=6, in_channels=4, out_channels=4, cross_attention_dim=24,
            caption_channels=16, sparse1d=True, sparse_n=4)
LATENT = (3, 6, 8)  # 36 tokens: padded by the sparse pattern (48), CP and SP (64)
TEXT_LEN = 7


def _config(params: dict, i2v: bool = False):
    from mm.families import predictor_config

    params = dict(params)
    return predictor_config("videoditsparsei2v" if i2v else "videoditsparse", params, params.pop("num_layers"),
                            params.pop("num_heads"))


def _megatron_config(osp, tp=1, sp=False, dtype=torch.float64, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=osp.num_layers, hidden_size=osp.hidden_size, num_attention_heads=osp.num_heads,
                             tensor_model_parallel_size=tp, sequence_parallel=sp, params_dtype=dtype,
                             use_cpu_initialization=True, **extra)


def _model(osp, tp=1, sp=False, dtype=torch.float64, **stage_and_extra):
    from mm.models.predictor.opensoraplan import OpenSoraPlanDiT

    stage = {k: stage_and_extra.pop(k) for k in ("pre_process", "post_process", "layer_offset", "num_layers")
             if k in stage_and_extra}
    return OpenSoraPlanDiT(osp, _megatron_config(osp, tp, sp, dtype, **stage_and_extra), **stage)


# ------------------------------------------------------------------------------ reference parity


def _golden_worker(rank, world):
    from safetensors.torch import load_file

    from mm.models.predictor.opensoraplan.weights import load_reference_weights, mindspeed_name
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    meta = json.loads((FIXTURES / "dit_golden.json").read_text())
    tiny = meta["tiny_config"]
    params = dict(num_layers=tiny["num_layers"], num_heads=tiny["num_attention_heads"],
                  head_dim=tiny["attention_head_dim"], in_channels=tiny["in_channels"],
                  out_channels=tiny["out_channels"], cross_attention_dim=tiny["cross_attention_dim"],
                  caption_channels=tiny["caption_channels"], sparse1d=tiny["sparse1d"], sparse_n=tiny["sparse_n"],
                  patch_size_thw=[tiny["patch_size_t"], tiny["patch_size"], tiny["patch_size"]],
                  norm_elementwise_affine=tiny["norm_elementwise_affine"], norm_eps=tiny["norm_eps"])
    weights = load_file(str(FIXTURES / "dit_weights.safetensors"))
    io = load_file(str(FIXTURES / "dit_io.safetensors"))
    errors = {}
    for case in meta["cases"]:
        i2v = case == "i2v"
        osp = _config(dict(params, vae_scale_factor_t=meta["vae_scale_factor_t"]) if i2v else params, i2v)
        source = weights if i2v else {k: v for k, v in weights.items() if not k.startswith("pos_embed_mask")}
        model = _model(osp, dtype=torch.float32).eval()
        load_reference_weights(model, source)
        inputs = {k.split(".", 1)[1]: v for k, v in io.items() if k.startswith(case + ".")}
        out = model(latents=inputs["hidden_states"], timestep=inputs["timestep"],
                    context=inputs["encoder_hidden_states"][:, 0], context_mask=inputs["encoder_attention_mask"][:, 0],
                    video_mask=inputs["attention_mask"])
        errors[case] = (out - inputs["output"]).abs().max().item()
        if case == "t2v":  # the same weights under MindSpeed-MM's names give the same model
            twin = _model(osp, dtype=torch.float32).eval()
            load_reference_weights(twin, {mindspeed_name(k): v for k, v in source.items()})
            twin_out = twin(latents=inputs["hidden_states"], timestep=inputs["timestep"],
                            context=inputs["encoder_hidden_states"][:, 0],
                            context_mask=inputs["encoder_attention_mask"][:, 0])
            errors["t2v_mindspeed_names"] = (twin_out - out).abs().max().item()
    destroy_parallel()
    return errors, sorted(meta["cases"])


def test_matches_reference_golden_outputs():
    (errors, cases), = run_distributed(1, _golden_worker)
    assert cases == ["i2v", "t2v", "t2v_video_mask"]
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_sparse_fold_matches_the_reference_grouping():
    from mm.models.predictor.opensoraplan.layers import group_valid_counts, sparse_fold, sparse_unfold

    n, s, b = 4, 48, 2
    x = torch.arange(s)[:, None].repeat(1, b) * 10 + torch.arange(b)  # token index * 10 + batch
    strided = sparse_fold(x, n, block=False)  # reference: '(g k) b -> g (k b)'
    assert strided[:, 1 * b + 0].tolist() == [i * 10 for i in range(1, s, n)]  # group 1: tokens 1, 5, 9, ...
    block = sparse_fold(x, n, block=True)  # reference: '(n m k) b -> (n k) (m b)'
    assert block[:8, 2 * b + 1].tolist() == [t * 10 + 1 for t in (8, 9, 10, 11, 24, 25, 26, 27)]
    for blk in (False, True):
        assert torch.equal(sparse_unfold(sparse_fold(x, n, blk), n, blk), x)
    # 36 real tokens of 48: strided group g holds ceil((36 - g) / 4); block group g holds tokens with (i // 4) % 4 == g
    assert group_valid_counts(36, 48, n, block=False) == (9, 9, 9, 9)
    assert group_valid_counts(37, 48, n, block=False) == (10, 9, 9, 9)
    assert group_valid_counts(36, 48, n, block=True) == (12, 8, 8, 8)
    # the arithmetic agrees with counting the folded token indices, for every real length
    for groups, runs, blk in ((2, 3, False), (3, 2, True), (4, 3, True), (4, 2, False)):
        padded = runs * groups * groups
        index = sparse_fold(torch.arange(padded)[:, None], groups, blk)
        for valid in range(padded + 1):
            assert group_valid_counts(valid, padded, groups, blk) == tuple((index < valid).sum(dim=0).tolist())


# ------------------------------------------------------------------------------ configs


def _count_worker(rank, world, params_by_id):
    from mm.families import build_predictor
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1))
    counts = {}
    for model_id, params in params_by_id.items():
        osp = _config(params, i2v=model_id.endswith("i2v"))
        config = _megatron_config(osp, dtype=torch.bfloat16, perform_initialization=False)
        with torch.device("meta"):
            model = build_predictor(model_id, osp, config)
        counts[model_id] = sum(p.numel() for p in model.parameters())
    destroy_parallel()
    return counts


# the predictor section of MindSpeed-MM's examples/opensoraplan1.3/{t2v,i2v}/pretrain_*_model.json
FULL_T2V = {"num_layers": 32, "num_heads": 24, "head_dim": 96, "in_channels": 8, "out_channels": 8, "dropout": 0.0,
            "cross_attention_dim": 2304, "attention_q_bias": True, "attention_k_bias": True, "attention_v_bias": True,
            "fa_layout": "sbh", "patch_size_thw": [1, 2, 2], "activation_fn": "gelu-approximate",
            "norm_elementwise_affine": False, "norm_eps": 1e-06, "caption_channels": 4096,
            "interpolation_scale": [1.0, 1.0, 1.0], "sparse1d": True, "sparse_n": 4}


def test_full_size_has_the_reference_parameter_count():
    reference = json.loads((FIXTURES / "dit_golden.json").read_text())["full_size_parameter_count"]
    (counts,), = [run_distributed(1, _count_worker, {"videoditsparse": FULL_T2V, "videoditsparsei2v": FULL_T2V})]
    assert counts == {"videoditsparse": reference["t2v"], "videoditsparsei2v": reference["i2v"]}


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=64), "predictor.head_dim = 64: 3-D RoPE needs a multiple of 6"),
    (dict(cross_attention_dim=2048), "predictor.cross_attention_dim = 2048; must equal num_heads x head_dim = 2304"),
    (dict(patch_size_thw=[2, 2, 2]), "predictor.patch_size_thw = [2, 2, 2]"),
    (dict(activation_fn="geglu"), "predictor.activation_fn = 'geglu'; valid: ['gelu-approximate']"),
    (dict(sparse_n=0), "predictor.sparse_n = 0; expected a positive integer"),
    (dict(attention_k_bias=False), "attention_k_bias / attention_v_bias = [True, False, True]"),
    (dict(vae_scale_factor_t=4), "predictor keys ['vae_scale_factor_t'] are not videoditsparse parameters"),
    (dict(foo=1), "predictor keys ['foo'] are not videoditsparse parameters; valid:"),
    (dict(num_layers=None), "predictor.num_layers = None; expected an integer"),
    (dict(sparse1d="yes"), "predictor.sparse1d = 'yes'; expected true or false"),
    (dict(interpolation_scale=[1.0, 1.0]), "predictor.interpolation_scale = [1.0, 1.0]; expected three numbers"),
])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ValueError) as err:
        _config(dict(FULL_T2V, **change))
    assert message in str(err.value)


def test_model_id_is_checked():
    from mm.families import predictor_config

    with pytest.raises(ValueError, match="predictor.model_id = 'videodit'; valid: .*videoditsparse, videoditsparsei2v"):
        predictor_config("videodit", {}, 1, 1)


# ------------------------------------------------------------------------------ parallel twins


def _source_worker(rank, world, i2v):
    """A random full state dict in the reference's names (every tensor informative)."""
    from mm.models.predictor.opensoraplan.weights import mm_to_hf
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    osp = _config(dict(TINY, vae_scale_factor_t=4) if i2v else TINY, i2v)
    torch.manual_seed(3)
    state = mm_to_hf([_model(osp).state_dict()])
    g = torch.Generator().manual_seed(4)
    destroy_parallel()
    return {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


@functools.lru_cache(maxsize=None)
def _source(i2v: bool) -> dict:
    (state,) = run_distributed(1, _source_worker, i2v)
    return state


def _inputs(osp, video_mask: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    x = dict(latents=torch.randn(2, osp.input_channels, *LATENT, generator=g, dtype=torch.float64),
             timestep=torch.tensor([37.0, 912.0]),
             context=torch.randn(2, TEXT_LEN, osp.caption_channels, generator=g, dtype=torch.float64),
             context_mask=torch.tensor([[1.0] * TEXT_LEN, [1.0] * 4 + [0.0] * (TEXT_LEN - 4)]))
    if video_mask:
        x["video_mask"] = torch.ones(2, *LATENT)
        x["video_mask"][1, -1] = 0
    return x


def _run(model, x: dict):
    """Forward and backward with a fixed probe; the inputs that take gradients: latents, context."""
    x = {k: v.clone().requires_grad_(k in ("latents", "context")) for k, v in x.items()}
    out = model(**x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), x


def _parallel_worker(rank, world, layouts, i2v, video_mask, source):
    from megatron.core import parallel_state as mpu

    from mm.models.predictor.opensoraplan.weights import load_reference_weights
    from mm.models.predictor.name_table import global_name
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    osp = _config(dict(TINY, vae_scale_factor_t=4) if i2v else TINY, i2v)
    results = []
    for layout in layouts:
        tp, cp, sp = layout.get("tp", 1), layout.get("cp", 1), layout.get("sp", False)
        algo = layout.get("algo", "ulysses_cp_algo")
        u = cp if algo == "ulysses_cp_algo" else layout.get("u", 1)
        initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=tp, context_parallel=cp,
                                          ulysses_degree=u, cp_window_size=layout.get("w", 1)),
                            cp_algo=algo, cp_overlap=layout.get("overlap", False), seed=0)
        model = _model(osp, tp=tp, sp=sp, context_parallel_size=cp)
        load_reference_weights(model, source, tp_size=tp, tp_rank=mpu.get_tensor_model_parallel_rank())
        out, x = _run(model, _inputs(osp, video_mask))
        # what DDP (over CP) and finalize_model_grads (over TP, sequence-parallel parameters) do
        cp_group, tp_group = mpu.get_context_parallel_group(), mpu.get_tensor_model_parallel_group()
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad, group=cp_group)
            if sp and getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=tp_group)
        input_grads = {}
        for k in ("latents", "context"):
            torch.distributed.all_reduce(x[k].grad, group=cp_group)
            input_grads[k] = x[k].grad
        grads = {global_name(n, 0): p.grad.detach().clone() for n, p in model.named_parameters()}
        results.append((out, grads, input_grads, mpu.get_tensor_model_parallel_rank(), mpu.get_context_parallel_rank()))
        destroy_parallel()
    return results


def _check_against_one_process(world, layouts, i2v=False, video_mask=False):
    from mm.models.predictor.opensoraplan.weights import mm_to_hf

    source = _source(i2v)
    ((ref_out, ref_grads, ref_inputs, _, _),), = run_distributed(1, _parallel_worker, [{}], i2v, video_mask, source)
    full_ref = mm_to_hf([ref_grads])
    per_rank = run_distributed(world, _parallel_worker, layouts, i2v, video_mask, source)
    for i, layout in enumerate(layouts):
        results = [r[i] for r in per_rank]
        for out, _, input_grads, _, _ in results:
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=str(layout))
            for k in ref_inputs:
                torch.testing.assert_close(input_grads[k], ref_inputs[k], rtol=1e-9, atol=1e-10, msg=f"{layout} d{k}")
        tp = layout.get("tp", 1)
        merged = mm_to_hf([next(r[1] for r in results if r[3] == t and r[4] == 0) for t in range(tp)])
        assert set(merged) == set(full_ref)
        for name in full_ref:
            torch.testing.assert_close(merged[name], full_ref[name], rtol=1e-9, atol=1e-10, msg=f"{layout} {name}")


@pytest.mark.parametrize("variant", ["t2v", "i2v", "t2v_video_mask"])
def test_tensor_parallel_matches_single_rank(variant):
    _check_against_one_process(2, [dict(tp=2), dict(tp=2, sp=True)], i2v=variant == "i2v",
                               video_mask=variant == "t2v_video_mask")


CP_LAYOUTS = {
    2: [dict(cp=2, algo="ulysses_cp_algo"), dict(cp=2, algo="megatron_cp_algo"),
        dict(cp=2, algo="megatron_cp_algo", overlap=True)],
    4: [dict(cp=4, algo="hybrid_cp_algo", u=2, overlap=True), dict(cp=4, algo="megatron_cp_algo", w=2),
        dict(cp=4, algo="ulysses_cp_algo"), dict(tp=2, cp=2, algo="ulysses_cp_algo", sp=True),
        dict(tp=2, cp=2, algo="megatron_cp_algo")],
}


@pytest.mark.parametrize("world", sorted(CP_LAYOUTS))
def test_context_parallel_with_the_sparse_pattern_matches_single_rank(world):
    _check_against_one_process(world, CP_LAYOUTS[world])


def test_context_parallel_i2v_matches_single_rank():
    _check_against_one_process(2, [dict(cp=2, algo="megatron_cp_algo")], i2v=True)


def _video_mask_cp_worker(rank, world, source):
    from mm.models.predictor.opensoraplan.weights import load_reference_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, context_parallel=world, ulysses_degree=world),
                        cp_algo="ulysses_cp_algo", seed=0)
    osp = _config(TINY)
    model = _model(osp, context_parallel_size=world)
    load_reference_weights(model, source)
    try:
        model(**_inputs(osp, video_mask=True))
    except ValueError as e:
        return str(e)
    finally:
        destroy_parallel()
    return None


def test_padded_video_under_context_parallel_is_refused():
    messages = run_distributed(2, _video_mask_cp_worker, _source(False))
    assert all("a video_mask with padded latents needs --context-parallel-size 1 (got 2)" in m for m in messages)


# ------------------------------------------------------------------------------ pipeline stages


def _stages_worker(rank, world, pipeline_num_layers, vpp, i2v, source):
    """The model cut into pipeline chunks (pipeline.layer_layout / stage_span, as pretrain builds
    them) and run one chunk after the other through the stage messages, against the whole model.
    megatron-core's schedules moving the messages between processes are tested in
    test_megatron_on_cpu.py and by the functional training tests."""
    from mm.families import build_predictor
    from mm.models.predictor.opensoraplan.weights import load_reference_weights, mm_to_hf
    from mm.models.predictor.pipeline import layer_layout, stage_span
    from mm.models.predictor.name_table import global_name
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    model_id = "videoditsparsei2v" if i2v else "videoditsparse"
    osp = _config(dict(TINY, vae_scale_factor_t=4) if i2v else TINY, i2v)
    whole = _model(osp)
    load_reference_weights(whole, source)
    ref_out, ref_x = _run(whole, _inputs(osp))
    ref_grads = mm_to_hf([{n: p.grad for n, p in whole.named_parameters()}])

    pp = len(pipeline_num_layers[0]) if vpp else len(pipeline_num_layers)
    layout = layer_layout(osp.num_layers, pp, vpp, pipeline_num_layers)
    config = _megatron_config(osp, pipeline_dtype=torch.float64)
    chunks = []
    for chunk in range(len(layout)):  # global layer order: chunk 0 of every stage, then chunk 1 ...
        for stage in range(pp):
            offset, count = stage_span(layout, stage, chunk)
            part = build_predictor(model_id, osp, config, pre_process=stage == 0 and chunk == 0,
                                   post_process=stage == pp - 1 and chunk == len(layout) - 1,
                                   layer_offset=offset, num_layers=count)
            load_reference_weights(part, source)
            chunks.append(part)
    x = {k: v.clone().requires_grad_(k in ("latents", "context")) for k, v in _inputs(osp).items()}
    target = torch.randn(2, osp.out_dim, *LATENT, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    message = chunks[0](**x, carry=target)
    for part in chunks[1:]:
        part.set_input_tensor(message)
        message = part()
    out = message
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * probe).sum().backward()
    grads = {}
    for part in chunks:
        grads.update({global_name(n, part.layer_offset): p.grad for n, p in part.named_parameters()})
    merged = mm_to_hf([grads])
    offsets = [(part.layer_offset, len(part.blocks)) for part in chunks]
    destroy_parallel()
    return (out.detach(), ref_out, merged, ref_grads, {k: (x[k].grad, ref_x[k].grad) for k in ("latents", "context")},
            torch.equal(chunks[-1].carried, target), offsets)


@pytest.mark.parametrize("pipeline_num_layers, vpp, i2v", [([1, 3], None, False), ([[1, 1], [1, 1]], 2, True)],
                         ids=["pp2", "pp2_vpp2_i2v"])
def test_pipeline_stages_match_the_whole_model(pipeline_num_layers, vpp, i2v):
    (out, ref_out, grads, ref_grads, input_grads, carried, offsets), = run_distributed(
        1, _stages_worker, pipeline_num_layers, vpp, i2v, _source(i2v))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    for k, (g, ref) in input_grads.items():
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=k)
    assert carried
    assert offsets == ([(0, 1), (1, 3)] if vpp is None else [(0, 1), (1, 1), (2, 1), (3, 1)])


# ------------------------------------------------------------------------------ distributed checkpoints


def _save_worker(rank, world, path, source):
    import multiprocessing

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    from mm.models.predictor.opensoraplan.weights import load_reference_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    multiprocessing.current_process().daemon = False  # megatron's writer starts a manager process
    initialize_parallel(ParallelSizes(world_size=world, tensor_parallel=world), seed=0)
    osp = _config(dict(TINY, vae_scale_factor_t=4), i2v=True)
    model = _model(osp, tp=world)
    load_reference_weights(model, source, tp_size=world, tp_rank=mpu.get_tensor_model_parallel_rank())
    dist_checkpointing.save(model.sharded_state_dict(), path)
    destroy_parallel()


def _load_worker(rank, world, path):
    from megatron.core import dist_checkpointing

    from mm.families import build_predictor
    from mm.models.predictor.opensoraplan.weights import mm_to_hf
    from mm.models.predictor.name_table import global_name
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    osp = _config(dict(TINY, vae_scale_factor_t=4), i2v=True)
    state = {}
    for offset, count in ((0, 1), (1, 3)):  # the stages of pipeline_num_layers [1, 3]
        part = build_predictor("videoditsparsei2v", osp, _megatron_config(osp), pre_process=offset == 0,
                               post_process=offset + count == osp.num_layers, layer_offset=offset, num_layers=count)
        part.load_state_dict(dist_checkpointing.load(part.sharded_state_dict(), path))
        state.update({global_name(k, offset): v for k, v in part.state_dict().items()})
    destroy_parallel()
    return mm_to_hf([state])


def test_distributed_checkpoint_reshards_tp2_to_pipeline_stages(tmp_path):
    source = _source(True)
    run_distributed(2, _save_worker, str(tmp_path), source)
    (loaded,), = [run_distributed(1, _load_worker, str(tmp_path))]
    assert set(loaded) == set(source)
    for name in source:
        assert torch.equal(loaded[name], source[name]), name


# ------------------------------------------------------------------------------ megatron-core's schedules

NUM_MICRO = 4  # interleaving needs a multiple of the pipeline size


def _micro_batches(osp):
    g = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(NUM_MICRO):
        x = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) if k in ("latents", "context") else v
             for k, v in _inputs(osp).items()}
        batches.append((x, torch.randn(2, osp.out_dim, *LATENT, generator=g, dtype=torch.float64)))
    return batches


def _schedule_worker(rank, world, pipeline_num_layers, vpp, source):
    """The predictor's pipeline chunks under megatron-core's 1F1B / interleaved schedule with the
    training loop's settings (variable_seq_lengths: the stage message's length varies); the target
    rides to the last stage in the message (``carry``)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm.families import build_predictor
    from mm.models.predictor.opensoraplan.weights import load_reference_weights, mm_to_hf
    from mm.models.predictor.pipeline import layer_layout, stage_span
    from mm.models.predictor.name_table import global_name
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=world, pipeline_parallel=world), virtual_pipeline_parallel=vpp, seed=0)
    osp = _config(TINY)
    config = _megatron_config(osp, pipeline_model_parallel_size=world, virtual_pipeline_model_parallel_size=vpp,
                              variable_seq_lengths=world > 1, overlap_p2p_comm=world > 1 and vpp is not None,
                              batch_p2p_comm=not (world > 1 and vpp is not None), moe_token_dispatcher_type="alltoall",
                              pipeline_dtype=torch.float64)
    stage = mpu.get_pipeline_model_parallel_rank()
    layout = layer_layout(osp.num_layers, world, vpp, pipeline_num_layers)
    chunks = []
    for c in range(len(layout)):
        offset, count = stage_span(layout, stage, c)
        part = build_predictor("videoditsparse", osp, config, pre_process=stage == 0 and c == 0,
                               post_process=stage == world - 1 and c == len(layout) - 1, layer_offset=offset,
                               num_layers=count)
        load_reference_weights(part, source)
        chunks.append(part)
    batches = iter(_micro_batches(osp))

    def forward_step(data_iterator, chunk):
        if chunk.pre_process:
            x, target = next(batches)
            output = chunk(**x, carry=None if chunk.post_process else target)
        else:
            output, target = chunk(), None

        def loss_func(out):
            loss = ((out - (chunk.carried if target is None else target)) ** 2).mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[None] * len(chunks) if vpp else None,
        model=chunks if vpp else chunks[0], num_microbatches=NUM_MICRO, seq_length=1, micro_batch_size=2,
        forward_only=False)
    grads = {}
    for part in chunks:
        grads.update({global_name(n, part.layer_offset): p.grad for n, p in part.named_parameters()})
    destroy_parallel()
    return mm_to_hf([grads]), [entry["loss"] for entry in losses]


@pytest.mark.parametrize("pipeline_num_layers, vpp", [([1, 3], None), ([[1, 1], [1, 1]], 2)], ids=["pp2", "pp2_vpp2"])
def test_pipeline_schedule_matches_single_process(pipeline_num_layers, vpp):
    source = _source(False)
    (ref_grads, ref_losses), = run_distributed(1, _schedule_worker, None, None, source)
    results = run_distributed(2, _schedule_worker, pipeline_num_layers, vpp, source)
    grads = {**results[0][0], **results[1][0]}
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(torch.stack(results[1][1]), torch.stack(ref_losses), rtol=1e-12, atol=0)


def _recompute_worker(rank, world, source):
    from mm.models.predictor.opensoraplan.weights import load_reference_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    osp = _config(TINY)
    layernorm = dict(recompute_granularity="selective", recompute_modules=["layernorm"])
    settings = {"none": {}, "full_uniform": dict(recompute_granularity="full", recompute_method="uniform",
                                                 recompute_num_layers=3),
                "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
                "selective": dict(recompute_granularity="selective"),
                # --compile-dit-blocks (dynamo + AOT autograd, without inductor on the CPU), alone and with
                # recompute; with a video mask the layers take the masked self-attention kernel
                "compiled": {}, "compiled_layernorm": layernorm,
                "compiled_full_block": dict(recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=2),
                # the first layer recomputed whole, the others with op-level recompute
                "compiled_block_layernorm": dict(recompute_granularity="full", recompute_method="block",
                                                 recompute_num_layers=1, recompute_modules=["layernorm", "mlp"]),
                "none_video_mask": {}, "compiled_video_mask": {}, "compiled_layernorm_video_mask": layernorm}
    results = {}
    for name, extra in settings.items():
        model = _model(osp, **extra).train()
        load_reference_weights(model, source)
        if name.startswith("compiled"):
            model.compile_blocks(backend="aot_eager")
        if name == "compiled_block_layernorm":
            assert [b.recompute for b in model.blocks] == [set()] + [{"layernorm", "mlp"}] * (len(model.blocks) - 1)
        out, x = _run(model, _inputs(osp, video_mask=name.endswith("video_mask")))
        results[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()}, x["context"].grad)
    destroy_parallel()
    return results


def test_activation_recompute_and_compiled_layers_give_the_same_gradients():
    (results,), = [run_distributed(1, _recompute_worker, _source(False))]
    for name, (out, grads, context) in results.items():
        ref_out, ref_grads, ref_context = results["none_video_mask" if name.endswith("video_mask") else "none"]
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(context, ref_context, rtol=1e-10, atol=1e-12, msg=name)
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")


def _selective_recompute_worker(rank, world, source):
    from mm.models.predictor.opensoraplan import layers
    from mm.models.predictor.opensoraplan.weights import load_reference_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    masked_attention, key = layers._masked_attention, None

    def counted_masked_attention(*args):  # the cross-attention and video-mask kernel, counted
        calls[key]["core_attn"] += 1
        return masked_attention(*args)

    layers._masked_attention = counted_masked_attention
    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    osp = _config(TINY)
    settings = {"none": {}, "selective": dict(recompute_granularity="selective"),
                "selective_mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
                "selective_both": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
                "selective_layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                "selective_layernorm_mlp": dict(recompute_granularity="selective",
                                                recompute_modules=["layernorm", "mlp"])}
    results, calls = {}, {}
    for video_mask in (False, True):  # the video mask takes the masked self-attention kernel
        for name, extra in settings.items():
            key = f"{name}{'_video_mask' if video_mask else ''}"
            model = _model(osp, **extra).train()
            load_reference_weights(model, source)
            # how often the attention kernels and the FFN input projections run in one step: twice
            # for what is recomputed
            calls[key] = {"core_attn": 0, "mlp": 0}
            for block in model.blocks:
                for module, part in ((block.self_attention.core_attention, "core_attn"),
                                     (block.mlp.linear_fc1, "mlp")):
                    module.register_forward_hook(lambda *_, key=key, part=part: calls[key].__setitem__(
                        part, calls[key][part] + 1))
            out, x = _run(model, _inputs(osp, video_mask=video_mask))
            results[key] = (out, {n: p.grad.clone() for n, p in model.named_parameters()}, x["context"].grad,
                            x["latents"].grad)
    try:
        _model(osp, recompute_granularity="selective", recompute_modules=["moe"])
        refusal = None
    except ValueError as e:
        refusal = str(e)
    destroy_parallel()
    return results, calls, refusal


def test_selective_recompute_modules_give_the_same_gradients_and_recompute():
    ((results, calls, refusal),) = run_distributed(1, _selective_recompute_worker, _source(False))
    for suffix in ("", "_video_mask"):
        base = calls["none" + suffix]
        attn, mlp = base["core_attn"], base["mlp"]
        assert mlp == TINY["num_layers"] and attn >= 2 * TINY["num_layers"], base  # self- and cross-attention
        assert calls["selective" + suffix] == {"core_attn": 2 * attn, "mlp": mlp}, suffix
        assert calls["selective_mlp" + suffix] == {"core_attn": attn, "mlp": 2 * mlp}, suffix
        assert calls["selective_both" + suffix] == {"core_attn": 2 * attn, "mlp": 2 * mlp}, suffix
        ref_out, ref_grads, ref_context, ref_latents = results["none" + suffix]
        # op-level recompute reruns the modules (hooks fire again) but answers their matmuls and
        # attention kernels from its cache; its numerics are the point here (the Wan test counts FLOPs)
        for name in ("selective", "selective_mlp", "selective_both", "selective_layernorm",
                     "selective_layernorm_mlp"):
            out, grads, context, latents = results[name + suffix]
            torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12, msg=name + suffix)
            torch.testing.assert_close(context, ref_context, rtol=1e-10, atol=1e-12, msg=name + suffix)
            torch.testing.assert_close(latents, ref_latents, rtol=1e-10, atol=1e-12, msg=name + suffix)
            for key in ref_grads:
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-10, atol=1e-12,
                                           msg=f"{name}{suffix}: {key}")
    assert refusal == "--recompute-modules moe: the Open-Sora-Plan DiT recomputes core_attn, mlp, layernorm only"
