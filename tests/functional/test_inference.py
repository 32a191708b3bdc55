"""inference.py: playable .mp4 files named from prompt and seed (never overwritten), the same latents
under TP and every context-parallel algorithm as on one process, weights from HuggingFace or a
training checkpoint (the quickstart end to end: tests/functional/test_quickstart.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.functional.test_pretrain_t2v import REPO
from tests.markers import marked_extended

ENV = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _inference_json(assets, out: Path, **changes) -> Path:
    """The fixture's model JSON (4-layer DiT with fixed HuggingFace weights) with the quickstart's
    inference section, fewer steps, latents saved, and guidance 3 (both branches a step: what CFG
    parallelism and the parallel layouts split; the quickstart itself samples unguided)."""
    model = json.loads((assets / "model.json").read_text())
    section = json.loads((assets / "inference_model.json").read_text())["inference"]
    section.update(sample_steps=4, save_path=str(out), save_latents=True, guidance_scale=3.0, **changes)
    model["inference"] = section
    path = out.parent / f"{out.name}_model.json"
    path.write_text(json.dumps(model))
    return path


def _run(nproc: int, model_json: Path, *flags, script: tuple[str, ...] = ("inference.py",),
         env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script,
           "--mm-model", str(model_json), *flags]
    done = subprocess.run(cmd, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, _failure(done)
    return done.stdout


def _failure(done: subprocess.CompletedProcess) -> str:
    """The end of a failed run's output without the progress bars and warnings that would push the
    failing rank's traceback out of the message."""
    noise = ("it/s]", "s/it]", "Warning", "warnings.warn", "No CUDA runtime is found")
    err = "\n".join(line for line in done.stderr.splitlines() if not any(n in line for n in noise))
    return f"exit status {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{err[-6000:]}"


# inference.py with, on every rank, the DiT's forwards (the context each was given), the text
# encoder's outputs and each sharded model's local parameter bytes recorded: observed, not replaced
SPY = """
import os
import sys

import torch

from mm.families.spec import FamilySpec
from mm.inference import runner
from mm.models.text_encoder import TextEncoder

seen = {"contexts": [], "encoded": [], "shards": []}
build_predictor, shard_parameters, encode = FamilySpec.build_predictor, runner.shard_parameters, TextEncoder.encode


def spied_build_predictor(*args, **kwargs):
    model = build_predictor(*args, **kwargs)
    model.register_forward_pre_hook(lambda module, args, kwargs: seen["contexts"].append(kwargs["context"].clone()),
                                    with_kwargs=True)
    return model


def spied_encode(self, *args, **kwargs):
    out = encode(self, *args, **kwargs)
    seen["encoded"].append(out.detach().clone())
    return out


def spied_shard_parameters(module, group, device_type):
    held = shard_parameters(module, group, device_type)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in module.parameters())
    seen["shards"].append({"model": type(module).__name__, "group": torch.distributed.get_world_size(group),
                           "bytes": local})
    return held


FamilySpec.build_predictor, runner.shard_parameters, TextEncoder.encode = \
    spied_build_predictor, spied_shard_parameters, spied_encode
rank = os.environ["RANK"]
runner.inference(sys.argv[2:])
torch.save(seen, os.path.join(sys.argv[1], f"rank{rank}.pt"))
"""


def _spied_run(nproc: int, model_json: Path, seen_dir: Path, *flags) -> tuple[list[dict], str]:
    """inference.py through SPY: each rank's record, and the log."""
    seen_dir.mkdir(parents=True)
    script = seen_dir / "spied_inference.py"
    script.write_text(SPY)
    log = _run(nproc, model_json, *flags, script=(str(script), str(seen_dir)), env=dict(ENV, PYTHONPATH=str(REPO)))
    return [torch.load(seen_dir / f"rank{r}.pt") for r in range(nproc)], log


def _decode(path: Path) -> tuple[int, int, int]:
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape[0], frames[0].shape[1]


@pytest.fixture(scope="module")
def two_prompts_one_process(assets, tmp_path_factory) -> Path:
    """One process's samples of the quickstart's two prompts (the directory they are written to)."""
    out = tmp_path_factory.mktemp("two_prompts") / "samples"
    _run(1, _inference_json(assets, out))
    return out


