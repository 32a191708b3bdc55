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

FRAMES, HEIGHT, WIDTH = 9, 64, 64


def make_text_encoder(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = sorted({w for phrase in [*COLOURS, *SHAPES, *MOTIONS, "a moving on background"] for w in phrase.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(path)
    config = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(config).save_pretrained(path)


def main(out: str) -> None:
    root = Path(out)
    torch.manual_seed(0)
    data_txt = make_dataset(root / "data", num_videos=16, frames=17, sizes=[(HEIGHT, WIDTH), (48, 96)], fps=16)
    save_wan_vae(WanVAE(WanVAEConfig(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4)), root / "vae")
    make_text_encoder(root / "umt5")
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
    (root / "data.json").write_text(json.dumps(data, indent=1))
    print(f"quickstart assets in {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
