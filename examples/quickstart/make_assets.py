"""Everything the quickstart trains on, made locally (no downloads): a synthetic video dataset
(moving shapes with captions), a tiny Wan VAE with random weights (run.sh fits it to the videos with
pretrain_vae.py before the DiT trains on its latents), a tiny random UMT5 text encoder with a word
tokenizer over the captions' words, and the model/data JSONs that point at them.

The dataset holds two distinct clips (CLIPS, each at both bucket sizes), the two that the sampled
prompts describe, so that the tiny DiT can learn them in the quickstart's minutes.

    python examples/quickstart/make_assets.py outputs/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mm.data import make_dataset
from mm.data.synthetic import COLOURS, MOTIONS, SHAPES, caption
from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
from mm.models.text_encoder.tiny import save_tiny_text_encoder

FRAMES, HEIGHT, WIDTH = 9, 64, 64
VAE_FRAMES = 5
# (shape, colour, motion, background): the clips of the dataset, which are the prompts inference_model.json
# samples (a tiny DiT learns two captions in the quickstart's minutes on 2 CPU cores)
CLIPS = [("square", "red", "left to right", "white"), ("circle", "blue", "top to bottom", "yellow")]
PROMPTS = [caption(*clip) for clip in CLIPS]


def main(out: str) -> None:
    root = Path(out)
    torch.manual_seed(0)
    # sizes alternate, so each clip listed twice comes once at each size (16 videos: 2 clips x 2 sizes x 4)
    data_txt = make_dataset(root / "data", num_videos=16, frames=17, sizes=[(HEIGHT, WIDTH), (48, 96)], fps=16,
                            clips=[clip for clip in CLIPS for _ in range(2)])
    # Wan2.2's residual down/up blocks (average-pool / duplicate shortcuts around each resolution change):
    # with them the tiny VAE fits the videos in a few hundred steps, where Wan2.1's plain blocks took far more
    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, is_residual=True,
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
            # every other frame of the 17-frame clips: a training clip of 9 frames is a whole clip, as
            # the samples (inference.fps 8) are
            "preprocess_parameters": {"buckets": [[FRAMES, HEIGHT, WIDTH], [FRAMES, 48, 96]], "train_fps": 8},
            "tokenizer_config": {"from_pretrained": str(root / "umt5"), "model_max_length": 16},
        },
        "dataloader_param": {"shuffle": True},
    }
    (root / "model.json").write_text(json.dumps(model, indent=1))
    # inference.py: the same model, the DiT from the training run's checkpoint (--load), and what to sample;
    # guidance 1 (off): training keeps every caption (data.json has no "cfg" dropout), so the DiT has no
    # unconditional branch for guidance to extrapolate from
    inference = dict(model, inference={
        "prompt": PROMPTS,
        "negative_prompt": "", "seed": 42, "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "fps": 8,
        "sample_steps": 20, "sample_shift": 3.0, "sample_solver": "unipc", "guidance_scale": 1.0,
        "model_max_length": 16, "save_path": str(root / "samples")})
    (root / "inference_model.json").write_text(json.dumps(inference, indent=1))
    (root / "data.json").write_text(json.dumps(data, indent=1))
    # pretrain_vae.py reads the same videos, first as single frames (vae_image_data.json: the spatial
    # layers, cheaply), then in clips of 1 + 4 frames (vae_data.json: a first frame and one temporal chunk
    # of the VAE, every layer the 9-frame clips go through, at about half their cost)
    for name, frames in (("vae_image_data.json", 1), ("vae_data.json", VAE_FRAMES)):
        vae_data = json.loads(json.dumps(data))
        vae_data["dataset_param"]["preprocess_parameters"]["buckets"] = [[frames, HEIGHT, WIDTH], [frames, 48, 96]]
        del vae_data["dataset_param"]["tokenizer_config"]
        (root / name).write_text(json.dumps(vae_data, indent=1))
    print(f"quickstart assets in {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
