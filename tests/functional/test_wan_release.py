"""inference.py on Wan's and Phantom's own files and generate configuration, as their users have them:
a Phantom generate config put verbatim into the model JSON's inference section (task s2v-1.3B,
size 832*480, ckpt_dir, phantom_ckpt, nulls, Wan's parallel keys) over a tiny original-layout
release, on 2 CPU processes (Ulysses 2, dit_fsdp, t5_fsdp), gives the latents of one process run
with the same weights through mm's own keys and layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.functional.test_inference import ENV, _failure
from tests.functional.test_pretrain_t2v import REPO

# the config of Phantom's multi-GPU example, as its users run it (ulysses 4 x ring 2 on 8 GPUs here
# ulysses 2 x ring 1 on 2 processes)
PHANTOM_CONFIG = {
    "task": "s2v-1.3B", "size": "832*480", "frame_num": 81, "ckpt_dir": "./Wan2.1-T2V-1.3B",
    "phantom_ckpt": "./Phantom-Wan-1.3B/Phantom-Wan-1.3B.pth", "offload_model": False, "ulysses_size": 2,
    "ring_size": 1, "t5_fsdp": True, "t5_cpu": False, "dit_fsdp": True, "use_prompt_extend": False,
    "prompt_extend_method": "local_qwen", "prompt_extend_model": None, "prompt_extend_target_lang": "ch",
    "base_seed": 40, "sample_solver": "unipc", "sample_steps": None, "sample_shift": None,
    "sample_guide_scale": 5.0, "sample_guide_scale_img": 5.0, "sample_guide_scale_text": 7.5}
PROMPTS = ["a person runs over the street", "a red car under the blue sky"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny release (``tests.wan_release_assets``) and two reference images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wan_release")
    done = subprocess.run([sys.executable, "-m", "tests.wan_release_assets", str(root)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, _failure(done)
    rng = np.random.default_rng(0)
    for name, (h, w) in (("ref1.png", (300, 200)), ("ref2.png", (120, 400))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


def _run(cwd: Path, nproc: int, model: dict) -> torch.Tensor:
    """inference.py in ``cwd`` (relative paths as a user's); the latents of each prompt, in order."""
    path = cwd / "model.json"
    path.write_text(json.dumps(model, ensure_ascii=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "inference.py"), "--mm-model", str(path)]
    done = subprocess.run(cmd, cwd=cwd, env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=2400)
    assert done.returncode == 0, _failure(done)
    found = {}
    for f in (cwd / "outputs" / "samples").glob("*.latents.pt"):
        found[f.name] = torch.load(f)
    assert len(found) == len(PROMPTS), sorted(found)
    return done.stdout, [found[k] for k in sorted(found)]


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("frames,steps", [pytest.param(81, None, marks=pytest.mark.extended), (5, 8)])
def test_phantoms_generate_config_verbatim_on_the_original_files(release, tmp_path, frames, steps):
    """81 frames: the config as it is (about 15 minutes on 2 CPU cores, the VAE decoding 832x480 frames:
    extended); 5 frames: the same with Phantom's --frame_num 5 --sample_steps 8 (its null sample_steps,
    s2v-1.3B's 50: tests/unit/test_wan_release.py::test_nulls_take_the_tasks_defaults_and_size_is_width_by_height;
    the other nulls stay null here)."""
    from mm.families.wan.release import WAN_NEGATIVE_PROMPT

    users = dict(PHANTOM_CONFIG, prompt=PROMPTS, ref_image=f"{release / 'ref1.png'},{release / 'ref2.png'}",
                 save_latents=True, frame_num=frames, sample_steps=steps)
    for name in ("Wan2.1-T2V-1.3B", "Phantom-Wan-1.3B"):  # the user's working directory holds the downloads
        (tmp_path / "wan").mkdir(exist_ok=True)
        (tmp_path / "wan" / name).symlink_to(release / name)
    out, latents = _run(tmp_path / "wan", 2, {"inference": users})
    assert "sharded over 2 ranks" in out and "is not s2v-1.3B's architecture" in out

    mine = json.loads((release / "mm" / "predictor.json").read_text())
    own = {"predictor": mine, "ae": {"model_id": "wan_vae", "from_pretrained": str(release / "mm" / "vae")},
           "text_encoder": {"model_id": "umt5", "from_pretrained": str(release / "mm" / "umt5"), "dtype": "bf16"},
           "inference": {"prompt": PROMPTS, "ref_images": [str(release / "ref1.png"), str(release / "ref2.png")],
                         "task": "s2v", "seed": 40, "num_frames": frames, "width": 832, "height": 480, "fps": 16,
                         "sample_steps": steps or 50, "sample_shift": 5.0, "sample_solver": "unipc",
                         "guidance_scale_img": 5.0, "guidance_scale_text": 7.5,
                         "negative_prompt": WAN_NEGATIVE_PROMPT, "save_latents": True}}
    (tmp_path / "own").mkdir()
    _, expected = _run(tmp_path / "own", 1, own)
    assert [t.shape for t in latents] == [(1, 16, (frames - 1) // 4 + 1, 60, 104)] * 2
    for got, want in zip(latents, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents[0], latents[1], atol=1e-3)


def test_mm_convert_takes_phantoms_pth_with_the_base_models_config(release, tmp_path):
    """hf_to_mm from Phantom's .pth (--cfg.source_config: the base model's config.json) writes the
    checkpoint the same weights give from a release directory."""
    from safetensors.torch import save_file

    pth = release / "Phantom-Wan-1.3B" / "Phantom-Wan-1.3B.pth"
    as_dir = tmp_path / "dir"
    as_dir.mkdir()
    save_file(torch.load(pth), str(as_dir / "diffusion_pytorch_model.safetensors"))
    (as_dir / "config.json").write_text((release / "Wan2.1-T2V-1.3B" / "config.json").read_text())

    def convert(*args):
        return subprocess.run([sys.executable, "-m", "checkpoint", "WanConverter", "--version", "wan2.1", "hf_to_mm",
                               *args, "--cfg.target_parallel_config.tp_size", "2"], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)

    for name, args in (("pth", ["--cfg.source_path", str(pth), "--cfg.source_config",
                                str(release / "Wan2.1-T2V-1.3B" / "config.json")]),
                       ("dir", ["--cfg.source_path", str(as_dir)])):
        done = convert(*args, "--cfg.target_path", str(tmp_path / f"out_{name}"))
        assert done.returncode == 0, _failure(done)
    for rank in ("mp_rank_00", "mp_rank_01"):
        got = torch.load(tmp_path / "out_pth" / "release" / rank / "model_optim_rng.pt", weights_only=False)["model"]
        want = torch.load(tmp_path / "out_dir" / "release" / rank / "model_optim_rng.pt", weights_only=False)["model"]
        assert got.keys() == want.keys()
        for key in want:
            if isinstance(want[key], torch.Tensor):
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    done = convert("--cfg.source_path", str(pth), "--cfg.target_path", str(tmp_path / "out_none"))
    assert done.returncode != 0 and "the base model's, e.g. --cfg.source_config" in done.stderr, _failure(done)
