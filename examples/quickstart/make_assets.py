"""Everything the quickstart trains on, made locally (no downloads): a synthetic video dataset
(moving shapes with captions), a tiny random Wan VAE, a tiny random UMT5 text encoder with a word
tokenizer over the captions' words, and the model/data JSONs that point at them.

    python examples/quickstart/make_assets.py outputs/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mm.data import make_dataset
from mm.data.synthetic import COLOURS, MOTIONS, SHAPES
from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
from mm.models.text_encoder.tiny import save_tiny_text_encoder

FRAMES, HEIGHT, WIDTH = 9, 64, 64


def main(out: str) -> None:
    root = Path(out)
    torch.manual_seed(0)
    data_txt = make_dataset(root / "data", num_videos=16, frames=17, sizes=[(HEIGHT, WIDTH), (48, 96)], fps=16)
    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4)), root / "vae")
    words = [w for phrase in [*COLOURS, *SHAPES, *MOTIONS, "a moving on background"] for w in phrase.split()]
    save_tiny_text_encoder(root / "umt5", sorted(set(words)), d_model=32)
    model = {
        "predictor": {"model_id": "wan_dit", "num_layers": 2, "num_heads": 4, "hidden_size": 64, "ffn_dim": 128,
                      "in_dim": 4, "out_dim": 4, "freq_dim": 32, "text_dim": 32, "dtype": "fp32"},
        "ae": {"model_id": "wan_vae", "from_pretrained": str(root / "vae")},
        "text_encoder": {"model_id": "umt5", "from_pretrained": str(root / "umt5"), "dtype": "fp32"},
        "diffusion": {"model_id": "flow_matching", "shift": 3.0},
    }
    data = {
        "dataset_param": {
            "dataset_type": "t2v",
            "basic_parameters": {"data_path": str(data_txt)},
            "preprocess_parameters": {"buckets": [[FRAMES, HEIGHT, WIDTH], [FRAMES, 48, 96]], "train_fps": 16},
            "tokenizer_config": {"from_pretrained": str(root / "umt5"), "model_max_length": 16},
        },
        "dataloader_param": {"shuffle": True},
    }
    (root / "model.json").write_text(json.dumps(model, indent=1))
    # inference.py: the same model, the DiT from the training run's checkpoint (--load), and what to sample
    inference = dict(model, inference={
        "prompt": ["a red square moving left to right on a white background",
                   "a blue circle moving top to bottom on a yellow background"],
        "negative_prompt": "", "seed": 42, "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "fps": 8,
        "sample_steps": 20, "sample_shift": 3.0, "sample_solver": "unipc", "guidance_scale": 3.0,
        "model_max_length": 16, "save_path": str(root / "samples")})
    (root / "inference_model.json").write_text(json.dumps(inference, indent=1))
    (root / "data.json").write_text(json.dumps(data, indent=1))
    print(f"quickstart assets in {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
