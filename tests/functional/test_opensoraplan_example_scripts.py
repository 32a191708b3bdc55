"""The Open-Sora-Plan v1.3 example scripts (examples/opensoraplan1.3/, the commands of MindSpeed-MM's
OpenSoraPlan 1.3 guide) as a user runs them, with a stand-in ``torchrun`` first on the PATH that records
what it was given: the flags after the entry point must pass mm's real parser, validation and the entry
point's own checks (with the model and data JSONs they name), and the parallel variants of the guide must
reach the flags."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mm.arguments import ConfigError, load_config, parse_flags

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples/opensoraplan1.3"
PRETRAIN = {  # script -> (entry point, task, predictor model_id)
    "examples/opensoraplan1.3/t2v/pretrain_t2v.sh": ("pretrain_t2v.py", "t2v", "videoditsparse"),
    "examples/opensoraplan1.3/i2v/pretrain_i2v.sh": ("pretrain_i2v.py", "i2v", "videoditsparsei2v"),
}
INFERENCE = {  # script -> (task, number of prompts)
    "examples/opensoraplan1.3/t2v/inference_t2v.sh": ("t2v", 3),
    "examples/opensoraplan1.3/i2v/inference_i2v.sh": ("i2v", 2),
}
CONVERTED_DIT = "mm_ckpt/open-sora-plan/pretrained-checkpoint-dit"  # the guide's LOAD_PATH
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD_DIR/argv"
env > "$RECORD_DIR/env"
echo "fake torchrun ran"
"""
# variables of the scripts' first blocks that a developer's shell may hold
CLEARED = ("MM_ACCELERATOR", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "TP", "PP", "VP",
           "CP", "CP_ALGO", "CP_WINDOW", "ULYSSES", "MBS", "GBS", "MM_DATA", "MM_MODEL", "LOAD_PATH", "LOAD_ARGS",
           "SAVE_PATH", "CKPT_FORMAT", "CFG_PARALLEL", "CUDA_DEVICE_MAX_CONNECTIONS", "HCCL_EXEC_TIMEOUT",
           "HCCL_CONNECT_TIMEOUT", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "LD_LIBRARY_PATH")


@pytest.fixture
def launcher(tmp_path):
    """Runs a script with the fake torchrun; returns (result, torchrun's own options, entry point, its flags)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)

    def run(script: str, **overrides: str):
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        # MM_PREFLIGHT=0: the scripts' JSONs point at placeholder weights and data, which the pre-flight check
        # rightly refuses (test_example_scripts.py runs it on real assets)
        env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_DIR=str(tmp_path),
                   LOG_DIR=str(tmp_path / "logs"), **{"MM_PREFLIGHT": "0", **overrides})
        (tmp_path / "argv").unlink(missing_ok=True)
        # from another directory: the scripts find the repository themselves
        result = subprocess.run(["bash", str(REPO / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        argv = (tmp_path / "argv").read_text().splitlines()
        entry = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        own = dict(zip(argv[:entry:2], argv[1:entry:2]))
        return result, own, argv[entry], argv[entry + 1:]

    return run


def _train_config(flags: list[str], world_size: int, task: str, monkeypatch):
    """The flags through mm's parser and validation, the data JSON through the dataset's parser, and the
    entry point's own check; the placeholder weight paths are not opened."""
    from mm.data.dataset import VideoDataConfig
    from mm.training.checks import check_task

    monkeypatch.chdir(REPO)
    config = load_config(flags, world_size=world_size, mode="train")
    video = VideoDataConfig.from_json(config.data.preprocess, config.data.dataset_type)
    # files=False: the scripts' data paths and output directories are placeholders users edit
    check_task(task, config, files=False)
    return config, video


def _model_copy(tmp_path: Path, task: str, **predictor) -> str:
    """The example's model JSON with ``predictor`` keys replaced, written under ``tmp_path``."""
    model = json.loads((EXAMPLES / task / f"pretrain_{task}_model.json").read_text())
    model["predictor"].update(predictor)
    path = tmp_path / f"pretrain_{task}_model.json"
    path.write_text(json.dumps(model))
    return str(path)


def test_scripts_are_valid_bash_and_name_their_files():
    scripts = sorted(str(p.relative_to(REPO)) for p in EXAMPLES.glob("**/*.sh"))
    assert scripts == sorted([*PRETRAIN, *INFERENCE])
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
    for task in ("t2v", "i2v"):
        for name in ("data", "data_dynamic_resolution", "data_static_resolution"):
            data = json.loads((EXAMPLES / task / f"{name}.json").read_text())["dataset_param"]
            assert data["basic_parameters"]["data_path"] == f"./examples/opensoraplan1.3/{task}/data.txt"
            assert data["dataset_type"] == task
        line = (EXAMPLES / task / "data.txt").read_text().strip()
        assert len(line.split(",")) == 2 and line.split(",")[1].endswith(".json")  # dataset_root,annotation.json


