"""Assets for timing pretrain_t2v.py / pretrain_i2v.py on a real-size DiT without downloads: synthetic
videos at the target resolution, the family's VAE at full size (a Wan2.1 VAE; for Open-Sora-Plan the
WFVAE of the example's ``ae`` section) and a 2-layer UMT5/mT5-style text encoder with the real width
(4096), all random, and model/data JSONs whose predictor is an example JSON's (random init).

    python benchmarks/pretrain_assets.py OUT --predictor examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json \
        --frames 81 --height 480 --width 832
    python benchmarks/pretrain_assets.py OUT --predictor examples/opensoraplan1.3/t2v/pretrain_t2v_model.json \
        --frames 93 --height 352 --width 640      # MindSpeed-MM's 93x480p stage (352 x 640 = max_hxw)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mm.data import make_dataset
from mm.data.synthetic import COLOURS, MOTIONS, SHAPES
from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
from mm.models.text_encoder.tiny import save_tiny_text_encoder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--predictor", required=True, help="model JSON whose predictor section is used")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--videos", type=int, default=4)
    a = p.parse_args()
    root = Path(a.out)
    torch.manual_seed(0)
    data_txt = make_dataset(root / "data", num_videos=a.videos, frames=a.frames, sizes=[(a.height, a.width)], fps=16)
    example = json.loads(Path(a.predictor).read_text())
    predictor = example["predictor"]
    predictor.pop("from_pretrained", None)
    predictor.pop("pipeline_num_layers", None)
    words = [w for phrase in [*COLOURS, *SHAPES, *MOTIONS, "a moving on background"] for w in phrase.split()]
    if predictor["model_id"].startswith("videoditsparse"):  # Open-Sora-Plan 1.3: WFVAE, mT5, DDPM
        from mm.models.ae import WFVAE, WFVAEConfig, save_wfvae

        ae = {k: v for k, v in example["ae"].items() if k not in ("model_id", "from_pretrained", "dtype", "vae_cp_size")}
        save_wfvae(WFVAE(WFVAEConfig.from_json(ae)), root / "vae")
        save_tiny_text_encoder(root / "mt5", sorted(set(words)), kind="mt5", d_model=predictor["caption_channels"])
        model = {"predictor": predictor,
                 "ae": {"model_id": "wfvae", "from_pretrained": str(root / "vae"), "dtype": "bf16"},
                 "text_encoder": {"model_id": "mt5", "from_pretrained": str(root / "mt5"), "dtype": "bf16"},
                 "diffusion": example["diffusion"]}
        tokenizer = root / "mt5"
    else:
        save_wan_vae(WanVAE(WanVAEConfig()), root / "vae")
        save_tiny_text_encoder(root / "umt5", sorted(set(words)), d_model=predictor["text_dim"])
        model = {"predictor": predictor,
                 "ae": {"model_id": "wan_vae", "from_pretrained": str(root / "vae")},
                 "text_encoder": {"model_id": "umt5", "from_pretrained": str(root / "umt5"), "dtype": "bf16"},
                 "diffusion": {"model_id": "flow_matching", "shift": 5.0}}
        tokenizer = root / "umt5"
    data = {"dataset_param": {
        "dataset_type": "t2v", "basic_parameters": {"data_path": str(data_txt)},
        "preprocess_parameters": {"num_frames": a.frames, "max_height": a.height, "max_width": a.width,
                                  "train_fps": 16},
        "tokenizer_config": {"from_pretrained": str(tokenizer), "model_max_length": 512}},
        "dataloader_param": {"shuffle": True}}
    (root / "model.json").write_text(json.dumps(model, indent=1))
    (root / "data.json").write_text(json.dumps(data, indent=1))
    print(f"pretrain assets in {root}")


if __name__ == "__main__":
    main()
