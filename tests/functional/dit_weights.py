"""Fixed random DiT weights in diffusers' layout for a model JSON, so every parallel layout of a
functional test starts from the same model:

    python tests/functional/dit_weights.py MODEL_JSON OUT_DIR [MODEL_JSON OUT_DIR ...]
        (also sets each model JSON's predictor.from_pretrained; several pairs share one process start)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.dist_helper import run_distributed  # noqa: E402

ARCH_ONLY = ("model_id", "dtype", "num_layers", "num_heads", "pipeline_num_layers", "from_pretrained")


def _worker(rank, world, model_jsons):
    from megatron.core.transformer import TransformerConfig

    from mm.families import build_predictor, predictor_config
    from mm.models.predictor.wan import mm_to_hf
    from mm.parallel import ParallelSizes, destroy_parallel, initialize_parallel

    states = []
    for model_json in model_jsons:  # each from seed 0, as in a process of its own
        initialize_parallel(ParallelSizes(world_size=1), seed=0)
        pred = json.loads(Path(model_json).read_text())["predictor"]
        params = {k: v for k, v in pred.items() if k not in ARCH_ONLY}
        arch = predictor_config("wan_dit", params, pred["num_layers"], pred["num_heads"])
        model = build_predictor("wan_dit", arch, TransformerConfig(
            num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
            use_cpu_initialization=True))
        states.append(mm_to_hf([dict(model.state_dict())]))
        destroy_parallel()
    return states


def main(*pairs: str) -> None:
    from safetensors.torch import save_file

    assert pairs and len(pairs) % 2 == 0, "usage: dit_weights.py MODEL_JSON OUT_DIR [MODEL_JSON OUT_DIR ...]"
    model_jsons, outs = pairs[0::2], pairs[1::2]
    states = run_distributed(1, _worker, model_jsons)[0]
    for model_json, out, state in zip(model_jsons, outs, states):
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "diffusion_pytorch_model.safetensors"))
        model = json.loads(Path(model_json).read_text())
        model["predictor"]["from_pretrained"] = str(out)
        Path(model_json).write_text(json.dumps(model))


if __name__ == "__main__":
    main(*sys.argv[1:])