@pytest.mark.parametrize("script", sorted(PRETRAIN))
def test_pretrain_defaults_pass_the_parser_validation_and_the_task_check(script, launcher, monkeypatch, tmp_path):
    entry_point, task, model_id = PRETRAIN[script]
    _, own, entry, flags = launcher(script)
    assert (entry, own["--nproc_per_node"], own["--nnodes"], own["--node_rank"]) == (entry_point, "8", "1", "0")
    assert (own["--master_addr"], own["--master_port"]) == ("localhost", "29501")
    parse_flags(flags, prog=entry)
    config, video = _train_config(flags, 8, task, monkeypatch)
    args, model, data = config.args, config.model, config.data
    # MindSpeed-MM's optimizer and recompute settings
    assert (args.lr, args.min_lr, args.adam_beta1, args.adam_beta2, args.adam_eps) == (1e-5, 1e-5, 0.9, 0.999, 1e-15)
    assert (args.weight_decay, args.clip_grad, args.lr_decay_style, args.train_iters) == (1e-2, 1.0, "constant", 5000)
    assert args.bf16 and args.use_distributed_optimizer and args.num_workers == 4
    assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "block", 32)
    assert model.predictor.num_layers == 32 and not args.sequence_parallel
    # pure data parallelism over 8 ranks
    assert (config.sizes.tensor_parallel, config.sizes.context_parallel, config.sizes.data_parallel) == (1, 1, 8)
    assert args.global_batch_size == 8 and args.context_parallel_algo == "ulysses_cp_algo"
    # the converted DiT, weights only; no checkpoints without SAVE_PATH
    assert (args.load, args.save, args.ckpt_format) == (CONVERTED_DIT, None, "torch")
    assert args.no_load_optim and args.no_load_rng
    # the JSONs: the guide's default data JSON (dynamic resolution) and the converted VAE
    assert data.path.endswith(f"{task}/data_dynamic_resolution.json") and data.dataset_type == task
    assert Path(REPO, data.data_path).is_file()
    assert data.tokenizers == [{"from_pretrained": "./weights/google/mt5-xxl", "model_max_length": 512}]
    assert video.per_sample.max_hxw == 225280 and video.per_sample.force_size is None
    assert (video.per_sample.num_frames, video.per_sample.min_num_frames, video.cfg) == (93, 29, 0.1)
    assert model.predictor.model_id == model_id and model.predictor.from_pretrained is None
    assert model.predictor.pipeline_num_layers is None
    assert (model.ae.model_id, model.ae.from_pretrained, model.ae.vae_cp_size) == ("wfvae", "mm_ckpt/open-sora-plan/vae.pt", 1)
    assert [(t.model_id, t.from_pretrained) for t in model.text_encoder] == [("MT5", "./weights/google/mt5-xxl")]
    assert not model.enable_encoder_dp and model.encoder_offload_interval == 1
    assert (tmp_path / "logs").is_dir() and len(list((tmp_path / "logs").glob("train_*.log"))) == 1


@pytest.mark.parametrize("script", sorted(PRETRAIN))
def test_pretrain_parallel_variants_of_the_guide(script, launcher, monkeypatch, tmp_path):
    _, task, _ = PRETRAIN[script]

    def config_of(**env):
        _, _, _, flags = launcher(script, **env)
        return _train_config(flags, int(env.get("GPUS_PER_NODE", 8)), task, monkeypatch)[0], flags

    # DiT-RingAttention: send/recv overlap and the (double) ring's window
    config, flags = config_of(CP="2", CP_ALGO="megatron_cp_algo")
    assert config.args.context_parallel_algo == "megatron_cp_algo" and config.args.use_cp_send_recv_overlap
    assert config.args.cp_window_size == 1 and "--attention-mask-type" in flags and not config.args.sequence_parallel
    config, _ = config_of(CP="4", CP_ALGO="megatron_cp_algo", CP_WINDOW="2")
    assert (config.sizes.context_parallel, config.args.cp_window_size) == (4, 2)
    # DiT-USP: Ulysses inside ring
    config, flags = config_of(CP="4", CP_ALGO="hybrid_cp_algo", ULYSSES="2")
    assert (config.args.context_parallel_algo, config.args.ulysses_degree_in_cp, config.sizes.ulysses_degree) == \
        ("hybrid_cp_algo", 2, 2)
    assert config.args.use_cp_send_recv_overlap and "--cp-window-size" not in flags
    # Ulysses alone: no ring flags
    config, flags = config_of(CP="8")
    assert config.sizes.ulysses_degree == 8 and not config.args.use_cp_send_recv_overlap
    assert "--attention-mask-type" not in flags
    # TP adds Megatron sequence parallelism; the batch follows the data-parallel size
    config, _ = config_of(TP="2")
    assert config.args.sequence_parallel and config.args.global_batch_size == 4
    # static resolution: every clip to 352 x 640
    _, _, _, flags = launcher(script, MM_DATA=f"examples/opensoraplan1.3/{task}/data_static_resolution.json")
    config, video = _train_config(flags, 8, task, monkeypatch)
    assert config.data.path.endswith("data_static_resolution.json")
    assert video.per_sample.force_size == (352, 640) and video.per_sample.num_frames == 93
    # resuming a run: LOAD_PATH = SAVE_PATH with everything loaded
    config, _ = config_of(SAVE_PATH="ckpt", LOAD_PATH="ckpt", LOAD_ARGS="")
    assert (config.args.save, config.args.load) == ("ckpt", "ckpt")
    assert not config.args.no_load_optim and not config.args.no_load_rng


