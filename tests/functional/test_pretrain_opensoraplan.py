"""pretrain_t2v.py / pretrain_i2v.py with the Open-Sora-Plan v1.3 DiT through torchrun on tiny stand-ins
of the guide's downloads (tests/opensoraplan_assets.py), CPU and gloo, fp32: every parallel layout
gives the losses of one process (the DDPM objective with min-SNR weights and explicit-uniform
timesteps, the WFVAE, the mT5 caption mask, and for I2V the masked-video condition)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.markers import marked_extended
from tests.opensoraplan_assets import REPO, TINY_PREDICTOR, make_assets, tiny_vae_config

DIFFUSION = {"model_id": "DDPM", "num_train_steps": 1000, "prediction_type": "v_prediction",
             "rescale_betas_zero_snr": True, "snr_gamma": 5.0, "t_sample_method": "explicit_uniform"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = make_assets(tmp_path_factory.mktemp("osp"))
    subprocess.run([sys.executable, "-m", "checkpoint", "OpenSoraPlanConverter", "--version", "v1.3", "vae_convert",
                    "--cfg.source_path", str(root / "raw_ckpt/open-sora-plan/merged.ckpt"),
                    "--cfg.target_path", str(root / "vae.pt")], cwd=REPO, check=True, capture_output=True)
    for variant in ("t2v", "i2v"):
        model = {"predictor": dict(TINY_PREDICTOR, model_id="videoditsparse" + ("i2v" if variant == "i2v" else ""),
                                   dtype="fp32",
                                   from_pretrained=str(root / "raw_ckpt/open-sora-plan" /
                                                       ("93x480p_i2v" if variant == "i2v" else "93x480p"))),
                 "diffusion": DIFFUSION,
                 "text_encoder": {"model_id": "MT5", "from_pretrained": str(root / "weights/google/mt5-xxl"),
                                  "dtype": "fp32"},
                 "ae": dict(tiny_vae_config(), model_id="wfvae", from_pretrained=str(root / "vae.pt"), dtype="fp32")}
        if variant == "i2v":
            model["predictor"]["vae_scale_factor_t"] = 4
        (root / f"{variant}_model.json").write_text(json.dumps(model))
        data = {"dataset_param": {
            "dataset_type": "t2v",
            "basic_parameters": {"data_path": str(root / "data/data.txt")},
            "preprocess_parameters": {"num_frames": 9, "min_num_frames": 5, "max_hxw": 4096, "hw_stride": 16,
                                      "force_resolution": False, "hw_aspect_thr": 2.0, "train_fps": 16,
                                      "vae_scale_factor": [4, 8, 8], "cfg": 0.0},
            "tokenizer_config": {"from_pretrained": str(root / "weights/google/mt5-xxl"), "model_max_length": 12}},
            "dataloader_param": {"shuffle": True}}
        (root / f"{variant}_data.json").write_text(json.dumps(data))
    return root


def _with(assets, variant: str, name: str, model_changes: dict | None = None, data_changes: dict | None = None):
    model = json.loads((assets / f"{variant}_model.json").read_text())
    for key, value in (model_changes or {}).items():
        section, _, inner = key.partition(".")
        if inner:
            model[section][inner] = value
        else:
            model[key] = value
    data = json.loads((assets / f"{variant}_data.json").read_text())
    data["dataset_param"]["preprocess_parameters"].update(data_changes or {})
    (assets / f"{name}_model.json").write_text(json.dumps(model))
    (assets / f"{name}_data.json").write_text(json.dumps(data))
    return name


def _train(assets, variant: str, nproc: int, *flags, iters=3, gbs=2, mbs=1, name=None):
    env = dict(os.environ, MM_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    name = name or variant
    entry = "pretrain_i2v.py" if variant == "i2v" else "pretrain_t2v.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", entry,
           "--mm-model", str(assets / f"{name}_model.json"), "--mm-data", str(assets / f"{name}_data.json"),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", "1e-3", "--train-iters",
           str(iters), "--log-interval", "1", "--num-workers", "0", "--seed", "7", *flags]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [float(x) for x in re.findall(r"\| loss: ([0-9.e+-]+) \|", result.stdout)], result.stdout


REFERENCE: dict = {}


def _reference(assets, variant, mbs=1):
    if (variant, mbs) not in REFERENCE:
        REFERENCE[variant, mbs] = _train(assets, variant, 1, "--log-throughput", mbs=mbs)
        assert "throughput per CPU process (GFLOP/s)" in REFERENCE[variant, mbs][1]  # the recipe's model FLOPs
    return REFERENCE[variant, mbs]


LAYOUTS = {  # name -> (variant, processes, flags, model changes)
    "t2v_tp2_sp": ("t2v", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], None),
    "t2v_cp2_ring_overlap": ("t2v", 2, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                                        "--use-cp-send-recv-overlap"], None),
    "t2v_pp2_vpp2": ("t2v", 2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
                     {"predictor.pipeline_num_layers": [[1, 1], [1, 1]]}),
    "i2v_tp2_cp2_ring": ("i2v", 4, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                                    "--context-parallel-algo", "megatron_cp_algo"], None),
    "i2v_pp2": ("i2v", 2, ["--pipeline-model-parallel-size", "2"], {"predictor.pipeline_num_layers": [1, 3]}),
}


# t2v TP2+SP and CP2 ring with overlap: the DiT in-process (tests/parallel/test_opensoraplan_dit.py),
# the loop under them with Wan (test_pretrain_t2v.py), ring under the recipe by i2v_tp2_cp2_ring;
# t2v PP2 x VPP2: the DiT's virtual stages in-process (test_opensoraplan_dit.py pp2_vpp2_i2v), the loop's
# by test_pretrain_t2v.py pp2_vpp2, the recipe over PP stages by i2v_pp2
EXTENDED = {"t2v_tp2_sp", "t2v_cp2_ring_overlap", "t2v_pp2_vpp2"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", marked_extended(sorted(LAYOUTS), EXTENDED))
def test_layout_losses_equal_one_process(assets, layout):
    variant, nproc, flags, model_changes = LAYOUTS[layout]
    size = 1
    for flag in ("--tensor-model-parallel-size", "--context-parallel-size", "--pipeline-model-parallel-size"):
        if flag in flags:
            size *= int(flags[flags.index(flag) + 1])
    dp = nproc // size  # DP2 x micro-batch 1 reads what one process reads with micro-batch 2
    ref, _ = _reference(assets, variant, mbs=dp)
    name = _with(assets, variant, layout, model_changes) if model_changes else variant
    par, out = _train(assets, variant, nproc, *flags, name=name)
    assert len(ref) == len(par) == 3, out[-3000:]
    for a, b in zip(ref, par):
        assert abs(a - b) <= 2e-5 * abs(a), (layout, ref, par)
    assert len(set(ref)) == 3  # different batches, timesteps and weights each iteration


def test_wrong_entry_point_or_objective_is_refused_before_start(assets, monkeypatch, capsys):
    """in-process: the entry points' pretrain(argv, task), refused in its configuration check"""
    from mm.training.pretrain import pretrain

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    name = _with(assets, "t2v", "flow", {"diffusion": {"model_id": "flow_matching"}})
    cases = [("i2v", "t2v", "pretrain_i2v.py trains 'videoditsparsei2v'"),
             ("t2v", "i2v", "is the I2V (inpainting) DiT: train it with pretrain_i2v.py"),
             ("t2v", name, "diffusion.model_id = 'flow_matching'; valid for training: DDPM")]
    for task, json_name, message in cases:
        with pytest.raises(SystemExit) as stop:
            pretrain(["--mm-model", str(assets / f"{json_name}_model.json"), "--mm-data",
                      str(assets / f"{json_name}_data.json"), "--micro-batch-size", "1", "--lr", "1e-4",
                      "--train-iters", "1"], task=task)
        err = capsys.readouterr().err
        assert stop.value.code == 2, err[-2000:]
        assert message in err, err[-2000:]


def test_load_without_a_checkpoint_is_refused_unless_it_is_the_save_directory(assets, tmp_path, monkeypatch,
                                                                               capsys):
    """A wrong --load (e.g. a relative path from another directory) must not train from random weights."""
    from mm.training.pretrain import pretrain

    monkeypatch.setenv("MM_ACCELERATOR", "cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = ["--mm-model", str(assets / "t2v_model.json"), "--mm-data", str(assets / "t2v_data.json"),
             "--micro-batch-size", "1", "--lr", "1e-4", "--train-iters", "1"]
    base = [sys.executable, "pretrain_t2v.py", *flags]
    wrong = tmp_path / "mm_ckpt" / "nothing-here"
    with pytest.raises(SystemExit) as stop:  # in-process: refused before any process group
        pretrain([*flags, "--load", str(wrong)], task="t2v")
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    assert f"--load {wrong}: no checkpoint there" in err
    # the first launch of a resumable run (--load = --save) starts from scratch and saves
    result = subprocess.run([*base, "--load", str(wrong), "--save", str(wrong), "--num-workers", "0"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (wrong / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
