"""Fixtures shared by the functional tests of the Wan entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def assets(tmp_path_factory, quickstart_assets):
    """The quickstart's synthetic assets with a 4-layer DiT of fixed weights (HuggingFace layout),
    shared by the Wan training and inference tests (each writes its own variant JSONs beside them)."""
    root = quickstart_assets(tmp_path_factory.mktemp("qs"))
    import json

    model = json.loads((root / "model.json").read_text())
    model["predictor"]["num_layers"] = 4  # enough layers for PP2 x VPP2
    (root / "model.json").write_text(json.dumps(model))
    # fixed DiT weights in diffusers layout, so every parallel layout starts from the same model
    code = f"""
import json, torch
from safetensors.torch import save_file
from tests.dist_helper import run_distributed
def worker(rank, world):
    from mm.parallel import ParallelSizes, initialize_parallel, destroy_parallel
    from mm.families import build_predictor, predictor_config
    from mm.models.predictor.wan import mm_to_hf
    from mm.models.predictor.transformer_config import transformer_config
    import argparse
    initialize_parallel(ParallelSizes(world_size=1), seed=0)
    pred = json.load(open('{root}/model.json'))['predictor']
    params = {{k: v for k, v in pred.items() if k not in ('model_id', 'dtype', 'num_layers', 'num_heads')}}
    arch = predictor_config('wan_dit', params, pred['num_layers'], pred['num_heads'])
    from megatron.core.transformer import TransformerConfig
    model = build_predictor('wan_dit', arch, TransformerConfig(num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads, use_cpu_initialization=True))
    sd = mm_to_hf([{{k: v for k, v in model.state_dict().items()}}])
    destroy_parallel()
    return sd
sd = run_distributed(1, worker)[0]
import os; os.makedirs('{root}/dit', exist_ok=True)
save_file({{k: v.contiguous() for k, v in sd.items()}}, '{root}/dit/diffusion_pytorch_model.safetensors')
model = json.load(open('{root}/model.json')); model['predictor']['from_pretrained'] = '{root}/dit'
json.dump(model, open('{root}/model.json', 'w'))
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def trained_checkpoint(assets, tmp_path_factory):
    """A 2-iteration single-process training run from the fixture's weights, saved (torch_dist):
    (checkpoint directory, the run's log)."""
    from tests.functional.test_pretrain_t2v import _train

    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    _, out = _train(assets, 1, "--save", str(ckpt), iters=2)
    return ckpt, out
