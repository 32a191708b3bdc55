"""The example launch scripts as a user runs them, with a stand-in ``torchrun`` first on the PATH that
records what it was given: the flags after the entry point must pass mm's real parser and
validation (with the model and data JSONs they name), and environment overrides must reach them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm.arguments import ConfigError, load_config, parse_flags

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in REPO.glob("examples/wan2.*/**/pretrain_*.sh"))
EXPECTED = {  # script -> (entry point, dataset type)
    "examples/wan2.1/1.3b/t2v/pretrain_t2v.sh": ("pretrain_t2v.py", "t2v"),
    "examples/wan2.1/14b/t2v/pretrain_t2v.sh": ("pretrain_t2v.py", "t2v"),
    "examples/wan2.1/14b/i2v_480p/pretrain_i2v.sh": ("pretrain_i2v.py", "i2v"),
    "examples/wan2.2/a14b/i2v/pretrain_i2v.sh": ("pretrain_i2v.py", "i2v"),
}
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD_DIR/argv"
env > "$RECORD_DIR/env"
echo "fake torchrun ran"
exit "${FAKE_TORCHRUN_RC:-0}"
"""


@pytest.fixture
def launcher(tmp_path):
    """Runs a script with the fake torchrun; returns (result, torchrun args, torchrun's environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)

    def run(script: str, **overrides: str):
        env = {k: v for k, v in os.environ.items()
               if k not in ("MM_ACCELERATOR", "ASCEND_SLOG_PRINT_TO_STDOUT", "ASCEND_GLOBAL_LOG_LEVEL",
                            "COMBINED_ENABLE", "MULTI_STREAM_MEMORY_REUSE", "GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "TP", "PP", "CP",
                            "VP", "MBS", "GBS", "EXPERT", "CUDA_DEVICE_MAX_CONNECTIONS", "HCCL_EXEC_TIMEOUT",
                            "HCCL_CONNECT_TIMEOUT", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "LD_LIBRARY_PATH")}
        # MM_PREFLIGHT=0 unless a test asks for the pre-flight check: the scripts' own JSONs point at placeholder
        # weights and data, which it rightly refuses (the tests of the check below give it real assets)
        env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_DIR=str(tmp_path),
                   LOG_DIR=str(tmp_path / "logs"), **{"MM_PREFLIGHT": "0", "MM_PYTHON": sys.executable, **overrides})
        # from another directory: the scripts find the repository themselves
        result = subprocess.run(["bash", str(REPO / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0 or not (tmp_path / "argv").exists():
            return result, None, None
        argv = (tmp_path / "argv").read_text().splitlines()
        recorded_env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
        return result, argv, recorded_env

    return run


def _split(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """torchrun's own options (as a dict), the entry point, and the entry point's flags."""
    entry = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    own = dict(zip(argv[:entry:2], argv[1:entry:2]))
    return own, argv[entry], argv[entry + 1:]


def _validate(flags: list[str], world_size: int, monkeypatch):
    """mm's parser and validation on the recorded flags, reading the JSONs from the repository root;
    the placeholder weight paths are not opened (validation does not touch from_pretrained)."""
    from mm.data.dataset import VideoDataConfig
    from mm.families import predictor_config

    monkeypatch.chdir(REPO)
    config = load_config(flags, world_size=world_size, mode="train")
    pred = config.model.predictor
    arch = predictor_config(pred.model_id, pred.params, pred.num_layers, pred.num_heads)
    VideoDataConfig.from_json(config.data.preprocess, config.data.dataset_type)
    # the entry point's own check: its task fits the model and data (and the encoders are named)
    from mm.training.pretrain import check_task

    # files=False: the scripts' data paths and output directories are placeholders users edit
    check_task("i2v" if config.data.dataset_type in ("i2v", "flf2v") else "t2v", config, files=False)
    return config, arch


INFERENCE_SCRIPTS = sorted(str(p.relative_to(REPO)) for p in REPO.glob("examples/*/**/inference_*.sh"))
INFERENCE_TASKS = {  # script -> the task its JSON samples
    "examples/opensoraplan1.3/i2v/inference_i2v.sh": "i2v",
    "examples/opensoraplan1.3/t2v/inference_t2v.sh": "t2v",
    "examples/phantom/1.3b/s2v/inference_s2v.sh": "s2v",
    "examples/stepvideo/t2v/inference_t2v.sh": "t2v",
    "examples/wan2.1/1.3b/t2v/inference_t2v.sh": "t2v",
    "examples/wan2.1/14b/flf2v/inference_flf2v.sh": "flf2v",
    "examples/wan2.1/14b/i2v_480p/inference_i2v.sh": "i2v",
    "examples/wan2.2/5b/ti2v/inference_ti2v.sh": "i2v",
    "examples/wan2.2/a14b/i2v/inference_i2v.sh": "i2v",
    "examples/wan2.2/a14b/t2v/inference_t2v.sh": "t2v",
}


def test_every_example_script_is_valid_bash():
    scripts = sorted(REPO.glob("examples/**/*.sh"))
    assert INFERENCE_SCRIPTS == sorted(INFERENCE_TASKS)
    assert set(SCRIPTS) == set(EXPECTED)
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_flags_pass_the_real_parser_and_validation(script, launcher, monkeypatch, tmp_path):
    result, argv, env = launcher(script)
    assert result.returncode == 0, result.stderr
    own, entry, flags = _split(argv)
    assert (entry, own["--nproc_per_node"], own["--nnodes"], own["--node_rank"]) == (EXPECTED[script][0], "8", "1", "0")
    assert own["--master_addr"] == "localhost"
    parse_flags(flags, prog=entry)
    config, arch = _validate(flags, world_size=8, monkeypatch=monkeypatch)
    assert config.data.dataset_type == EXPECTED[script][1]
    assert config.args.bf16 and config.args.use_distributed_optimizer and config.args.log_throughput
    assert config.args.recompute_num_layers == arch.num_layers
    assert config.args.global_batch_size == 8 // (config.sizes.tensor_parallel * config.sizes.context_parallel)
    assert config.args.sequence_parallel == (config.sizes.tensor_parallel > 1)
    assert config.args.tensorboard_dir.startswith(str(tmp_path / "logs"))
    assert Path(config.model.predictor.from_pretrained).parts[0] == "weights"  # the placeholder users edit
    # no NPU here: the NVIDIA settings, not the Ascend ones
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == str(max(60 * config.args.distributed_timeout_minutes, 480))
    assert "HCCL_EXEC_TIMEOUT" not in env and "NPUS_PER_NODE" not in env
    logs = list((tmp_path / "logs").glob("train_*.log"))
    assert len(logs) == 1 and logs[0].read_text() == "fake torchrun ran\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_environment_overrides_reach_torchrun_and_the_flags(script, launcher, monkeypatch):
    result, argv, _ = launcher(script, GPUS_PER_NODE="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3",
                               TP="2", CP="2", MBS="1")
    assert result.returncode == 0, result.stderr
    own, _, flags = _split(argv)
    assert (own["--nproc_per_node"], own["--nnodes"], own["--node_rank"], own["--master_addr"]) == \
        ("4", "2", "1", "10.1.2.3")
    config, _ = _validate(flags, world_size=8, monkeypatch=monkeypatch)
    assert (config.sizes.tensor_parallel, config.sizes.context_parallel, config.sizes.data_parallel) == (2, 2, 2)
    assert config.args.sequence_parallel and config.args.global_batch_size == 2

    result, argv, _ = launcher(script, GPUS_PER_NODE="2", TP="1", CP="2", CP_ALGO="megatron_cp_algo")
    config, _ = _validate(_split(argv)[2], world_size=2, monkeypatch=monkeypatch)
    assert config.args.context_parallel_algo == "megatron_cp_algo" and config.args.use_cp_send_recv_overlap
    assert not config.args.sequence_parallel

    # checkpoints: LOAD_PATH defaults to SAVE_PATH (a relaunch resumes); converted weights load without optimizer/RNG
    result, argv, _ = launcher(script, SAVE_PATH="ckpt", CKPT_FORMAT="torch")
    config, _ = _validate(_split(argv)[2], world_size=8, monkeypatch=monkeypatch)
    assert (config.args.save, config.args.load, config.args.ckpt_format) == ("ckpt", "ckpt", "torch")
    result, argv, _ = launcher(script, LOAD_PATH="converted", LOAD_ARGS="--no-load-optim --no-load-rng")
    config, _ = _validate(_split(argv)[2], world_size=8, monkeypatch=monkeypatch)
    assert (config.args.save, config.args.load) == (None, "converted")
    assert config.args.no_load_optim and config.args.no_load_rng


@pytest.mark.parametrize("script", ["examples/wan2.1/1.3b/t2v/pretrain_t2v.sh",
                                    "examples/wan2.1/1.3b/t2v/inference_t2v.sh"])
def test_nccl_heartbeat_follows_the_collective_timeout_unless_set(script, launcher):
    """NCCL's watchdog monitor (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC) gets the collective timeout, never less
    than torch's default of 480 s; a value in the environment is kept."""
    for minutes, expected in (("30", "1800"), ("5", "480")):
        result, argv, env = launcher(script, DIST_TIMEOUT_MINUTES=minutes)
        assert result.returncode == 0, result.stderr
        assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == expected
        assert argv[argv.index("--distributed-timeout-minutes") + 1] == minutes
    result, _, env = launcher(script, TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="7200")
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "7200"


