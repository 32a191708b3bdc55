"""The Wan DiT's release config.json (diffusers' ``WanTransformer3DModel``, or the original Wan
release's) <-> mm's predictor config (``WanDiTConfig``'s keys, as checkpoint headers record them)."""

from __future__ import annotations

from typing import Any

from mm.models.predictor.name_table import ReleaseConfigError, ShapeOf


def arch_from_diffusers(config: dict) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    arch = dict(num_layers=config["num_layers"], num_heads=heads, hidden_size=heads * config["attention_head_dim"],
                ffn_dim=config["ffn_dim"], in_dim=config["in_channels"], out_dim=config["out_channels"],
                patch_size=list(config.get("patch_size", [1, 2, 2])), freq_dim=config.get("freq_dim", 256),
                text_dim=config.get("text_dim", 4096), image_dim=config.get("image_dim"),
                pos_embed_seq_len=config.get("pos_embed_seq_len"), cross_attn_norm=config.get("cross_attn_norm", True),
                eps=config.get("eps", 1e-6), rope_max_seq_len=config.get("rope_max_seq_len", 1024))
    return arch


def diffusers_config(arch: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``WanTransformer3DModel`` config.json for mm's WanDiTConfig keys."""
    image = arch.get("image_dim")
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(arch.get("patch_size", [1, 2, 2])),
            "num_attention_heads": arch["num_heads"], "attention_head_dim": arch["hidden_size"] // arch["num_heads"],
            "in_channels": arch.get("in_dim", 16), "out_channels": arch.get("out_dim", 16),
            "text_dim": arch.get("text_dim", 4096), "freq_dim": arch.get("freq_dim", 256), "ffn_dim": arch["ffn_dim"],
            "num_layers": arch["num_layers"], "cross_attn_norm": arch.get("cross_attn_norm", True),
            "qk_norm": "rms_norm_across_heads", "eps": arch.get("eps", 1e-6), "image_dim": image,
            "added_kv_proj_dim": arch["hidden_size"] if image is not None else None,
            "rope_max_seq_len": arch.get("rope_max_seq_len", 1024), "pos_embed_seq_len": arch.get("pos_embed_seq_len")}


def read_wan_arch(config: dict, fmt: str, shape: ShapeOf, where: str) -> dict[str, Any]:
    """WanDiTConfig keys from a diffusers config.json, or from the original release's (dim /
    num_heads / ...) and the sizes its weights carry."""
    if fmt == "diffusers":
        missing = [k for k in ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim",
                               "in_channels", "out_channels") if k not in config]
        if missing:
            raise ReleaseConfigError(f"{where}: a diffusers config without {', '.join(missing)}")
        return arch_from_diffusers(config)
    missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in config]
    if missing:
        raise ReleaseConfigError(f"{where}: an original Wan config without {', '.join(missing)}")

    def need(name: str) -> list[int]:
        found = shape(name)
        if found is None:
            raise ReleaseConfigError(f"{where}: the original Wan weights beside it have no {name}")
        return found

    kernel = need("patch_embedding.weight")[2:]
    head = need("head.head.weight")[0]
    arch = dict(num_layers=config["num_layers"], num_heads=config["num_heads"], hidden_size=config["dim"],
                ffn_dim=config["ffn_dim"], in_dim=need("patch_embedding.weight")[1],
                out_dim=head // (kernel[0] * kernel[1] * kernel[2]), patch_size=list(kernel),
                freq_dim=need("time_embedding.0.weight")[1], text_dim=need("text_embedding.0.weight")[1],
                image_dim=None, pos_embed_seq_len=None, cross_attn_norm=config.get("cross_attn_norm", True),
                eps=config.get("eps", 1e-6), rope_max_seq_len=1024)
    if shape("img_emb.proj.0.weight") is not None:
        arch["image_dim"] = shape("img_emb.proj.0.weight")[0]
    if shape("img_emb.emb_pos") is not None:
        arch["pos_embed_seq_len"] = shape("img_emb.emb_pos")[1]
    return arch