def test_writes_playable_videos_and_never_overwrites(assets, tmp_path, two_prompts_one_process):
    """H.264 at inference.fps (the fixture's 8, not Wan's default 16): 9 frames last 9/8 s."""
    import shutil

    import av

    # the first run's samples (the fixture's) in this run's save_path, then the same run again
    shutil.copytree(two_prompts_one_process, tmp_path / "samples")
    model_json = _inference_json(assets, tmp_path / "samples")
    fps = json.loads(model_json.read_text())["inference"]["fps"]
    assert fps == 8
    videos = sorted((tmp_path / "samples").glob("*.mp4"))
    assert [v.name for v in videos] == ["a_blue_circle_moving_top_to_bottom_on_a_yellow_background_seed43.mp4",
                                        "a_red_square_moving_left_to_right_on_a_white_background_seed42.mp4"]
    for video in videos:
        assert _decode(video) == (9, 64, 64)
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.average_rate == fps
            assert container.duration / av.time_base == pytest.approx(9 / fps)
    first = torch.load(videos[1].with_suffix(".latents.pt"))
    assert first.shape == (1, 4, 3, 8, 8) and torch.isfinite(first).all()
    out = _run(1, model_json)  # again: new names, the first videos stay
    assert "_seed42_1.mp4" in out
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 4
    assert torch.equal(torch.load(tmp_path / "samples" / videos[1].name.replace(".mp4", "_1.latents.pt")), first)


# CP2 Ulysses: test_sharded_dit_and_text_encoder_change_nothing; CP2 ring with overlap:
# test_vae_cp_decode_writes_the_same_video (both against one process's latents)
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    # the fixture's DiT has 4 heads: Ulysses over all 4 ranks gives each one head
    "cp4_ulysses": (4, ["--context-parallel-size", "4", "--context-parallel-algo", "ulysses_cp_algo"]),
    "cp4_ring": (4, ["--context-parallel-size", "4", "--context-parallel-algo", "megatron_cp_algo",
                     "--use-cp-send-recv-overlap"]),
    # CP4 hybrid (Ulysses 2 inside ring 2): test_wan_ulysses_and_ring_sizes_in_the_json
    "cfg_parallel_cp2_ulysses": (4, ["--cfg-parallel", "--context-parallel-size", "2"]),
}  # --cfg-parallel alone: test_cfg_parallel_runs_one_branch_per_rank