def test_ascend_settings_only_on_an_npu(launcher, tmp_path):
    # a stand-in for CANN's set_env.sh; it reads an unset variable, as the real one does
    set_env = tmp_path / "set_env.sh"
    set_env.write_text('export LD_LIBRARY_PATH=/ascend/lib64:$LD_LIBRARY_PATH\nexport ASCEND_HOME_PATH=/ascend\n')
    result, _, env = launcher("examples/wan2.1/14b/t2v/pretrain_t2v.sh", MM_ACCELERATOR="npu",
                              ASCEND_SET_ENV=str(set_env), GPUS_PER_NODE="16", HCCL_CONNECT_TIMEOUT="3600")
    assert result.returncode == 0, result.stderr
    assert env["ASCEND_HOME_PATH"] == "/ascend"
    assert env["HCCL_CONNECT_TIMEOUT"] == "3600" and env["HCCL_EXEC_TIMEOUT"] == "1800"
    assert (env["TASK_QUEUE_ENABLE"], env["CPU_AFFINITY_CONF"], env["NPUS_PER_NODE"]) == ("2", "1", "16")
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    # the rest of the NPU variables of MindSpeed-MM's OpenSoraPlan 1.3 guide
    assert (env["ASCEND_SLOG_PRINT_TO_STDOUT"], env["ASCEND_GLOBAL_LOG_LEVEL"], env["COMBINED_ENABLE"],
            env["MULTI_STREAM_MEMORY_REUSE"]) == ("0", "3", "1", "1")
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in env
    from mm.accelerator import check_comm_env

    assert check_comm_env("hccl", 30, env) == []  # in range, and no shorter than the collective timeout


