"""A tiny Step-Video-T2V release on disk, for the tests that run the entry points: the DiT in the
release layout (``transformer/``: config.json + safetensors; 2 layers, 2 heads of 128, the release's
RoPE split), a tiny VAE (version 2, z 8), tiny Step-LLM and HunyuanCLIP directories, synthetic videos
with captions, and model/data/inference JSONs that point at them. Random weights, made locally.

    from tests.stepvideo_assets import make_assets
    assets = make_assets(tmp_path)         # -> StepVideoAssets (paths)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FRAMES, HEIGHT, WIDTH = 17, 32, 32  # one VAE chunk: 3 x 2 x 2 latent tokens
Z = 8
DIT = {"num_layers": 2, "num_heads": 2, "head_dim": 128, "in_channels": Z, "out_channels": Z,
       "channel_split": [64, 32, 32]}
VAE = {"version": 2, "z_channels": Z, "frame_len": 17, "num_res_blocks": 1, "encoder_ch": 32,
       "encoder_ch_mult": [1, 1, 2, 2], "decoder_ch": 32, "decoder_ch_mult": [1, 1, 2, 2]}
LLM_HIDDEN, CLIP_HIDDEN = 48, 16
PROMPTS = ["a red square moving left to right", "a blue circle moving top to bottom"]


@dataclass
class StepVideoAssets:
    root: Path
    model: Path  # pretrain model JSON (DiT from predictor.from_pretrained)
    data: Path
    inference: Path  # inference model JSON (DiT from predictor.from_pretrained)
    transformer: Path


def _dit_weights(seed: int, num_layers: int) -> dict[str, torch.Tensor]:
    from tests.stepvideo_helpers import release_shapes

    shapes = release_shapes(num_layers, DIT["num_heads"], DIT["head_dim"], Z, Z, [LLM_HIDDEN, CLIP_HIDDEN])
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias") or "scale_shift_table" in name:
            state[name] = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            state[name] = torch.randn(shape, generator=gen) / fan_in**0.5
    return state


def save_tiny_transformer(path: Path, seed: int = 0, num_layers: int = DIT["num_layers"]) -> Path:
    from safetensors.torch import save_file

    from mm.families.stepvideo.weights import stepvideo_release_config

    path.mkdir(parents=True, exist_ok=True)
    arch = dict(DIT, num_layers=num_layers, caption_channels=[LLM_HIDDEN, CLIP_HIDDEN])
    (path / "config.json").write_text(json.dumps(stepvideo_release_config(arch), indent=1))
    save_file({k: v.contiguous() for k, v in _dit_weights(seed, num_layers).items()},
              str(path / "diffusion_pytorch_model.safetensors"))
    return path


def make_assets(out: str | Path, num_videos: int = 8, num_layers: int = DIT["num_layers"]) -> StepVideoAssets:
    from mm.data import make_dataset
    from mm.families.stepvideo.text_encoder_tiny import save_tiny_hunyuan_clip, save_tiny_step_llm
    from mm.families.stepvideo.vae import StepVideoVAE, StepVideoVAEConfig, save_stepvideo_vae

    root = Path(out)
    torch.manual_seed(0)
    data_txt = make_dataset(root / "data", num_videos=num_videos, frames=24, sizes=[(HEIGHT, WIDTH)], fps=16)
    save_stepvideo_vae(StepVideoVAE(StepVideoVAEConfig.from_json(VAE)), str(root / "vae"))
    save_tiny_step_llm(root / "step_llm", hidden_size=LLM_HIDDEN)
    save_tiny_hunyuan_clip(root / "hunyuan_clip", hidden_size=CLIP_HIDDEN)
    transformer = save_tiny_transformer(root / "transformer", num_layers=num_layers)
    predictor = {"model_id": "stepvideodit", "dtype": "fp32", **DIT, "num_layers": num_layers,
                 "caption_channels": [LLM_HIDDEN, CLIP_HIDDEN],
                 "from_pretrained": str(transformer)}
    model = {
        "predictor": predictor,
        "ae": {"model_id": "stepvideovae", "from_pretrained": str(root / "vae"), "dtype": "fp32", **VAE},
        "text_encoder": [
            {"model_id": "StepLLmModel", "from_pretrained": str(root / "step_llm"), "dtype": "fp32"},
            {"model_id": "BertModel", "from_pretrained": str(root / "hunyuan_clip" / "clip_text_encoder"),
             "dtype": "float32"}],
        "diffusion": {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0,
                      "reverse": False, "solver": "euler"},
    }
    llm_tokenizer = next(p for p in (root / "step_llm").iterdir() if p.suffix in (".model", ".json")
                         and p.name != "config.json" and "index" not in p.name)
    data = {
        "dataset_param": {
            "dataset_type": "t2v",
            "basic_parameters": {"data_path": str(data_txt)},
            "preprocess_parameters": {"num_frames": FRAMES, "max_height": HEIGHT, "max_width": WIDTH,
                                      "train_fps": 16},
            "tokenizer_config": [
                {"autotokenizer_name": "stepchat", "from_pretrained": str(llm_tokenizer), "model_max_length": 32},
                {"autotokenizer_name": "BertTokenizer", "from_pretrained": str(root / "hunyuan_clip" / "tokenizer"),
                 "model_max_length": 16}],
        },
        "dataloader_param": {"shuffle": True},
    }
    inference = dict(model, diffusion=dict(model["diffusion"], num_inference_timesteps=3), inference={
        "prompt": PROMPTS, "seed": 42, "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "fps": 8,
        "guidance_scale": 9.0, "model_max_length": [32, 16], "save_path": str(root / "samples")})
    paths = StepVideoAssets(root, root / "model.json", root / "data.json", root / "inference_model.json",
                            transformer)
    paths.model.write_text(json.dumps(model, indent=1))
    paths.data.write_text(json.dumps(data, indent=1))
    paths.inference.write_text(json.dumps(inference, indent=1))
    return paths


if __name__ == "__main__":
    import sys

    print(make_assets(sys.argv[1] if len(sys.argv) > 1 else "outputs/stepvideo_tiny"))
