"""Tiny stand-ins for everything MindSpeed-MM's OpenSoraPlan 1.3 guide downloads, laid out as the guide
lays them out, so its commands run here on CPU processes:

    raw_ckpt/open-sora-plan/merged.ckpt + config.json      the released WFVAE (the golden fixture's
                                                           tiny reference model)
    raw_ckpt/open-sora-plan/93x480p/                       the released T2V DiT (reference layout)
    raw_ckpt/open-sora-plan/93x480p_i2v/                   the released I2V DiT
    raw_ckpt/open-sora-plan/93x480p_2layers/               the T2V DiT's first two layers
    weights/google/mt5-xxl/                                a tiny random mT5 with a word tokenizer
    data/                                                  synthetic clips + annotation + data.txt

``tiny_model_json`` / ``tiny_data_json`` turn the example JSONs of examples/opensoraplan1.3 into
ones that point at these files and use the tiny DiT / WFVAE configs (every other key kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "opensoraplan"
_I2V_KEYS = ("pos_embed_masked_hidden_states", "pos_embed_mask")
# the golden fixture's tiny DiT in mm's predictor keys (tests/fixtures/opensoraplan/dit_golden.json)
TINY_PREDICTOR = {"num_layers": 4, "num_heads": 2, "head_dim": 12, "in_channels": 4, "out_channels": 4,
                  "cross_attention_dim": 24, "caption_channels": 16, "sparse1d": True, "sparse_n": 4}
CLIP_SIZES = [(64, 64), (48, 96), (96, 64)]  # synthetic clips (height, width): three aspect ratios
TEXT_WORDS = 16  # the tiny mT5's width = the tiny DiT's caption_channels


def write_release_dit(root: Path, variant: str, num_layers: int = 4) -> None:
    """A release DiT directory as the reference's save_pretrained writes it (the fixture's first
    ``num_layers`` layers)."""
    from safetensors.torch import load_file, save_file

    meta = json.loads((FIXTURES / "dit_golden.json").read_text())
    state = load_file(str(FIXTURES / "dit_weights.safetensors"))
    if variant == "t2v":
        state = {k: v for k, v in state.items() if not k.startswith(_I2V_KEYS)}
    state = {k: v for k, v in state.items()
             if not k.startswith("transformer_blocks.") or int(k.split(".")[1]) < num_layers}
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / "diffusion_pytorch_model.safetensors"))
    config = dict(meta["tiny_config"], num_layers=num_layers, _class_name="OpenSoraInpaint_v1_3" if variant == "i2v" else "OpenSoraT2V_v1_3",
                  _diffusers_version="0.30.2", dropout=0.0)
    if variant == "i2v":
        config["vae_scale_factor_t"] = meta["vae_scale_factor_t"]
    (root / "config.json").write_text(json.dumps(config))


def tiny_vae_config() -> dict:
    return json.loads((FIXTURES / "wfvae_tiny_config.json").read_text())["config"]


def make_assets(root: Path, clips: int = 6, frames: int = 17) -> Path:
    """Write every stand-in under ``root``; returns ``root``."""
    from safetensors.torch import load_file

    from mm.data import make_dataset
    from mm.data.synthetic import COLOURS, MOTIONS, SHAPES
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    root = Path(root)
    raw = root / "raw_ckpt" / "open-sora-plan"
    raw.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": load_file(str(FIXTURES / "wfvae_tiny_state_dict.safetensors"))}, raw / "merged.ckpt")
    (raw / "config.json").write_text(json.dumps(tiny_vae_config()))  # the release has it beside
    write_release_dit(raw / "93x480p", "t2v")
    write_release_dit(raw / "93x480p_i2v", "i2v")
    write_release_dit(raw / "93x480p_2layers", "t2v", num_layers=2)  # for pp_layers [1, 1]
    words = [w for phrase in [*COLOURS, *SHAPES, *MOTIONS, "a moving on background"] for w in phrase.split()]
    save_tiny_text_encoder(root / "weights" / "google" / "mt5-xxl", sorted(set(words)), kind="mt5",
                           d_model=TEXT_WORDS)
    torch.manual_seed(0)
    make_dataset(root / "data", num_videos=clips, frames=frames, sizes=CLIP_SIZES, fps=16)
    return root


def tiny_model_json(example: Path, root: Path, out: Path, **changes) -> Path:
    """``example`` (a model JSON of examples/opensoraplan1.3) with the tiny DiT and WFVAE configs and
    the weight paths under ``root`` (the DiT's stays as the example has it: the scripts pass --load);
    ``changes`` update top-level keys, ``predictor__key`` / ``ae__key`` / ``inference__key`` nested ones."""
    model = json.loads(example.read_text())
    model["predictor"].update(TINY_PREDICTOR)
    model["predictor"].pop("pipeline_num_layers", None)
    model["predictor"]["dtype"] = "fp32"
    vae = tiny_vae_config()
    model["ae"] = {k: v for k, v in model["ae"].items() if k in ("model_id", "vae_cp_size")}
    model["ae"].update(vae, from_pretrained=str(root / "mm_ckpt" / "open-sora-plan" / "vae.pt"), dtype="fp32")
    text = model["text_encoder"]
    text.update(from_pretrained=str(root / "weights" / "google" / "mt5-xxl"), dtype="fp32")
    if "inference" in model:
        model["inference"].update(num_frames=9, height=64, width=64, model_max_length=12,
                                  save_path=str(root / "samples"))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            model.setdefault(section, {})[name] = value
        else:
            model[key] = value
    out.write_text(json.dumps(model, indent=1))
    return out


def tiny_data_json(example: Path, root: Path, out: Path, **preprocess) -> Path:
    """``example`` (a data JSON) reading the synthetic clips with short clips and small sizes."""
    data = json.loads(example.read_text())
    ds = data["dataset_param"]
    ds["basic_parameters"]["data_path"] = str(root / "data" / "data.txt")
    ds["tokenizer_config"].update(from_pretrained=str(root / "weights" / "google" / "mt5-xxl"), model_max_length=12)
    params = ds["preprocess_parameters"]
    params.update(num_frames=9, min_num_frames=5)
    if params.get("force_resolution"):
        params.update(max_height=64, max_width=64)
    else:
        params.update(max_hxw=4096, hw_stride=16)
    for step in params.get("train_pipeline", {}).get("video", []):  # the transforms name the sizes too
        param = step.get("param", {})
        if "stride" in param:
            param["stride"] = params["hw_stride"]
        if "size" in param:
            param["size"] = [params["max_height"], params["max_width"]]
    params.update(preprocess)
    out.write_text(json.dumps(data, indent=1))
    return out
