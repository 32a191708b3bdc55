"""WanConverter: Wan2.1 / Wan2.2 DiT weights between HuggingFace layouts and mm checkpoints, and Wan's text
encoder release file to a transformers directory."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from checkpoint.config import ConvertConfig, ConvertError
from checkpoint.converter import DiTConverter
from checkpoint.sources import read_torch_state
from checkpoint.writers import open_mode, staged_target
from mm.models.predictor.wan.weights import WAN_WEIGHTS

# what t5_convert copies from the tokenizer directory (Wan's google/umt5-xxl holds the first four)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json",
                   "added_tokens.json")


class WanConverter(DiTConverter):
    """Wan2.1 / Wan2.2 DiT weights, and Wan's UMT5 text encoder.

    Every variant (Wan2.1 T2V/I2V/FLF2V, Wan2.2 T2V/I2V-A14B experts, TI2V-5B) is read from the
    source: config.json and the tensors present. hf_to_mm reads a diffusers WanTransformer3DModel
    directory or the original Wan release; mm_to_hf writes what WanTransformer3DModel.from_pretrained
    loads. t5_convert turns the release's models_t5_umt5-xxl-enc-bf16.pth into a UMT5EncoderModel directory.

    Args:
        version: wan2.1 or wan2.2.
    """

    WEIGHTS = WAN_WEIGHTS
    VERSIONS = ("wan2.1", "wan2.2")

    def t5_convert(self, cfg: ConvertConfig, tokenizer_path: Optional[str] = None) -> None:
        """Wan's text encoder release file (models_t5_umt5-xxl-enc-bf16.pth: the state dict of Wan's
        T5Encoder) -> a transformers UMT5EncoderModel directory (config.json, safetensors, the file's dtype)
        with the tokenizer files copied in: what the model JSON's text_encoder.from_pretrained reads. Every
        size is read from the tensors; missing, unexpected and misshapen tensors are named.

        Args:
            cfg: source_path (the .pth file), target_path (the directory to write), overwrite.
            tokenizer_path: the tokenizer directory (default: google/umt5-xxl beside the .pth, Wan's layout).
        """
        from mm.models.text_encoder.encoder import release_tokenizer_dir
        from mm.models.text_encoder.wan_t5 import umt5_from_original

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected Wan's text encoder "
                               "release file, models_t5_umt5-xxl-enc-bf16.pth)")
        try:
            tokenizer = release_tokenizer_dir(source, tokenizer_path, key="--tokenizer_path",
                                              file_key="--cfg.source_path")
        except FileNotFoundError as e:
            raise ConvertError(str(e)) from None
        state = read_torch_state(source)
        try:
            model = umt5_from_original(state, key=f"--cfg.source_path = {cfg.source_path!r}")
        except ValueError as e:
            raise ConvertError(str(e)) from None
        copied = [f for f in TOKENIZER_FILES if (tokenizer / f).is_file()]
        with staged_target(cfg.target_path, cfg.overwrite) as tmp:
            model.save_pretrained(tmp)
            for written in tmp.glob("*.safetensors"):
                os.chmod(written, open_mode())  # safetensors creates its files 0600
            for name in copied:
                shutil.copyfile(tokenizer / name, tmp / name)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._summary("t5_convert", f"{source} ({model.config.num_layers} blocks, {model.dtype}; tokenizer "
                      f"{', '.join(copied)} from {tokenizer})", cfg.target_path, None, nbytes, start)
