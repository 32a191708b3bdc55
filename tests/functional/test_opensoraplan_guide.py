"""MindSpeed-MM's OpenSoraPlan 1.3 guide, step by step, as a user runs it: mm-convert vae_convert and
hf_to_mm (tp 2 with pp_layers [1,1] and [[1,1],[1,1]]), the pretrain_t2v.sh / pretrain_i2v.sh scripts
with the static and the dynamic resolution data JSONs and each CP algorithm, resplit, and the
inference_t2v.sh / inference_i2v.sh scripts writing .mp4 files. Everything at tiny scale on CPU
processes (tests/opensoraplan_assets.py stands in for the downloads); the example JSONs are used with
only their sizes and paths changed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.markers import marked_extended
from tests.opensoraplan_assets import REPO, make_assets, tiny_data_json, tiny_model_json

EXAMPLES = REPO / "examples" / "opensoraplan1.3"
CONVERTED = "mm_ckpt/open-sora-plan/pretrained-checkpoint-dit"


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _mm_convert(root: Path, verb: str, *args: str) -> subprocess.CompletedProcess:
    """The guide's ``mm-convert OpenSoraPlanConverter --version v1.3 <verb> ...`` (the console script)."""
    mm_convert = Path(sys.executable).parent / "mm-convert"
    result = subprocess.run([str(mm_convert), "OpenSoraPlanConverter", "--version", "v1.3", verb, *args], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def _script(root: Path, script: str, **env: str) -> str:
    """``bash examples/opensoraplan1.3/<script>`` with environment overrides; returns its output."""
    full = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=_free_port(),
                LOG_DIR=str(root / "logs"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                **env)
    result = subprocess.run(["bash", str(EXAMPLES / script)], cwd=root, env=full, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """The guide's downloads and its two conversions (VAE; DiT for TP1, the pretrain scripts' default)."""
    root = make_assets(tmp_path_factory.mktemp("guide"))
    out = _mm_convert(root, "vae_convert", "--cfg.source_path", "raw_ckpt/open-sora-plan/merged.ckpt",
                      "--cfg.target_path", "mm_ckpt/open-sora-plan/vae.pt")
    assert "checked" in out.stdout + out.stderr  # against the config.json beside the release's checkpoint
    for variant, release in (("t2v", "93x480p"), ("i2v", "93x480p_i2v")):
        _mm_convert(root, "hf_to_mm", "--cfg.source_path", f"./raw_ckpt/open-sora-plan/{release}/",
                    "--cfg.target_path", f"{CONVERTED}-{variant}")
    return root


def _jsons(guide: Path, variant: str, data: str, name: str, **model_changes) -> dict[str, str]:
    model = tiny_model_json(EXAMPLES / variant / f"pretrain_{variant}_model.json", guide,
                            guide / f"{name}_model.json", **model_changes)
    data_json = tiny_data_json(EXAMPLES / variant / data, guide, guide / f"{name}_data.json")
    return {"MM_MODEL": str(model), "MM_DATA": str(data_json)}


def _losses(output: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", output)]


# (variant, data JSON, environment): the guide's CP variants on both resolution modes
RUNS = {
    "t2v_dynamic_ulysses": ("t2v", "data_dynamic_resolution.json", {"GPUS_PER_NODE": "2", "CP": "2"}),
    "t2v_static_ring": ("t2v", "data_static_resolution.json",
                        {"GPUS_PER_NODE": "2", "CP": "2", "CP_ALGO": "megatron_cp_algo"}),
    "i2v_dynamic_hybrid": ("i2v", "data_dynamic_resolution.json",
                           {"GPUS_PER_NODE": "4", "CP": "4", "CP_ALGO": "hybrid_cp_algo", "ULYSSES": "2"}),
}


# t2v_dynamic_ulysses: the t2v script on the dynamic-resolution data JSON is
# test_tp2_pp_conversions_train_and_resplit_back's run, the script's CP flags t2v_static_ring's and
# i2v_dynamic_hybrid's, Ulysses under the Open-Sora-Plan DiT tests/parallel/test_opensoraplan_dit.py's
EXTENDED = {"t2v_dynamic_ulysses"}


@pytest.mark.slow
@pytest.mark.parametrize("run", marked_extended(sorted(RUNS), EXTENDED))
def test_pretrain_scripts_train_from_the_converted_dit(guide, run):
    variant, data, env = RUNS[run]
    out = _script(guide, f"{variant}/pretrain_{variant}.sh", **_jsons(guide, variant, data, run), **env,
                  LOAD_PATH=str(guide / f"{CONVERTED}-{variant}"), TRAIN_ITERS="2", RECOMPUTE_LAYERS="4", NUM_WORKERS="0")
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), out[-3000:]
    assert "loaded model weights from" in out
    assert f"CP={env['CP']} ({env.get('CP_ALGO', 'ulysses_cp_algo')})" in out  # the layout the script asked for


@pytest.mark.slow
def test_tp2_pp_conversions_train_and_resplit_back(guide):
    """hf_to_mm with tp 2 and pp_layers [1,1] (a 2-layer DiT) and [[1,1],[1,1]] (the 4-layer one); the
    script trains at the second layout (TP2 x PP2 x VP2) from it, and the checkpoint it saves is
    resplit to TP1 for inference."""
    for release, pp_layers, name in (("93x480p_2layers", "[1,1]", "pp"), ("93x480p", "[[1,1],[1,1]]", "vpp")):
        _mm_convert(guide, "hf_to_mm", "--cfg.source_path", f"./raw_ckpt/open-sora-plan/{release}/",
                    "--cfg.target_path", f"mm_ckpt/open-sora-plan/tp2-{name}", "--cfg.target_parallel_config.tp_size",
                    "2", "--cfg.target_parallel_config.pp_layers", pp_layers)
    stages = guide / "mm_ckpt/open-sora-plan/tp2-pp/release"
    assert sorted(p.name for p in stages.iterdir() if p.is_dir()) == [f"mp_rank_{t:02d}_{s:03d}" for t in range(2)
                                                                      for s in range(2)]
    save = guide / "trained-vpp"
    out = _script(guide, "t2v/pretrain_t2v.sh",
                  **_jsons(guide, "t2v", "data_dynamic_resolution.json", "tp2_vpp",
                           predictor__pipeline_num_layers=[[1, 1], [1, 1]]),
                  GPUS_PER_NODE="4", TP="2", PP="2", VP="2", LOAD_PATH=str(guide / "mm_ckpt/open-sora-plan/tp2-vpp"),
                  SAVE_PATH=str(save), TRAIN_ITERS="2", RECOMPUTE_LAYERS="1", NUM_WORKERS="0")
    assert len(_losses(out)) == 2 and "TP=2 PP=2 VPP=2" in out, out[-3000:]
    _mm_convert(guide, "resplit", "--cfg.source_path", str(save), "--cfg.target_path", str(guide / "resplit-vpp"))
    assert (guide / "resplit-vpp" / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_resplit_then_inference_script_writes_videos(guide, variant):
    import av

    release = "93x480p" if variant == "t2v" else "93x480p_i2v"
    target = f"mm_ckpt/open-sora-plan/inference-{variant}"
    # the guide's resplit example: the release directory in, one TP1 checkpoint out
    _mm_convert(guide, "resplit", "--cfg.source_path", f"./raw_ckpt/open-sora-plan/{release}/",
                "--cfg.target_path", target)
    prompts = guide / f"{variant}_prompts.txt"
    prompts.write_text("a red square moving left to right on a white background\n"
                       "a blue circle moving top to bottom on a yellow background\n")
    model = tiny_model_json(EXAMPLES / variant / f"inference_{variant}_model.json", guide,
                            guide / f"inference_{variant}.json", diffusion__num_inference_steps=3,
                            inference__prompt=str(prompts),
                            inference__save_path=str(guide / f"samples_{variant}"))
    # t2v: the two guidance branches on a pair of ranks; i2v: ring attention over two ranks
    layout = {"GPUS_PER_NODE": "2", "CP": "1", "CFG_PARALLEL": "1"} if variant == "t2v" else \
        {"GPUS_PER_NODE": "2", "CP": "2", "CP_ALGO": "megatron_cp_algo", "CFG_PARALLEL": "0"}
    out = _script(guide, f"{variant}/inference_{variant}.sh", MM_MODEL=str(model), LOAD_PATH=str(guide / target),
                  **layout)
    videos = sorted((guide / f"samples_{variant}").glob("*.mp4"))
    assert len(videos) == 2, out[-3000:]
    for video in videos:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = stream.average_rate
            assert stream.codec_context.name == "h264" and rate.numerator == 18 * rate.denominator
        assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


OSP13_REF = os.environ.get("MM_MINDSPEED_MM_OSP13_REF")


def _their_json(ref: Path, name: str, guide: Path, out: Path, **changes) -> Path:
    """MindSpeed-MM's own ``examples/opensoraplan1.3/<name>`` with only its weight and data paths pointed at the
    guide's tiny assets and its sizes shrunk (the tiny DiT / WFVAE configs, short clips): every other key as
    the file has it."""
    from tests.opensoraplan_assets import TINY_PREDICTOR, tiny_vae_config

    data = json.loads((ref / "examples" / "opensoraplan1.3" / name).read_text())
    if "dataset_param" in data:
        ds = data["dataset_param"]
        ds["basic_parameters"]["data_path"] = str(guide / "data" / "data.txt")
        ds["tokenizer_config"].update(from_pretrained=str(guide / "weights" / "google" / "mt5-xxl"), model_max_length=12)
        ds["preprocess_parameters"].update(num_frames=9, min_num_frames=5, max_hxw=4096, hw_stride=16)
        for step in ds["preprocess_parameters"]["train_pipeline"]["video"]:
            if "stride" in step.get("param", {}):
                step["param"]["stride"] = 16
    else:
        data["predictor"].update(TINY_PREDICTOR, dtype="fp32")
        data["predictor"].pop("pipeline_num_layers", None)
        data["ae"].update(tiny_vae_config(), from_pretrained=str(guide / "mm_ckpt" / "open-sora-plan" / "vae.pt"),
                          dtype="fp32")
        data["text_encoder"].update(from_pretrained=str(guide / "weights" / "google" / "mt5-xxl"), dtype="fp32")
        if "pipeline_config" in data:  # the inference layout
            data["pipeline_config"]["input_size"] = [9, 64, 64]
            data["tokenizer"].update(from_pretrained=str(guide / "weights" / "google" / "mt5-xxl"), model_max_length=12)
            data["diffusion"]["num_inference_steps"] = 3
            data.update(dtype="fp32", save_path=str(out.parent / f"{out.stem}_samples"))
        data.update(changes)
    out.write_text(json.dumps(data))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not OSP13_REF, reason="set MM_MINDSPEED_MM_OSP13_REF to a MindSpeed-MM checkout at 37ccda36 "
                                          "(its Open-Sora-Plan 1.3 examples) to run its own files")
@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_mindspeed_mm_s_own_open_sora_plan_files_train_and_sample(guide, variant):
    """MindSpeed-MM's OpenSoraPlan 1.3 pretrain model JSON, its dynamic-resolution data JSON and its inference
    JSON (37ccda36), as they are but for paths and sizes: 2 training iterations and sampling on 2 processes."""
    ref = Path(OSP13_REF)
    model = _their_json(ref, f"{variant}/pretrain_{variant}_model.json", guide, guide / f"their_{variant}_model.json")
    data = _their_json(ref, "t2v/data_dynamic_resolution.json", guide, guide / f"their_{variant}_data.json")
    out = _script(guide, f"{variant}/pretrain_{variant}.sh", MM_MODEL=str(model), MM_DATA=str(data),
                  LOAD_PATH=str(guide / f"{CONVERTED}-{variant}"), TRAIN_ITERS="2", GPUS_PER_NODE="2", CP="1",
                  NUM_WORKERS="0")
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), out[-3000:]
    prompts = guide / f"their_{variant}_prompts.txt"
    prompts.write_text("a red square moving left to right on a white background\n")
    changes = {"prompt": str(prompts)}
    if variant == "i2v":
        from PIL import Image

        Image.new("RGB", (96, 64), (255, 0, 0)).save(guide / "their_first_frame.png")
        (guide / "their_images.txt").write_text(str(guide / "their_first_frame.png") + "\n")
        changes["conditional_pixel_values_path"] = str(guide / "their_images.txt")
    inference = _their_json(ref, f"{variant}/inference_{variant}_model.json", guide, guide / f"their_{variant}_inference.json",
                            **changes)
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "inference.py", "--mm-model", str(inference), "--load", str(guide / f"{CONVERTED}-{variant}"),
                           "--cfg-parallel"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OpenSoraPlanPipeline's template" in done.stdout
    assert len(list((guide / f"their_{variant}_inference_samples").glob("*.mp4"))) == 1
