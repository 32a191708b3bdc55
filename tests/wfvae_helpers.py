"""The tiny WFVAE of the golden fixture (tests/fixtures/opensoraplan/, made by the reference at 4b14d58)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "opensoraplan"


def golden() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the fixture's metadata, the reference state dict, the reference's inputs and outputs)."""
    from safetensors.torch import load_file

    meta = json.loads((FIXTURES / "wfvae_tiny_config.json").read_text())
    return (meta, load_file(str(FIXTURES / "wfvae_tiny_state_dict.safetensors")),
            load_file(str(FIXTURES / "wfvae_tiny_golden.safetensors")))


def tiny_wfvae(**overrides):
    """Our WFVAE with the fixture's config and the reference's weights."""
    from mm.models.ae import WFVAE, WFVAEConfig, wfvae_state_dict_from_reference

    meta, state, _ = golden()
    vae = WFVAE(WFVAEConfig(**dict(meta["config"], **overrides))).eval()
    vae.load_state_dict(wfvae_state_dict_from_reference(state), strict=True)
    return vae