@pytest.mark.parametrize("script", sorted(PRETRAIN))
def test_pretrain_pipeline_parallel_needs_pipeline_num_layers(script, launcher, monkeypatch, tmp_path):
    _, task, _ = PRETRAIN[script]
    # the shipped JSON has no layout (PP 1): PP=4 is refused with the key to set
    _, _, _, flags = launcher(script, PP="4")
    assert {"--optimization-level", "--use-multiparameter-pipeline-model-parallel", "--variable-seq-lengths"} <= set(flags)
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="pipeline_num_layers"):
        load_config(flags, world_size=8, mode="train")
    # the header's layouts: [8, 8, 8, 8] for PP=4, [[4, 4, 4, 4], [4, 4, 4, 4]] for PP=4 x VP=2
    one_d = _model_copy(tmp_path, task, pipeline_num_layers=[8, 8, 8, 8])
    _, _, _, flags = launcher(script, PP="4", MM_MODEL=one_d)
    config, _ = _train_config(flags, 8, task, monkeypatch)
    assert config.sizes.pipeline_parallel == 4 and config.args.global_batch_size == 2
    assert config.args.use_multiparameter_pipeline_model_parallel and config.args.variable_seq_lengths
    two_d = _model_copy(tmp_path, task, pipeline_num_layers=[[4, 4, 4, 4], [4, 4, 4, 4]])
    _, _, _, flags = launcher(script, PP="4", VP="2", MM_MODEL=two_d)
    config, _ = _train_config(flags, 8, task, monkeypatch)
    assert config.virtual_pipeline_size == 2


@pytest.mark.parametrize("script", sorted(INFERENCE))
def test_inference_flags_and_sampling_are_valid(script, launcher, monkeypatch):
    from mm.families.opensoraplan import sampler as opensoraplan
    from mm.inference.runner import sampling_config

    task, prompts = INFERENCE[script]
    _, own, entry, flags = launcher(script)
    assert entry == "inference.py" and own["--nproc_per_node"] == "8"
    parse_flags(flags, prog=entry)
    monkeypatch.chdir(REPO)
    config = load_config(flags, world_size=8, mode="inference")
    assert config.args.load == CONVERTED_DIT and config.model.predictor.from_pretrained is None
    assert config.args.cfg_parallel and config.args.bf16
    assert (config.sizes.context_parallel, config.sizes.data_parallel) == (4, 2)
    sampling = sampling_config(config)
    assert sampling.task == task and len(sampling.prompts) == prompts
    assert (sampling.num_frames, sampling.height, sampling.width, sampling.fps) == (93, 352, 640, 18)
    assert sampling.save_path == f"examples/opensoraplan1.3/{task}/samples/" and sampling.model_max_length == 512
    if task == "i2v":
        assert len(sampling.images) == prompts and all(Path(REPO, p).is_file() for p in sampling.images)
    # the sampler is the diffusion section
    sampler = opensoraplan.sampler_config(config.model.diffusion)
    assert (sampler.model_id, sampler.num_inference_steps, sampler.guidance_scale, sampler.spacing) == \
        ("EulerAncestralDiscrete", 100, 7.5, "trailing")
    assert sampler.prediction_type == "v_prediction" and sampler.schedule.rescale_betas_zero_snr
    # ring attention over the node, no CFG pairs
    _, _, _, flags = launcher(script, CP="8", CP_ALGO="megatron_cp_algo", CFG_PARALLEL="0")
    config = load_config(flags, world_size=8, mode="inference")
    assert config.args.context_parallel_algo == "megatron_cp_algo" and not config.args.cfg_parallel
    sampling_config(config)
    # no --load and no predictor.from_pretrained: nothing to take the DiT's weights from
    _, _, _, flags = launcher(script, LOAD_PATH="")
    assert "--load" not in flags
    with pytest.raises(ConfigError, match="predictor.from_pretrained"):
        sampling_config(load_config(flags, world_size=8, mode="inference"))
