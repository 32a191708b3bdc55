"""A tiny Wan2.1 T2V release and a Phantom checkpoint in the layout Wan and Phantom publish, and the
same weights in mm's own layouts (``python -m tests.wan_release_assets <root>``):

- ``<root>/Wan2.1-T2V-1.3B/``: config.json (original keys), diffusion_pytorch_model.safetensors (original
  keys), Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth and its tokenizer in google/umt5-xxl/;
- ``<root>/Phantom-Wan-1.3B/Phantom-Wan-1.3B.pth``: another DiT's flat state dict (original keys);
- ``<root>/mm/``: the VAE as a diffusers directory (vae/), the text encoder as a transformers
  directory (umt5/), and ``predictor.json``, the Phantom DiT's predictor section (mm's keys).

The DiT patches 4x4 pixels of latent, so 81 frames at 832x480 stay a few thousand tokens on a CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

DIT = dict(num_layers=1, num_heads=2, hidden_size=32, ffn_dim=64, in_dim=16, out_dim=16, patch_size=[1, 4, 4],
           freq_dim=32, text_dim=16)
VAE = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True])
WORDS = "a cat dog runs jumps over the red blue ball under sky camera slowly quickly person car street".split()


def _dit_states() -> list[dict[str, torch.Tensor]]:
    """Two random DiTs' weights in the original release's keys (the base model's, Phantom's)."""
    from megatron.core.transformer import TransformerConfig

    from mm.families import build_predictor, predictor_config
    from mm.models.predictor.wan.weights import WAN_WEIGHTS
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    params = {k: v for k, v in DIT.items() if k not in ("num_layers", "num_heads")}
    arch = predictor_config("wan_dit", params, DIT["num_layers"], DIT["num_heads"])
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_predictor("wan_dit", arch, TransformerConfig(
            num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
            use_cpu_initialization=True))
        with torch.no_grad():  # no zero-initialised tensor: every weight matters
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        states.append({k: v.contiguous() for k, v in WAN_WEIGHTS.mm_to_hf([model.state_dict()], "original").items()})
    destroy_parallel()
    return states


def build(root: Path) -> None:
    from safetensors.torch import save_file

    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
    from mm.models.ae.wan_vae_original import state_to_original
    from mm.models.text_encoder.tiny import save_tiny_text_encoder
    from mm.models.text_encoder.wan_t5 import umt5_state_to_original
    from tests.dist_helper import run_distributed

    base, phantom = run_distributed(1, _worker)[0]
    release, mine = root / "Wan2.1-T2V-1.3B", root / "mm"
    release.mkdir(parents=True)
    save_file(base, str(release / "diffusion_pytorch_model.safetensors"))
    (release / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": DIT["hidden_size"], "ffn_dim": DIT["ffn_dim"],
        "num_heads": DIT["num_heads"], "num_layers": DIT["num_layers"], "in_dim": DIT["in_dim"],
        "out_dim": DIT["out_dim"], "freq_dim": DIT["freq_dim"], "text_len": 512, "eps": 1e-6, "model_type": "t2v"}))
    (root / "Phantom-Wan-1.3B").mkdir()
    torch.save(phantom, root / "Phantom-Wan-1.3B" / "Phantom-Wan-1.3B.pth")
    mine.mkdir()
    (mine / "predictor.json").write_text(json.dumps({
        "model_id": "wan_dit", "from_pretrained": str(root / "Phantom-Wan-1.3B" / "Phantom-Wan-1.3B.pth"), **DIT}))

    torch.manual_seed(2)
    cfg = WanVAEConfig(**VAE)
    vae = WanVAE(cfg)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_wan_vae(vae, str(mine / "vae"))
    torch.save(state_to_original(vae.state_dict(), cfg), release / "Wan2.1_VAE.pth")

    save_tiny_text_encoder(mine / "umt5", WORDS, d_model=DIT["text_dim"], seed=3)
    from transformers import UMT5EncoderModel

    t5 = UMT5EncoderModel.from_pretrained(mine / "umt5")
    torch.save(umt5_state_to_original(t5.state_dict()), release / "models_t5_umt5-xxl-enc-bf16.pth")
    tokenizer = release / "google" / "umt5-xxl"
    tokenizer.mkdir(parents=True)
    for f in (mine / "umt5").iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, tokenizer / f.name)


def _worker(rank, world):
    return _dit_states()


if __name__ == "__main__":
    build(Path(sys.argv[1]))
