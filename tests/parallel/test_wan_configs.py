"""Every example Wan model JSON parses, and its full-size DiT has diffusers' parameter count
(both built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm.arguments import load_config
from mm.families import predictor_config
from tests.dist_helper import run_distributed

REPO = Path(__file__).resolve().parents[2]
WAN_JSONS = sorted(str(p.relative_to(REPO)) for p in REPO.glob("examples/wan2.*/**/*_model.json"))


def _arch(path: str):
    pred = load_config(["--mm-model", str(REPO / path)], world_size=1, mode="inference").model.predictor
    return predictor_config(pred.model_id, pred.params, pred.num_layers, pred.num_heads)


def _diffusers_count(arch) -> int:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=arch.patch_size, num_attention_heads=arch.num_heads, attention_head_dim=arch.head_dim,
            in_channels=arch.in_dim, out_channels=arch.out_dim, text_dim=arch.text_dim, freq_dim=arch.freq_dim,
            ffn_dim=arch.ffn_dim, num_layers=arch.num_layers, cross_attn_norm=arch.cross_attn_norm, eps=arch.eps,
            image_dim=arch.image_dim, added_kv_proj_dim=arch.hidden_size if arch.image_dim else None,
            rope_max_seq_len=arch.rope_max_seq_len, pos_embed_seq_len=arch.pos_embed_seq_len)
    return sum(p.numel() for p in model.parameters())


def _mm_counts(rank, world, paths):
    from megatron.core.transformer import TransformerConfig

    from mm.families import build_predictor
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1))
    counts = {}
    for path in paths:
        arch = _arch(path)
        config = TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                                   num_attention_heads=arch.num_heads, params_dtype=torch.bfloat16,
                                   use_cpu_initialization=True, perform_initialization=False)
        with torch.device("meta"):
            model = build_predictor("wan_dit", arch, config)
        counts[path] = sum(p.numel() for p in model.parameters())
    destroy_parallel()
    return counts


def test_every_wan_variant_has_an_example_json():
    expected = {"wan2.1/1.3b/t2v", "wan2.1/14b/t2v", "wan2.1/14b/i2v_480p", "wan2.1/14b/i2v_720p", "wan2.1/14b/flf2v",
                "wan2.2/a14b/t2v", "wan2.2/a14b/i2v", "wan2.2/5b/ti2v"}
    assert {str(Path(p).parent.relative_to("examples")) for p in WAN_JSONS} == expected


def test_full_size_parameter_counts_equal_diffusers():
    (counts,) = run_distributed(1, _mm_counts, WAN_JSONS)
    for path in WAN_JSONS:
        assert counts[path] == _diffusers_count(_arch(path)), path
    assert round(counts["examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json"] / 1e9, 2) == 1.42
    assert round(counts["examples/wan2.2/5b/ti2v/pretrain_ti2v_model.json"] / 1e9, 1) == 5.0


def test_unknown_predictor_key_is_an_error():
    with pytest.raises(ValueError, match=r"predictor keys \['hiden_size'\] are not Wan DiT parameters"):
        predictor_config("wan_dit", {"hiden_size": 8}, 2, 2)
    with pytest.raises(ValueError,
                       match="predictor.model_id = 'wan'; valid: stepvideodit, videoditsparse, videoditsparsei2v, wan_dit"):
        predictor_config("wan", {}, 2, 2)