@pytest.fixture(scope="module")
def one_process_latents(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "samples"
    _run(1, _inference_json(assets, out, prompt="a red square moving left to right on a white background"))
    return torch.load(next(out.glob("*.latents.pt")))


# cp4_ulysses, cfg_parallel_cp2_ulysses: Ulysses is also the CP2 sharded-DiT run's, --cfg-parallel
# test_cfg_parallel_runs_one_branch_per_rank's; cp4_ring: ring with overlap is the VAE-CP decode run's (CP2)
EXTENDED = {"cp4_ulysses", "cp4_ring", "cfg_parallel_cp2_ulysses"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", marked_extended(LAYOUTS, EXTENDED))
def test_parallel_inference_equals_one_process(assets, tmp_path, layout, one_process_latents):
    nproc, flags = LAYOUTS[layout]
    out = tmp_path / "samples"
    log = _run(nproc, _inference_json(assets, out, prompt="a red square moving left to right on a white background"),
               *flags)
    if "--context-parallel-algo" in flags:
        size, algo = (flags[flags.index(f) + 1] for f in ("--context-parallel-size", "--context-parallel-algo"))
        assert f"CP={size} ({algo})" in log
    (latents,) = [torch.load(p) for p in out.glob("*.latents.pt")]  # rank 0 alone writes
    torch.testing.assert_close(latents, one_process_latents, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cfg_parallel_runs_one_branch_per_rank(assets, tmp_path, one_process_latents):
    """--cfg-parallel on 2 ranks: each rank runs the DiT once a step (one process runs it twice),
    rank 0 on the prompt's encoding and rank 1 on the negative prompt's; the latents are one
    process's."""
    out = tmp_path / "samples"
    model_json = _inference_json(assets, out, prompt="a red square moving left to right on a white background")
    steps = json.loads(model_json.read_text())["inference"]["sample_steps"]
    seen, _ = _spied_run(2, model_json, tmp_path / "seen", "--cfg-parallel")
    for rank, record in enumerate(seen):
        (encoded,) = record["encoded"]  # [prompt, negative prompt], on every rank
        assert len(record["contexts"]) == steps, (rank, len(record["contexts"]))
        assert all(torch.equal(context, encoded[rank:rank + 1]) for context in record["contexts"]), rank
    assert not torch.allclose(seen[0]["encoded"][0][0], seen[0]["encoded"][0][1])  # two different branches
    (latents,) = [torch.load(p) for p in out.glob("*.latents.pt")]
    torch.testing.assert_close(latents, one_process_latents, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_data_parallel_replicas_share_the_prompts(assets, tmp_path, two_prompts_one_process):
    """DP2: each replica samples every other prompt; each video's latents are one process's."""
    out = _run(2, _inference_json(assets, tmp_path / "two"))
    assert out.count("inference.py: wrote") == 2
    one = {p.name: torch.load(p) for p in two_prompts_one_process.glob("*.latents.pt")}
    two = {p.name: torch.load(p) for p in (tmp_path / "two").glob("*.latents.pt")}
    assert len(one) == 2 and set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-4)


def test_cfg_parallel_needs_an_even_data_parallel_size(assets, tmp_path):
    model_json = _inference_json(assets, tmp_path / "cfg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "inference.py",
           "--mm-model", str(model_json), "--cfg-parallel"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--cfg-parallel pairs data-parallel ranks; the data-parallel size is 1" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def red_square_samples(assets, tmp_path_factory) -> Path:
    """One process's samples for the prompt "a red square" from predictor.from_pretrained's weights
    (the directory they are written to)."""
    out = tmp_path_factory.mktemp("red") / "samples"
    _run(1, _inference_json(assets, out, prompt="a red square"))
    return out


@pytest.fixture(scope="module")
def red_square_latents(red_square_samples):
    return torch.load(next(red_square_samples.glob("*.latents.pt")))


def test_weights_from_a_training_checkpoint(assets, tmp_path, trained_checkpoint, red_square_latents):
    """--load of a training run's checkpoint replaces predictor.from_pretrained's weights."""
    ckpt, _ = trained_checkpoint
    trained = _inference_json(assets, tmp_path / "trained", prompt="a red square")
    out = _run(1, trained, "--load", str(ckpt))
    assert "loading torch_dist checkpoint" in out
    b = torch.load(next((tmp_path / "trained").glob("*.latents.pt")))
    assert not torch.allclose(red_square_latents, b)


def test_bad_inference_section_is_refused_before_starting(assets, tmp_path):
    model_json = _inference_json(assets, tmp_path / "bad", num_frames=8, height=60, sample_solver="ddim",
                                 colour="red")
    cmd = [sys.executable, "inference.py", "--mm-model", str(model_json)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    for expected in ("inference.num_frames = 8; valid: 4k + 1", "inference.height = 60; valid: a multiple of 16",
                     "inference.sample_solver = 'ddim'; valid: unipc, dpm++, euler", "inference: unknown key colour"):
        assert expected in done.stderr, done.stderr
    assert not (tmp_path / "bad").exists()


def test_two_experts_from_the_entry_point(assets, tmp_path, trained_checkpoint, red_square_latents):
    """inference.low_noise_model (here a training checkpoint) takes over below boundary_ratio x 1000;
    a boundary below every timestep leaves the high-noise expert alone."""
    ckpt, _ = trained_checkpoint
    runs = {"switching": {"low_noise_model": str(ckpt), "boundary_ratio": 0.9},
            "never": {"low_noise_model": str(ckpt), "boundary_ratio": 0.0001}}
    latents = {"single": red_square_latents}
    for name, extra in runs.items():
        _run(1, _inference_json(assets, tmp_path / name, prompt="a red square", **extra))
        latents[name] = torch.load(next((tmp_path / name).glob("*.latents.pt")))
    assert torch.equal(latents["never"], latents["single"])
    assert not torch.allclose(latents["switching"], latents["single"])


@pytest.mark.slow
def test_wan_ulysses_and_ring_sizes_in_the_json(assets, tmp_path, one_process_latents):
    """Wan's ulysses_size x ring_size (2 x 2: Ulysses inside ring) from the inference section,
    with no parallel flags, equals one process."""
    out = tmp_path / "samples"
    log = _run(4, _inference_json(assets, out, prompt="a red square moving left to right on a white background",
                                  ulysses_size=2, ring_size=2))
    assert "CP=4 (hybrid_cp_algo)" in log
    (latents,) = [torch.load(p) for p in out.glob("*.latents.pt")]
    torch.testing.assert_close(latents, one_process_latents, rtol=1e-4, atol=1e-4)


def test_offload_and_text_encoder_on_the_host_change_nothing(assets, tmp_path, one_process_latents):
    out = tmp_path / "samples"
    _run(1, _inference_json(assets, out, prompt="a red square moving left to right on a white background",
                            offload_model=True, t5_cpu=True))
    (latents,) = [torch.load(p) for p in out.glob("*.latents.pt")]
    assert torch.equal(latents, one_process_latents)


def _parameter_bytes(safetensors_file: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(safetensors_file)).values())


@pytest.mark.slow
def test_sharded_dit_and_text_encoder_change_nothing(assets, tmp_path, one_process_latents):
    """dit_fsdp / t5_fsdp (Wan's names): each rank of the CP2 group holds half of each model's parameters
    (the full size read from the weight files), as the log says; the same latents."""
    import re

    out = tmp_path / "samples"
    seen, log = _spied_run(2, _inference_json(assets, out, dit_fsdp=True, t5_fsdp=True,
                                              prompt="a red square moving left to right on a white background"),
                           tmp_path / "seen", "--context-parallel-size", "2")
    full = {"dit": _parameter_bytes(assets / "dit" / "diffusion_pytorch_model.safetensors"),
            "t5": _parameter_bytes(assets / "umt5" / "model.safetensors")}
    for model, flag, what in (("dit", "dit_fsdp", "the DiT's"), ("t5", "t5_fsdp", "the text encoder's")):
        held = [next(s["bytes"] for s in record["shards"] if ("T5" in s["model"]) == (model == "t5") and
                     s["group"] == 2) for record in seen]
        # dim-0 shards: the two halves make the whole, neither much more than half (odd rows round up)
        assert sum(held) == full[model] and max(held) <= 0.52 * full[model], (model, held, full[model])
        mib = float(re.search(rf"{flag}: {what} parameters sharded over 2 ranks \(([0-9.]+) MiB per rank\)",
                              log).group(1))
        assert abs(mib - held[0] / 2**20) <= 0.05 + 1e-6, (model, mib, held[0])  # printed to 0.1 MiB
    (latents,) = [torch.load(p) for p in out.glob("*.latents.pt")]
    torch.testing.assert_close(latents, one_process_latents, rtol=1e-4, atol=1e-4)


def _frames(path: Path):
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


@pytest.mark.slow
def test_vae_cp_decode_writes_the_same_video(assets, tmp_path):
    """ae.vae_cp_size 2 with CP2: both ranks of the writer's TP x CP group decode half the frames each;
    the video equals one process's (17 frames: two latent frames per rank after the first)."""
    runs = {}
    for name, nproc, vae_cp in (("one", 1, 1), ("two", 2, 2)):
        out = tmp_path / name
        model_json = _inference_json(assets, out, prompt="a red square", num_frames=17)
        model = json.loads(model_json.read_text())
        model["ae"]["vae_cp_size"] = vae_cp
        model_json.write_text(json.dumps(model))
        # CP2 ring with send/recv overlap (CP2 Ulysses: test_sharded_dit_and_text_encoder_change_nothing)
        log = _run(nproc, model_json, *(["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                                         "--use-cp-send-recv-overlap"] if nproc == 2 else []))
        assert ("decoded over 2 VAE-CP ranks" in log) == (vae_cp == 2)
        assert nproc == 1 or "CP=2 (megatron_cp_algo)" in log
        (video,) = out.glob("*.mp4")
        runs[name] = (_frames(video), torch.load(next(out.glob("*.latents.pt"))))
    torch.testing.assert_close(runs["two"][1], runs["one"][1], rtol=1e-4, atol=1e-4)
    one, two = runs["one"][0], runs["two"][0]
    assert one.shape == two.shape == (17, 64, 64, 3)
    assert abs(one - two).mean() < 0.5 and one.std() > 1  # same frames up to rounding, and not blank


def test_sharding_and_vae_cp_are_checked_before_starting(assets, tmp_path):
    model_json = _inference_json(assets, tmp_path / "bad", dit_fsdp=True, t5_fsdp=True, t5_cpu=True)
    cmd = [sys.executable, "inference.py", "--mm-model", str(model_json)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    for expected in ("inference.dit_fsdp shards the DiT over its context-parallel group, which is 1 rank here",
                     "inference.t5_fsdp shards the text encoder over the TP x CP group, which is 1 rank here",
                     "inference.t5_cpu keeps the text encoder whole on the host"):
        assert expected in done.stderr, done.stderr
    # VAE-CP over 2 ranks needs 2 latent frames per rank after the first: 17 video frames, not 9
    model = json.loads(model_json.read_text())
    model["ae"]["vae_cp_size"] = 2
    model["inference"].update(dit_fsdp=False, t5_fsdp=False, t5_cpu=False)
    model_json.write_text(json.dumps(model))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "inference.py",
           "--mm-model", str(model_json), "--context-parallel-size", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ae.vae_cp_size = 2 with inference.num_frames = 9" in done.stdout + done.stderr
    assert not (tmp_path / "bad").exists()


def test_phantom_subject_to_video_from_a_pth_state_dict(assets, tmp_path):
    """task s2v (Phantom): reference images (Phantom's comma-separated ref_image) after the video
    frames; the DiT's weights from a flat .pth state dict (Phantom-Wan-1.3B.pth's form); CP2 (ring)
    equals one process, and other references give another video."""
    import numpy as np
    from PIL import Image

    from mm.models.predictor.name_table import read_weights

    model = json.loads((assets / "model.json").read_text())
    pth = tmp_path / "phantom.pth"
    torch.save(read_weights(model["predictor"]["from_pretrained"]), pth)
    rng = np.random.default_rng(2)
    refs = []
    for i, (h, w) in enumerate(((40, 64), (64, 24), (30, 30))):
        refs.append(tmp_path / f"ref{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(refs[-1])
    latents = {}
    for name, nproc, chosen in (("one", 1, refs[:2]), ("cp2", 2, refs[:2]), ("other", 1, refs[2:])):
        out = tmp_path / name
        model_json = _inference_json(assets, out, prompt="a red square", ref_image=",".join(map(str, chosen)),
                                     sample_guide_scale_img=4.0, sample_guide_scale_text=6.0)
        config = json.loads(model_json.read_text())
        config["predictor"]["from_pretrained"] = str(pth)
        model_json.write_text(json.dumps(config))
        flags = ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"] if nproc == 2 else []
        _run(nproc, model_json, *flags)
        (video,) = out.glob("*.mp4")
        assert _decode(video) == (9, 64, 64)
        latents[name] = torch.load(next(out.glob("*.latents.pt")))
    assert latents["one"].shape == (1, 4, 3, 8, 8)
    torch.testing.assert_close(latents["cp2"], latents["one"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents["other"], latents["one"], atol=1e-3)


def test_phantom_with_cfg_parallel_is_refused(assets, tmp_path):
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 200, 30)).save(ref)
    model_json = _inference_json(assets, tmp_path / "s2v", ref_images=[str(ref)])
    done = subprocess.run([sys.executable, "inference.py", "--mm-model", str(model_json), "--cfg-parallel"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Phantom's s2v guidance has three (text, image, neither): leave --cfg-parallel out" in done.stderr


def test_prompt_extension_runs_on_rank_0_and_is_written_beside_the_video(assets, tmp_path, red_square_samples):
    """use_prompt_extend with local_qwen (a tiny random chat LM made here): rank 0 extends, the ranks
    of a CP2 run sample the extended prompt; the same seed extends the same way again (one process:
    the same latents); the prompt as
    given and as extended lie beside the video; dashscope without its key is refused before start.
    Without extension (the prompt_extend keys given, use_prompt_extend false) the run is
    red_square_samples' (the same prompt and seed, no extension): checked on that run's files."""
    from tests.chat_lm_helpers import make_tiny_chat_lm

    lm = make_tiny_chat_lm(tmp_path / "lm")
    texts, latents = {}, {}
    # the plain run: use_prompt_extend false with the other keys given, checked once against the fixture's
    plain = _inference_json(assets, tmp_path / "plain", prompt="a red square", use_prompt_extend=False,
                            prompt_extend_method="local_qwen", prompt_extend_model=lm, prompt_extend_target_lang="en")
    plain_section = json.loads(plain.read_text())["inference"]
    fixture_section = json.loads((red_square_samples.parent / "samples_model.json").read_text())["inference"]
    for key in ("use_prompt_extend", "prompt_extend_method", "prompt_extend_model", "prompt_extend_target_lang",
                "save_path"):
        plain_section.pop(key, None)
        fixture_section.pop(key, None)
    assert plain_section == fixture_section
    latents["plain"] = torch.load(next(red_square_samples.glob("*.latents.pt")))
    assert list(red_square_samples.glob("*.prompt.txt")) == []
    for name, extend, nproc in (("first", True, 2), ("again", True, 1)):
        out = tmp_path / name
        model_json = _inference_json(assets, out, prompt="a red square", use_prompt_extend=extend,
                                     prompt_extend_method="local_qwen", prompt_extend_model=lm,
                                     prompt_extend_target_lang="en")
        flags = ["--context-parallel-size", "2", "--context-parallel-algo", "ulysses_cp_algo"] if nproc == 2 else []
        stdout = _run(nproc, model_json, *flags)
        latents[name] = torch.load(next(out.glob("*.latents.pt")))
        written = list(out.glob("*.prompt.txt"))
        if extend:
            assert "prompt extension 1/1 (seed 42)" in stdout
            assert len(written) == 1 and written[0].name.startswith("a_red_square")
            texts[name] = written[0].read_text(encoding="utf-8")
        else:
            assert written == []
    given, extended = texts["first"].split("\n\nextended:\n")
    assert given == "a red square" and extended.strip() and extended.strip() != given
    assert texts["again"] == texts["first"]
    torch.testing.assert_close(latents["again"], latents["first"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents["plain"], latents["first"], atol=1e-3)
    model_json = _inference_json(assets, tmp_path / "dash", prompt="x", use_prompt_extend=True,
                                 prompt_extend_method="dashscope")
    env = {k: v for k, v in ENV.items() if k != "DASH_API_KEY"}
    done = subprocess.run([sys.executable, "inference.py", "--mm-model", str(model_json)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "DASH_API_KEY" in done.stderr, _failure(done)
    assert "inference.prompt_extend_method = 'dashscope'" in done.stderr


def _mindspeed_layout(assets, out: Path, prompts: list[str]) -> Path:
    """The fixture's model as MindSpeed-MM's Wan2.1 T2V inference JSON lays it out (examples/wan2.1/1.3b/t2v/
    inference_model.json of its current tree: top-level pipeline keys, a tokenizer section, diffusers'
    UniPCMultistepScheduler with every key that file gives), sampling what _inference_json samples."""
    model = json.loads((assets / "model.json").read_text())
    pred = {k: v for k, v in model["predictor"].items() if k != "model_id"}
    prompt_file = out.parent / f"{out.name}_prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    text = model["text_encoder"]["from_pretrained"]
    unipc = {"model_id": "UniPCMultistepScheduler", "num_train_steps": 1000, "num_inference_steps": 4,
             "guidance_scale": 3.0, "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero",
             "flow_shift": 3.0, "lower_order_final": True, "predict_x0": True, "prediction_type": "flow_prediction",
             "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
             "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
             "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
             "use_flow_sigmas": True, "use_karras_sigmas": False}
    layout = {
        "pipeline_class": "WanPipeline", "prompt": str(prompt_file), "save_path": str(out),
        "use_prompt_preprocess": False, "dtype": "fp32", "device": "npu", "frame_interval": 1, "fps": 8,
        "pipeline_config": {"input_size": [9, 64, 64], "seed": 42},
        "ae": {"model_id": "wan_video_vae", "from_pretrained": model["ae"]["from_pretrained"], "dtype": "float32"},
        "tokenizer": {"autotokenizer_name": "AutoTokenizer", "hub_backend": "hf", "from_pretrained": text,
                      "model_max_length": 16},
        "text_encoder": {"model_id": "UMT5", "hub_backend": "hf", "from_pretrained": text, "dtype": "fp32"},
        "predictor": {"model_id": "wandit", "model_type": "t2v", "qk_norm": True, "qk_norm_type": "rmsnorm",
                      "use_fused_rmsnorm": True, **pred},
        "diffusion": unipc,
    }
    path = out.parent / f"{out.name}_mindspeed_model.json"
    path.write_text(json.dumps(layout))
    return path


@pytest.mark.slow
def test_mindspeed_mm_inference_json_samples_what_the_mm_layout_samples(assets, tmp_path, two_prompts_one_process):
    """MindSpeed-MM's inference JSON layout, read as it is, on 2 data-parallel processes: the videos of mm's
    own layout of the same settings (one process), frame for frame; a file mixing both layouts is refused."""
    from mm.data.decoding import read_frames

    section = json.loads((assets / "inference_model.json").read_text())["inference"]
    prompts = section["prompt"]
    assert section["negative_prompt"] == "" and section["seed"] == 42  # what the layout below samples with
    stdout = _run(2, _mindspeed_layout(assets, tmp_path / "mindspeed", prompts))
    assert "device = 'npu'" in stdout  # the notes say what mm does instead of the keys it does not use
    ours = sorted(p for p in two_prompts_one_process.glob("*.mp4") if p.stem.endswith(("_seed42", "_seed43")))
    theirs = sorted((tmp_path / "mindspeed").glob("*.mp4"))
    assert [p.name for p in theirs] == [p.name for p in ours] and len(ours) == 2
    for a, b in zip(ours, theirs):
        frames_a, frames_b = (read_frames(p, list(range(9)), "auto").astype(int) for p in (a, b))
        assert frames_a.shape == (9, 64, 64, 3)
        assert abs(frames_a - frames_b).max() <= 3, (a.name, abs(frames_a - frames_b).max())
    mixed = json.loads(_mindspeed_layout(assets, tmp_path / "mixed", prompts).read_text())
    mixed["inference"] = {"sample_steps": 4}
    path = tmp_path / "mixed_model.json"
    path.write_text(json.dumps(mixed))
    done = subprocess.run([sys.executable, "inference.py", "--mm-model", str(path)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "mixes MindSpeed-MM's top-level inference keys" in done.stderr, _failure(done)


MINDSPEED_REF = os.environ.get("MM_MINDSPEED_MM_REF")
MINDSPEED_WAN_FILES = ["wan2.1/1.3b/t2v", "wan2.1/1.3b/i2v", "wan2.1/14b/t2v", "wan2.1/14b/i2v", "wan2.1/14b/flf2v",
                       "wan2.2/5B/t2v", "wan2.2/5B/ti2v", "wan2.2/A14B/t2v", "wan2.2/A14B/i2v"]


def _standin_vae(root: Path, channels: int) -> str:
    from mm.models.ae import WanVAE, WanVAEConfig, save_wan_vae
    from tests.vae_helpers import VARIANTS

    config = dict(VARIANTS["wan2.2" if channels == 48 else "wan2.1"], z_dim=channels, latents_mean=[0.0] * channels,
                  latents_std=[1.0] * channels)
    path = root / f"vae_{channels}"
    save_wan_vae(WanVAE(WanVAEConfig(**config)), path)
    return str(path)


@pytest.mark.skipif(not MINDSPEED_REF, reason="set MM_MINDSPEED_MM_REF to a MindSpeed-MM checkout to read its files")
@pytest.mark.parametrize("example", MINDSPEED_WAN_FILES + ["wan2.1/1.3b/v2v"])
def test_mindspeed_mm_s_own_wan_inference_files_validate(assets, tmp_path, example):
    """MindSpeed-MM's examples/<example>/inference_model.json (its prompt and image lists, read from the checkout)
    with only the weight paths pointed at the fixture's: valid for its 8-rank launch (--load as its
    inference.sh passes it); its video-to-video files refused, naming the keys."""
    ref = Path(MINDSPEED_REF)
    data = json.loads((ref / "examples" / example / "inference_model.json").read_text())
    model = json.loads((assets / "model.json").read_text())
    # a tiny VAE of the DiT's latent channels (16, or Wan2.2's 48 with its 16x compression) stands in
    data["ae"]["from_pretrained"] = _standin_vae(tmp_path, data["predictor"].get("out_dim", 16))
    for key in ("text_encoder", "tokenizer", "image_encoder"):
        if key in data:
            data[key]["from_pretrained"] = model["text_encoder"]["from_pretrained"]  # a directory is what is checked
    if "low_noise_predictor" in data:
        data["low_noise_predictor"] = str(assets)
    data["save_path"] = str(tmp_path / "samples")
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "-m", "mm.preflight", "--nproc_per_node", "8", str(REPO / "inference.py"),
                           "--mm-model", str(path), "--load", str(assets)], cwd=ref, env=ENV, capture_output=True,
                          text=True, timeout=300)
    if example.endswith("v2v"):
        assert done.returncode == 2 and "video-to-video (WanPipeline's v2v) is not in mm" in done.stderr, _failure(done)
    else:
        assert done.returncode == 0 and "configuration valid for 8 process(es)" in done.stdout, _failure(done)
