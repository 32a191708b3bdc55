"""LoRA on one process: the adapter file mm-convert writes is read by diffusers' Wan LoRA loader (peft
behind it), whose transformer then gives the output of mm's adapted DiT, of mm's merged export and of
inference.lora's adapters (from that file or from the adapter checkpoint);
the --lora-* flags refuse what they cannot do before anything starts."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.wan_helpers import diffusers_inputs, diffusers_model, inputs, megatron_config, tiny_kwargs

# the image branch's k and v both: diffusers' Wan loader takes a file without add_k_proj and add_v_proj for a T2V
# LoRA and sets both to zero on an image model
TARGETS = ["proj_q", "proj_k", "proj_v", "proj_out", "ffn.0", "ffn.2", "add_k_proj", "add_v_proj"]


def _export_worker(rank, world, root):
    """mm's image-branch Wan DiT with adapters (B random: the adapted model differs from the base), its base
    and adapter checkpoints, and its outputs with the adapters unmerged."""
    from types import SimpleNamespace

    from mm.families import family_for
    from mm.models.predictor.lora import add_adapters, is_adapter_key, is_base_key
    from mm.models.predictor.wan import WanDiT, WanDiTConfig, load_hf_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from mm.training.checkpointing import save_checkpoint

    multiprocessing.current_process().daemon = False
    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs(image=True)
    model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs))
    load_hf_weights(model, diffusers_model(kwargs).state_dict())
    family = family_for("wan_dit")
    settings = family.lora_settings(SimpleNamespace(lora_r=3, lora_alpha=6.0, lora_dropout=0.0,
                                                    lora_target_modules=TARGETS))
    add_adapters(model, settings, 5, family.lora_part_counts())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    predictor = dataclasses.asdict(model.arch)
    save_checkpoint(f"{root}/base", 1, [model], None, None, 0, save_optim=False, save_rng=False, predictor=predictor,
                    keep=is_base_key)
    save_checkpoint(f"{root}/adapter", 1, [model], None, None, 0, save_optim=False, save_rng=False,
                    predictor=predictor, keep=is_adapter_key, lora=settings.to_dict())
    with torch.no_grad():
        out = model(**inputs(kwargs, 3, 4, 6))
    destroy_parallel()
    return out, settings.to_dict()


def _merged_worker(rank, world, root):
    """mm's DiT from the merged export (diffusers layout), and the base with the adapters applied as
    inference.lora applies them: from the PEFT file and from the adapter checkpoint."""
    from safetensors.torch import load_file

    from mm.ckpt import load_model
    from mm.families import family_for
    from mm.inference.adapters import apply_adapter
    from mm.models.predictor.wan import WanDiT, WanDiTConfig, load_hf_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs(image=True)
    outputs = {}
    for name in ("merged", "peft", "adapter"):
        model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs)).eval()
        if name == "merged":
            load_hf_weights(model, load_file(f"{root}/merged/diffusion_pytorch_model.safetensors"))
        else:
            load_model(f"{root}/base", [model])
            apply_adapter(model, family_for("wan_dit"), f"{root}/{name}", 1.0, 1, 0)
        with torch.no_grad():
            outputs[name] = model(**inputs(kwargs, 3, 4, 6))
    destroy_parallel()
    return outputs


def test_diffusers_reads_the_exported_adapter_and_matches_mm(tmp_path):
    pytest.importorskip("peft", reason="diffusers loads LoRA adapters through peft (requirements/test.txt)")
    from diffusers import WanPipeline

    from checkpoint.cli import main as mm_convert

    (adapted, lora), = run_distributed(1, _export_worker, str(tmp_path))
    assert lora["targets"]["cross_attention.linear_kv_img"] == [0, 1]
    convert = ["WanConverter", "--version", "wan2.1"]
    mm_convert([*convert, "lora_to_hf", "--cfg.source_path", str(tmp_path / "adapter"),
                "--cfg.target_path", str(tmp_path / "peft")])
    mm_convert([*convert, "mm_to_hf", "--cfg.source_path", str(tmp_path / "base"), "--cfg.lora_path",
                str(tmp_path / "adapter"), "--cfg.target_path", str(tmp_path / "merged")])
    mm_outputs, = run_distributed(1, _merged_worker, str(tmp_path))

    kwargs = tiny_kwargs(image=True)
    transformer = diffusers_model(kwargs).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)
    pipe.load_lora_weights(str(tmp_path / "peft"))  # pytorch_lora_weights.safetensors, its metadata
    config = transformer.peft_config["default_0"]
    assert config.r == 3 and config.lora_alpha == 6.0
    with torch.no_grad():
        theirs = transformer(**diffusers_inputs(kwargs, inputs(kwargs, 3, 4, 6)), return_dict=False)[0]
        pipe.disable_lora()
        base = transformer(**diffusers_inputs(kwargs, inputs(kwargs, 3, 4, 6)), return_dict=False)[0]
    assert (theirs - base).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(theirs, adapted, rtol=1e-5, atol=1e-5)
    for name, out in mm_outputs.items():  # the merged export; inference.lora of either file
        torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5, msg=name)
    # the merged export's config is the base's: diffusers loads it as it is
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["num_layers"] == kwargs["num_layers"]


# ------------------------------------------------------------------------------------------ flags


def _problems(tmp_path, *flags, mode="train"):
    from mm.arguments import ConfigError, load_config

    model = tmp_path / "model.json"
    model.write_text(json.dumps({"predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 2,
                                               **{k: v for k, v in tiny_kwargs().items()
                                                  if k not in ("num_layers", "num_heads")}}}))
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"dataset_param": {"dataset_type": "t2v", "basic_parameters": {"data_path": "unused.txt"}}}))
    argv = ["--mm-model", str(model), "--train-iters", "1", "--lr", "1e-4", *flags]
    if mode == "train":
        argv += ["--mm-data", str(data)]
    try:
        config = load_config(argv, world_size=1, mode=mode)
    except ConfigError as e:
        return str(e)
    from mm.families import resolve

    family, arch = resolve(config.model.predictor)
    return "\n".join(family.problems(config, arch, weights=False))


def test_bad_lora_flags_are_refused_naming_flag_value_and_valid(tmp_path):
    out = _problems(tmp_path, "--lora-r", "0")
    assert "argument --lora-r: must be an integer >= 1, got 0" in out
    out = _problems(tmp_path, "--lora-r", "8", "--lora-target-modules", "proj_q", "to_qq")
    assert "--lora-target-modules to_qq: no linear of the wan DiT's layers has this name; valid:" in out
    assert "diffusers: attn1.to_q" in out and "MindSpeed-MM: self_attn.proj_q" in out
    out = _problems(tmp_path, "--lora-r", "8", "--lora-dropout", "0.1", "--recompute-granularity", "selective",
                    "--recompute-modules", "mlp")
    assert "--lora-dropout 0.1 with --recompute-modules mlp" in out
    out = _problems(tmp_path, "--lora-r", "8", "--lora-dropout", "1.5", "--lora-alpha", "-2")
    assert "--lora-dropout 1.5; valid: 0 <= dropout < 1" in out and "--lora-alpha -2.0; valid: a number > 0" in out
    missing = tmp_path / "no_adapters_here"
    out = _problems(tmp_path, "--lora-r", "8", "--lora-load", str(missing))
    assert f"--lora-load {missing}: no adapter checkpoint there" in out
    out = _problems(tmp_path, "--lora-alpha", "16", "--lora-target-modules", "ffn.0")
    assert "--lora-alpha needs --lora-r" in out and "--lora-target-modules needs --lora-r" in out
    out = _problems(tmp_path, "--lora-r", "8", "--ema-decay", "0.99")
    assert "--ema-decay 0.99 with --lora-r 8" in out
    out = _problems(tmp_path, "--lora-r", "8", mode="inference")
    assert "inference section" in out and '"lora"' in out
    # MindSpeed-MM's finetune_lora.sh targets resolve: q, k, v, out of both attentions and the FFN
    assert "lora" not in _problems(tmp_path, "--lora-r", "16", "--lora-target-modules", "ffn.2", "ffn.0", "proj_q",
                                   "proj_k", "proj_v", "proj_out")


def test_mindspeed_targets_resolve_to_mm_linears_and_parts():
    from mm.families import family_for

    family = family_for("wan_dit")
    problems = []
    targets = family.lora.resolve(["ffn.2", "ffn.0", "proj_q", "proj_k", "proj_v", "proj_out"], problems, "Wan")
    assert problems == []
    assert targets == {"self_attention.linear_qkv": (0, 1, 2), "self_attention.linear_proj": (0,),
                       "cross_attention.linear_q": (0,), "cross_attention.linear_kv": (0, 1),
                       "cross_attention.linear_proj": (0,), "mlp.linear_fc1": (0,), "mlp.linear_fc2": (0,)}
    assert family.lora.resolve(["attn1.to_v"], problems, "Wan") == {"self_attention.linear_qkv": (2,)}
    for name in ("videoditsparse", "stepvideodit"):  # every family names its linears
        other = family_for(name)
        assert other.lora.resolve(None, problems, name) and problems == []


def _recompute_worker(rank, world):
    """Adapter gradients of the same model and batch with and without full recompute of every layer."""
    from types import SimpleNamespace

    from mm.families import family_for
    from mm.models.predictor.lora import add_adapters
    from mm.models.predictor.wan import WanDiT, WanDiTConfig, load_hf_weights
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    kwargs = tiny_kwargs()
    family = family_for("wan_dit")
    settings = family.lora_settings(SimpleNamespace(lora_r=2, lora_alpha=2.0, lora_dropout=0.0,
                                                    lora_target_modules=["ffn.0", "to_q"]))
    grads = []
    for extra in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        model = WanDiT(WanDiTConfig(**kwargs), megatron_config(kwargs, dtype=torch.float64, **extra)).train()
        load_hf_weights(model, {k: v.double() for k, v in diffusers_model(kwargs).state_dict().items()})
        add_adapters(model, settings, 1, family.lora_part_counts())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.fill_(0.1)
        x = {k: v.double() if v.is_floating_point() else v for k, v in inputs(kwargs, 3, 4, 6).items()}
        model(**x).square().mean().backward()  # the latents need no gradient: frozen embeddings see none
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    destroy_parallel()
    return grads


def test_full_recompute_reaches_the_adapters_behind_frozen_embeddings():
    plain, recomputed = run_distributed(1, _recompute_worker)[0]
    adapters = [n for n in plain if ".lora_" in n]
    assert adapters and all(plain[n] is None for n in plain if n not in adapters)  # the base gets no gradient
    for name in adapters:
        assert recomputed[name] is not None, name
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-12, atol=1e-12, msg=name)


def _stepvideo_worker(rank, world):
    """Step-Video's DiT (its release fuses q/k/v in one linear) with adapters on every layer linear, and
    the same DiT with W + alpha / r x B @ A written into its weights."""
    from types import SimpleNamespace

    from mm.families import family_for
    from mm.families.stepvideo.config import StepVideoDiTConfig
    from mm.families.stepvideo.model import StepVideoDiT
    from mm.models.predictor.lora import add_adapters, merged
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel
    from tests.unit.test_stepvideo_dit import FLOPS_PARAMS, _megatron_config

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    family = family_for("stepvideodit")
    arch = StepVideoDiTConfig.from_json(FLOPS_PARAMS)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7)
    batch = (torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([0.3, 0.7]), torch.randn(2, 7, 16, generator=g),
             mask, torch.randn(2, 5, 12, generator=g))
    torch.manual_seed(3)
    base = StepVideoDiT(arch, _megatron_config(arch, torch.float64)).eval()
    adapted = StepVideoDiT(arch, _megatron_config(arch, torch.float64)).eval()
    adapted.load_state_dict(base.state_dict())
    settings = family.lora_settings(SimpleNamespace(lora_r=2, lora_alpha=3.0, lora_dropout=0.0,
                                                    lora_target_modules=None))
    add_adapters(adapted, settings, 4, family.lora_part_counts())
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        for block, target in zip(base.blocks, adapted.blocks):
            for linear in settings.targets:
                mine, theirs = block.get_submodule(linear), target.get_submodule(linear)
                pairs = {int(p): (theirs.lora_A[p], theirs.lora_B[p]) for p in theirs.lora_A}
                mine.weight.copy_(merged([mine.weight], pairs, settings.scale)[0])
        out = [model(*batch) for model in (base, adapted)]
    destroy_parallel()
    return out, settings.targets


def test_stepvideo_adapters_equal_their_merge_into_the_weights():
    (merged_out, adapted_out), targets = run_distributed(1, _stepvideo_worker)[0]
    assert set(targets) == {"attn1.proj_qkv", "attn1.proj_out", "attn2.proj_q", "attn2.proj_kv", "ff.net.0.proj",
                            "ff.net.2"}
    torch.testing.assert_close(adapted_out, merged_out, rtol=1e-10, atol=1e-10)
