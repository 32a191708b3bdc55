"""inference.py against diffusers' WanPipeline on the same random full-size Wan2.1-1.3B weights.

    python benchmarks/inference_wan.py outputs/bench/inference_wan --frames 81 --height 480 --width 832 --steps 50

Makes (once) the assets under OUT: a diffusers-format DiT of random bf16 weights with the 1.3B
config, a random Wan2.1-size VAE and a 2-layer UMT5-style text encoder of the real width (4096),
and an inference model JSON that points at them. Then, in two child processes one after the
other, samples one prompt with classifier-free guidance (guidance 5, UniPC, shift 3):

* ``mm``: ``inference.py --bf16`` (its log line gives s/step over steps 2..N and peak memory); with
  ``--compile`` also ``inference.py --bf16 --compile-dit-blocks``; ``--mm-run`` (repeatable) gives one run's
  extra flags instead (``--mm-run=--compile-dit-blocks --mm-run="--compile-dit-blocks --attention-kernel cudnn"``);
* ``diffusers``: ``WanPipeline`` in bf16 (VAE in bf16 too), its steps timed by a step callback,
  peak memory from torch.cuda.

Prints the lines. No downloads. Both step times are means over steps 2..N (the first step, with
its warm-up or compilation, is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red square moving left to right on a white background"

DIFFUSERS = r"""
import json, sys, time, torch, transformers
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
root, frames, height, width, steps = sys.argv[1], *map(int, sys.argv[2:6])
dtype = torch.bfloat16
pipe = WanPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(f"{root}/umt5"),
                   text_encoder=transformers.UMT5EncoderModel.from_pretrained(f"{root}/umt5", dtype=dtype),
                   transformer=WanTransformer3DModel.from_pretrained(f"{root}/dit", torch_dtype=dtype),
                   vae=AutoencoderKLWan.from_pretrained(f"{root}/vae", torch_dtype=dtype),
                   scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0, num_train_timesteps=1000))
cuda = torch.cuda.is_available()
pipe = pipe.to("cuda" if cuda else "cpu")
sync = torch.cuda.synchronize if cuda else (lambda: None)
stamps = []
def on_step(pipe, i, t, kwargs):
    sync(); stamps.append(time.perf_counter()); return kwargs
if cuda:
    torch.cuda.reset_peak_memory_stats()
sync(); start = time.perf_counter()
pipe(prompt=sys.argv[6], negative_prompt="", height=height, width=width, num_frames=frames, num_inference_steps=steps,
     guidance_scale=5.0, generator=torch.Generator().manual_seed(42), output_type="np", callback_on_step_end=on_step)
sync(); total = time.perf_counter() - start
per_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
print(f"diffusers WanPipeline: {frames} frames, {height}x{width}, {steps} unipc steps: {per_step:.3f} s/step; "
      f"{total:.1f} s in all; peak memory {peak:.1f} GiB", flush=True)
"""


def make_assets(root: Path, predictor_json: Path) -> None:
    import torch
    from diffusers import WanTransformer3DModel

    from mm.models.predictor.wan.hf_config import diffusers_config
    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
    from mm.families import predictor_config
    from mm.models.text_encoder.tiny import save_tiny_text_encoder

    pred = json.loads(predictor_json.read_text())["predictor"]
    params = {k: v for k, v in pred.items() if k not in ("model_id", "dtype", "num_layers", "num_heads",
                                                          "from_pretrained", "pipeline_num_layers")}
    import dataclasses

    arch = dataclasses.asdict(predictor_config("wan_dit", params, pred["num_layers"], pred["num_heads"]))
    config = {k: v for k, v in diffusers_config(arch).items() if not k.startswith("_")}
    torch.manual_seed(0)
    WanTransformer3DModel(**config).to(torch.bfloat16).save_pretrained(str(root / "dit"))
    save_wan_vae(WanVAE(WanVAEConfig()), root / "vae")
    save_tiny_text_encoder(root / "umt5", PROMPT.split(), d_model=arch["text_dim"])
    pred = dict(pred, from_pretrained=str(root / "dit"))
    pred.pop("pipeline_num_layers", None)
    model = {"predictor": pred, "ae": {"model_id": "wan_vae", "from_pretrained": str(root / "vae")},
             "text_encoder": {"model_id": "umt5", "from_pretrained": str(root / "umt5"), "dtype": "bf16"},
             "diffusion": {"model_id": "flow_matching", "shift": 3.0}}
    (root / "model.json").write_text(json.dumps(model, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--predictor", default="examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also run mm with --compile-dit-blocks")
    p.add_argument("--mm-run", action="append", default=None, metavar="FLAGS",
                   help="one mm run with these extra inference.py flags (one string; '' for none); repeatable")
    a = p.parse_args()
    root = Path(a.out)
    if not (root / "model.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        make_assets(root, REPO / a.predictor)
    model = json.loads((root / "model.json").read_text())
    model["inference"] = {"prompt": PROMPT, "negative_prompt": "", "seed": 42, "num_frames": a.frames,
                          "height": a.height, "width": a.width, "sample_steps": a.steps, "sample_shift": 3.0,
                          "sample_solver": "unipc", "guidance_scale": 5.0, "save_path": str(root / "samples")}
    (root / "inference_model.json").write_text(json.dumps(model, indent=1))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    lines = []
    runs = [shlex.split(r) for r in a.mm_run] if a.mm_run is not None else \
        ([], ["--compile-dit-blocks"]) if a.compile else ([],)
    for flags in runs:
        mm = subprocess.run([sys.executable, "inference.py", "--bf16", "--mm-model", str(root / "inference_model.json"),
                             *flags], cwd=REPO, env=env, capture_output=True, text=True)
        if mm.returncode:
            raise SystemExit(mm.stdout[-3000:] + mm.stderr[-3000:])
        name = "mm" + "".join(f" {f}" for f in flags)
        lines.append(f"{name} " + next(line for line in mm.stdout.splitlines() if "inference.py: wrote" in line))
        print(lines[-1], flush=True)
    ref = subprocess.run([sys.executable, "-c", DIFFUSERS, str(root), str(a.frames), str(a.height), str(a.width),
                          str(a.steps), PROMPT], cwd=REPO, env=env, capture_output=True, text=True)
    if ref.returncode:
        raise SystemExit(ref.stdout[-3000:] + ref.stderr[-3000:])
    print("\n".join(lines))  # again, beside the baseline
    print(next(line for line in ref.stdout.splitlines() if line.startswith("diffusers WanPipeline")))


if __name__ == "__main__":
    main()