def test_wan22_experts_get_their_weights_and_timestep_ranges(launcher, monkeypatch):
    from mm.diffusion import FlowMatchingConfig

    script = "examples/wan2.2/a14b/i2v/pretrain_i2v.sh"
    ranges = {}
    for expert in ("high", "low"):
        result, argv, _ = launcher(script, EXPERT=expert)
        assert result.returncode == 0, result.stderr
        config, _ = _validate(_split(argv)[2], world_size=8, monkeypatch=monkeypatch)
        assert config.model.path.endswith(f"pretrain_i2v_{expert}_noise_model.json")
        assert expert in config.args.tensorboard_dir
        args = config.args
        ranges[expert] = (args.min_timestep_boundary, args.max_timestep_boundary)
        FlowMatchingConfig(min_timestep=args.min_timestep_boundary * 1000, max_timestep=args.max_timestep_boundary * 1000)
    assert ranges == {"high": (0.9, 1.0), "low": (0.0, 0.9)}
    result, argv, _ = launcher(script, EXPERT="medium")
    assert result.returncode == 2 and "EXPERT=medium; valid: high, low" in result.stderr and argv is None


def test_a_failing_torchrun_fails_the_script(launcher):
    result, _, _ = launcher("examples/wan2.1/1.3b/t2v/pretrain_t2v.sh", FAKE_TORCHRUN_RC="3")
    assert result.returncode == 3


