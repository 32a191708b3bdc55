"""LoRA fine-tuning through the entry points (CPU, gloo): pretrain_t2v.py with --lora-* on the fixture's
released weights saves adapter-only checkpoints and resumes from them exactly; mm-convert merges them into
the base (diffusers layout) and writes them alone as a PEFT/diffusers LoRA file; inference.py with
``inference.lora`` samples what the merged export samples."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.functional.test_convert_and_train import _hf_dir_with_config
from tests.functional.test_inference import _inference_json, _run
from tests.functional.test_pretrain_t2v import _train

# MindSpeed-MM's finetune_lora.sh targets, with the distributed optimizer (its state of the adapters alone)
LORA = ("--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "proj_q", "proj_k", "proj_v", "proj_out",
        "ffn.0", "ffn.2", "--use-distributed-optimizer")


def _convert(*argv):
    from checkpoint.cli import main

    main(["WanConverter", "--version", "wan2.1", *argv])  # mm-convert in this process


def _tensors(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """4 iterations from the fixture's released weights, adapters saved at 2 and 4: (checkpoint directory,
    losses, log)."""
    ckpt = tmp_path_factory.mktemp("lora") / "ckpt"
    losses, out = _train(assets, 1, *LORA, "--save", str(ckpt), "--save-interval", "2",
                         "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2",
                         "--lora-register-forward-hook", "patch_embedding", iters=4)
    return ckpt, losses, out


@pytest.mark.slow
def test_adapter_checkpoints_hold_adapters_alone_and_resume_exactly(assets, lora_run, tmp_path):
    ckpt, losses, out = lora_run
    assert len(losses) == 4 and losses[-1] != losses[0], out[-2000:]
    assert "--lora-register-forward-hook patch_embedding: mm needs no hook" in out
    from torch.distributed.checkpoint import FileSystemReader

    stored = {k: v.size for k, v in FileSystemReader(str(ckpt / "iter_0000002")).read_metadata().state_dict_metadata.items()
              if hasattr(v, "size") and not k.startswith(("optimizer.", "rng_state", "ema."))}
    assert stored and all(".lora_A." in k or ".lora_B." in k for k in stored), stored
    # exactly r x (in + out) numbers per adapted linear of the release (q, k, v, out of both attentions, ffn up, down)
    base = _tensors(assets / "dit")
    adapted = [w.shape for n, w in base.items() if n.endswith(".weight") and any(
        f".{m}." in n for m in ("to_q", "to_k", "to_v", "to_out", "ffn.net.0", "ffn.net.2")) and "add_" not in n]
    assert sum(v.numel() for v in stored.values()) == sum(4 * (i + o) for o, i in adapted) < \
        sum(w.numel() for w in base.values()) / 4
    # resume from iteration 2 (the tracker pointed back at it) into the same directory: iterations 3, 4 again
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed)
    (resumed / "latest_checkpointed_iteration.txt").write_text("2")
    shutil.rmtree(resumed / "iter_0000004")
    again, out = _train(assets, 1, *LORA, "--lora-load", str(resumed), "--save", str(resumed),
                        "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2",
                        iters=3)
    assert "loaded checkpoint from" in out and again == losses[2:3], (losses, again)
    assert (resumed / "iter_0000003").is_dir()


@pytest.mark.slow
def test_merged_export_adapter_file_and_sampling_with_the_adapter(assets, lora_run, tmp_path):
    ckpt, _, _ = lora_run
    base = tmp_path / "base_mm"
    _convert("hf_to_mm", "--cfg.source_path", str(_hf_dir_with_config(assets, tmp_path)), "--cfg.target_path", str(base))
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    _convert("mm_to_hf", "--cfg.source_path", str(base), "--cfg.lora_path", str(ckpt), "--cfg.target_path", str(merged))
    _convert("lora_to_hf", "--cfg.source_path", str(ckpt), "--cfg.target_path", str(adapter))
    from safetensors import safe_open

    with safe_open(str(adapter / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        lora = {k: f.get_tensor(k) for k in f.keys()}
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8.0
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in lora and "transformer.blocks.3.ffn.net.2.lora_B.weight" \
        in lora and not any("add_k_proj" in k or "attn2.to_out" not in k and ".attn2." in k and "to_q" not in k and
                            "to_k" not in k and "to_v" not in k for k in lora)
    # the merged weights: base + alpha / r x B @ A of every adapted linear, the rest as it was
    before, after = _tensors(assets / "dit"), _tensors(merged)
    assert set(before) == set(after)
    adapted = {k[len("transformer."):-len(".lora_A.weight")] for k in lora if k.endswith("lora_A.weight")}
    assert len(adapted) == 4 * 10  # 4 layers x (q, k, v, out of both attentions, ffn up and down)
    for name, weight in before.items():
        module = name[:-len(".weight")]
        if module in adapted:
            a, b = lora[f"transformer.{module}.lora_A.weight"], lora[f"transformer.{module}.lora_B.weight"]
            expected = weight.double() + 2.0 * (b.double() @ a.double())
            assert not torch.equal(b, torch.zeros_like(b))
            torch.testing.assert_close(after[name].double(), expected, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(after[name], weight), name
    # sampling: inference.lora over the base == the merged export
    latents = {}
    for name, weights, changes in (("adapter", None, {"lora": {"path": str(ckpt), "scale": 1.0}}),
                                   ("merged", str(merged), {})):
        model_json = _inference_json(assets, tmp_path / name, prompt="a red square", **changes)
        model = json.loads(model_json.read_text())
        model["inference"].update(sample_steps=2, guidance_scale=1.0)  # one DiT call a step: enough to compare
        if weights is not None:
            model["predictor"]["from_pretrained"] = weights
        model_json.write_text(json.dumps(model))
        _run(1, model_json)
        latents[name] = torch.load(next((tmp_path / name).glob("*.latents.pt")))
    torch.testing.assert_close(latents["adapter"], latents["merged"], rtol=1e-4, atol=1e-5)
