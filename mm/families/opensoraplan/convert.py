"""OpenSoraPlanConverter: Open-Sora-Plan v1.3 weights (the sparse DiT, ``videoditsparse`` /
``videoditsparsei2v``, and the WFVAE) from the reference release to mm."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from checkpoint.config import ConvertConfig, ConvertError
from checkpoint.converter import DiTConverter
from checkpoint.sources import read_torch_state
from checkpoint.writers import compact, staged_file
from mm.models.predictor.opensoraplan.weights import OSP_WEIGHTS


def _check_vae_state(state: dict, config_file: Path) -> str:
    """Every tensor a WFVAE of ``config_file``'s config has, with its shape, and nothing else; returns a
    phrase for the summary."""
    from mm.models.ae.wfvae import WFVAE, WFVAEConfig

    try:
        cfg = WFVAEConfig.from_json(json.loads(config_file.read_text()))
    except ValueError as e:
        raise ConvertError(f"{config_file} (the VAE config beside --cfg.source_path): {e}") from None
    with torch.device("meta"):
        model = WFVAE(cfg)
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{k}: {list(state[k].shape)}, expected {own[k]}" for k in own
                 if k in state and list(state[k].shape) != own[k]]
    if missing or unexpected or misshapen:
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:20])}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
        raise ConvertError(f"--cfg.source_path: the weights do not match the WFVAE {config_file} describes:\n  "
                           + "\n  ".join(problems))
    return f"checked against {config_file.name}"


class OpenSoraPlanConverter(DiTConverter):
    """Open-Sora-Plan v1.3: the sparse DiT (T2V ``videoditsparse``, I2V ``videoditsparsei2v``) and the WFVAE.

    hf_to_mm reads the release's DiT directory (e.g. 93x480p/: config.json and
    diffusion_pytorch_model*.safetensors, under the reference's names or MindSpeed-MM's); whether
    it is T2V or I2V comes from config.json and the tensors present. mm_to_hf writes that layout
    back (the reference's names). vae_convert turns the released VAE checkpoint into the vae.pt
    that the model JSON's ae.from_pretrained reads.

    Args:
        version: v1.3.
    """

    WEIGHTS = OSP_WEIGHTS
    VERSIONS = ("v1.3",)

    def vae_convert(self, cfg: ConvertConfig, use_ema: bool = True) -> None:
        """The released WFVAE checkpoint (merged.ckpt: a torch file holding the reference's state dict,
        EMA weights, or a training checkpoint) -> vae.pt, a flat {name: tensor} state dict that
        ae.from_pretrained reads (the model JSON's ae keys give the config). The reference's fixed
        Haar filters are checked and left out. When a config.json lies beside the source (the
        release's vae/ directory), every tensor is checked against the WFVAE it describes.

        Args:
            cfg: source_path (the .ckpt file), target_path (the .pt file to write), overwrite.
            use_ema: take ema_state_dict when the checkpoint has one (as the reference does).
        """
        from mm.models.ae.wfvae_checkpoint import wfvae_state_dict_from_reference

        start = time.perf_counter()
        source = Path(cfg.source_path)
        if not source.is_file():
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a file (expected the released VAE "
                               "checkpoint, e.g. vae/merged.ckpt)")
        checkpoint = read_torch_state(source)
        try:
            state = wfvae_state_dict_from_reference(checkpoint, use_ema=use_ema)
        except ValueError as e:
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: {e}") from None
        not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        if not state or not_tensors:
            found = f"; not tensors: {', '.join(not_tensors[:10])}" if not_tensors else ""
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: no WFVAE state dict there (top-level keys "
                               f"{sorted(checkpoint)[:10]}{found})")
        strangers = sorted(k for k in state if not k.startswith(("encoder.", "decoder.")))
        if strangers:
            raise ConvertError(f"--cfg.source_path = {cfg.source_path!r}: not a WFVAE state dict (tensors outside "
                               f"encoder.* / decoder.*: {', '.join(strangers[:10])})")
        config_file = source.parent / "config.json"
        checked = _check_vae_state(state, config_file) if config_file.is_file() else "no config.json beside it to check"
        state = {k: compact(v) for k, v in state.items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        with staged_file(cfg.target_path, cfg.overwrite) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
        weights = "EMA" if use_ema and checkpoint.get("ema_state_dict") else "model"
        self._summary("vae_convert", f"{source} ({len(state)} {weights} tensors, {checked})", cfg.target_path, None,
                      nbytes, start)