@pytest.mark.parametrize("script", INFERENCE_SCRIPTS)
def test_inference_script_flags_and_sampling_section_are_valid(script, launcher, monkeypatch):
    from mm.inference.config import parse_sampling
    from mm.families.wan.sampler import conditioning_task
    from mm.families import predictor_config
    from mm.models.predictor.wan.conditioning import WanConditioning

    result, argv, env = launcher(script)
    assert result.returncode == 0, result.stderr
    own, entry, flags = _split(argv)
    assert entry == "inference.py" and own["--nproc_per_node"] == "8"
    monkeypatch.chdir(REPO)
    config = load_config(flags, world_size=8, mode="inference")
    pred = config.model.predictor
    arch = predictor_config(pred.model_id, pred.params, pred.num_layers, pred.num_heads)
    assert arch.num_heads % (config.sizes.tensor_parallel * config.sizes.ulysses_degree) == 0
    task = INFERENCE_TASKS[script]
    if pred.model_id in ("videoditsparse", "videoditsparsei2v"):  # test_opensoraplan_example_scripts.py: the rest
        from mm.inference.runner import sampling_config

        assert sampling_config(config).task == task
        return
    if pred.model_id == "stepvideodit":  # test_stepvideo_example_scripts.py: the rest, against a stand-in release
        from mm.inference.runner import sampling_config

        with pytest.raises(ConfigError) as error:  # here the release's files are missing, and named
            sampling_config(config)
        assert all("./weights/" in p for p in error.value.problems[:3]), error.value.problems
        return
    # Phantom's three guidance branches stay on one rank; the others pair ranks for CFG
    assert config.args.cfg_parallel == (task != "s2v") and config.args.bf16
    assert config.sizes.data_parallel % 2 == 0 or not config.args.cfg_parallel
    problems = []
    spatial = 16 if arch.in_dim == 48 else 8  # the Wan2.2 VAE of TI2V-5B
    sampling = parse_sampling(config.model.extra["inference"], spatial, 4, tuple(arch.patch_size), problems)
    # the placeholder weight directories users fill in are the only things missing
    assert all("./weights/" in p for p in problems), problems
    assert len(sampling.prompts) == 2 and sampling.task == task
    WanConditioning.from_config(arch, conditioning_task(task))  # the task fits the model
    assert Path(config.model.predictor.from_pretrained).parts[0] == "weights"
    if task == "s2v":  # Phantom's own generate settings
        assert (config.sizes.context_parallel, config.args.context_parallel_algo, config.args.ulysses_degree_in_cp) \
            == (8, "hybrid_cp_algo", 4)
        assert sampling.dit_fsdp and sampling.t5_fsdp and len(sampling.ref_images[0]) == 2
        return
    # a checkpoint instead of the HuggingFace weights, ring attention, no CFG pairs
    result, argv, _ = launcher(script, LOAD_PATH="ckpt", CP_ALGO="megatron_cp_algo", CFG_PARALLEL="0", CP="8")
    config = load_config(_split(argv)[2], world_size=8, mode="inference")
    assert config.args.load == "ckpt" and not config.args.cfg_parallel
    assert config.args.context_parallel_algo == "megatron_cp_algo" and config.sizes.context_parallel == 8


def test_phantoms_own_generate_config_runs_from_the_example_script(launcher, monkeypatch):
    """The Phantom script with MM_MODEL = inference_s2v_release_model.json (Phantom's generate config as
    it is): the flags pass, and the downloads the JSON names (./weights/...) are all that is missing."""
    from mm.arguments import config_from_args
    from mm.families import expand_model_json

    result, argv, _ = launcher("examples/phantom/1.3b/s2v/inference_s2v.sh",
                               MM_MODEL="examples/phantom/1.3b/s2v/inference_s2v_release_model.json")
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as error:
        config_from_args(parse_flags(_split(argv)[2]), 8, mode="inference", expand=expand_model_json)
    assert error.value.problems == ["inference.ckpt_dir = './weights/Wan2.1-T2V-1.3B': not a directory (Wan's release "
                                    "directory for task 's2v-1.3B', as downloaded)"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory, quickstart_assets):
    """The quickstart's assets (a tiny Wan DiT's JSONs, a random VAE and text encoder, synthetic videos):
    real files for the pre-flight check, which opens what the JSONs name."""
    return quickstart_assets(tmp_path_factory.mktemp("preflight_assets"))


