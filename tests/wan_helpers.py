"""Tiny Wan configurations shared by the Wan DiT tests: the same architecture in diffusers
(the oracle) and in mm."""

from __future__ import annotations

import torch

TEXT_LEN = 512  # diffusers' Wan attention splits image/text context assuming 512 text tokens


def tiny_kwargs(image: bool = False, flf2v: bool = False, layers: int = 2) -> dict:
    """mm's WanDiTConfig keys: 2 heads of 12 channels (3-D RoPE parts 4/4/4), 2 layers."""
    kwargs = dict(num_layers=layers, num_heads=2, hidden_size=24, ffn_dim=40, in_dim=4, out_dim=4,
                  patch_size=(1, 2, 2), freq_dim=16, text_dim=16, rope_max_seq_len=64)
    if image or flf2v:
        kwargs["image_dim"] = 12
    if flf2v:
        kwargs["pos_embed_seq_len"] = 2 * 3
    return kwargs


def diffusers_model(kwargs: dict, seed: int = 0, dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=kwargs["patch_size"], num_attention_heads=kwargs["num_heads"],
        attention_head_dim=kwargs["hidden_size"] // kwargs["num_heads"], in_channels=kwargs["in_dim"],
        out_channels=kwargs["out_dim"], text_dim=kwargs["text_dim"], freq_dim=kwargs["freq_dim"],
        ffn_dim=kwargs["ffn_dim"], num_layers=kwargs["num_layers"], cross_attn_norm=True,
        image_dim=kwargs.get("image_dim"), added_kv_proj_dim=kwargs["hidden_size"] if kwargs.get("image_dim") else None,
        rope_max_seq_len=kwargs["rope_max_seq_len"], pos_embed_seq_len=kwargs.get("pos_embed_seq_len"),
    ).to(dtype)
    # diffusers zero-initialises some tensors (pos_embed); make every tensor informative
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def megatron_config(kwargs: dict, tp: int = 1, sequence_parallel: bool = False, dtype=torch.float32, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=kwargs["num_layers"], hidden_size=kwargs["hidden_size"],
                             num_attention_heads=kwargs["num_heads"], tensor_model_parallel_size=tp,
                             sequence_parallel=sequence_parallel, params_dtype=dtype, use_cpu_initialization=True,
                             **extra)


def inputs(kwargs: dict, frames: int, height: int, width: int, batch: int = 2, seed: int = 1,
           dtype=torch.float32, per_token: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = frames * height * width // 4
    timestep = torch.tensor([37.0, 912.0][:batch])
    if per_token:  # TI2V: the first latent frame's tokens are clean (timestep 0)
        timestep = timestep[:, None].repeat(1, tokens)
        timestep[:, : height * width // 4] = 0.0
    out = dict(
        latents=torch.randn(batch, kwargs["in_dim"], frames, height, width, generator=g, dtype=dtype),
        timestep=timestep,
        context=torch.randn(batch, TEXT_LEN, kwargs["text_dim"], generator=g, dtype=dtype),
    )
    if kwargs.get("image_dim"):
        tokens = kwargs.get("pos_embed_seq_len") or 5  # FLF2V: first- then last-frame tokens
        out["context_image"] = torch.randn(batch, tokens, kwargs["image_dim"], generator=g, dtype=dtype)
    return out


def diffusers_inputs(kwargs: dict, mm_inputs: dict) -> dict:
    """The same inputs as diffusers takes them: text and image context in one tensor (image first);
    FLF2V's first/last-frame tokens stacked along the batch."""
    out = dict(hidden_states=mm_inputs["latents"], timestep=mm_inputs["timestep"],
               encoder_hidden_states=mm_inputs["context"])
    image = mm_inputs.get("context_image")
    if image is not None:
        if kwargs.get("pos_embed_seq_len"):
            b, n, d = image.shape
            image = image.reshape(2 * b, n // 2, d)
        out["encoder_hidden_states_image"] = image
    return out


def mindspeed_wan_model(text_len: int = 16, dtype: str = "bf16") -> dict:
    """A model JSON in MindSpeed-MM's Wan2.1 T2V training layout (its key names: ``wandit``,
    ``wan_flow_match_scheduler``, its kernel switches) with the quickstart's tiny DiT sizes, for features."""
    return {
        "load_video_features": True, "load_text_features": True, "task": "t2v",
        "diffusion": {"model_id": "wan_flow_match_scheduler", "num_train_timesteps": 1000, "shift": 5,
                      "sigma_min": 0.0, "extra_one_step": True},
        "predictor": {"model_id": "wandit", "dtype": dtype, "model_type": "t2v", "patch_size": [1, 2, 2],
                      "text_len": text_len, "in_dim": 4, "hidden_size": 64, "ffn_dim": 128, "freq_dim": 32,
                      "text_dim": 32, "img_dim": 1280, "out_dim": 4, "num_heads": 4, "num_layers": 2,
                      "pipeline_num_layers": [1, 1], "qk_norm": True, "qk_norm_type": "rmsnorm", "cross_attn_norm": True,
                      "eps": 1e-6, "max_seq_len": 1024, "attention_async_offload": False, "use_fused_rmsnorm": True,
                      "FPDT": False, "FPDT_chunk_number": 4, "FPDT_with_offload": False}}