@pytest.mark.slow
def test_preflight_stops_a_bad_training_configuration_once_before_torchrun(launcher, tiny_assets, tmp_path):
    """The training script with the check on: each problem is printed once (not once per rank), the script
    exits 2, and neither torchrun nor its log file was started."""
    import json

    script = "examples/wan2.1/1.3b/t2v/pretrain_t2v.sh"
    tiny = dict(MM_PREFLIGHT="1", MM_MODEL=str(tiny_assets / "model.json"), MM_DATA=str(tiny_assets / "data.json"),
                RECOMPUTE_LAYERS="2")
    # 4 processes with TP 3: neither the world size nor the tiny DiT's 4 heads divide
    result, argv, _ = launcher(script, GPUS_PER_NODE="4", TP="3", GBS="1", **tiny)
    assert result.returncode == 2 and argv is None, result.stderr
    assert "fake torchrun ran" not in result.stdout and not (tmp_path / "logs").exists()
    for problem in ("pretrain_t2v.py: error: invalid configuration:",
                    "  - world size 4 is not divisible by --tensor-model-parallel-size (3) x",
                    "  - predictor.num_heads = 4 is not divisible by --tensor-model-parallel-size (3) x"):
        assert sum(line.startswith(problem) for line in result.stderr.splitlines()) == 1, result.stderr
    # a typo in the model JSON, named once
    model = json.loads((tiny_assets / "model.json").read_text())
    model["predictor"]["num_layer"] = 2
    (tmp_path / "typo.json").write_text(json.dumps(model))
    result, argv, _ = launcher(script, GPUS_PER_NODE="2", **dict(tiny, MM_MODEL=str(tmp_path / "typo.json")))
    assert result.returncode == 2 and argv is None and "fake torchrun ran" not in result.stdout
    assert result.stderr.count("predictor keys ['num_layer'] are not Wan DiT parameters") == 1, result.stderr
    # a data.txt that is not there: the entry point's file checks run too
    data = json.loads((tiny_assets / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "missing" / "data.txt")
    (tmp_path / "data.json").write_text(json.dumps(data))
    result, argv, _ = launcher(script, GPUS_PER_NODE="2", **dict(tiny, MM_DATA=str(tmp_path / "data.json")))
    assert result.returncode == 2 and argv is None and result.stderr.count(str(tmp_path / "missing")) == 1, \
        result.stderr


@pytest.mark.slow
def test_preflight_lets_a_good_configuration_reach_torchrun(launcher, tiny_assets, tmp_path):
    """The check sees the launch's world size (GPUS_PER_NODE x NNODES); a good configuration goes on to
    torchrun; MM_PREFLIGHT=0 skips the check."""
    tiny = dict(MM_PREFLIGHT="1", MM_MODEL=str(tiny_assets / "model.json"), MM_DATA=str(tiny_assets / "data.json"),
                RECOMPUTE_LAYERS="2")
    result, argv, _ = launcher("examples/wan2.1/1.3b/t2v/pretrain_t2v.sh", GPUS_PER_NODE="2", NNODES="2", CP="2",
                               **tiny)
    assert result.returncode == 0 and argv is not None, result.stderr
    assert "mm.preflight: pretrain_t2v.py: configuration valid for 4 process(es)" in result.stdout
    assert "CP=2 DP=2" in result.stdout and "fake torchrun ran" in result.stdout
    # inference: the quickstart's sampling JSON (its VAE and text encoder exist) and the checkpoint a training run
    # will write (the check does not open --load: the quickstart checks both runs before the first); then a
    # layout the world cannot hold
    inference = dict(MM_PREFLIGHT="1", MM_MODEL=str(tiny_assets / "inference_model.json"), CP_ALGO="megatron_cp_algo",
                     CFG_PARALLEL="0", LOAD_PATH=str(tmp_path / "ckpt"))
    (tmp_path / "argv").unlink()
    result, argv, _ = launcher("examples/wan2.1/1.3b/t2v/inference_t2v.sh", GPUS_PER_NODE="2", CP="2", **inference)
    assert result.returncode == 0 and argv is not None, result.stderr
    assert "mm.preflight: inference.py: configuration valid for 2 process(es)" in result.stdout
    (tmp_path / "argv").unlink()
    result, argv, _ = launcher("examples/wan2.1/1.3b/t2v/inference_t2v.sh", GPUS_PER_NODE="2", CP="4", **inference)
    assert result.returncode == 2 and argv is None and "fake torchrun ran" not in result.stdout
    assert result.stderr.count("inference.py: error:") == 1 and "world size 2" in result.stderr, result.stderr
    # skipped: the same bad layout reaches torchrun
    result, argv, _ = launcher("examples/wan2.1/1.3b/t2v/inference_t2v.sh", GPUS_PER_NODE="2", CP="4",
                               **dict(inference, MM_PREFLIGHT="0"))
    assert result.returncode == 0 and argv is not None and "mm.preflight" not in result.stdout


def test_feature_extraction_script_and_training_on_its_features(launcher, monkeypatch):
    """feature_extraction.sh launches extract_features.py with flags its real parser and validation take
    (mode "features"); its feature_data.json passes the training checks with the script's model JSON."""
    result, argv, _ = launcher("examples/wan2.1/1.3b/t2v/feature_extraction.sh", GPUS_PER_NODE="4",
                               SAVE_FEATURES="/data/features")
    assert result.returncode == 0, result.stderr
    own, entry, flags = _split(argv)
    assert (entry, own["--nproc_per_node"]) == ("extract_features.py", "4")
    monkeypatch.chdir(REPO)
    config = load_config(flags, world_size=4, mode="features")
    assert config.args.save_features == "/data/features" and config.data.dataset_type == "t2v"
    train = ["--mm-model", "examples/wan2.1/1.3b/t2v/pretrain_t2v_model.json", "--mm-data",
             "examples/wan2.1/1.3b/t2v/feature_data.json", "--micro-batch-size", "1", "--lr", "1e-5",
             "--train-iters", "10"]
    config = load_config(train, world_size=8, mode="train")
    assert config.data.features and config.data.data_path == "./sora_features/data.jsonl"
    from mm.training.pretrain import check_task

    check_task("t2v", config, files=False)


def test_lora_finetune_script_flags_pass_validation_and_resume_into_its_save_path(launcher, monkeypatch, tmp_path):
    script = "examples/wan2.1/1.3b/t2v/finetune_lora.sh"
    result, argv, _ = launcher(script, SAVE_PATH=str(tmp_path / "adapters"))
    assert result.returncode == 0, result.stderr
    own, entry, flags = _split(argv)
    assert (entry, own["--nproc_per_node"]) == ("pretrain_t2v.py", "8")
    config, arch = _validate(flags, world_size=8, monkeypatch=monkeypatch)
    args = config.args
    assert (args.lora_r, args.lora_alpha, args.load) == (16, 16.0, None)  # the base: predictor.from_pretrained
    assert args.lora_load == args.save == str(tmp_path / "adapters")  # a relaunch resumes the adapters
    assert args.recompute_granularity == "full" and args.recompute_num_layers == arch.num_layers
    from mm.families import family_for

    settings = family_for(config.model.predictor.model_id).lora_settings(args)
    # MindSpeed-MM's module names: q, k, v and output of both attentions and the FFN, as mm's linears and parts
    assert settings.targets == {"self_attention.linear_qkv": (0, 1, 2), "self_attention.linear_proj": (0,),
                                "cross_attention.linear_q": (0,), "cross_attention.linear_kv": (0, 1),
                                "cross_attention.linear_proj": (0,), "mlp.linear_fc1": (0,), "mlp.linear_fc2": (0,)}
    result, argv, _ = launcher(script, SAVE_PATH=str(tmp_path / "a"), LORA_R="0")
    assert argv is not None  # the fake torchrun records; mm's parser refuses the rank
    with pytest.raises(ConfigError, match="--lora-r: must be an integer >= 1, got 0"):
        parse_flags(_split(argv)[2])
